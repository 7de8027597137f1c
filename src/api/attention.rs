//! The attention side: dispatch token blocks to every FFN rank, wait for
//! their combines.

use std::sync::Arc;
use std::time::Duration;

use super::layout::Layout;
use super::reduce::{sum_into, Dtype};
use super::stream_wait::{self, StageFlags};
use crate::engine::{now_ns, Engine, RankStats, Sink};
use crate::error::{Error, Result};
use crate::proto::{Accepted, AttentionStages, Header, Imm, Kind, StageLayout, HEADER_LEN};
use crate::transport::slots::SlotRef;
use crate::transport::MemoryKind;
use crate::transport::Region;

mod combined;
mod in_place;
pub use combined::Combined;

/// A dispatch within this long of a wait's last poll does not poll again
/// before committing.
const FRESH_POLL: Duration = Duration::from_micros(200);

/// Where a dispatch's side block is when the header is stamped.
#[derive(Clone, Copy)]
enum Side<'a> {
    /// Already in the slot (built in place), this many bytes.
    InPlace(usize),
    /// To be copied in with the header.
    Copy(&'a [u8]),
}

/// A dispatch in flight; redeem it with [`AttentionRank::wait_combine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a dispatch must be waited for before its stage can be used again"]
pub struct DispatchHandle {
    stage: u32,
    seq: u32,
}

impl DispatchHandle {
    /// Rebuilds a handle from its parts (as the C ABI passes it around).
    /// A handle that does not name a dispatch in flight is refused by
    /// `wait_combine`.
    pub fn from_parts(stage: u32, sequence: u32) -> DispatchHandle {
        DispatchHandle {
            stage,
            seq: sequence,
        }
    }

    /// The stage dispatched.
    pub fn stage(&self) -> u32 {
        self.stage
    }
    /// The stage's sequence number for this dispatch.
    pub fn sequence(&self) -> u32 {
        self.seq
    }
}

/// Trace stamps of one combine (wall clock, ns): when the dispatch was
/// posted, landed on the FFN, was handed to the FFN's caller, was answered,
/// and when the answer was seen here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trace {
    /// Dispatch posted (attention clock).
    pub post_ns: u64,
    /// Dispatch landed (FFN clock).
    pub land_ns: u64,
    /// Batch handed to the FFN's caller (FFN clock).
    pub process_ns: u64,
    /// Combine posted (FFN clock).
    pub respond_ns: u64,
    /// Combine seen by the attention rank (attention clock).
    pub back_ns: u64,
}

impl Trace {
    /// Time on the wire both ways (needs synchronized clocks across hosts).
    pub fn network_ns(&self) -> u64 {
        self.land_ns.saturating_sub(self.post_ns) + self.back_ns.saturating_sub(self.respond_ns)
    }
    /// Time inside the FFN rank, landing to response.
    pub fn ffn_ns(&self) -> u64 {
        self.respond_ns.saturating_sub(self.land_ns)
    }
}

/// An attention rank of a mesh: a face over the [`Engine`].
#[derive(Debug)]
pub struct AttentionRank {
    engine: Engine,
    st: State,
}

/// What only the attention role keeps: its stage machine and the trace
/// stamps of each combine.
#[derive(Debug)]
struct State {
    layout: Layout,
    rank: u32,
    stages: AttentionStages,
    /// Per (stage, FFN rank): the last combine's stamps.
    traces: Vec<Trace>,
    /// Per stage: when its dispatch was posted.
    post_ns: Vec<u64>,
    /// Per stage: the latest and the second-latest combine arrival of the
    /// current dispatch, to name the straggler when the stage completes.
    arrivals: Vec<Arrivals>,
    /// The straggler of the stage the last arrival completed, for the
    /// engine's stats.
    straggler: Option<(usize, u64)>,
    /// Flags streams wait on ([`AttentionRank::wait_combine_on`]); made on
    /// first use.
    flags: Option<StageFlags>,
}

/// The two latest combine arrivals of a stage's dispatch.
#[derive(Debug, Clone, Copy, Default)]
struct Arrivals {
    /// The latest: when, and from which FFN rank.
    last: Option<(u64, usize)>,
    /// The one before it.
    before: Option<u64>,
}

impl Arrivals {
    fn note(&mut self, at: u64, f: usize) {
        match self.last {
            Some((t, _)) if at < t => self.before = Some(self.before.map_or(at, |b| b.max(at))),
            _ => {
                self.before = self.last.map(|(t, _)| t);
                self.last = Some((at, f));
            }
        }
    }
}

impl State {
    /// Gives up a dispatch whose combine can never complete; streams
    /// waiting for it are let go.
    fn abandon(&mut self, s: usize) {
        self.stages.abandon(s);
        if let (Some(f), Some(q)) = (&self.flags, self.stages.combined_through(s)) {
            f.raise(s, q);
        }
    }
}

impl Sink for State {
    type Counter = AttentionStages;
    fn counter(&mut self) -> &mut AttentionStages {
        &mut self.stages
    }
    fn accepted(&mut self, f: usize, a: &Accepted, at_ns: u64) -> Option<u64> {
        let s = a.stage;
        let post_ns = self.post_ns[s];
        self.traces[s * self.layout.n + f] = Trace {
            post_ns,
            land_ns: a.header.land_ns,
            process_ns: a.header.process_ns,
            respond_ns: a.header.respond_ns,
            back_ns: at_ns,
        };
        // The last FFN rank to answer held the stage up by the time since
        // the one before it.
        let arrivals = &mut self.arrivals[s];
        arrivals.note(at_ns, f);
        if a.complete {
            if let (Some((last, who)), Some(before)) = (arrivals.last, arrivals.before) {
                self.straggler = Some((who, last.saturating_sub(before)));
            }
            *arrivals = Arrivals::default();
        }
        if let (true, Some(f)) = (a.complete, &self.flags) {
            f.raise(s, a.header.sequence.wrapping_add(1));
        }
        Some(at_ns.saturating_sub(post_ns))
    }
    fn take_straggler(&mut self) -> Option<(usize, u64)> {
        self.straggler.take()
    }
}

impl AttentionRank {
    pub(crate) fn new(mut engine: Engine, layout: Layout, rank: u32) -> Self {
        // Header and side area: what mirrored peers read on the host.
        engine.set_prefix(layout.rows_at());
        let s = layout.stages();
        AttentionRank {
            engine,
            st: State {
                stages: AttentionStages::new(s, layout.n),
                traces: vec![Trace::default(); s * layout.n],
                post_ns: vec![0; s],
                arrivals: vec![Arrivals::default(); s],
                straggler: None,
                flags: None,
                layout,
                rank,
            },
        }
    }

    /// This rank's index among the attention ranks.
    pub fn rank(&self) -> u32 {
        self.st.rank
    }
    /// Number of attention ranks (M).
    pub fn attention_ranks(&self) -> usize {
        self.st.layout.m
    }
    /// Number of FFN ranks (N).
    pub fn ffn_ranks(&self) -> usize {
        self.st.layout.n
    }
    /// The stage geometry.
    pub fn spec(&self) -> super::StageSpec {
        self.st.layout.spec
    }

    /// Sends `tokens` (whole rows of `row_bytes`) and `side` to every FFN
    /// rank for `stage`: copies them into the stage's send slot and posts
    /// it. The buffers may be reused at once. [`AttentionRank::dispatch_with`]
    /// builds the message in place instead.
    pub fn dispatch(&mut self, stage: u32, tokens: &[u8], side: &[u8]) -> Result<DispatchHandle> {
        let spec = self.st.layout.spec;
        let row = spec.row_bytes as usize;
        let count = tokens.len().checked_div(row).unwrap_or(0);
        if row == 0 && !tokens.is_empty() || row != 0 && !tokens.len().is_multiple_of(row) {
            return Err(Error::BufferSize {
                what: format!("dispatch tokens: not a whole number of {row}-byte rows"),
                need: count.saturating_add(1) * row,
                got: tokens.len(),
            });
        }
        if side.len() > spec.side_bytes as usize {
            return Err(Error::BufferSize {
                what: "dispatch side block exceeds side_bytes".into(),
                need: side.len(),
                got: spec.side_bytes as usize,
            });
        }
        let h = if self.engine.send_kind() == MemoryKind::Host {
            self.dispatch_with(stage, count, |rows, area| {
                rows.copy_from_slice(tokens);
                area[..side.len()].copy_from_slice(side);
                side.len()
            })?
        } else {
            // Device send slots: the rows go through one host-to-device copy.
            let rows_at = self.st.layout.rows_at();
            let s = self.begin(stage, count)?;
            self.engine.write_slot(s, rows_at, tokens)?;
            self.finish(stage, count, Side::Copy(side))?
        };
        for f in 0..self.st.layout.n {
            self.engine.count_copied(f, tokens.len() + side.len());
        }
        Ok(h)
    }

    /// Sends `tokens` rows to every FFN rank for `stage`, built in place:
    /// `fill(rows, side_area)` writes the rows (`tokens × row_bytes` bytes)
    /// and the side block at the start of the side area (`side_bytes`
    /// bytes) straight into the registered send slot, and returns the side
    /// block's length. No copy is made; the message leaves in one write (two
    /// under the matrix layout: the rows, then the head).
    /// The slot is the stage's own and keeps its bytes between dispatches
    /// of the stage, so `fill` may rewrite only what changed.
    ///
    /// Checked before `fill` runs: the stage exists and is idle, `tokens`
    /// is at most `max_tokens`, no FFN rank is lost. A side length over
    /// `side_bytes` is refused after `fill` (`InvalidArgument`); nothing is
    /// sent then and the stage stays idle.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use afmesh::{sim_mesh, transport::sim::SimNetwork, StageSpec};
    /// # let net = SimNetwork::new(1);
    /// # let spec = StageSpec { stages: 1, max_tokens: 4, row_bytes: 8, out_row_bytes: 8, side_bytes: 8 };
    /// # let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec)?;
    /// let h = attn[0].dispatch_with(0, 2, |rows, side| {
    ///     rows.fill(3); // 2 rows of 8 bytes, written in place
    ///     side[..2].copy_from_slice(&[1, 2]);
    ///     2
    /// })?;
    /// # net.deliver_all();
    /// # let b = ffn[0].get_batch(Duration::from_secs(1))?;
    /// # assert_eq!((b.tokens(0), b.side(0)), (&[3u8; 16][..], &[1u8, 2][..]));
    /// # Ok::<(), afmesh::Error>(())
    /// ```
    pub fn dispatch_with(
        &mut self,
        stage: u32,
        tokens: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]) -> usize,
    ) -> Result<DispatchHandle> {
        let s = self.begin(stage, tokens)?;
        let layout = self.st.layout;
        let rows_len = tokens * layout.spec.row_bytes as usize;
        let side_bytes = layout.spec.side_bytes as usize;
        let slot = self.engine.fill(s)?;
        let (_, rest) = slot.split_at_mut(HEADER_LEN);
        let (area, rows) = rest.split_at_mut(layout.side_area);
        let side_len = fill(&mut rows[..rows_len], &mut area[..side_bytes]);
        if side_len > side_bytes {
            return Err(Error::invalid(format!(
                "dispatch_with: side block of {side_len} bytes exceeds side_bytes {side_bytes}"
            )));
        }
        self.finish(stage, tokens, Side::InPlace(side_len))
    }

    /// Sends `tokens` rows that are already on this rank's GPU, at device
    /// address `rows` (`tokens × row_bytes` bytes, e.g. a tensor's
    /// `data_ptr()`), and the host `side` block, to every FFN rank for
    /// `stage`. The rows are copied device to device into the stage's send
    /// slot (copy engine, no host staging); the copy is enqueued on the
    /// rank's fill stream, a blocking CUDA stream, and this returns without
    /// waiting for it: work the caller enqueues afterwards on the legacy
    /// default stream runs after it and may overwrite `rows`; from any
    /// other stream, wait for the default stream first (or produce `rows`
    /// there and use [`AttentionRank::dispatch_device_on`]). Only for a rank whose stage memory is on a GPU
    /// ([`AttentionRank::memory`]); checked like
    /// [`AttentionRank::dispatch`].
    pub fn dispatch_device(
        &mut self,
        stage: u32,
        rows: u64,
        tokens: usize,
        side: &[u8],
    ) -> Result<DispatchHandle> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return Err(Error::Unsupported(
                "dispatch_device: this rank's stage memory is host memory (use dispatch)".into(),
            ));
        };
        let spec = self.st.layout.spec;
        if side.len() > spec.side_bytes as usize {
            return Err(Error::BufferSize {
                what: "dispatch side block exceeds side_bytes".into(),
                need: side.len(),
                got: spec.side_bytes as usize,
            });
        }
        let len = tokens.saturating_mul(spec.row_bytes as usize);
        if len > 0 {
            // Device memory of one allocation, or refused (never host
            // memory through the unified address space).
            crate::cuda::pointer_info(rows, len)?;
        }
        let s = self.begin(stage, tokens)?;
        let rows_at = self.st.layout.rows_at();
        let dst = self.engine.slot_addr(s, rows_at, len)?;
        // SAFETY: `dst` is `len` bytes of this rank's device send slot
        // (bounds checked by `slot_addr`, not posted); the caller gives
        // `len` bytes of device memory at `rows` (the driver refuses an
        // address it does not know) and orders its reuse (method docs).
        unsafe { crate::cuda::copy_enqueued(device, dst, rows, len, self.engine.fill_stream()) }?;
        self.finish(stage, tokens, Side::Copy(side))
    }

    /// Stream-ordered [`AttentionRank::dispatch_device`]: the copies start
    /// only after the work enqueued so far on the caller's CUDA stream
    /// `stream` (a `CUstream`/`cudaStream_t` of this rank's device, e.g. the
    /// one whose kernel produced `rows`; 0 is the legacy default stream),
    /// and the host never waits for the GPU. Not to be called while
    /// `stream` is being captured into a CUDA graph (module docs of
    /// [`crate::cuda`]).
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and
    /// `rows` must stay allocated, and unchanged, until the dispatch's
    /// copies ran (work ordered after it on the default stream or any
    /// blocking stream of the device sees them done).
    pub unsafe fn dispatch_device_on(
        &mut self,
        stage: u32,
        rows: u64,
        tokens: usize,
        side: &[u8],
        stream: u64,
    ) -> Result<DispatchHandle> {
        let MemoryKind::Cuda { device } = self.engine.send_kind() else {
            return Err(Error::Unsupported(
                "dispatch_device_on: this rank's stage memory is host memory (use dispatch)".into(),
            ));
        };
        // SAFETY: the caller's contract covers `stream`.
        unsafe { crate::cuda::order_after(device, self.engine.fill_stream(), stream) }?;
        self.dispatch_device(stage, rows, tokens, side)
    }

    /// What memory this rank's stage buffers are (host, or a GPU's).
    pub fn memory(&self) -> MemoryKind {
        self.engine.recv_region().kind()
    }

    /// The checks before a dispatch writes its slot; returns the slot.
    fn begin(&mut self, stage: u32, tokens: usize) -> Result<usize> {
        let layout = self.st.layout;
        let spec = layout.spec;
        if stage >= spec.stages {
            return Err(Error::invalid(format!(
                "stage {stage}: only {} stages registered",
                spec.stages
            )));
        }
        let row = spec.row_bytes as usize;
        if tokens > spec.max_tokens as usize {
            return Err(Error::BufferSize {
                what: format!(
                    "dispatch of {tokens} tokens exceeds max_tokens {}",
                    spec.max_tokens
                ),
                need: tokens.saturating_mul(row),
                got: spec.max_tokens as usize * row,
            });
        }
        // Notice peer deaths that already happened before committing,
        // unless a wait just polled (a death since then is reported by the
        // combine, as one right after this poll would be).
        if !self.engine.polled_within(FRESH_POLL) {
            self.progress()?;
        }
        if let Some(f) = self.engine.first_lost(0..layout.n) {
            return Err(self.engine.lost_error(f));
        }
        let s = stage as usize;
        if !self.st.stages.is_idle(s) {
            return Err(Error::StageBusy { stage });
        }
        // The slot's previous message may still be on its way out.
        self.engine.reclaim(s, &mut self.st)?;
        Ok(s)
    }

    /// Stamps the header into the filled slot and posts it to every FFN
    /// rank.
    fn finish(&mut self, stage: u32, tokens: usize, side: Side<'_>) -> Result<DispatchHandle> {
        let side_len = match side {
            Side::InPlace(n) => n,
            Side::Copy(b) => b.len(),
        };
        let layout = self.st.layout;
        let spec = layout.spec;
        let s = stage as usize;
        let rows_len = tokens * spec.row_bytes as usize;
        let seq = self
            .st
            .stages
            .dispatch(s, tokens as u32)
            .ok_or(Error::StageBusy { stage })?;
        let post = now_ns();
        self.st.post_ns[s] = post;
        self.st.arrivals[s] = Arrivals::default();
        let header = Header {
            kind: Kind::Dispatch,
            stage: stage as u8,
            sequence: seq,
            sender: self.st.rank,
            tokens: tokens as u32,
            row_bytes: spec.row_bytes,
            side_len: side_len as u32,
            post_ns: post,
            land_ns: 0,
            process_ns: 0,
            respond_ns: 0,
            checksum: None,
        };
        let len = layout.rows_at() + rows_len;
        let msg = match self.stamp(s, header, side, len) {
            Ok(msg) => msg,
            Err(e) => {
                // Nothing was posted: free the stage for the next dispatch.
                self.st.abandon(s);
                return Err(e);
            }
        };
        let imm = Imm::new(Kind::Dispatch, stage as u8, seq);
        let me = self.st.rank as usize;
        let offset = layout.in_offset(s, me) as u64;
        let rows_to = layout.in_rows_offset(s, me) as u64;
        for f in 0..layout.n {
            let posted = match layout.stage_layout {
                StageLayout::Slots => self.engine.post(f, msg, offset, imm),
                // The rows into the stage's matrix, then the head.
                StageLayout::Matrix => {
                    self.engine
                        .post_split(f, msg, layout.rows_at(), rows_to, offset, imm)
                }
            };
            if let Err(e) = posted {
                // The combine can never complete: free the stage.
                self.st.abandon(s);
                return Err(e);
            }
        }
        Ok(DispatchHandle { stage, seq })
    }

    /// Refuses a sum output that overlaps this rank's receive memory (the
    /// partials it sums): possible with caller memory from C or Python.
    fn out_apart(&self, out: &[u8]) -> Result<()> {
        let r = self.engine.recv_region();
        let (a, b) = (out.as_ptr() as u64, r.addr());
        let overlap =
            a < b.saturating_add(r.len() as u64) && b < a.saturating_add(out.len() as u64);
        if overlap && !out.is_empty() && !r.is_empty() {
            return Err(Error::invalid(format!(
                "the sum output ({} bytes at {a:#x}) overlaps this rank's receive memory ({} bytes at {b:#x}), which holds the partials being summed",
                out.len(),
                r.len()
            )));
        }
        Ok(())
    }

    /// Writes the header (and a side block still to be copied) into send
    /// slot `s` and returns its first `len` bytes as the message.
    fn stamp(&mut self, s: usize, header: Header, side: Side<'_>, len: usize) -> Result<SlotRef> {
        Ok(if self.engine.checksums() {
            // The checksum covers the side block: it goes in first.
            if let Side::Copy(b) = side {
                self.engine.write_slot(s, HEADER_LEN, b)?;
            }
            self.engine.seal(s, header, len)?
        } else {
            match side {
                Side::InPlace(_) => self.engine.write_head(s, 0, &header.encode())?,
                Side::Copy(b) => {
                    // Header and side block are adjacent: one copy into the
                    // slot (one staged host-to-device copy for device slots).
                    let mut head = [0u8; HEADER_LEN + 256];
                    match head.get_mut(HEADER_LEN..HEADER_LEN + b.len()) {
                        Some(area) => {
                            area.copy_from_slice(b);
                            head[..HEADER_LEN].copy_from_slice(&header.encode());
                            self.engine
                                .write_head(s, 0, &head[..HEADER_LEN + b.len()])?;
                        }
                        None => {
                            self.engine.write_head(s, HEADER_LEN, b)?;
                            self.engine.write_head(s, 0, &header.encode())?;
                        }
                    }
                }
            }
            self.engine.message(s, len)?
        })
    }

    /// Enqueues on the caller's CUDA stream `stream` a wait for every FFN
    /// rank's combine of `handle`: work enqueued after this call (kernels
    /// reading [`Combined::partial_addr`]'s slots, one address per (stage,
    /// FFN rank)) starts only once all partials have landed. The host does
    /// not wait: `cuStreamWaitValue32` on a host-mapped flag the engine
    /// raises when it counts the last combine, inside any call that
    /// progresses this rank (`wait_combine`, `try_combine`, `dispatch`,
    /// `progress`), so keep calling one and still take the combine
    /// (`wait_combine` / `try_combine`) to free the stage. A combine that
    /// can never complete (a lost FFN rank) lets the stream go when the
    /// host sees the loss.
    ///
    /// CUDA graphs: the wait can be captured, but a replayed graph waits
    /// for the sequence captured; call it outside capture, per dispatch.
    /// `Unsupported` on a host rank or without CUDA.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or 0), and
    /// this rank must outlive the wait (drop it only after the stream has
    /// passed it).
    pub unsafe fn wait_combine_on(&mut self, handle: DispatchHandle, stream: u64) -> Result<()> {
        let MemoryKind::Cuda { device } = self.memory() else {
            return Err(stream_wait::host_rank("wait_combine_on"));
        };
        self.st.check(handle)?;
        let s = handle.stage as usize;
        if self.st.flags.is_none() {
            let stages = &self.st.stages;
            self.st.flags = Some(StageFlags::new(device, self.st.layout.stages(), |s| {
                stages.combined_through(s).unwrap_or(0)
            })?);
        }
        let Some(f) = &self.st.flags else {
            return Err(Error::Unsupported("wait_combine_on: no stage flags".into()));
        };
        if let Some(q) = self.st.stages.combined_through(s) {
            f.raise(s, q);
        }
        // SAFETY: the caller's contract.
        unsafe { f.enqueue(s, stream, handle.seq.wrapping_add(1)) }
    }

    /// Waits up to `timeout` for every FFN rank's combine of `handle`, and
    /// returns the partials. The stage is free for the next dispatch once
    /// the returned value is dropped.
    pub fn wait_combine(
        &mut self,
        handle: DispatchHandle,
        timeout: Duration,
    ) -> Result<Combined<'_>> {
        self.wait_all(&[handle], timeout)?;
        let s = handle.stage as usize;
        let tokens = self.st.stages.tokens(s).unwrap_or(0) as usize;
        self.st.stages.finish(s);
        Ok(Combined {
            rank: self,
            stage: s,
            tokens,
        })
    }

    /// Waits for the combine of `handle` and writes the element-wise sum of
    /// the N partials into the first `tokens × out_row_bytes` bytes of
    /// `out`; returns that length. `out` is checked first: if it is too
    /// short (`BufferSize`), or `dtype` does not divide `out_row_bytes`
    /// (`InvalidArgument`), nothing is consumed and the combine can still
    /// be taken.
    pub fn wait_combine_sum(
        &mut self,
        handle: DispatchHandle,
        dtype: Dtype,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<usize> {
        self.st.check(handle)?;
        let need = self.st.sum_len(handle, dtype, out.len())?;
        self.out_apart(out)?;
        let c = self.wait_combine(handle, timeout)?;
        c.sum_into(dtype, &mut out[..need])?;
        Ok(need)
    }

    /// Non-blocking: the combine of `handle` if it is complete.
    pub fn try_combine(&mut self, handle: DispatchHandle) -> Result<Option<Combined<'_>>> {
        self.progress()?;
        self.st.check(handle)?;
        let s = handle.stage as usize;
        if self.st.stages.is_combined(s) {
            return self.wait_combine(handle, Duration::ZERO).map(Some);
        }
        if let Some(f) = self.engine.first_lost(self.st.stages.missing(s)) {
            // The combine can never complete: free the stage.
            self.st.abandon(s);
            return Err(self.engine.lost_error(f));
        }
        Ok(None)
    }

    /// Non-blocking [`AttentionRank::wait_combine_sum`]: if the combine of
    /// `handle` is complete, writes the sum into `out` and returns its
    /// length; `None` if it is not complete yet (nothing is consumed then).
    /// `out` and `dtype` are checked as `wait_combine_sum` checks them,
    /// whether or not the combine is complete.
    pub fn try_combine_sum(
        &mut self,
        handle: DispatchHandle,
        dtype: Dtype,
        out: &mut [u8],
    ) -> Result<Option<usize>> {
        self.st.check(handle)?;
        self.st.sum_len(handle, dtype, out.len())?;
        self.out_apart(out)?;
        self.progress()?;
        let s = handle.stage as usize;
        if self.st.stages.is_combined(s) {
            return self
                .wait_combine_sum(handle, dtype, out, Duration::ZERO)
                .map(Some);
        }
        if let Some(f) = self.engine.first_lost(self.st.stages.missing(s)) {
            // The combine can never complete: free the stage.
            self.st.abandon(s);
            return Err(self.engine.lost_error(f));
        }
        Ok(None)
    }

    /// Whether `stage` may be dispatched now: it exists and its previous
    /// dispatch (if any) was combined and the combine released.
    pub fn stage_idle(&self, stage: u32) -> bool {
        self.st.stages.is_idle(stage as usize)
    }

    /// Trace stamps of FFN rank `f`'s answer to the last combine taken on
    /// `stage` (as [`Combined::trace`] gives them, for callers that took
    /// the combine with [`AttentionRank::wait_combine_sum`]). `None` for a
    /// stage or rank out of range, and while the stage is dispatched again
    /// (its stamps are being replaced then); all zeros before the stage's
    /// first combine.
    pub fn last_trace(&self, stage: u32, f: usize) -> Option<Trace> {
        let s = stage as usize;
        if f >= self.st.layout.n || !self.st.stages.is_idle(s) {
            return None;
        }
        self.st.traces.get(s * self.st.layout.n + f).copied()
    }

    /// Waits up to `timeout` until every handle's combine is complete,
    /// without taking them (take them with `wait_combine`, which then
    /// returns at once).
    pub fn wait_all(&mut self, handles: &[DispatchHandle], timeout: Duration) -> Result<()> {
        let mut waiting = None;
        let done = self.engine.wait(&mut self.st, timeout, |engine, st| {
            waiting = None;
            for h in handles {
                st.check(*h)?;
                let s = h.stage as usize;
                if st.stages.is_combined(s) {
                    continue;
                }
                if let Some(f) = engine.first_lost(st.stages.missing(s)) {
                    // The combine can never complete: free the stage.
                    st.abandon(s);
                    return Err(engine.lost_error(f));
                }
                waiting.get_or_insert(s);
            }
            Ok(waiting.is_none().then_some(()))
        })?;
        match (done, waiting) {
            (Some(()), _) | (None, None) => Ok(()),
            (None, Some(s)) => Err(Error::Timeout {
                op: "combine",
                peer: self.engine.names(self.st.stages.missing(s)),
                after: timeout,
            }),
        }
    }

    /// What wakes this rank's blocked wait from another thread: see
    /// [`Interrupter`](crate::Interrupter). The wait returns
    /// [`Error::Interrupted`](crate::Error::Interrupted).
    pub fn interrupter(&self) -> crate::Interrupter {
        self.engine.interrupter()
    }

    /// The registered receive region (combines land in). Bindings that hand
    /// zero-copy views to a garbage-collected language keep a clone, so the
    /// memory outlives the rank for as long as a view does.
    pub fn receive_region(&self) -> &Arc<Region> {
        self.engine.recv_region()
    }

    /// Makes progress without waiting: counts whatever has landed.
    pub fn progress(&mut self) -> Result<()> {
        self.engine.pump(Duration::ZERO, &mut self.st)
    }

    /// Counters per FFN rank, with how often each answered a stage last
    /// ([`PeerStats::late_ns`](crate::PeerStats::late_ns)).
    pub fn stats(&self) -> RankStats {
        self.engine.stats()
    }

    /// Hands the scheduler a line of this rank's results — a JSON object
    /// such as `afmesh run --json` prints (`role`, `rank`, `lat_ns`,
    /// `links`, ...) — which a standalone `afmesh scheduler` gathers into
    /// its job summary when the mesh finishes. At most 16 KiB; call it
    /// before `shutdown`. An error on a simulated mesh (no scheduler).
    pub fn report(&mut self, text: &str) -> Result<()> {
        self.engine.report(text)
    }

    /// A barrier of the running mesh, through the scheduler: returns once
    /// every rank of `roles` (this one's role among them) has called it,
    /// or fails with `Timeout` after `timeout` — still inside the barrier:
    /// calling again with the same `roles` waits on for the same one.
    /// Barriers of one set of roles are numbered, so each rank of the set
    /// must call each of them. A rank that died or left holds the barrier
    /// until the timeout. An error on a simulated mesh (no scheduler).
    /// Of a job of several instance groups, this group's mesh only
    /// (StepMesh's `instance_barrier=False`); see
    /// [`barrier_all_groups`](Self::barrier_all_groups).
    pub fn barrier(&mut self, roles: crate::Roles, timeout: std::time::Duration) -> Result<()> {
        self.engine.sync(roles, crate::proto::Scope::Group, timeout)
    }

    /// A barrier of every instance group's running mesh (StepMesh's
    /// `instance_barrier=True`): returns once every rank of `roles` in
    /// every group of the job has called it. Numbered apart from
    /// [`barrier`](Self::barrier)'s; otherwise the same rules (a timeout
    /// leaves the rank inside, calling again resumes it). In a job of one
    /// group it is that same barrier.
    pub fn barrier_all_groups(
        &mut self,
        roles: crate::Roles,
        timeout: std::time::Duration,
    ) -> Result<()> {
        self.engine
            .sync(roles, crate::proto::Scope::AllGroups, timeout)
    }

    /// Leaves the mesh in order: closes the links, tells the scheduler.
    pub fn shutdown(mut self) -> Result<()> {
        self.engine.shutdown();
        Ok(())
    }
}

impl State {
    /// The bytes a sum of `handle`'s combine fills, once `dtype` and an
    /// output of `got` bytes are checked against them.
    fn sum_len(&self, handle: DispatchHandle, dtype: Dtype, got: usize) -> Result<usize> {
        let out_row = self.layout.spec.out_row_bytes as usize;
        if !out_row.is_multiple_of(dtype.size()) {
            return Err(Error::invalid(format!(
                "combine sum: rows of {out_row} bytes are not whole {} elements",
                dtype.name()
            )));
        }
        let tokens = self.stages.tokens(handle.stage as usize).unwrap_or(0) as usize;
        let need = tokens * out_row;
        if got < need {
            return Err(Error::BufferSize {
                what: format!("combine sum output for {tokens} tokens"),
                need,
                got,
            });
        }
        Ok(need)
    }

    fn check(&self, h: DispatchHandle) -> Result<()> {
        if !self.stages.in_flight(h.stage as usize, h.seq) {
            return Err(Error::invalid(format!(
                "dispatch handle (stage {}, sequence {}) is not in flight: already combined, or abandoned",
                h.stage, h.seq
            )));
        }
        Ok(())
    }
}
