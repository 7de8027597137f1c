//! The self-checking workload on GPU ranks (`--device cuda`).
//!
//! Each rank's stage buffers are on its GPU (ranks round-robin over the
//! visible GPUs: attention rank `a` on GPU `a % G`, FFN rank `f` on
//! `(M + f) % G`). The data never passes through the host in a timed
//! layer. By default rows are written in place into the send slots
//! (`send_slot_device` + `dispatch_device_in_place`, `reply_slot_device` +
//! `respond_device_in_place`), as an engine's kernels would write their
//! outputs there: the rows of the checked layers are copied into the slots
//! from device buffers filled once at start, before the layer's clock
//! starts (the last layer, whose answers are written while the attention
//! rank's clock runs, is checked and not timed), and the timed layers
//! between post the slots as they are. With `--copy-rows` the ranks
//! dispatch and answer from those device buffers through the copying path
//! (`dispatch_device`, `respond_device`: one copy within the GPU per
//! message) in every layer. `--stream-ordered` produces each message's
//! rows on a stream of the rank's (into the slot, or into a scratch buffer
//! to copy from) right before the stream-ordered call in every layer. The
//! buffers are chosen by the layer's key (its parity; 2 for the last
//! layer), so a stale layer's bytes are caught. Every byte is checked, by
//! copying it back to the host, in the warm-up layers and in the last
//! layer; the timed layers between check token counts only.

use std::time::{Duration, Instant};

use afmesh::transport::Region;
use afmesh::{AttentionRank, FfnRank, Histogram, Role};
use anyhow::{Context, Result};

mod echo;
mod host_time;

use crate::workload::{mix, AttentionReport, FfnReport, Workload, SIDE_BYTES};
use echo::echo_target;
use host_time::{pct, switches, threads, wall_ns, Legs};

/// The GPU a rank's buffers go on.
pub fn device_of(role: Role, rank: u32, m: u32) -> Result<i32> {
    let g = afmesh::cuda::device_count().context("counting CUDA devices")?;
    if g <= 0 {
        anyhow::bail!("--device cuda: no CUDA device is visible");
    }
    let i = match role {
        Role::Attention => rank,
        Role::Ffn => m + rank,
    };
    Ok((i % g as u32) as i32)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(&mix(seed ^ i.wrapping_mul(0x9e37_79b9)).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn in_seed(parity: u32, s: u32, a: u32) -> u64 {
    mix(0x1_0000 ^ (u64::from(parity) << 40) ^ (u64::from(s) << 20) ^ u64::from(a))
}

fn out_seed(parity: u32, s: u32, a: u32, f: u32) -> u64 {
    mix(0x2_0000
        ^ (u64::from(parity) << 48)
        ^ (u64::from(s) << 32)
        ^ (u64::from(a) << 16)
        ^ u64::from(f))
}

fn device_buffer(device: i32, bytes: &[u8]) -> Result<Region> {
    let r = Region::alloc_device(device, bytes.len().max(1))?;
    r.write_gather(0, &[bytes])
        .map_err(|e| anyhow::anyhow!("filling a device buffer: {e}"))?;
    Ok(r)
}

/// With --stream-ordered, the "model" of a rank: a stream that produces
/// rows into `count` device scratch buffers of `bytes` each (at least 1).
fn producer(
    ordered: bool,
    device: i32,
    count: usize,
    bytes: usize,
) -> Result<Option<(afmesh::cuda::Stream, Vec<Region>)>> {
    if !ordered {
        return Ok(None);
    }
    let dev = afmesh::cuda::Device::get(device)?;
    let scratch = (0..count)
        .map(|_| Region::alloc_device(device, bytes.max(1)))
        .collect::<afmesh::Result<Vec<_>>>()?;
    Ok(Some((afmesh::cuda::Stream::new(&dev)?, scratch)))
}

fn side_of(layer: u32, s: u32, a: u32, count: u32) -> [u8; SIDE_BYTES as usize] {
    let mut b = [0u8; SIDE_BYTES as usize];
    b[0..4].copy_from_slice(&layer.to_le_bytes());
    b[4..8].copy_from_slice(&s.to_le_bytes());
    b[8..12].copy_from_slice(&a.to_le_bytes());
    b[12..16].copy_from_slice(&count.to_le_bytes());
    b
}

fn checked(w: &Workload, layer: u32) -> bool {
    layer < w.warmup || layer + 1 == w.layers()
}

/// Which of the three device buffers (per stage and peer) a layer's rows
/// come from: the parity, and a key of its own for the last layer, whose
/// bytes then differ from every earlier checked layer's.
fn key(w: &Workload, layer: u32) -> u32 {
    if layer + 1 == w.layers() {
        2
    } else {
        layer % 2
    }
}

/// Whether a layer's latency is recorded: after the warm-up, and with rows
/// in place and not stream-ordered, not the last layer (its rows are
/// copied into the slots for the check, the answers while the clock runs).
fn timed(w: &Workload, layer: u32, in_place: bool, ordered: bool) -> bool {
    layer >= w.warmup && !(in_place && !ordered && layer + 1 == w.layers())
}

const KEYS: u32 = 3;

pub fn run_attention(
    a: &mut AttentionRank,
    w: &Workload,
    ordered: bool,
    copy_rows: bool,
) -> Result<AttentionReport> {
    let in_place = !copy_rows;
    let afmesh::transport::MemoryKind::Cuda { device } = a.memory() else {
        anyhow::bail!("the rank's memory is not on a GPU");
    };
    let spec = a.spec();
    let me = a.rank();
    let n = a.ffn_ranks() as u32;
    let (row, out_row) = (spec.row_bytes as usize, spec.out_row_bytes as usize);
    let max = w.tokens as usize;
    let mut inputs = Vec::new();
    for k in 0..KEYS {
        for s in 0..w.stages {
            inputs.push(device_buffer(
                device,
                &pattern(in_seed(k, s, me), max * row),
            )?);
        }
    }
    let mut rep = AttentionReport {
        lat: Histogram::new(),
        errors: 0,
        first_error: None,
        ffn_us: 0.0,
        net_us: 0.0,
        timed_from: Default::default(),
    };
    let mut back = vec![0u8; max * out_row];
    // --stream-ordered: a stream of the "model" that produces each stage's
    // rows (here: copies them into scratch buffers) right before the
    // dispatch, which must wait for it. A dispatch that did not would send
    // the scratch's previous layer, which has the other parity.
    let producer = producer(ordered, device, w.stages as usize, max * row)?;
    // --stream-ordered also checks the stream-enqueued wait: after each
    // dispatch, a stream per stage waits for its combine
    // (`wait_combine_on`) and copies the partial slots into echo buffers,
    // which at checked layers must hold this layer's answers, not the
    // previous layer's (the other parity). The next dispatch of the stage
    // (after which its slots are written again) waits for the echo.
    let (echo, waiters) = if ordered {
        let dev = afmesh::cuda::Device::get(device)?;
        (
            (0..w.stages * n)
                .map(|_| Region::alloc_device(device, (max * out_row).max(1)))
                .collect::<afmesh::Result<Vec<_>>>()?,
            (0..w.stages)
                .map(|_| {
                    Ok((
                        afmesh::cuda::Stream::new(&dev)?,
                        afmesh::cuda::Event::new(&dev, false)?,
                    ))
                })
                .collect::<afmesh::Result<Vec<_>>>()?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut slots = vec![0u64; (w.stages * n) as usize];
    let mut handles = Vec::with_capacity(w.stages as usize);
    // Host time inside the dispatch calls, for the log (where a layer's
    // time goes).
    let mut host_ns = 0u128;
    let mut legs = Legs::default();
    let mut sw = ((0, 0), (0, 0));
    for layer in 0..w.layers() {
        handles.clear();
        if layer == w.warmup {
            sw.0 = switches();
            rep.timed_from = a.stats().spin_gaps;
        }
        let parity = key(w, layer);
        if in_place && !ordered && checked(w, layer) {
            // The rows the checks expect, into the slots before the clock
            // starts (the timed layers between send the slots as they are).
            for s in 0..w.stages {
                let n = w.count(layer, s, me) as usize * row;
                let dst = a
                    .send_slot_device(s)
                    .with_context(|| format!("A{me}: send slot of stage {s}"))?;
                let src = &inputs[(parity * w.stages + s) as usize];
                // SAFETY: the slot's rows (`max_tokens × row_bytes` bytes,
                // free: `send_slot_device` waited) and a live device
                // buffer of as many; a synchronous copy.
                unsafe { afmesh::cuda::copy(device, dst, src.addr(), n) }?;
            }
        }
        let t0 = Instant::now();
        for s in 0..w.stages {
            let count = w.count(layer, s, me);
            let src = &inputs[(parity * w.stages + s) as usize];
            let side = side_of(layer, s, me, count);
            let call = Instant::now();
            let h: Result<_> = match &producer {
                None if in_place => a
                    .dispatch_device_in_place(s, count as usize, &side)
                    .map_err(Into::into),
                None => a
                    .dispatch_device(s, src.addr(), count as usize, &side)
                    .map_err(Into::into),
                Some((stream, _)) if in_place => {
                    if layer > 1 {
                        // The slots' echo of the previous layer first.
                        let (w_stream, done) = &waiters[s as usize];
                        done.record(w_stream)?;
                        stream.wait(done)?;
                    }
                    // The "model" writes its rows straight into the slot
                    // on its stream; the dispatch must wait for that.
                    let dst = a.send_slot_device(s)?;
                    // SAFETY: the slot's rows are free (`send_slot_device`
                    // waited) until this stage's dispatch below, which is
                    // ordered after the copy; `src` is a live buffer.
                    unsafe { stream.copy_async(dst, src.addr(), count as usize * row) }?;
                    // SAFETY: `stream` is a live stream of this rank's
                    // device.
                    unsafe {
                        a.dispatch_device_in_place_on(s, count as usize, &side, stream.raw() as u64)
                    }
                    .map_err(anyhow::Error::from)
                }
                Some((stream, scratch)) => {
                    if layer > 1 {
                        // The slots' echo of the previous layer first.
                        let (w_stream, done) = &waiters[s as usize];
                        done.record(w_stream)?;
                        stream.wait(done)?;
                    }
                    let dst = &scratch[s as usize];
                    // SAFETY: both buffers are live device allocations of at
                    // least `count × row` bytes, kept for the whole run; the
                    // scratch's previous dispatch is complete (its combine
                    // was waited for), so nothing reads it while this runs.
                    unsafe { stream.copy_async(dst.addr(), src.addr(), count as usize * row) }
                        .map_err(anyhow::Error::from)
                        .and_then(|()| {
                            // SAFETY: `stream` is a live stream of this
                            // rank's device; `dst` stays allocated and
                            // unchanged until the next layer, after this
                            // dispatch's combine.
                            unsafe {
                                a.dispatch_device_on(
                                    s,
                                    dst.addr(),
                                    count as usize,
                                    &side,
                                    stream.raw() as u64,
                                )
                            }
                            .map_err(anyhow::Error::from)
                        })
                }
            };
            let h = h.with_context(|| format!("A{me}: dispatch layer {layer} stage {s}"))?;
            if timed(w, layer, in_place, ordered) {
                let ns = call.elapsed().as_nanos();
                host_ns += ns;
                legs.call.record(u64::try_from(ns).unwrap_or(u64::MAX));
            }
            if ordered && layer > 0 {
                let (w_stream, _) = &waiters[s as usize];
                // SAFETY: a live stream of this rank's device, synchronised
                // before the rank is dropped (on an error path the rank's
                // drop lets the wait go and keeps the flag's page mapped).
                unsafe { a.wait_combine_on(h, w_stream.raw() as u64) }
                    .with_context(|| format!("A{me}: wait_combine_on stage {s}"))?;
                let len = w.count(layer, s, me) as usize * out_row;
                for f in 0..n {
                    let k = (s * n + f) as usize;
                    // SAFETY: the slot lies in the rank's registered
                    // receive region, the echo is ours; the copy runs after
                    // the combine landed (the wait above) and before the
                    // stage's next dispatch (ordered after this stream).
                    unsafe { w_stream.copy_async(echo[k].addr(), slots[k], len) }?;
                }
            }
            handles.push(h);
        }
        a.wait_all(&handles, w.timeout)
            .with_context(|| format!("A{me}: combine of layer {layer}"))?;
        let dt = t0.elapsed();
        let done_ns = wall_ns();
        let timed_layer = timed(w, layer, in_place, ordered);
        if timed_layer {
            rep.lat
                .record(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        }
        for (s, h) in handles.iter().enumerate() {
            let s = s as u32;
            let c = a.wait_combine(*h, Duration::ZERO)?;
            if timed_layer {
                for t in (0..n as usize).filter_map(|f| c.trace(f)) {
                    legs.out.record(t.land_ns.saturating_sub(t.post_ns));
                    legs.ffn.record(t.respond_ns.saturating_sub(t.land_ns));
                    legs.back.record(t.back_ns.saturating_sub(t.respond_ns));
                    legs.wake.record(done_ns.saturating_sub(t.back_ns));
                }
            }
            let count = w.count(layer, s, me) as usize;
            let mut bad = |what: String| {
                rep.errors += 1;
                rep.first_error.get_or_insert(what);
            };
            if c.tokens() != count {
                bad(format!(
                    "layer {layer} stage {s}: {} tokens back, sent {count}",
                    c.tokens()
                ));
                continue;
            }
            for f in 0..n {
                slots[(s * n + f) as usize] = c.partial_addr(f as usize).unwrap_or(0);
            }
            if !checked(w, layer) {
                continue;
            }
            if ordered && layer > 0 {
                waiters[s as usize].0.synchronize()?;
                for f in 0..n {
                    let len = count * out_row;
                    echo[(s * n + f) as usize]
                        .copy_out(0, &mut back[..len])
                        .map_err(|e| anyhow::anyhow!("echo: {e}"))?;
                    if back[..len] != pattern(out_seed(parity, s, me, f), len)[..] {
                        bad(format!(
                            "layer {layer} stage {s} F{f}: the stream did not wait for the combine (wait_combine_on)"
                        ));
                    }
                }
            }
            for f in 0..n {
                let got = c.copy_partial(f as usize, &mut back)?;
                let want = pattern(out_seed(parity, s, me, f), count * out_row);
                if got != want.len() || back[..got] != want[..] {
                    bad(format!("layer {layer} stage {s} F{f}: wrong combine bytes"));
                }
            }
        }
    }
    sw.1 = switches();
    for (stream, _) in &waiters {
        stream.synchronize()?;
    }
    let timed = u128::from(w.layers().saturating_sub(w.warmup).max(1));
    eprintln!(
        "A{me}: host time in dispatch calls: {:.2} us per layer; per message, p50/p99 us: {}",
        host_ns as f64 / timed as f64 / 1e3,
        legs.line()
    );
    eprintln!(
        "A{me}: context switches in the timed layers: {} voluntary, {} involuntary; threads: {}",
        sw.1 .0.saturating_sub(sw.0 .0),
        sw.1 .1.saturating_sub(sw.0 .1),
        threads()
    );
    Ok(rep)
}

pub fn run_ffn(f: &mut FfnRank, w: &Workload, ordered: bool, copy_rows: bool) -> Result<FfnReport> {
    let in_place = !copy_rows;
    let afmesh::transport::MemoryKind::Cuda { device } = f.memory() else {
        anyhow::bail!("the rank's memory is not on a GPU");
    };
    let spec = f.spec();
    let me = f.rank();
    let m = f.attention_ranks();
    let (row, out_row) = (spec.row_bytes as usize, spec.out_row_bytes as usize);
    let max = w.tokens as usize;
    // Per (parity, stage, attention rank): this rank's answer rows.
    let mut outs = Vec::new();
    for parity in 0..KEYS {
        for s in 0..w.stages {
            for a in 0..m as u32 {
                outs.push(device_buffer(
                    device,
                    &pattern(out_seed(parity, s, a, me), max * out_row),
                )?);
            }
        }
    }
    let mut rep = FfnReport {
        batches: 0,
        errors: 0,
        first_error: None,
        timed_from: Default::default(),
    };
    // --stream-ordered: answers are produced into scratch buffers on a
    // stream of this rank's right before the respond, which must wait for
    // it (a respond that did not would send the other parity's bytes).
    let producer = producer(ordered, device, w.stages as usize * m, max * out_row)?;
    // --stream-ordered also checks the stream-enqueued wait: after each
    // respond, a stage's stream waits for that stage's next batch
    // (`wait_batch_on`, which one: `echo_target`) and copies its input
    // slots into echo buffers; at
    // checked layers the echo must hold that batch's rows, not the
    // previous layer's (the other parity), which it would if the stream
    // had not waited for the data to land.
    // The echo runs on a stream per stage (a stage's wait must not hold up
    // the answers of the others), and each respond is ordered after its
    // stage's echo by an event, so the slot is read before it is answered
    // (and so written again).
    let (echo, waiters) = if ordered {
        let dev = afmesh::cuda::Device::get(device)?;
        (
            (0..w.stages as usize * m)
                .map(|_| Region::alloc_device(device, (max * row).max(1)))
                .collect::<afmesh::Result<Vec<_>>>()?,
            (0..w.stages)
                .map(|_| {
                    Ok((
                        afmesh::cuda::Stream::new(&dev)?,
                        afmesh::cuda::Event::new(&dev, false)?,
                    ))
                })
                .collect::<afmesh::Result<Vec<_>>>()?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let few_queues = afmesh::cuda::few_hardware_queues();
    let mut slots = vec![0u64; w.stages as usize * m];
    // Per stage, the layer whose batch the stream's echo waits for.
    let mut echoed: Vec<Option<u32>> = vec![None; w.stages as usize];
    let mut layer_of = vec![0u32; w.stages as usize];
    let mut input = vec![0u8; max * row];
    let mut side = [0u8; SIDE_BYTES as usize];
    let mut ptrs = vec![0u64; m];
    let total = u64::from(w.layers()) * u64::from(w.stages);
    // Host time inside the respond calls, for the log.
    let mut host_ns = 0u128;
    let mut calls = Histogram::new();
    let mut sw = ((0, 0), (0, 0));
    while rep.batches < total {
        if rep.batches == w.timed_batches_from() {
            rep.timed_from = f.stats().spin_gaps;
        }
        let b = f
            .get_batch(w.timeout)
            .with_context(|| format!("F{me}: get_batch {}", rep.batches))?;
        let s = b.stage();
        let layer = layer_of[s as usize];
        layer_of[s as usize] += 1;
        if layer == w.warmup && s == 0 {
            sw.0 = switches();
        }
        let parity = key(w, layer);
        let mut bad = |what: String| {
            rep.errors += 1;
            rep.first_error.get_or_insert(what);
        };
        if let (Some((stream, _)), true) = (&producer, echoed[s as usize].take() == Some(layer)) {
            // The answer (on `stream`) waits for the echo of its slots.
            let (echo_stream, done) = &waiters[s as usize];
            done.record(echo_stream)?;
            stream.wait(done)?;
            if checked(w, layer) {
                echo_stream.synchronize()?;
                for a in 0..m {
                    let n = w.count(layer, s, a as u32) as usize * row;
                    echo[s as usize * m + a]
                        .copy_out(0, &mut input[..n])
                        .map_err(|e| anyhow::anyhow!("echo: {e}"))?;
                    if input[..n] != pattern(in_seed(parity, s, a as u32), n)[..] {
                        bad(format!(
                            "layer {layer} stage {s} A{a}: the stream did not wait for the batch (wait_batch_on)"
                        ));
                    }
                }
            }
        }
        for a in 0..m {
            slots[s as usize * m + a] = b.tokens_addr(a).unwrap_or(0);
        }
        for a in 0..m {
            let count = b.token_count(a);
            if count != w.count(layer, s, a as u32) as usize {
                bad(format!("layer {layer} stage {s} A{a}: {count} tokens"));
            }
            if checked(w, layer) {
                let n = b.copy_side(a, &mut side)?;
                if n != side.len() || side != side_of(layer, s, a as u32, count as u32) {
                    bad(format!("layer {layer} stage {s} A{a}: wrong side block"));
                }
                let got = b.copy_tokens(a, &mut input)?;
                let want = pattern(in_seed(parity, s, a as u32), count * row);
                if got != want.len() || input[..got] != want[..] {
                    bad(format!("layer {layer} stage {s} A{a}: wrong input bytes"));
                }
            }
            ptrs[a] = outs[((parity * w.stages + s) as usize) * m + a].addr();
        }
        if in_place && !ordered && checked(w, layer) {
            // The answers the checks expect, into the reply slots (the
            // timed layers between answer with the slots as they are).
            for (a, &p) in ptrs.iter().enumerate() {
                let n = b.token_count(a) * out_row;
                let dst = f
                    .reply_slot_device(&b, a)
                    .with_context(|| format!("F{me}: reply slot of A{a}"))?;
                // SAFETY: the reply slot's rows for `a` (free:
                // `reply_slot_device` waited) and a live device buffer of
                // at least `n` bytes; a synchronous copy.
                unsafe { afmesh::cuda::copy(device, dst, p, n) }?;
            }
        }
        let call = Instant::now();
        let answered = match &producer {
            None if in_place => f.respond_device_in_place(b).map_err(afmesh::Error::from),
            None => f.respond_device(b, &ptrs).map_err(afmesh::Error::from),
            Some((stream, _)) if in_place => {
                // The answers are written straight into the reply slots
                // on the rank's stream; the respond must wait for that.
                let mut r = Ok(());
                for (a, &p) in ptrs.iter().enumerate() {
                    let n = b.token_count(a) * out_row;
                    r = f.reply_slot_device(&b, a).and_then(|dst| {
                        // SAFETY: the reply slot is free until the respond
                        // below, which is ordered after this copy; `p` is a
                        // live buffer of at least `n` bytes.
                        unsafe { stream.copy_async(dst, p, n) }
                    });
                    if r.is_err() {
                        break;
                    }
                }
                match r {
                    // SAFETY: `stream` is a live stream of this rank's
                    // device.
                    Ok(()) => unsafe { f.respond_device_in_place_on(b, stream.raw() as u64) }
                        .map_err(afmesh::Error::from),
                    Err(e) => Err(e),
                }
            }
            Some((stream, scratch)) => {
                for (a, p) in ptrs.iter_mut().enumerate() {
                    let n = w.count(layer, s, a as u32) as usize * out_row;
                    let scratch = &scratch[s as usize * m..];
                    // SAFETY: live device buffers of at least `n` bytes,
                    // kept for the run; this (stage, sender)'s scratch held
                    // the stage's previous answer, which left before this
                    // batch could come (the attention rank combined it
                    // first).
                    unsafe { stream.copy_async(scratch[a].addr(), *p, n) }?;
                    *p = scratch[a].addr();
                }
                // SAFETY: `stream` is a live stream of this rank's device;
                // the scratch stays allocated and is rewritten only for a
                // later batch.
                unsafe { f.respond_device_on(b, &ptrs, stream.raw() as u64) }
                    .map_err(afmesh::Error::from)
            }
        };
        answered.with_context(|| format!("F{me}: respond stage {s}"))?;
        if timed(w, layer, in_place, ordered) {
            let ns = call.elapsed().as_nanos();
            host_ns += ns;
            calls.record(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        // The batch the echo checks next, and where its stream waits for it.
        let target = echo_target(s, w.stages, &layer_of, w.layers(), few_queues);
        let known = |next: u32| {
            slots[next as usize * m..(next as usize + 1) * m]
                .iter()
                .all(|&p| p != 0)
        };
        if let (Some(_), Some((next, next_layer))) = (&producer, target.filter(|t| known(t.0))) {
            let (stream, _) = &waiters[next as usize];
            // SAFETY: a live stream of this rank's device; the rank
            // outlives the wait: the stream is synchronised below before
            // the rank is dropped, and on an error path the rank's drop
            // lets the wait go and keeps the flag's page mapped.
            unsafe { f.wait_batch_on(next, stream.raw() as u64) }
                .with_context(|| format!("F{me}: wait_batch_on stage {next}"))?;
            for a in 0..m {
                let n = w.count(next_layer, next, a as u32) as usize * row;
                // SAFETY: the slot lies in the rank's registered receive
                // region and the echo is ours; the copy runs after the
                // stage's next batch landed (the wait above) and before
                // this rank answers it (its respond is ordered after this
                // stream), so no writer touches the slot meanwhile.
                unsafe {
                    stream.copy_async(
                        echo[next as usize * m + a].addr(),
                        slots[next as usize * m + a],
                        n,
                    )
                }?;
            }
            echoed[next as usize] = Some(next_layer);
        }
        rep.batches += 1;
    }
    if let Some((stream, _)) = &producer {
        stream.synchronize()?;
    }
    for (stream, _) in &waiters {
        stream.synchronize()?;
    }
    sw.1 = switches();
    let timed = u128::from(w.layers().saturating_sub(w.warmup).max(1));
    eprintln!(
        "F{me}: host time in respond calls: {:.2} us per layer; per call, p50/p99 us: {}",
        host_ns as f64 / timed as f64 / 1e3,
        pct("respond", &calls)
    );
    eprintln!(
        "F{me}: context switches in the timed layers: {} voluntary, {} involuntary; threads: {}",
        sw.1 .0.saturating_sub(sw.0 .0),
        sw.1 .1.saturating_sub(sw.0 .1),
        threads()
    );
    Ok(rep)
}
