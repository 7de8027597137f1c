//! Per-stage state machines.
//!
//! Attention side, per stage: `Idle → Dispatched → Combined → Idle`. A
//! dispatch of a stage that is not idle is refused (`StageBusy`): its output
//! slots may still be read. Each FFN's combine for the current sequence is
//! counted once.
//!
//! FFN side, per stage: `Collecting → Complete → HandedOut → Collecting`
//! (the last step is `respond`, which moves the stage to the next sequence).
//! Every attention rank's dispatch for the expected sequence is counted once.
//!
//! Arrivals that do not fit — a sequence already finished, a sender counted
//! twice, a message for a stage in the wrong state — are a [`Reject`]; the
//! engine drops them and counts them, and the state does not change.

use super::codec::DecodeError;
use super::header::Kind;

/// Why an arrival was not accepted: the header does not agree with its
/// imm, its link or the geometry (see [`accept`](super::accept::accept)),
/// or the stage machine does not expect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The stage index is outside the registered stages.
    NoSuchStage,
    /// The sender index is outside the mesh.
    NoSuchPeer,
    /// An older sequence than the stage expects: a stale message.
    Stale,
    /// This sender was already counted for this sequence.
    Duplicate,
    /// A newer sequence than possible: the peer broke the protocol.
    Ahead,
    /// The stage is not waiting for this kind of message now.
    Unexpected,
    /// The token count differs from what was dispatched.
    WrongTokens,
    /// The imm or the header names a kind of message this rank does not
    /// receive (an attention rank receives combines, an FFN rank dispatches).
    WrongKind {
        /// The kind the message claims.
        got: Kind,
    },
    /// The header in the slot does not decode.
    BadHeader(DecodeError),
    /// A header field disagrees with the imm or the link it came on, or
    /// with the geometry.
    Mismatch {
        /// Which field.
        field: Field,
        /// Its value in the header.
        header: u64,
        /// The value the imm, the link or the geometry requires.
        expected: u64,
    },
    /// A header field exceeds what the geometry allows.
    TooLarge {
        /// Which field.
        field: Field,
        /// Its value in the header.
        header: u64,
        /// The most the geometry allows.
        max: u64,
    },
    /// The write that announced the message carried fewer bytes than its
    /// header says the message has (the rest of the slot is stale).
    Short {
        /// Bytes that landed.
        landed: u64,
        /// Bytes the header's message needs.
        need: u64,
    },
    /// The message's bytes do not match its checksum, or it carries none
    /// where checksums are on (`AFMESH_CHECKSUM`).
    Checksum(String),
}

/// A header field named in a [`Reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// [`Header::stage`](super::Header::stage).
    Stage,
    /// [`Header::sequence`](super::Header::sequence) (its low 24 bits, as
    /// the imm carries them).
    Sequence,
    /// [`Header::sender`](super::Header::sender).
    Sender,
    /// [`Header::row_bytes`](super::Header::row_bytes).
    RowBytes,
    /// [`Header::tokens`](super::Header::tokens).
    Tokens,
    /// [`Header::side_len`](super::Header::side_len).
    SideLen,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Field::Stage => "stage",
            Field::Sequence => "sequence",
            Field::Sender => "sender",
            Field::RowBytes => "row_bytes",
            Field::Tokens => "tokens",
            Field::SideLen => "side_len",
        })
    }
}

impl Reject {
    /// Whether the message is harmless to drop (a replay) rather than a sign
    /// that the peer is broken.
    pub fn is_replay(&self) -> bool {
        matches!(self, Reject::Stale | Reject::Duplicate)
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::NoSuchStage => f.write_str("no such stage"),
            Reject::NoSuchPeer => f.write_str("no such peer"),
            Reject::Stale => f.write_str("stale sequence"),
            Reject::Duplicate => f.write_str("duplicate message"),
            Reject::Ahead => f.write_str("sequence ahead of the protocol"),
            Reject::Unexpected => f.write_str("stage not expecting this message"),
            Reject::WrongTokens => f.write_str("token count differs from the dispatch"),
            Reject::WrongKind { got } => write!(f, "a {got} is not received here"),
            Reject::BadHeader(e) => write!(f, "header: {e}"),
            Reject::Mismatch {
                field,
                header,
                expected,
            } => write!(f, "header {field} is {header}, expected {expected}"),
            Reject::TooLarge { field, header, max } => {
                write!(f, "header {field} is {header}, at most {max} allowed")
            }
            Reject::Checksum(e) => write!(f, "checksum: {e}"),
            Reject::Short { landed, need } => {
                write!(
                    f,
                    "{landed} bytes landed, the header's message needs {need}"
                )
            }
        }
    }
}

/// A stage machine that counts arrivals of one kind of message: what
/// [`accept`](super::accept::accept) feeds once a header checks out.
pub trait StageCounter {
    /// The kind of message counted.
    const KIND: Kind;
    /// Counts `from`'s message for `stage` at `sequence` carrying `tokens`
    /// rows. `Ok(true)` once the stage has every peer's; on `Err` the state
    /// is unchanged.
    fn count(
        &mut self,
        stage: usize,
        from: usize,
        sequence: u32,
        tokens: u32,
    ) -> Result<bool, Reject>;
    /// Whether [`StageCounter::count`] would count this message, without
    /// counting it: what is judged before the payload is read (a stale or
    /// duplicate message's slot may be receiving the next one).
    fn admits(&self, stage: usize, from: usize, sequence: u32, tokens: u32) -> Result<(), Reject>;
}

impl StageCounter for AttentionStages {
    const KIND: Kind = Kind::Combine;
    fn admits(&self, stage: usize, from: usize, seq: u32, tokens: u32) -> Result<(), Reject> {
        let s = self.stages.get(stage).ok_or(Reject::NoSuchStage)?;
        if from >= self.peers {
            return Err(Reject::NoSuchPeer);
        }
        if seq.wrapping_sub(s.seq) as i32 > 0 {
            return Err(Reject::Ahead);
        }
        if seq != s.seq {
            return Err(Reject::Stale);
        }
        match &s.state {
            AState::Dispatched { tokens: t, .. } if *t != tokens => Err(Reject::WrongTokens),
            AState::Dispatched { .. } if s.arrived[from] => Err(Reject::Duplicate),
            AState::Dispatched { .. } => Ok(()),
            AState::Combined { .. } => Err(Reject::Duplicate),
            AState::Idle => Err(Reject::Unexpected),
        }
    }
    fn count(
        &mut self,
        stage: usize,
        from: usize,
        sequence: u32,
        tokens: u32,
    ) -> Result<bool, Reject> {
        self.on_combine(stage, from, sequence, tokens)
    }
}

impl StageCounter for FfnStages {
    const KIND: Kind = Kind::Dispatch;
    fn admits(&self, stage: usize, from: usize, seq: u32, _tokens: u32) -> Result<(), Reject> {
        let s = self.stages.get(stage).ok_or(Reject::NoSuchStage)?;
        if from >= self.peers {
            return Err(Reject::NoSuchPeer);
        }
        if seq.wrapping_sub(s.seq) as i32 > 0 {
            return Err(Reject::Ahead);
        }
        if seq != s.seq {
            return Err(Reject::Stale);
        }
        if s.state != FState::Collecting || s.tokens[from].is_some() {
            return Err(Reject::Duplicate);
        }
        Ok(())
    }
    fn count(
        &mut self,
        stage: usize,
        from: usize,
        sequence: u32,
        tokens: u32,
    ) -> Result<bool, Reject> {
        self.on_dispatch(stage, from, sequence, tokens)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AState {
    Idle,
    /// Which FFN ranks have arrived is the stage's `arrived` (kept between
    /// dispatches, so a dispatch allocates nothing).
    Dispatched {
        tokens: u32,
        count: usize,
    },
    Combined {
        tokens: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AStage {
    state: AState,
    /// Sequence of the current (or next) dispatch of this stage.
    seq: u32,
    /// Per FFN rank, while `Dispatched`: whether its combine arrived.
    arrived: Vec<bool>,
}

/// An attention rank's stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionStages {
    stages: Vec<AStage>,
    peers: usize,
}

impl AttentionStages {
    /// `stages` stages, each combined from `peers` FFN ranks.
    pub fn new(stages: usize, peers: usize) -> Self {
        AttentionStages {
            stages: vec![
                AStage {
                    state: AState::Idle,
                    seq: 0,
                    arrived: vec![false; peers],
                };
                stages
            ],
            peers,
        }
    }

    /// Starts a dispatch; returns its sequence, or `None` if the stage is busy
    /// (or does not exist — the caller checks the index first).
    pub fn dispatch(&mut self, stage: usize, tokens: u32) -> Option<u32> {
        let peers = self.peers;
        let s = self.stages.get_mut(stage)?;
        if s.state != AState::Idle {
            return None;
        }
        s.state = if peers == 0 {
            AState::Combined { tokens }
        } else {
            s.arrived.fill(false);
            AState::Dispatched { tokens, count: 0 }
        };
        Some(s.seq)
    }

    /// Counts FFN `from`'s combine for `stage` at `seq` carrying `tokens`
    /// rows. Returns `Ok(true)` once every FFN has arrived.
    pub fn on_combine(
        &mut self,
        stage: usize,
        from: usize,
        seq: u32,
        tokens: u32,
    ) -> Result<bool, Reject> {
        let peers = self.peers;
        let s = self.stages.get_mut(stage).ok_or(Reject::NoSuchStage)?;
        if from >= peers {
            return Err(Reject::NoSuchPeer);
        }
        if seq.wrapping_sub(s.seq) as i32 > 0 {
            return Err(Reject::Ahead);
        }
        if seq != s.seq {
            return Err(Reject::Stale);
        }
        match &mut s.state {
            AState::Dispatched { tokens: t, count } => {
                if *t != tokens {
                    return Err(Reject::WrongTokens);
                }
                if s.arrived[from] {
                    return Err(Reject::Duplicate);
                }
                s.arrived[from] = true;
                *count += 1;
                if *count == peers {
                    s.state = AState::Combined { tokens };
                    return Ok(true);
                }
                Ok(false)
            }
            AState::Combined { .. } => Err(Reject::Duplicate),
            AState::Idle => Err(Reject::Unexpected),
        }
    }

    /// How many dispatches of `stage` have all their combines: every one
    /// with a smaller sequence has. What a stream waiting for a combine
    /// compares against.
    pub fn combined_through(&self, stage: usize) -> Option<u32> {
        self.stages.get(stage).map(|s| match s.state {
            AState::Combined { .. } => s.seq.wrapping_add(1),
            _ => s.seq,
        })
    }

    /// Whether `stage` may be dispatched now (it exists and is idle).
    pub fn is_idle(&self, stage: usize) -> bool {
        self.stages
            .get(stage)
            .is_some_and(|s| s.state == AState::Idle)
    }

    /// Whether `stage` has all its combines.
    pub fn is_combined(&self, stage: usize) -> bool {
        matches!(
            self.stages.get(stage).map(|s| &s.state),
            Some(AState::Combined { .. })
        )
    }

    /// Whether `stage` was dispatched at `seq` and not yet finished.
    pub fn in_flight(&self, stage: usize, seq: u32) -> bool {
        self.stages
            .get(stage)
            .is_some_and(|s| s.seq == seq && s.state != AState::Idle)
    }

    /// FFN ranks whose combine for `stage` has not arrived.
    pub fn missing(&self, stage: usize) -> Vec<usize> {
        self.waiting_on(stage).collect()
    }

    /// [`AttentionStages::missing`], without collecting it.
    pub fn waiting_on(&self, stage: usize) -> impl Iterator<Item = usize> + '_ {
        let arrived = match self.stages.get(stage) {
            Some(
                s @ AStage {
                    state: AState::Dispatched { .. },
                    ..
                },
            ) => &s.arrived[..],
            _ => &[],
        };
        (0..arrived.len()).filter(|&i| !arrived[i])
    }

    /// Tokens of the dispatch in flight on `stage`.
    pub fn tokens(&self, stage: usize) -> Option<u32> {
        match self.stages.get(stage).map(|s| &s.state) {
            Some(AState::Dispatched { tokens, .. }) | Some(AState::Combined { tokens }) => {
                Some(*tokens)
            }
            _ => None,
        }
    }

    /// The caller took the combined result: the stage is idle again and
    /// its next dispatch gets the next sequence.
    pub fn finish(&mut self, stage: usize) -> bool {
        match self.stages.get_mut(stage) {
            Some(s) if matches!(s.state, AState::Combined { .. }) => {
                s.state = AState::Idle;
                s.seq = s.seq.wrapping_add(1);
                true
            }
            _ => false,
        }
    }

    /// Abandons a dispatch whose combine can never complete (a peer was
    /// lost): the stage is idle again and moves to the next sequence, so
    /// late arrivals of the old one are stale.
    pub fn abandon(&mut self, stage: usize) {
        if let Some(s) = self.stages.get_mut(stage) {
            if s.state != AState::Idle {
                s.state = AState::Idle;
                s.seq = s.seq.wrapping_add(1);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FState {
    Collecting,
    Complete,
    HandedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FStage {
    state: FState,
    seq: u32,
    tokens: Vec<Option<u32>>,
    count: usize,
}

/// An FFN rank's stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfnStages {
    stages: Vec<FStage>,
    peers: usize,
}

impl FfnStages {
    /// `stages` stages, each gathered from `peers` attention ranks.
    pub fn new(stages: usize, peers: usize) -> Self {
        FfnStages {
            stages: vec![
                FStage {
                    state: if peers == 0 {
                        FState::Complete
                    } else {
                        FState::Collecting
                    },
                    seq: 0,
                    tokens: vec![None; peers],
                    count: 0,
                };
                stages
            ],
            peers,
        }
    }

    /// Counts attention rank `from`'s dispatch. `Ok(true)` once the stage
    /// has every sender.
    pub fn on_dispatch(
        &mut self,
        stage: usize,
        from: usize,
        seq: u32,
        tokens: u32,
    ) -> Result<bool, Reject> {
        let peers = self.peers;
        let s = self.stages.get_mut(stage).ok_or(Reject::NoSuchStage)?;
        if from >= peers {
            return Err(Reject::NoSuchPeer);
        }
        if seq.wrapping_sub(s.seq) as i32 > 0 {
            return Err(Reject::Ahead);
        }
        if seq != s.seq {
            return Err(Reject::Stale);
        }
        if s.state != FState::Collecting || s.tokens[from].is_some() {
            return Err(Reject::Duplicate);
        }
        s.tokens[from] = Some(tokens);
        s.count += 1;
        if s.count == peers {
            s.state = FState::Complete;
            return Ok(true);
        }
        Ok(false)
    }

    /// How many batches of `stage` were complete: every one with a
    /// smaller sequence was.
    pub fn complete_through(&self, stage: usize) -> Option<u32> {
        self.stages.get(stage).map(|s| match s.state {
            FState::Collecting => s.seq,
            FState::Complete | FState::HandedOut => s.seq.wrapping_add(1),
        })
    }

    /// The sequence of the next batch of `stage` that `hand_out` will give.
    pub fn next_batch(&self, stage: usize) -> Option<u32> {
        self.stages.get(stage).map(|s| match s.state {
            FState::Collecting | FState::Complete => s.seq,
            FState::HandedOut => s.seq.wrapping_add(1),
        })
    }

    /// The complete stage that is oldest by (sequence, stage), if any.
    pub fn oldest_complete(&self) -> Option<usize> {
        let base = self.stages.iter().map(|s| s.seq).min().unwrap_or(0);
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == FState::Complete)
            .min_by_key(|(i, s)| (s.seq.wrapping_sub(base), *i))
            .map(|(i, _)| i)
    }

    /// Hands a complete stage to the caller; returns its sequence and the
    /// token count of every sender.
    pub fn hand_out(&mut self, stage: usize) -> Option<(u32, Vec<u32>)> {
        let seq = self.hand_out_seq(stage)?;
        let s = &self.stages[stage];
        Some((seq, s.tokens.iter().map(|t| t.unwrap_or(0)).collect()))
    }

    /// [`FfnStages::hand_out`], returning the sequence only (allocates
    /// nothing).
    pub fn hand_out_seq(&mut self, stage: usize) -> Option<u32> {
        let s = self.stages.get_mut(stage)?;
        if s.state != FState::Complete {
            return None;
        }
        s.state = FState::HandedOut;
        Some(s.seq)
    }

    /// Whether `stage` is handed out at `seq` and not yet answered.
    pub fn is_handed_out(&self, stage: usize, seq: u32) -> bool {
        self.stages
            .get(stage)
            .is_some_and(|s| s.state == FState::HandedOut && s.seq == seq)
    }

    /// The caller responded to `stage` at `seq`: collect the next sequence.
    pub fn respond(&mut self, stage: usize, seq: u32) -> bool {
        let peers = self.peers;
        match self.stages.get_mut(stage) {
            Some(s) if s.state == FState::HandedOut && s.seq == seq => {
                s.seq = s.seq.wrapping_add(1);
                s.tokens.iter_mut().for_each(|t| *t = None);
                s.count = 0;
                s.state = if peers == 0 {
                    FState::Complete
                } else {
                    FState::Collecting
                };
                true
            }
            _ => false,
        }
    }

    /// Attention ranks that have not arrived on the stage closest to
    /// completion — who a waiter is waiting for.
    pub fn missing(&self) -> Vec<usize> {
        self.stages
            .iter()
            .filter(|s| s.state == FState::Collecting)
            .max_by_key(|s| s.count)
            .map(|s| (0..self.peers).filter(|&i| s.tokens[i].is_none()).collect())
            .unwrap_or_default()
    }

    /// Whether attention rank `from` is needed by a stage still collecting.
    pub fn needs(&self, from: usize) -> bool {
        self.stages.iter().any(|s| {
            s.state == FState::Collecting && s.tokens.get(from).is_some_and(|t| t.is_none())
        })
    }
}

#[cfg(test)]
mod tests;
