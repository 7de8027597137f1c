//! Would "copies armed ahead" pay, and are they safe? A probe for the
//! GPU machine (two GPUs with peer access; with one, the hops copy within
//! it), not a test: CI never runs it
//! (it needs CUDA; without it, it says so and exits 1).
//!
//! `cargo build --release --example cuda_armed_probe`, then there:
//! `cuda_armed_probe [iterations | hazard]` as it is, and `cuda_armed_probe
//! hazard` with `CUDA_DEVICE_MAX_CONNECTIONS=1` (Megatron-style engines set
//! that; the full run there stalls every GPU-released hop for its 2 s bound).
//!
//! 1. One hop, GPU 0 → GPU 1 (or within GPU 0) (the reference stage's 917,504 B and 8 B),
//!    the time from the start of the post to the host seeing the copy's
//!    completion word, p50/p99/p99.9, and the post's own host time, for:
//!    * `today`: what a post does now: an event recorded on the (blocking)
//!      fill stream, the link stream waiting on it, the copy, the
//!      completion word stored behind it (`cuStreamWriteValue32`);
//!    * `armed-host`: the wait on a `go` word in pinned host memory, the
//!      copy and the store enqueued ahead; the post is one host store;
//!    * `armed-gpu`: the same, `go` released by `cuStreamWriteValue32` on
//!      the fill stream (one driver call; what ordering after the caller's
//!      work on that stream would take);
//!    * `armed-gate`: the same, `go` stored by the host once an event
//!      recorded on the fill stream has completed (ordering kept by the
//!      host: two calls, `cuEventRecord` and `cuEventQuery`);
//!    * `copy-only`: the copy and the word, no event pair.
//!
//!    Before each post the host sits idle for as long as a round trip
//!    takes (the armed work is in place and the GPU waits on `go`).
//! 2. `cuCtxGetCurrent` against `cuCtxSetCurrent` (what `Device::bind`
//!    now does before skipping the set).
//! 3. The hazard NVIDIA documents for stream memory operations ("ordering
//!    established through this API is not visible to CUDA ... the
//!    scheduler may serialize them in an improper order"): with one
//!    stream parked on a wait, does work on 16 other streams run? And does
//!    a `go` released by another stream's `cuStreamWriteValue32` ever
//!    reach a stream that waits on it?

use std::time::{Duration, Instant};

use afmesh::cuda::{
    self, wait_value_geq, write_value32_on, Device, DeviceMemory, Event, HostFlag, Stream,
};

type R<T> = afmesh::Result<T>;

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn spin_until(f: &HostFlag, v: u32, limit: Duration) -> Option<Instant> {
    let t = Instant::now();
    loop {
        if f.get().wrapping_sub(v) as i32 >= 0 {
            return Some(Instant::now());
        }
        if t.elapsed() > limit {
            return None;
        }
        std::hint::spin_loop();
    }
}

fn idle(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Way {
    Today,
    ArmedHost,
    ArmedGpu,
    ArmedGate,
    CopyOnly,
}

struct Rig {
    fill: Stream,
    link: Stream,
    ev: Event,
    go: HostFlag,
    done: HostFlag,
    seq: u32,
}

impl Rig {
    /// One hop; returns (post host µs, post → seen µs, arm host µs).
    fn hop(&mut self, way: Way, dst: u64, src: u64, n: usize) -> R<(f64, f64, f64)> {
        self.seq = self.seq.wrapping_add(1);
        let s = self.seq;
        let mut arm = 0.0;
        if matches!(way, Way::ArmedHost | Way::ArmedGpu | Way::ArmedGate) {
            let t = Instant::now();
            // SAFETY: the flags and buffers outlive every enqueued op (the
            // rig synchronises its streams before dropping them).
            let armed = unsafe {
                wait_value_geq(self.link.raw(), self.go.device_addr(), s)
                    .and_then(|()| self.link.copy_async(dst, src, n))
                    .and_then(|()| write_value32_on(self.link.raw(), self.done.device_addr(), s))
            };
            if let Err(e) = armed {
                // A wait may be enqueued: let it go, or the link stream's
                // synchronisation would never return.
                self.go.set(s);
                return Err(e);
            }
            arm = t.elapsed().as_secs_f64() * 1e6;
        }
        // The rank waits for the round trip: the armed work is in place.
        idle(Duration::from_micros(25));
        let t0 = Instant::now();
        // SAFETY: as above.
        unsafe {
            match way {
                Way::Today => {
                    self.ev.record_raw(self.fill.raw())?;
                    self.link.wait(&self.ev)?;
                    self.link.copy_async(dst, src, n)?;
                    write_value32_on(self.link.raw(), self.done.device_addr(), s)?;
                }
                Way::CopyOnly => {
                    self.link.copy_async(dst, src, n)?;
                    write_value32_on(self.link.raw(), self.done.device_addr(), s)?;
                }
                Way::ArmedHost => self.go.set(s),
                Way::ArmedGpu => write_value32_on(self.fill.raw(), self.go.device_addr(), s)?,
                Way::ArmedGate => {
                    // Ordered after the fill stream (and the legacy one)
                    // by the host: an event there, polled until done.
                    self.ev.record_raw(self.fill.raw())?;
                    let t = Instant::now();
                    while !self.ev.done()? {
                        if t.elapsed() > Duration::from_secs(2) {
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    self.go.set(s);
                }
            }
        }
        let posted = t0.elapsed().as_secs_f64() * 1e6;
        let Some(seen) = spin_until(&self.done, s, Duration::from_secs(2)) else {
            // Unstick whatever waits, then report.
            self.go.set(s);
            return Err(afmesh::Error::Unsupported(format!(
                "{way:?}: hop {s} never completed"
            )));
        };
        Ok((posted, (seen - t0).as_secs_f64() * 1e6, arm))
    }
}

fn hops(iters: usize) -> R<()> {
    let peer = i32::from(cuda::device_count()? > 1);
    println!(
        "hops: GPU 0 -> GPU {peer}{}",
        if peer == 0 {
            " (one GPU visible: a copy within it)"
        } else {
            ""
        }
    );
    let d0 = Device::get(0)?;
    let d1 = Device::get(peer)?;
    d0.enable_peer(&d1)?;
    let dst = DeviceMemory::alloc(peer, 4 << 20)?;
    let src = DeviceMemory::alloc(0, 4 << 20)?;
    d0.bind()?;
    let mut rig = Rig {
        fill: Stream::blocking(&d0)?,
        link: Stream::new(&d0)?,
        ev: Event::new(&d0, false)?,
        go: HostFlag::new(&d0)?,
        done: HostFlag::new(&d0)?,
        seq: 0,
    };
    let ways = [
        Way::Today,
        Way::ArmedHost,
        Way::ArmedGpu,
        Way::ArmedGate,
        Way::CopyOnly,
    ];
    for n in [917_504usize, 8] {
        let mut res: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); ways.len()];
        // Warm up, then alternate blocks of 50 so drift hits all alike.
        for w in ways {
            for _ in 0..50 {
                if let Err(e) = rig.hop(w, dst.ptr(), src.ptr(), n) {
                    eprintln!("warm-up: {e}");
                    rig.link.synchronize()?;
                    break;
                }
            }
        }
        let mut stuck = [0usize; 5];
        let mut left = iters;
        while left > 0 {
            let k = left.min(50);
            for (i, w) in ways.iter().enumerate() {
                for _ in 0..k {
                    match rig.hop(*w, dst.ptr(), src.ptr(), n) {
                        Ok((p, l, a)) => {
                            res[i].0.push(p);
                            res[i].1.push(l);
                            res[i].2.push(a);
                        }
                        Err(e) => {
                            stuck[i] += 1;
                            eprintln!("{e}");
                            rig.link.synchronize()?;
                            break;
                        }
                    }
                }
            }
            left -= k;
        }
        for (i, w) in ways.iter().enumerate() {
            if stuck[i] > 0 {
                println!(
                    "hop {n:>7} B {w:?}: {} hops never completed (released by the host after 2 s)",
                    stuck[i]
                );
            }
            let (p, l, a) = &mut res[i];
            if l.is_empty() {
                continue;
            }
            println!(
                "hop {n:>7} B {:<11} post->seen p50 {:6.2} p99 {:6.2} p99.9 {:6.2} us (p99/p50 {:.2}) | post call p50 {:5.2} p99 {:5.2} | arm p50 {:5.2} p99 {:5.2}",
                format!("{w:?}"),
                pct(l, 0.5),
                pct(l, 0.99),
                pct(l, 0.999),
                pct(l, 0.99) / pct(l, 0.5),
                pct(p, 0.5),
                pct(p, 0.99),
                pct(a, 0.5),
                pct(a, 0.99),
            );
        }
    }
    rig.link.synchronize()?;
    rig.fill.synchronize()?;
    Ok(())
}

fn ctx_calls(iters: usize) -> R<()> {
    let d0 = Device::get(0)?;
    let drv = cuda::driver()?;
    let mut cur: cuda::driver::CuContext = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    unsafe { (drv.ctx_get_current)(&mut cur) };
    let mut get = Vec::with_capacity(iters);
    let mut set = Vec::with_capacity(iters);
    let mut bind = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { (drv.ctx_get_current)(&mut cur) };
        get.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        // SAFETY: the primary context current now (a retained one).
        unsafe { (drv.ctx_set_current)(cur) };
        set.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        d0.bind()?;
        bind.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for (name, v) in [
        ("cuCtxGetCurrent", &mut get),
        ("cuCtxSetCurrent", &mut set),
        ("Device::bind (get, skip set)", &mut bind),
    ] {
        println!(
            "{name:<30} p50 {:5.3} p99 {:5.3} p99.9 {:5.3} us",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.999)
        );
    }
    Ok(())
}

fn hazard() -> R<()> {
    let d0 = Device::get(0)?;
    let conn = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").unwrap_or_else(|_| "unset (8)".into());
    // (a) One stream parked on a host word; a store on each of 16 other
    // streams: which run while it is parked?
    let gate = HostFlag::new(&d0)?;
    let parked = Stream::new(&d0)?;
    // SAFETY: `gate` outlives the wait (released and synchronised below).
    unsafe { wait_value_geq(parked.raw(), gate.device_addr(), 1)? };
    let mut others = Vec::new();
    for _ in 0..16 {
        let s = Stream::new(&d0)?;
        let f = HostFlag::new(&d0)?;
        // SAFETY: `f` outlives the store (synchronised below).
        unsafe { write_value32_on(s.raw(), f.device_addr(), 1)? };
        others.push((s, f));
    }
    // A fixed window, not a wait: the question is which stores run while
    // the stream stays parked, and a store that never runs (the hazard
    // under one hardware queue) has no completion to wait for.
    std::thread::sleep(Duration::from_millis(50));
    let ran = others.iter().filter(|(_, f)| f.get() == 1).count();
    gate.set(1);
    parked.synchronize()?;
    for (s, _) in &others {
        s.synchronize()?;
    }
    let after = others.iter().filter(|(_, f)| f.get() == 1).count();
    println!(
        "hazard (CUDA_DEVICE_MAX_CONNECTIONS={conn}): one stream parked on a host word: {ran} of 16 other streams' stores ran within 50 ms ({after} after it was released)"
    );
    // (b) A stream waits on `go`; another stream stores `go`. Does the
    // waiter ever pass?
    let go = HostFlag::new(&d0)?;
    let done = HostFlag::new(&d0)?;
    let waiter = Stream::new(&d0)?;
    let releaser = Stream::blocking(&d0)?;
    // SAFETY: the flags outlive both streams' work (synchronised below).
    unsafe {
        wait_value_geq(waiter.raw(), go.device_addr(), 7)?;
        write_value32_on(waiter.raw(), done.device_addr(), 7)?;
        write_value32_on(releaser.raw(), go.device_addr(), 7)?;
    }
    let passed = spin_until(&done, 7, Duration::from_millis(200)).is_some();
    if !passed {
        go.set(7);
    }
    waiter.synchronize()?;
    releaser.synchronize()?;
    println!(
        "hazard (CUDA_DEVICE_MAX_CONNECTIONS={conn}): go released by another stream's cuStreamWriteValue32: {}",
        if passed { "the waiter passed" } else { "DEADLOCK (the waiter never passed in 200 ms; the host released it)" }
    );
    // (c) The same with 16 releasers in turn (streams map onto the
    // hardware queues in turn).
    let mut dead = 0;
    for k in 0..16u32 {
        let v = 100 + k;
        let waiter = Stream::new(&d0)?;
        let releaser = Stream::blocking(&d0)?;
        // SAFETY: as above.
        unsafe {
            wait_value_geq(waiter.raw(), go.device_addr(), v)?;
            write_value32_on(waiter.raw(), done.device_addr(), v)?;
            write_value32_on(releaser.raw(), go.device_addr(), v)?;
        }
        if spin_until(&done, v, Duration::from_millis(100)).is_none() {
            dead += 1;
            go.set(v);
        }
        waiter.synchronize()?;
        releaser.synchronize()?;
    }
    println!("hazard (CUDA_DEVICE_MAX_CONNECTIONS={conn}): {dead} of 16 fresh waiter/releaser pairs deadlocked");
    Ok(())
}

fn main() {
    let arg = std::env::args().nth(1);
    let only_hazard = arg.as_deref() == Some("hazard");
    let iters = match arg.as_deref() {
        None | Some("hazard") => 2000,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!(
                    "cuda_armed_probe: {v:?}: expected a positive iteration count or `hazard`"
                );
                std::process::exit(2);
            }
        },
    };
    let run = || -> R<()> {
        hazard()?;
        if only_hazard {
            return Ok(());
        }
        ctx_calls(iters)?;
        hops(iters)
    };
    if let Err(e) = run() {
        eprintln!("cuda_armed_probe: {e}");
        std::process::exit(1);
    }
}
