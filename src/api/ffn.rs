//! The FFN side: gather every attention rank's block for a stage, answer
//! each with its rows.

use std::sync::Arc;
use std::time::Duration;

use super::layout::Layout;
use super::stream_wait::{self, StageFlags};
use crate::engine::{now_ns, Engine, RankStats, Sink};
use crate::error::{Error, Result};
use crate::proto::{Accepted, FfnStages, Header, Imm, Kind, HEADER_LEN};
use crate::trace::Record;
use crate::transport::slots::SlotRef;
use crate::transport::{MemoryKind, Region};

mod batch;
mod device;
mod in_place;
pub use batch::Batch;
use batch::Part;

/// One gathered stage: every attention rank's block, viewed in place in the
/// registered input slots. Answer it with [`FfnRank::respond`], which takes
/// it by value: its views end there, before the attention ranks may write
/// the slots again.
///
/// ```
/// use std::time::Duration;
/// use afmesh::{sim_mesh, transport::sim::SimNetwork, StageSpec};
///
/// let net = SimNetwork::new(1);
/// let spec = StageSpec { stages: 1, max_tokens: 2, row_bytes: 8, out_row_bytes: 4, side_bytes: 8 };
/// let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec)?;
/// let h = attn[0].dispatch(0, &[7; 16], b"expert")?;
/// net.deliver_all();
/// let batch = ffn[0].get_batch(Duration::from_secs(1))?;
/// assert_eq!((batch.token_count(0), batch.side(0)), (2, &b"expert"[..]));
/// // Answer each row with its first 4 bytes; the views end before respond.
/// let out: Vec<u8> = batch.tokens(0).chunks(8).flat_map(|r| r[..4].to_vec()).collect();
/// ffn[0].respond(batch, &[&out])?;
/// net.deliver_all();
/// assert_eq!(attn[0].wait_combine(h, Duration::from_secs(1))?.partial(0), Some(&[7u8; 8][..]));
/// # Ok::<(), afmesh::Error>(())
/// ```
/// Where `respond` takes the rows from.
enum Rows<'f, 'o> {
    /// Built in place in host send slots.
    Fill(&'f mut dyn FnMut(&Batch, usize, &mut [u8])),
    /// Host buffers, copied into (device) send slots.
    Host(&'o [&'o [u8]]),
    /// Device buffers of `device`, copied device to device.
    Device { device: i32, outputs: &'o [u64] },
    /// Already in the (device) send slots, written by the caller.
    InPlace,
}

/// A [`FfnRank::respond`] that did not go through.
#[derive(Debug)]
pub struct RespondError {
    /// The batch, given back when the arguments were refused: nothing was
    /// sent and its stage is as it was, so it can be answered again.
    /// `None` once the response was committed: some attention ranks could
    /// not be reached (e.g. one was lost), the others were answered.
    pub batch: Option<Batch>,
    /// What went wrong.
    pub error: Error,
}

impl std::fmt::Display for RespondError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RespondError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<RespondError> for Error {
    fn from(e: RespondError) -> Error {
        e.error
    }
}

/// An FFN rank of a mesh: a face over the [`Engine`].
#[derive(Debug)]
pub struct FfnRank {
    // `st` first: fields drop in order, and its stream-wait flags must
    // release any stream still parked on them before the engine's drop
    // synchronises link streams and frees the stage memory.
    st: State,
    engine: Engine,
}

/// What only the FFN role keeps: its stage machine and, per (stage,
/// attention rank), what the counted dispatch said.
#[derive(Debug)]
struct State {
    layout: Layout,
    rank: u32,
    stages: FfnStages,
    parts: Vec<Part>,
    /// Part lists of answered batches, reused so that handing out a batch
    /// allocates nothing.
    spare: Vec<Vec<Part>>,
    /// The messages of one respond, stamped before any is posted (kept to
    /// avoid an allocation per respond).
    msgs: Vec<SlotRef>,
    /// Flags streams wait on ([`FfnRank::wait_batch_on`]); made on first use.
    flags: Option<StageFlags>,
    /// Per attention rank: whether its side blocks land in the receive
    /// region's host mirror only (a cuda peer).
    mirrored: Vec<bool>,
}

impl Sink for State {
    type Counter = FfnStages;
    fn counter(&mut self) -> &mut FfnStages {
        &mut self.stages
    }
    fn accepted(&mut self, a: usize, acc: &Accepted, at_ns: u64) -> Option<u64> {
        self.parts[acc.stage * self.layout.m + a] = Part {
            offset: self.layout.in_offset(acc.stage, a),
            rows: self.layout.in_rows_offset(acc.stage, a),
            tokens: acc.header.tokens,
            side_len: acc.header.side_len,
            post_ns: acc.header.post_ns,
            land_ns: at_ns,
            mirrored: self.mirrored.get(a).copied().unwrap_or(false),
        };
        if let (true, Some(f)) = (acc.complete, &self.flags) {
            f.raise(acc.stage, acc.header.sequence.wrapping_add(1));
        }
        None
    }
    /// A dispatch means its attention rank is done with the stage's
    /// previous combine (it dispatches a stage only once that combine was
    /// taken): the answer to this one goes there.
    fn next_write(&self, _a: usize, acc: &Accepted) -> Option<(u64, u64)> {
        let l = &self.layout;
        let len =
            HEADER_LEN as u64 + u64::from(acc.header.tokens) * u64::from(l.spec.out_row_bytes);
        Some((l.out_offset(acc.stage, self.rank as usize) as u64, len))
    }
}

impl State {
    /// The first attention rank that is lost while a stage still needs it.
    /// Streams waiting for a batch that can no longer complete are let go
    /// (their kernels then see a partial stage; the host sees the error).
    fn lost_needed(&self, engine: &Engine) -> Option<usize> {
        let lost = engine.first_lost((0..self.layout.m).filter(|&a| self.stages.needs(a)));
        if let (Some(_), Some(f)) = (lost, &self.flags) {
            for s in 0..self.layout.stages() {
                if let Some(q) = self.stages.next_batch(s) {
                    f.raise(s, q.wrapping_add(1));
                }
            }
        }
        lost
    }

    fn take_complete(&mut self, region: &Arc<Region>) -> Option<Batch> {
        let s = self.stages.oldest_complete()?;
        let seq = self.stages.hand_out_seq(s)?;
        let m = self.layout.m;
        Some(Batch {
            stage: s as u32,
            seq,
            row_bytes: self.layout.spec.row_bytes,
            max_tokens: self.layout.spec.max_tokens,
            matrix: self
                .layout
                .matrix_offset(s)
                .and_then(std::num::NonZeroUsize::new),
            parts: {
                let mut v = self.spare.pop().unwrap_or_default();
                v.clear();
                v.extend_from_slice(&self.parts[s * m..(s + 1) * m]);
                v
            },
            region: region.clone(),
            process_ns: now_ns(),
        })
    }
}

impl FfnRank {
    pub(crate) fn new(mut engine: Engine, layout: Layout, rank: u32) -> Self {
        // The header: what mirrored peers read on the host.
        engine.set_prefix(HEADER_LEN);
        let mirrored = (0..layout.m).map(|a| engine.mirrored(a)).collect();
        FfnRank {
            engine,
            st: State {
                mirrored,
                stages: FfnStages::new(layout.stages(), layout.m),
                parts: vec![Part::default(); layout.stages() * layout.m],
                spare: Vec::new(),
                msgs: Vec::new(),
                flags: None,
                layout,
                rank,
            },
        }
    }

    /// This rank's index among the FFN ranks.
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

    /// Waits up to `timeout` for the oldest stage that every attention rank
    /// has dispatched to.
    pub fn get_batch(&mut self, timeout: Duration) -> Result<Batch> {
        let got = self.engine.wait(&mut self.st, timeout, |engine, st| {
            if let Some(b) = st.take_complete(engine.recv_region()) {
                return Ok(Some(b));
            }
            match st.lost_needed(engine) {
                Some(a) => Err(engine.lost_error(a)),
                None => Ok(None),
            }
        })?;
        got.ok_or_else(|| Error::Timeout {
            op: "get_batch",
            peer: self.engine.names(self.st.stages.missing()),
            after: timeout,
        })
    }

    /// Non-blocking `get_batch`.
    pub fn try_get_batch(&mut self) -> Result<Option<Batch>> {
        self.progress()?;
        if let Some(b) = self.st.take_complete(self.engine.recv_region()) {
            return Ok(Some(b));
        }
        match self.st.lost_needed(&self.engine) {
            Some(a) => Err(self.engine.lost_error(a)),
            None => Ok(None),
        }
    }

    /// Sends each attention rank `a` its rows `outputs[a]`
    /// (`batch.token_count(a) × out_row_bytes` bytes), and frees the stage
    /// for its next sequence. The batch is consumed, and with it every view
    /// of its slots, which attention ranks may write again from now on:
    ///
    /// ```compile_fail,E0505
    /// # use std::time::Duration;
    /// # use afmesh::{sim_mesh, transport::sim::SimNetwork, StageSpec};
    /// # let net = SimNetwork::new(1);
    /// # let spec = StageSpec { stages: 1, max_tokens: 2, row_bytes: 8, out_row_bytes: 8, side_bytes: 0 };
    /// # let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec).unwrap();
    /// # let _h = attn[0].dispatch(0, &[7; 16], &[]).unwrap();
    /// # net.deliver_all();
    /// let batch = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    /// let rows = batch.tokens(0);
    /// let out = vec![0u8; 16];
    /// ffn[0].respond(batch, &[&out]).unwrap();
    /// assert_eq!(rows[0], 7); // error: the view outlives the batch
    /// ```
    ///
    /// Arguments are checked before anything changes: on a wrong number of
    /// outputs (`InvalidArgument`), a wrong length (`BufferSize`) or a batch
    /// of another rank, the error carries the batch back and the stage is
    /// as it was. If an attention rank is lost, the others are still
    /// answered and the loss is returned (without the batch).
    pub fn respond(&mut self, batch: Batch, outputs: &[&[u8]]) -> Result<(), RespondError> {
        if let Err(error) = self.check_outputs(&batch, outputs) {
            return Err(RespondError {
                batch: Some(batch),
                error,
            });
        }
        let r = match self.engine.send_kind() {
            MemoryKind::Host => self.respond_rows(
                batch,
                Rows::Fill(&mut |_, a, rows| rows.copy_from_slice(outputs[a])),
            ),
            MemoryKind::Cuda { .. } => self.respond_rows(batch, Rows::Host(outputs)),
        };
        // The outputs were copied into the send slots once the answer was
        // committed.
        if r.as_ref().map_or_else(|e| e.batch.is_none(), |()| true) {
            for (a, o) in outputs.iter().enumerate() {
                self.engine.count_copied(a, o.len());
            }
        }
        r
    }

    /// Answers `batch` with rows built in place: `fill(&batch, a, rows)`
    /// writes attention rank `a`'s rows (`batch.token_count(a) ×
    /// out_row_bytes` bytes) straight into the registered send slot, once
    /// per attention rank in order, and may read the batch's views while it
    /// does (the input slots are not written again before the answer is
    /// committed, after the last `fill`). No copy is made; each answer
    /// leaves in one write. The slot of (stage, `a`) keeps its bytes
    /// between answers, so `fill` may rewrite only what changed. Otherwise as [`FfnRank::respond`]: the batch is
    /// consumed, and a batch refused before `fill` runs comes back in the
    /// error.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use afmesh::{sim_mesh, transport::sim::SimNetwork, StageSpec};
    /// # let net = SimNetwork::new(1);
    /// # let spec = StageSpec { stages: 1, max_tokens: 4, row_bytes: 8, out_row_bytes: 4, side_bytes: 0 };
    /// # let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec)?;
    /// # let h = attn[0].dispatch(0, &[5; 16], &[])?;
    /// # net.deliver_all();
    /// let batch = ffn[0].get_batch(Duration::from_secs(1))?;
    /// // Each output row is the first 4 bytes of its input row.
    /// ffn[0].respond_with(batch, |b, a, rows| {
    ///     for (out, inp) in rows.chunks_mut(4).zip(b.tokens(a).chunks(8)) {
    ///         out.copy_from_slice(&inp[..4]);
    ///     }
    /// })?;
    /// # net.deliver_all();
    /// # assert_eq!(attn[0].wait_combine(h, Duration::from_secs(1))?.partial(0), Some(&[5u8; 8][..]));
    /// # Ok::<(), afmesh::Error>(())
    /// ```
    pub fn respond_with(
        &mut self,
        batch: Batch,
        mut fill: impl FnMut(&Batch, usize, &mut [u8]),
    ) -> Result<(), RespondError> {
        self.respond_rows(batch, Rows::Fill(&mut fill))
    }

    /// What memory this rank's stage buffers are (host, or a GPU's).
    pub fn memory(&self) -> MemoryKind {
        self.engine.recv_region().kind()
    }

    fn respond_rows(
        &mut self,
        batch: Batch,
        mut rows_from: Rows<'_, '_>,
    ) -> Result<(), RespondError> {
        let give_back = |batch, error| RespondError {
            batch: Some(batch),
            error,
        };
        if let Err(e) = self.check_batch(&batch) {
            return Err(give_back(batch, e));
        }
        let layout = self.st.layout;
        let m = layout.m;
        let s = batch.stage as usize;
        let out_row = layout.spec.out_row_bytes as usize;
        // Each slot's previous answer may still be on its way out.
        for a in 0..m {
            if let Err(e) = self.engine.reclaim(s * m + a, &mut self.st) {
                return Err(give_back(batch, e));
            }
        }
        for a in 0..m {
            let rows = batch.token_count(a) * out_row;
            let slot = s * m + a;
            let filled = match &mut rows_from {
                Rows::Fill(fill) => self
                    .engine
                    .fill(slot)
                    .map(|buf| fill(&batch, a, &mut buf[HEADER_LEN..HEADER_LEN + rows])),
                Rows::Host(outputs) => self.engine.write_slot(slot, HEADER_LEN, outputs[a]),
                Rows::InPlace => Ok(()),
                Rows::Device { device, outputs } => {
                    let fill = self.engine.fill_stream();
                    self.engine
                        .slot_addr(slot, HEADER_LEN, rows)
                        .and_then(|dst| {
                            // SAFETY: `dst` is `rows` bytes of this rank's
                            // device send slot (bounds checked, not
                            // posted); the caller gives `rows` bytes of
                            // device memory (the driver refuses an address
                            // it does not know).
                            unsafe {
                                crate::cuda::copy_enqueued(*device, dst, outputs[a], rows, fill)
                            }
                        })
                }
            };
            if let Err(e) = filled {
                return Err(give_back(batch, e));
            }
        }
        let imm = Imm::new(Kind::Combine, batch.stage as u8, batch.seq);
        let offset = layout.out_offset(s, self.st.rank as usize) as u64;
        let respond = now_ns();
        // Every message is stamped before anything is committed, so a
        // failure here gives the batch back with the stage unchanged.
        let mut msgs = std::mem::take(&mut self.st.msgs);
        msgs.clear();
        for a in 0..m {
            let tokens = batch.token_count(a);
            let header = Header {
                kind: Kind::Combine,
                stage: batch.stage as u8,
                sequence: batch.seq,
                sender: self.st.rank,
                tokens: tokens as u32,
                row_bytes: layout.spec.out_row_bytes,
                side_len: 0,
                post_ns: batch.posted_ns(a),
                land_ns: batch.landed_ns(a),
                process_ns: batch.process_ns,
                respond_ns: respond,
                checksum: None,
            };
            match self
                .engine
                .seal(s * m + a, header, HEADER_LEN + tokens * out_row)
            {
                Ok(msg) => msgs.push(msg),
                Err(e) => {
                    self.st.msgs = msgs;
                    return Err(give_back(batch, e));
                }
            }
        }
        if let Err(error) = self.commit(&batch) {
            self.st.msgs = msgs;
            return Err(RespondError { batch: None, error });
        }
        let mut first_err = None;
        for (a, &msg) in msgs.iter().enumerate() {
            match self.engine.post(a, msg, offset, imm) {
                Ok(()) => self.engine.record_ffn(Record {
                    peer: a as u32,
                    stage: batch.stage,
                    seq: batch.seq,
                    post_ns: batch.posted_ns(a),
                    land_ns: batch.landed_ns(a),
                    process_ns: batch.process_ns,
                    respond_ns: respond,
                    back_ns: 0,
                }),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.st.msgs = msgs;
        // The batch's views end here; its part list serves the next one.
        if self.st.spare.len() < layout.stages() {
            self.st.spare.push(batch.parts);
        }
        match first_err {
            None => Ok(()),
            Some(error) => Err(RespondError { batch: None, error }),
        }
    }

    /// Whether `batch` is this rank's, handed out and not yet answered.
    fn check_batch(&self, batch: &Batch) -> Result<()> {
        if !Arc::ptr_eq(&batch.region, self.engine.recv_region()) {
            return Err(Error::invalid(format!(
                "respond: the batch (stage {}, sequence {}) belongs to another FFN rank",
                batch.stage, batch.seq
            )));
        }
        if !self
            .st
            .stages
            .is_handed_out(batch.stage as usize, batch.seq)
        {
            return Err(Error::invalid(format!(
                "respond: batch (stage {}, sequence {}) is not waiting for an answer",
                batch.stage, batch.seq
            )));
        }
        Ok(())
    }

    /// `outputs` holds one block of the right length per attention rank.
    fn check_outputs(&self, batch: &Batch, outputs: &[&[u8]]) -> Result<()> {
        self.check_batch(batch)?;
        let m = self.st.layout.m;
        if outputs.len() != m {
            return Err(Error::invalid(format!(
                "respond: {} output blocks for {m} attention ranks",
                outputs.len()
            )));
        }
        let out_row = self.st.layout.spec.out_row_bytes as usize;
        for (a, out) in outputs.iter().enumerate() {
            let need = batch.token_count(a) * out_row;
            if out.len() != need {
                return Err(Error::BufferSize {
                    what: format!("respond output for A{a} ({} tokens)", batch.token_count(a)),
                    need,
                    got: out.len(),
                });
            }
        }
        Ok(())
    }

    /// Moves the batch's stage to its next sequence: from here on the
    /// attention ranks may write its slots.
    fn commit(&mut self, batch: &Batch) -> Result<()> {
        if self.st.stages.respond(batch.stage as usize, batch.seq) {
            Ok(())
        } else {
            // `check_batch` ran first; only a bug gets here.
            Err(Error::invalid(format!(
                "respond: batch (stage {}, sequence {}) was already answered",
                batch.stage, batch.seq
            )))
        }
    }

    /// What wakes this rank's blocked wait from another thread: see
    /// [`Interrupter`](crate::Interrupter). The wait returns
    /// [`Error::Interrupted`](crate::Error::Interrupted).
    pub fn interrupter(&self) -> crate::Interrupter {
        self.engine.interrupter()
    }

    /// The registered receive region (batches' views point into). Bindings that hand
    /// zero-copy views to a garbage-collected language keep a clone, so the
    /// memory outlives the rank for as long as a view does.
    pub fn receive_region(&self) -> &Arc<Region> {
        self.engine.recv_region()
    }

    /// Makes progress without waiting: counts whatever has landed.
    pub fn progress(&mut self) -> Result<()> {
        self.engine.pump(Duration::ZERO, &mut self.st)
    }

    /// Counters per attention rank.
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

#[cfg(test)]
mod tests;
