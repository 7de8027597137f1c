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
mod device;
mod in_place;
mod waiting;
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
    // `st` first: fields drop in order, and its stream-wait flags must
    // release any stream still parked on them before the engine's drop
    // synchronises link streams and frees the stage memory.
    st: State,
    engine: Engine,
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
    /// A combine means its FFN rank answered, so it no longer reads this
    /// rank's dispatch slot of the stage (its batch ended at `respond`):
    /// the stage's next dispatch goes there.
    fn next_write(&self, _f: usize, a: &Accepted) -> Option<(u64, u64)> {
        let l = &self.layout;
        let head = l.rows_at() as u64;
        let len = match l.stage_layout {
            StageLayout::Slots => head + u64::from(a.header.tokens) * u64::from(l.spec.row_bytes),
            StageLayout::Matrix => head,
        };
        Some((l.in_offset(a.stage, self.rank as usize) as u64, len))
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
        let Some(seq) = self.st.stages.dispatch(s, tokens as u32) else {
            return Err(Error::StageBusy { stage });
        };
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
        match side {
            // In place, the side block is already there: `seal` writes the
            // header (and the checksum over the side block and rows).
            Side::InPlace(_) => self.engine.seal(s, header, len),
            // The checksum covers the side block: it goes in first.
            Side::Copy(b) if self.engine.checksums() => {
                self.engine.write_slot(s, HEADER_LEN, b)?;
                self.engine.seal(s, header, len)
            }
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
                self.engine.message(s, len)
            }
        }
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
    /// While it waits, the rank's links keep moving (queued writes go
    /// out, arrivals are taken), and the rank's
    /// [`Interrupter`](crate::Interrupter) ends the wait (`Interrupted`,
    /// likewise still inside).
    /// Barriers of one set of roles are numbered, so each rank of the set
    /// must call each of them. A rank that died or left holds the barrier
    /// until the timeout. An error on a simulated mesh (no scheduler).
    /// Of a job of several instance groups, this group's mesh only
    /// (StepMesh's `instance_barrier=False`); see
    /// [`barrier_all_groups`](Self::barrier_all_groups).
    pub fn barrier(&mut self, roles: crate::Roles, timeout: std::time::Duration) -> Result<()> {
        self.engine
            .sync(&mut self.st, roles, crate::proto::Scope::Group, timeout)
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
            .sync(&mut self.st, roles, crate::proto::Scope::AllGroups, timeout)
    }

    /// Leaves the mesh in order: closes the links, tells the scheduler.
    pub fn shutdown(mut self) -> Result<()> {
        self.engine.shutdown();
        Ok(())
    }
}

impl State {
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
