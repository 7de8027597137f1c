//! The attention side: dispatch token blocks to every FFN rank, wait for
//! their combines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layout::Layout;
use super::mesh::{RankStats, Support};
use super::reduce::{sum_into, Dtype};
use crate::engine::{now_ns, Engine, Event};
use crate::error::{Error, Peer, Result};
use crate::proto::{accept, AttentionStages, Header, Imm, Kind, HEADER_LEN};
use crate::transport::Region;

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

/// An attention rank of a mesh.
#[derive(Debug)]
pub struct AttentionRank {
    engine: Engine,
    layout: Layout,
    rank: u32,
    region: Arc<Region>,
    stages: AttentionStages,
    traces: Vec<Trace>,
    post_ns: Vec<u64>,
    events: Vec<Event>,
    support: Support,
}

/// The combined result of one dispatch: N partial blocks, viewed in place
/// in the registered output slots.
#[derive(Debug)]
pub struct Combined<'a> {
    rank: &'a AttentionRank,
    stage: usize,
    tokens: usize,
}

impl<'a> Combined<'a> {
    /// Rows in each partial.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Number of partials (FFN ranks).
    pub fn len(&self) -> usize {
        self.rank.layout.n
    }
    /// Whether there are no partials (never, in a valid mesh).
    pub fn is_empty(&self) -> bool {
        self.rank.layout.n == 0
    }
    /// FFN rank `f`'s rows (`tokens × out_row_bytes`), zero-copy.
    pub fn partial(&self, f: usize) -> Option<&'a [u8]> {
        if f >= self.rank.layout.n {
            return None;
        }
        let off = self.rank.layout.out_offset(self.stage, f) + HEADER_LEN;
        let len = self.tokens * self.rank.layout.spec.out_row_bytes as usize;
        self.rank.region.slice(off, len).ok()
    }
    /// All partials, in FFN-rank order.
    pub fn partials(&self) -> Vec<&'a [u8]> {
        (0..self.len()).filter_map(|f| self.partial(f)).collect()
    }
    /// Writes the element-wise sum of the partials into `out`.
    pub fn sum_into(&self, dtype: Dtype, out: &mut [u8]) -> Result<()> {
        sum_into(dtype, &self.partials(), out)
    }
    /// Trace stamps of FFN rank `f`'s combine.
    pub fn trace(&self, f: usize) -> Option<Trace> {
        self.rank
            .traces
            .get(self.stage * self.rank.layout.n + f)
            .copied()
    }
}

impl AttentionRank {
    pub(crate) fn new(
        engine: Engine,
        layout: Layout,
        rank: u32,
        region: Arc<Region>,
        support: Support,
    ) -> Self {
        let s = layout.stages();
        AttentionRank {
            stages: AttentionStages::new(s, layout.n),
            traces: vec![Trace::default(); s * layout.n],
            post_ns: vec![0; s],
            events: Vec::with_capacity(64),
            engine,
            layout,
            rank,
            region,
            support,
        }
    }

    /// This rank's index among the attention ranks.
    pub fn rank(&self) -> u32 {
        self.rank
    }
    /// Number of attention ranks (M).
    pub fn attention_ranks(&self) -> usize {
        self.layout.m
    }
    /// Number of FFN ranks (N).
    pub fn ffn_ranks(&self) -> usize {
        self.layout.n
    }
    /// The stage geometry.
    pub fn spec(&self) -> super::StageSpec {
        self.layout.spec
    }

    /// Sends `tokens` (whole rows of `row_bytes`) and `side` to every FFN
    /// rank for `stage`. Returns once the data is handed to the transport;
    /// the buffers may be reused at once.
    pub fn dispatch(&mut self, stage: u32, tokens: &[u8], side: &[u8]) -> Result<DispatchHandle> {
        let spec = self.layout.spec;
        if stage >= spec.stages {
            return Err(Error::config(format!(
                "stage {stage}: only {} stages registered",
                spec.stages
            )));
        }
        let row = spec.row_bytes as usize;
        let count = tokens.len().checked_div(row).unwrap_or(0);
        if row == 0 && !tokens.is_empty() || row != 0 && tokens.len() % row != 0 {
            return Err(Error::BufferSize {
                what: format!("dispatch tokens: not a whole number of {row}-byte rows"),
                need: count.saturating_add(1) * row,
                got: tokens.len(),
            });
        }
        if count > spec.max_tokens as usize {
            return Err(Error::BufferSize {
                what: format!(
                    "dispatch of {count} tokens exceeds max_tokens {}",
                    spec.max_tokens
                ),
                need: count * row,
                got: spec.max_tokens as usize * row,
            });
        }
        if side.len() > spec.side_bytes as usize {
            return Err(Error::BufferSize {
                what: "dispatch side block exceeds side_bytes".into(),
                need: side.len(),
                got: spec.side_bytes as usize,
            });
        }
        // Notice peer deaths that already happened before committing.
        self.pump(Duration::ZERO)?;
        if let Some(f) = (0..self.layout.n).find(|&f| self.engine.lost(f).is_some()) {
            return Err(self.engine.lost_error(f));
        }
        let s = stage as usize;
        let seq = self
            .stages
            .dispatch(s, count as u32)
            .ok_or(Error::StageBusy { stage })?;
        let post = now_ns();
        self.post_ns[s] = post;
        let header = Header {
            kind: Kind::Dispatch,
            stage: stage as u8,
            sequence: seq,
            sender: self.rank,
            tokens: count as u32,
            row_bytes: spec.row_bytes,
            side_len: side.len() as u32,
            post_ns: post,
            land_ns: 0,
            process_ns: 0,
            respond_ns: 0,
        }
        .encode();
        let imm = Imm::new(Kind::Dispatch, stage as u8, seq);
        let offset = self.layout.in_offset(s, self.rank as usize) as u64;
        for f in 0..self.layout.n {
            if let Err(e) = self.engine.write(f, &[&header, tokens, side], offset, imm) {
                // The combine can never complete: free the stage.
                self.stages.abandon(s);
                return Err(e);
            }
        }
        Ok(DispatchHandle { stage, seq })
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
        let tokens = self.stages.tokens(s).unwrap_or(0) as usize;
        self.stages.finish(s);
        Ok(Combined {
            rank: self,
            stage: s,
            tokens,
        })
    }

    /// Waits for the combine of `handle` and writes the element-wise sum of
    /// the N partials into `out` (`tokens × out_row_bytes` bytes).
    pub fn wait_combine_sum(
        &mut self,
        handle: DispatchHandle,
        dtype: Dtype,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<()> {
        let c = self.wait_combine(handle, timeout)?;
        c.sum_into(dtype, out)
    }

    /// Non-blocking: the combine of `handle` if it is complete.
    pub fn try_combine(&mut self, handle: DispatchHandle) -> Result<Option<Combined<'_>>> {
        self.pump(Duration::ZERO)?;
        self.check(handle)?;
        if self.stages.is_combined(handle.stage as usize) {
            return self.wait_combine(handle, Duration::ZERO).map(Some);
        }
        Ok(None)
    }

    /// Waits up to `timeout` until every handle's combine is complete,
    /// without taking them (take them with `wait_combine`, which then
    /// returns at once).
    pub fn wait_all(&mut self, handles: &[DispatchHandle], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pending = None;
            for h in handles {
                self.check(*h)?;
                let s = h.stage as usize;
                if !self.stages.is_combined(s) {
                    if let Some(f) = self
                        .stages
                        .missing(s)
                        .into_iter()
                        .find(|&f| self.engine.lost(f).is_some())
                    {
                        self.stages.abandon(s);
                        return Err(self.engine.lost_error(f));
                    }
                    pending.get_or_insert(s);
                }
            }
            let Some(s) = pending else { return Ok(()) };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let who: Vec<String> = self
                    .stages
                    .missing(s)
                    .iter()
                    .map(|&f| self.engine.peer(f).to_string())
                    .collect();
                return Err(Error::Timeout {
                    op: "combine",
                    peer: who.join(","),
                    after: timeout,
                });
            }
            self.pump(left)?;
        }
    }

    fn check(&self, h: DispatchHandle) -> Result<()> {
        if !self.stages.in_flight(h.stage as usize, h.seq) {
            return Err(Error::config(format!(
                "dispatch handle (stage {}, sequence {}) is not in flight: already combined, or abandoned",
                h.stage, h.seq
            )));
        }
        Ok(())
    }

    /// Makes progress without waiting: counts whatever has landed.
    pub fn progress(&mut self) -> Result<()> {
        self.pump(Duration::ZERO)
    }

    fn pump(&mut self, timeout: Duration) -> Result<()> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let r = self.engine.poll(timeout, &mut events);
        for ev in events.drain(..) {
            if let Event::Arrival { peer, imm } = ev {
                self.on_arrival(peer, imm);
            }
        }
        self.events = events;
        r
    }

    fn on_arrival(&mut self, f: usize, imm: Imm) {
        let (layout, region) = (self.layout, &self.region);
        let read = |s: usize| {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(region.slice(layout.out_offset(s, f), HEADER_LEN)?);
            Ok(h)
        };
        match accept(&layout.spec, f, imm, read, &mut self.stages) {
            Ok(a) => {
                self.engine.count_received(f);
                let s = a.stage;
                self.traces[s * self.layout.n + f] = Trace {
                    post_ns: self.post_ns[s],
                    land_ns: a.header.land_ns,
                    process_ns: a.header.process_ns,
                    respond_ns: a.header.respond_ns,
                    back_ns: now_ns(),
                };
            }
            Err(r) => {
                self.engine.count_rejected(f);
                if r.is_replay() {
                    tracing::debug!(peer = %Peer::Ffn(f as u32), "dropped combine (stage {}, seq {}): {r}", imm.stage, imm.seq24);
                } else {
                    tracing::warn!(peer = %Peer::Ffn(f as u32), "rejected combine (stage {}, seq {}): {r}", imm.stage, imm.seq24);
                }
            }
        }
    }

    /// Counters per FFN rank.
    pub fn stats(&self) -> RankStats {
        RankStats::new(&self.engine)
    }

    /// Leaves the mesh in order: tells the scheduler, closes the links.
    pub fn shutdown(mut self) -> Result<()> {
        self.engine.close();
        self.support.shutdown();
        Ok(())
    }
}
