//! The rank core: what attention and FFN ranks share, written once.
//!
//! An [`Engine`] owns the transport, the peer table, the rank's receive
//! region and its send slots. It posts messages from send slots to peers by
//! index (`post`, in `send.rs`) and learns in one place when a slot may be
//! reused (`on_sent`). Its pump polls the transport and turns completions
//! into effects: an arrival is judged by
//! [`proto::accept`](crate::proto::accept) against the header in the slot
//! it names and, when accepted, handed to the role's [`Sink`]; a lost link
//! marks its peer lost (first reason wins) and releases the sends to it. It
//! keeps the per-peer counters and ends the rank in order (links closed,
//! goodbye to the scheduler).
//!
//! The role faces in `crate::api` hold an engine plus their stage machine
//! and bookkeeping; they never poll the transport themselves.

mod checksum;
mod clock;
mod histogram;
mod interrupt;
mod send;
mod stats;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use histogram::Histogram;
pub use interrupt::Interrupter;
pub use stats::{PeerStats, RankStats, Straggler};
pub(crate) use support::Support;

use checksum::{crc_of, region_crc};

use crate::error::{Error, Peer, Result};
use crate::metrics::Metrics;
use crate::proto::accept::accept_checked;
use crate::proto::header::checksum;
use crate::proto::{
    Accepted, Geometry, Header, Imm, Kind, RegionKey, Reject, StageCounter, StageLayout, HEADER_LEN,
};
use crate::trace::{Record, Recorder};
use crate::transport::mux::MAX_PARK;
use crate::transport::slots::SendSlots;
use crate::transport::{Completion, LinkId, LocalKey, Mux, Region};

/// Where a role's arrivals go: the stage machine that counts them, and what
/// the role records about an accepted one.
pub(crate) trait Sink {
    /// The stage machine.
    type Counter: StageCounter;
    /// The stage machine, to count an arrival whose header checked out.
    fn counter(&mut self) -> &mut Self::Counter;
    /// Peer `peer`'s message was counted; `at_ns` is when it was seen.
    /// Returns the round trip it ends (nanoseconds), if it ends one, for
    /// the peer's [`PeerStats::round_trip_ns`].
    fn accepted(&mut self, peer: usize, accepted: &Accepted, at_ns: u64) -> Option<u64>;
    /// After an arrival completed a stage: the peer that answered it last
    /// and by how many ns after the one before it, for the peer's
    /// [`PeerStats::late_ns`] (attention ranks; taken once).
    fn take_straggler(&mut self) -> Option<(usize, u64)> {
        None
    }
    /// Where in peer `peer`'s region this rank writes next, now that
    /// `accepted` says the peer is done reading it: (offset, length), for
    /// [`Transport::prepare_write`](crate::transport::Transport::prepare_write).
    fn next_write(&self, peer: usize, accepted: &Accepted) -> Option<(u64, u64)> {
        let _ = (peer, accepted);
        None
    }
}

/// A peer's side of the table.
#[derive(Debug)]
struct PeerLink {
    peer: Peer,
    link: LinkId,
    /// The peer region our writes target.
    key: RegionKey,
    stats: PeerStats,
    /// Whether it was lost by leaving in order (rather than failing).
    orderly: bool,
    /// Whether it was dropped for sending a corrupt message (a checksum
    /// that did not match): its error is `BadFrame`, not `PeerLost`.
    corrupt: bool,
    /// Whether its link's backend also puts headers in the receive
    /// region's host mirror (cuda); else headers are read from the region.
    mirrored: bool,
    /// Whether its link's backend copies the bytes itself (counted as
    /// copied once posted).
    copies: bool,
}

/// Where the peers' messages land.
#[derive(Debug)]
pub(crate) struct Receive {
    pub(crate) region: Arc<Region>,
    pub(crate) places: Places,
}

/// Where in the receive region (stage `s`, peer `p`)'s message lands: its
/// header at `s × stage_stride + p × peer_stride`, followed by its side
/// area and, unless `rows` says otherwise, its rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Places {
    pub(crate) stage_stride: usize,
    pub(crate) peer_stride: usize,
    /// The matrix layout: the rows are elsewhere.
    pub(crate) rows: Option<MatrixRows>,
}

/// Under the matrix layout, (stage `s`, peer `p`)'s rows are at `at + s ×
/// stage_stride + p × peer_stride`; the head before them is the header and
/// `side_area` bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatrixRows {
    pub(crate) at: usize,
    pub(crate) peer_stride: usize,
    pub(crate) side_area: usize,
}

impl Places {
    /// Offset of (stage `s`, peer `p`)'s header.
    fn header(&self, s: usize, p: usize) -> usize {
        s * self.stage_stride + p * self.peer_stride
    }
}

/// The rank core.
#[derive(Debug)]
pub(crate) struct Engine {
    transport: Mux,
    /// The send region's key, for posted writes from it.
    send_key: LocalKey,
    /// Completions taken while waiting out a full send window, for the next
    /// pump.
    backlog: Vec<Completion>,
    /// When a wait last started polling the transport ([`now_ns`]).
    polled_at: Option<u64>,
    peers: Vec<PeerLink>,
    link_to_peer: Vec<Option<usize>>,
    completions: Vec<Completion>,
    geometry: Geometry,
    recv: Receive,
    send: SendSlots,
    /// Per (send slot, peer): the generation of the post whose send has not
    /// completed, if any, and how many of its writes have not reported
    /// `Sent` yet (see `send.rs`).
    outstanding: Vec<Option<(u32, u8)>>,
    generation: u32,
    /// Bound on waiting for a send slot's sends to complete.
    send_timeout: Duration,
    support: Support,
    /// Wakes `wait` from another thread.
    interrupter: Interrupter,
    /// Whether messages carry (and arrivals must carry) a CRC32C.
    checksum: bool,
    /// Records every message exchanged, when the rank traces.
    tracer: Option<Box<Recorder>>,
    /// Serves the stats (`AFMESH_METRICS`), when asked to.
    metrics: Option<Metrics>,
    /// Bytes of a message before its rows (header and side area): posted
    /// to mirrored peers into their host mirror only (0: not split).
    prefix: usize,
    /// Device send slots and every peer mirrored: the prefix is written
    /// to the slots' pinned shadow only, never copied to the device.
    prefix_host_only: bool,
}

impl Engine {
    /// `peers[i]` is reached over `links[i]` and written at `keys[i]`; its
    /// messages land in `recv`; this rank's messages are built in `send`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        transport: Mux,
        peers: Vec<(Peer, LinkId, RegionKey)>,
        geometry: Geometry,
        recv: Receive,
        send: SendSlots,
        send_key: LocalKey,
        support: Support,
    ) -> Engine {
        let nlinks = peers
            .iter()
            .map(|p| p.1 + 1)
            .max()
            .unwrap_or(0)
            .max(transport.links());
        let npeers = peers.len();
        let mut link_to_peer = vec![None; nlinks];
        for (i, p) in peers.iter().enumerate() {
            link_to_peer[p.1] = Some(i);
        }
        let peers: Vec<PeerLink> = peers
            .into_iter()
            .map(|(peer, link, key)| PeerLink {
                peer,
                link,
                key,
                stats: PeerStats::default(),
                orderly: false,
                corrupt: false,
                mirrored: transport.caps_of(link).is_some_and(|c| c.header_mirror),
                copies: transport.caps_of(link).is_some_and(|c| c.copies),
            })
            .collect();
        Engine {
            transport,
            send_key,
            backlog: Vec::new(),
            polled_at: None,
            peers,
            link_to_peer,
            completions: Vec::with_capacity(64),
            geometry,
            recv,
            outstanding: vec![None; send.count() * npeers],
            send,
            generation: 0,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            support,
            interrupter: Interrupter::new(),
            checksum: false,
            tracer: None,
            metrics: None,
            prefix: 0,
            prefix_host_only: false,
        }
    }

    /// Messages carry `prefix` bytes (header and side area) before their
    /// rows: to peers whose backend writes the receive region's host
    /// mirror (cuda), a message from device send slots is posted with its
    /// prefix going to that mirror only (`post_write_mirrored`), and where
    /// every peer is such, the prefix is not copied to the device at all.
    pub(crate) fn set_prefix(&mut self, prefix: usize) {
        // Device send slots keep a pinned host shadow: the mirror's bytes.
        let device = self.send.region().shadow().is_some();
        self.prefix = if device { prefix } else { 0 };
        self.prefix_host_only =
            device && !self.peers.is_empty() && self.peers.iter().all(|p| p.mirrored);
    }

    /// Whether peer `peer`'s messages leave their prefix (header, side
    /// block) in the receive region's host mirror only, not in the region.
    pub(crate) fn mirrored(&self, peer: usize) -> bool {
        self.peers.get(peer).is_some_and(|p| p.mirrored)
    }

    /// Serves this rank's stats through `metrics` from here on.
    pub(crate) fn set_metrics(&mut self, mut metrics: Metrics, me: Peer) -> Result<()> {
        metrics.start(me)?;
        self.metrics = Some(metrics);
        Ok(())
    }

    /// Records every message from here on into `tracer`.
    pub(crate) fn set_tracer(&mut self, tracer: Recorder) {
        tracing::info!("tracing messages to {}", tracer.path().display());
        self.tracer = Some(Box::new(tracer));
    }

    /// Bounds waits for send completions (a blocking write's bound).
    pub(crate) fn set_send_timeout(&mut self, t: Duration) {
        self.send_timeout = t;
    }

    /// Sends a CRC32C in every message and requires one, matching, in every
    /// arrival (`AFMESH_CHECKSUM`).
    pub(crate) fn set_checksum(&mut self, on: bool) {
        self.checksum = on;
    }

    /// What wakes this engine's waits from another thread.
    pub(crate) fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }

    pub(crate) fn peer(&self, i: usize) -> Peer {
        self.peers[i].peer
    }

    /// The region peers write into.
    pub(crate) fn recv_region(&self) -> &Arc<Region> {
        &self.recv.region
    }

    /// Why peer `i` is lost, if it is.
    pub(crate) fn lost(&self, i: usize) -> Option<&str> {
        self.peers.get(i).and_then(|p| p.stats.lost.as_deref())
    }

    /// A peer among `among` that is lost: the first that failed, else the
    /// first that left in order (a peer often leaves because another
    /// failed; the failure is the news).
    pub(crate) fn first_lost(&self, among: impl IntoIterator<Item = usize>) -> Option<usize> {
        let mut left = None;
        for i in among {
            match self.peers.get(i) {
                Some(p) if p.stats.lost.is_some() && !p.orderly => return Some(i),
                Some(p) if p.stats.lost.is_some() => {
                    left.get_or_insert(i);
                }
                _ => {}
            }
        }
        left
    }

    pub(crate) fn lost_error(&self, i: usize) -> Error {
        if self.peers[i].corrupt {
            return Error::BadFrame {
                peer: self.peers[i].peer.to_string(),
                reason: self.lost(i).unwrap_or("corrupt").to_string(),
            };
        }
        Error::PeerLost {
            peer: self.peers[i].peer,
            reason: self.lost(i).unwrap_or("lost").to_string(),
        }
    }

    /// Names peers for an error message: `"A0,A2"`.
    pub(crate) fn names(&self, peers: impl IntoIterator<Item = usize>) -> String {
        peers
            .into_iter()
            .map(|i| self.peer(i).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Counters per peer.
    pub(crate) fn stats(&self) -> RankStats {
        RankStats {
            transport: self.transport.name(),
            peers: self
                .peers
                .iter()
                .map(|p| (p.peer, p.stats.clone()))
                .collect(),
            wire: self.transport.counters(),
            spin_gaps: self.transport.spin_gaps(),
        }
    }

    /// Records that peer `r.peer`'s message was answered: `r` holds its
    /// stamps (when it was posted, landed, processed and answered).
    pub(crate) fn record_ffn(&mut self, r: Record) {
        if let Some(p) = self.peers.get_mut(r.peer as usize) {
            p.stats
                .ffn_ns
                .record(r.respond_ns.saturating_sub(r.land_ns));
        }
        if let Some(t) = &mut self.tracer {
            t.record(r);
        }
    }

    /// Hands the scheduler this rank's results for its job summary.
    pub(crate) fn report(&mut self, text: &str) -> Result<()> {
        self.support.report(text)
    }

    /// A barrier of the running mesh through the scheduler. While it
    /// waits for the release it keeps pumping the transport in slices of
    /// at most [`SYNC_SLICE`] (queued writes go out, arrivals are counted
    /// into `sink`, completions taken), so a peer waiting on this rank's
    /// traffic can reach the barrier too. A timeout or an interrupt
    /// leaves the rank inside: calling again resumes the same barrier.
    pub(crate) fn sync<S: Sink>(
        &mut self,
        sink: &mut S,
        roles: crate::proto::Roles,
        scope: crate::proto::Scope,
        timeout: Duration,
    ) -> Result<()> {
        let entered = self.support.sync_enter(roles, scope)?;
        let deadline = Instant::now().checked_add(timeout);
        let mut polled = false;
        loop {
            if self.support.sync_released(&entered, Duration::ZERO)? {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => timeout,
            };
            if polled && left.is_zero() {
                return Err(entered.timed_out(timeout));
            }
            if polled && self.interrupter.take() {
                return Err(Error::Interrupted);
            }
            // Parks on the transport's wake sources (at most one slice);
            // the release is looked for after every slice.
            self.pump(left.min(SYNC_SLICE), sink)?;
            polled = true;
        }
    }

    /// Leaves in order: tells every peer (closing the links), then the
    /// scheduler.
    pub(crate) fn shutdown(&mut self) {
        if let Some(t) = &mut self.tracer {
            t.finish();
        }
        if let Some(m) = &mut self.metrics {
            m.stop();
        }
        self.transport.close();
        self.support.shutdown();
    }

    /// Marks peer `i` lost (first reason wins); sends to it will not
    /// complete, so their slots are released.
    fn mark_lost(&mut self, i: usize, reason: String, orderly: bool) {
        let p = &mut self.peers[i];
        if p.stats.lost.is_none() {
            if orderly {
                tracing::debug!(peer = %p.peer, "peer closed the link in order");
            } else {
                tracing::warn!(peer = %p.peer, "peer lost: {reason}");
            }
            p.stats.lost = Some(reason);
            p.orderly = orderly;
        }
        // The transport must stop reading this peer's posted slots before
        // they are handed back for refilling.
        let link = self.peers[i].link;
        self.transport.abort(link);
        self.release_sends_to(i);
    }

    /// Polls the transport, waiting up to `timeout` for the first
    /// completion, and acts on everything it reports: arrivals go through
    /// acceptance into `sink`, lost links mark their peers.
    pub(crate) fn pump<S: Sink>(&mut self, timeout: Duration, sink: &mut S) -> Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        completions.append(&mut self.backlog);
        let wait = if completions.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        if let Some(m) = self.metrics.as_ref().filter(|m| m.wanted()) {
            m.publish(self.stats());
        }
        let r = self.transport.poll(&mut completions, wait);
        for c in completions.drain(..) {
            match c {
                Completion::Sent { token } => self.on_sent(token),
                Completion::Arrival { link, imm, len } => {
                    if let Some(peer) = self.peer_of(link) {
                        self.arrival(peer, Imm::decode(imm), u64::from(len), sink);
                    }
                }
                Completion::LinkClosed { link } => {
                    if let Some(peer) = self.peer_of(link) {
                        self.mark_lost(peer, "peer shut down".into(), true);
                    }
                }
                Completion::LinkDown { link, reason } => {
                    if let Some(peer) = self.peer_of(link) {
                        self.mark_lost(peer, reason, false);
                    }
                }
                Completion::LinkError { link, reason } => {
                    if let Some(peer) = self.peer_of(link) {
                        self.mark_lost(peer, format!("protocol error: {reason}"), false);
                    }
                }
            }
        }
        self.completions = completions;
        r
    }

    /// Pumps until `ready` yields a value or errs, or `timeout` runs out
    /// (`Ok(None)`), or the [`Interrupter`] fires (`Error::Interrupted`).
    /// `ready` is asked first, and the transport is polled at least once
    /// before giving up, so a zero timeout takes what has already landed.
    /// Each pump waits at most [`MAX_PARK`], so an interrupt is seen within
    /// one park.
    pub(crate) fn wait<S: Sink, T>(
        &mut self,
        sink: &mut S,
        timeout: Duration,
        mut ready: impl FnMut(&Engine, &mut S) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut polled = false;
        loop {
            if let Some(v) = ready(self, sink)? {
                return Ok(Some(v));
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => timeout,
            };
            if left.is_zero() && polled {
                return Ok(None);
            }
            if !left.is_zero() && self.interrupter.pending() {
                if polled && self.interrupter.take() {
                    return Err(Error::Interrupted);
                }
                // What has already landed answers the wait before an
                // interrupt ends it.
                self.pump(Duration::ZERO, sink)?;
                polled = true;
                continue;
            }
            self.polled_at = Some(now_ns());
            self.pump(left.min(MAX_PARK), sink)?;
            polled = true;
        }
    }

    /// Whether a wait polled the transport within `window` (so a dispatch
    /// right behind a combine need not poll again: over tcp that is a
    /// `recv` per link finding nothing).
    pub(crate) fn polled_within(&self, window: Duration) -> bool {
        // On the stamp clock (cheap): a wall clock stepped back only makes
        // this true (or false) once too often within `window`.
        self.polled_at
            .is_some_and(|t| u128::from(now_ns().saturating_sub(t)) < window.as_nanos())
    }

    fn peer_of(&self, link: LinkId) -> Option<usize> {
        self.link_to_peer.get(link).copied().flatten()
    }

    /// Judges peer `peer`'s arrival announced by `imm`. Kept out of line:
    /// inlined, its frame would be set up on every pump, arrival or not.
    #[inline(never)]
    fn arrival<S: Sink>(&mut self, peer: usize, imm: Imm, landed: u64, sink: &mut S) {
        let (region, places) = (&self.recv.region, self.recv.places);
        let mirrored = self.peers.get(peer).is_some_and(|p| p.mirrored);
        // The header is copied out with volatile reads: the slot is
        // peer-written memory, and a replay may be landing on it. A device
        // region's host mirror holds it only where the peer's backend
        // writes the mirror (cuda); a verbs peer's header is on the device.
        let read = |stage: usize| {
            let at = places.header(stage, peer);
            if !mirrored {
                if let Some(h) = region.load_line(at) {
                    return Ok(h);
                }
            }
            let mut h = [0u8; HEADER_LEN];
            if mirrored {
                region.copy_header(at, &mut h)?;
            } else {
                region.copy_out(at, &mut h)?;
            }
            Ok(h)
        };
        let stage = usize::from(imm.stage);
        let base = places.header(stage, peer);
        let on = self.checksum;
        let row_bytes = u64::from(self.geometry.row_bytes);
        let check = |h: &Header, raw: &[u8; HEADER_LEN], len: u64| match h.checksum {
            None if on => Err("none sent, and this rank requires one (AFMESH_CHECKSUM)".into()),
            None => Ok(()),
            Some(sent) => {
                let got = checksum(raw, |crc| match places.rows {
                    None => region_crc(region, base, len, crc),
                    // The sender's checksum covers its slot: side area,
                    // then rows; here they are in two places.
                    Some(m) => {
                        let head = (HEADER_LEN + m.side_area) as u64;
                        let crc = region_crc(region, base, head, crc)?;
                        let rows = m.at + stage * places.stage_stride + peer * m.peer_stride;
                        let n = u64::from(h.tokens) * row_bytes;
                        crc_of(region, rows, n, crc)
                    }
                })?;
                if got == sent {
                    Ok(())
                } else {
                    Err(format!(
                        "message bytes give CRC32C {got:#010x}, the header says {sent:#010x}"
                    ))
                }
            }
        };
        let stats = &mut self.peers[peer].stats;
        let layout = match places.rows {
            None => StageLayout::Slots,
            Some(_) => StageLayout::Matrix,
        };
        match accept_checked(
            &self.geometry,
            layout,
            peer,
            imm,
            landed,
            read,
            check,
            sink.counter(),
        ) {
            Ok(a) => {
                stats.received += 1;
                let at = now_ns();
                let posted = match a.header.kind {
                    Kind::Dispatch => a.header.post_ns,
                    Kind::Combine => a.header.respond_ns,
                };
                if posted > 0 {
                    stats.arrival_ns.record(at.saturating_sub(posted));
                }
                if let Some(ns) = sink.accepted(peer, &a, at) {
                    stats.round_trip_ns.record(ns);
                }
                // A combine completes the message's record (an FFN rank
                // records its side when it answers).
                if let (Some(t), Kind::Combine) = (&mut self.tracer, a.header.kind) {
                    let h = &a.header;
                    t.record(Record {
                        peer: peer as u32,
                        stage: u32::from(h.stage),
                        seq: h.sequence,
                        post_ns: h.post_ns,
                        land_ns: h.land_ns,
                        process_ns: h.process_ns,
                        respond_ns: h.respond_ns,
                        back_ns: at,
                    });
                }
                if let Some((who, ns)) = sink.take_straggler() {
                    if let Some(p) = self.peers.get_mut(who) {
                        p.stats.late_ns.record(ns);
                    }
                }
                if let Some((offset, len)) = sink.next_write(peer, &a) {
                    let p = &self.peers[peer];
                    self.transport.prepare_write(p.link, &p.key, offset, len);
                }
            }
            Err(r) => {
                stats.rejected += 1;
                self.rejected(peer, imm, r);
            }
        }
    }

    /// Acts on a rejected arrival: a corrupt message loses its peer, a
    /// replay is dropped quietly, anything else is dropped with a warning.
    /// Out of line, away from the accepted path.
    #[cold]
    #[inline(never)]
    fn rejected(&mut self, peer: usize, imm: Imm, r: Reject) {
        let who = self.peers[peer].peer;
        if let Reject::Checksum(e) = &r {
            let reason = format!(
                "corrupt {} (stage {}, sequence {}): {e}",
                imm.kind, imm.stage, imm.seq24
            );
            self.peers[peer].corrupt = true;
            self.mark_lost(peer, reason, false);
        } else if r.is_replay() {
            tracing::debug!(peer = %who, "dropped {} (stage {}, sequence {}): {r}", imm.kind, imm.stage, imm.seq24);
        } else {
            tracing::warn!(peer = %who, "rejected {} (stage {}, sequence {}): {r}", imm.kind, imm.stage, imm.seq24);
        }
    }
}

/// The longest a barrier parks on the transport before it looks for the
/// scheduler's release again: the most a release waits to be seen.
pub(crate) const SYNC_SLICE: Duration = Duration::from_millis(1);

/// How long a rank waits by default for the sends from a slot to complete
/// before it fills the slot again.
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Wall-clock nanoseconds, for trace stamps (comparable across processes
/// of one host; across hosts only as good as their clock sync), at the
/// price of a cycle-counter read where the kernel's clock is that counter
/// (`clock.rs`).
#[inline]
pub(crate) fn now_ns() -> u64 {
    clock::now_ns()
}
