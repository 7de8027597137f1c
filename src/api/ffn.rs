//! The FFN side: gather every attention rank's block for a stage, answer
//! each with its rows.

use std::sync::Arc;
use std::time::Duration;

use super::layout::Layout;
use crate::engine::{now_ns, Engine, RankStats, Sink};
use crate::error::{Error, Result};
use crate::proto::{Accepted, FfnStages, Header, Imm, Kind, HEADER_LEN};
use crate::transport::Region;

/// One gathered stage: every attention rank's block, viewed in place in the
/// registered input slots. Answer it with [`FfnRank::respond`].
#[derive(Debug)]
pub struct Batch {
    stage: u32,
    seq: u32,
    tokens: Vec<u32>,
    side_lens: Vec<u32>,
    offsets: Vec<usize>,
    row_bytes: usize,
    region: Arc<Region>,
    land_ns: Vec<u64>,
    post_ns: Vec<u64>,
    process_ns: u64,
}

impl Batch {
    /// The stage.
    pub fn stage(&self) -> u32 {
        self.stage
    }
    /// The stage's sequence number.
    pub fn sequence(&self) -> u32 {
        self.seq
    }
    /// Number of senders (attention ranks).
    pub fn senders(&self) -> usize {
        self.tokens.len()
    }
    /// Tokens attention rank `a` sent.
    pub fn token_count(&self, a: usize) -> usize {
        self.tokens.get(a).copied().unwrap_or(0) as usize
    }
    /// Bytes of one dispatched row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// Tokens from all senders.
    pub fn total_tokens(&self) -> usize {
        self.tokens.iter().map(|&t| t as usize).sum()
    }
    /// Attention rank `a`'s rows, zero-copy.
    pub fn tokens(&self, a: usize) -> &[u8] {
        let Some(&off) = self.offsets.get(a) else {
            return &[];
        };
        self.region
            .slice(off + HEADER_LEN, self.token_count(a) * self.row_bytes)
            .unwrap_or(&[])
    }
    /// Attention rank `a`'s side block, zero-copy.
    pub fn side(&self, a: usize) -> &[u8] {
        let Some(&off) = self.offsets.get(a) else {
            return &[];
        };
        let rows = self.token_count(a) * self.row_bytes;
        self.region
            .slice(off + HEADER_LEN + rows, self.side_lens[a] as usize)
            .unwrap_or(&[])
    }
    /// When attention rank `a` posted its dispatch (its clock, ns).
    pub fn posted_ns(&self, a: usize) -> u64 {
        self.post_ns.get(a).copied().unwrap_or(0)
    }
    /// When attention rank `a`'s dispatch was seen here (ns).
    pub fn landed_ns(&self, a: usize) -> u64 {
        self.land_ns.get(a).copied().unwrap_or(0)
    }
}

/// An FFN rank of a mesh: a face over the [`Engine`].
#[derive(Debug)]
pub struct FfnRank {
    engine: Engine,
    st: State,
}

/// What only the FFN role keeps: its stage machine and, per (stage,
/// attention rank), what the counted dispatch said.
#[derive(Debug)]
struct State {
    layout: Layout,
    rank: u32,
    stages: FfnStages,
    /// When it landed, when it was posted, its side-block length.
    land_ns: Vec<u64>,
    post_ns: Vec<u64>,
    side_lens: Vec<u32>,
}

impl Sink for State {
    type Counter = FfnStages;
    fn counter(&mut self) -> &mut FfnStages {
        &mut self.stages
    }
    fn accepted(&mut self, a: usize, acc: &Accepted, at_ns: u64) {
        let i = acc.stage * self.layout.m + a;
        self.land_ns[i] = at_ns;
        self.post_ns[i] = acc.header.post_ns;
        self.side_lens[i] = acc.header.side_len;
    }
}

impl State {
    /// The first attention rank that is lost while a stage still needs it.
    fn lost_needed(&self, engine: &Engine) -> Option<usize> {
        engine.first_lost((0..self.layout.m).filter(|&a| self.stages.needs(a)))
    }

    fn take_complete(&mut self, region: &Arc<Region>) -> Option<Batch> {
        let s = self.stages.oldest_complete()?;
        let (seq, tokens) = self.stages.hand_out(s)?;
        let m = self.layout.m;
        let offsets: Vec<usize> = (0..m).map(|a| self.layout.in_offset(s, a)).collect();
        let senders = s * m..(s + 1) * m;
        Some(Batch {
            stage: s as u32,
            seq,
            side_lens: self.side_lens[senders.clone()].to_vec(),
            post_ns: self.post_ns[senders.clone()].to_vec(),
            tokens,
            offsets,
            row_bytes: self.layout.spec.row_bytes as usize,
            region: region.clone(),
            land_ns: self.land_ns[senders].to_vec(),
            process_ns: now_ns(),
        })
    }
}

impl FfnRank {
    pub(crate) fn new(engine: Engine, layout: Layout, rank: u32) -> Self {
        let n = layout.stages() * layout.m;
        FfnRank {
            engine,
            st: State {
                stages: FfnStages::new(layout.stages(), layout.m),
                land_ns: vec![0; n],
                post_ns: vec![0; n],
                side_lens: vec![0; n],
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
        let region = self.engine.recv_region().clone();
        let got = self.engine.wait(&mut self.st, timeout, |engine, st| {
            if let Some(b) = st.take_complete(&region) {
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
    /// for its next sequence. If an attention rank is lost, the others are
    /// still answered and the loss is returned.
    pub fn respond(&mut self, batch: &Batch, outputs: &[&[u8]]) -> Result<()> {
        let layout = self.st.layout;
        let spec = layout.spec;
        let s = batch.stage as usize;
        if outputs.len() != layout.m {
            return Err(Error::invalid(format!(
                "respond: {} output blocks for {} attention ranks",
                outputs.len(),
                layout.m
            )));
        }
        for (a, out) in outputs.iter().enumerate() {
            let need = batch.token_count(a) * spec.out_row_bytes as usize;
            if out.len() != need {
                return Err(Error::BufferSize {
                    what: format!("respond output for A{a} ({} tokens)", batch.token_count(a)),
                    need,
                    got: out.len(),
                });
            }
        }
        if !self.st.stages.respond(s, batch.seq) {
            return Err(Error::invalid(format!(
                "respond: batch (stage {}, sequence {}) was already answered",
                batch.stage, batch.seq
            )));
        }
        let imm = Imm::new(Kind::Combine, batch.stage as u8, batch.seq);
        let respond = now_ns();
        let mut first_err = None;
        for (a, out) in outputs.iter().enumerate() {
            let header = Header {
                kind: Kind::Combine,
                stage: batch.stage as u8,
                sequence: batch.seq,
                sender: self.st.rank,
                tokens: batch.token_count(a) as u32,
                row_bytes: spec.out_row_bytes,
                side_len: 0,
                post_ns: batch.posted_ns(a),
                land_ns: batch.landed_ns(a),
                process_ns: batch.process_ns,
                respond_ns: respond,
            }
            .encode();
            let offset = layout.out_offset(s, self.st.rank as usize) as u64;
            if let Err(e) = self.engine.write(a, &[&header, out], offset, imm) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Makes progress without waiting: counts whatever has landed.
    pub fn progress(&mut self) -> Result<()> {
        self.engine.pump(Duration::ZERO, &mut self.st)
    }

    /// Counters per attention rank.
    pub fn stats(&self) -> RankStats {
        self.engine.stats()
    }

    /// Leaves the mesh in order: closes the links, tells the scheduler.
    pub fn shutdown(mut self) -> Result<()> {
        self.engine.shutdown();
        Ok(())
    }
}
