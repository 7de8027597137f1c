//! Progress: the layer between the role APIs and a transport. It owns the
//! transport and the peer table, posts writes to peers by index, turns
//! transport completions into per-peer events, remembers which peers are
//! lost and why, and keeps the per-peer counters.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Peer, Result};
use crate::proto::{Imm, RegionKey};
use crate::transport::{Completion, LinkId, LocalKey, LocalSlice, Mux, Region};

/// Counters for one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages written to the peer.
    pub sent: u64,
    /// Bytes written to the peer (headers included).
    pub sent_bytes: u64,
    /// Bytes of those the library itself copied on the way (a staging copy,
    /// or the shared-memory copy into the peer); 0 where the kernel or a NIC
    /// moves the bytes (tcp, verbs).
    pub copied_bytes: u64,
    /// Messages from the peer that were counted.
    pub received: u64,
    /// Messages from the peer that were rejected (stale, duplicate, bad).
    pub rejected: u64,
    /// Why the peer is lost, if it is.
    pub lost: Option<String>,
}

/// A peer's side of the table.
#[derive(Debug)]
struct PeerLink {
    peer: Peer,
    link: LinkId,
    /// The peer region our writes target.
    key: RegionKey,
    stats: PeerStats,
}

/// What happened on a peer's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message announced by `imm` landed from peer `peer`.
    Arrival { peer: usize, imm: Imm },
    /// The peer is gone.
    Lost { peer: usize },
}

/// The progress engine for one rank.
#[derive(Debug)]
pub(crate) struct Engine {
    transport: Mux,
    peers: Vec<PeerLink>,
    link_to_peer: Vec<Option<usize>>,
    completions: Vec<Completion>,
    /// Registered staging memory for writes, and completions seen while
    /// waiting for one to be sent.
    bounce: (Arc<Region>, LocalKey),
    staging_len: usize,
    staging_busy: Vec<Option<u64>>,
    backlog: Vec<Completion>,
    next_token: u64,
    io_timeout: Duration,
}

impl Engine {
    /// `peers[i]` is reached over `links[i]` and written at `keys[i]`.
    pub(crate) fn new(
        transport: Mux,
        peers: Vec<(Peer, LinkId, RegionKey)>,
        bounce: (Arc<Region>, LocalKey),
        staging_len: usize,
        io_timeout: Duration,
    ) -> Engine {
        let staging_slots = bounce.0.len().checked_div(staging_len).unwrap_or(0);
        let nlinks = peers
            .iter()
            .map(|p| p.1 + 1)
            .max()
            .unwrap_or(0)
            .max(transport.links());
        let mut link_to_peer = vec![None; nlinks];
        for (i, p) in peers.iter().enumerate() {
            link_to_peer[p.1] = Some(i);
        }
        Engine {
            transport,
            peers: peers
                .into_iter()
                .map(|(peer, link, key)| PeerLink {
                    peer,
                    link,
                    key,
                    stats: PeerStats::default(),
                })
                .collect(),
            link_to_peer,
            completions: Vec::with_capacity(64),
            bounce,
            staging_len,
            staging_busy: vec![None; staging_slots],
            backlog: Vec::new(),
            next_token: 0,
            io_timeout,
        }
    }

    pub(crate) fn transport_name(&self) -> String {
        self.transport.name()
    }

    pub(crate) fn peer(&self, i: usize) -> Peer {
        self.peers[i].peer
    }

    /// Why peer `i` is lost, if it is.
    pub(crate) fn lost(&self, i: usize) -> Option<&str> {
        self.peers.get(i).and_then(|p| p.stats.lost.as_deref())
    }

    pub(crate) fn lost_error(&self, i: usize) -> Error {
        Error::PeerLost {
            peer: self.peers[i].peer,
            reason: self.lost(i).unwrap_or("lost").to_string(),
        }
    }

    /// Tells every peer we leave in order.
    pub(crate) fn close(&mut self) {
        self.transport.close();
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        self.peers.iter().map(|p| p.stats.clone()).collect()
    }

    pub(crate) fn count_received(&mut self, i: usize) {
        self.peers[i].stats.received += 1;
    }

    pub(crate) fn count_rejected(&mut self, i: usize) {
        self.peers[i].stats.rejected += 1;
    }

    /// Marks peer `i` lost (first reason wins) and closes nothing: the
    /// transport already saw it, or the caller decided the peer is broken.
    pub(crate) fn mark_lost(&mut self, i: usize, reason: String) {
        let p = &mut self.peers[i];
        if p.stats.lost.is_none() {
            tracing::warn!(peer = %p.peer, "peer lost: {reason}");
            p.stats.lost = Some(reason);
        }
    }

    /// Writes `src` to peer `i` at `offset` of its region, with `imm`: one
    /// posted write from a free staging slot, which is busy until `Sent`.
    pub(crate) fn write(&mut self, i: usize, src: &[&[u8]], offset: u64, imm: Imm) -> Result<()> {
        if self.peers[i].stats.lost.is_some() {
            return Err(self.lost_error(i));
        }
        let bytes = src.iter().map(|s| s.len() as u64).sum::<u64>();
        let link = self.peers[i].link;
        let copies = self.transport.caps_of(link).is_some_and(|c| c.copies);
        let deadline = Instant::now() + self.io_timeout;
        let result = loop {
            let slot = self.staging_busy.iter().position(Option::is_none);
            if let Some(slot) = slot {
                let (region, key) = self.bounce.clone();
                let at = (slot * self.staging_len) as u64;
                if bytes > self.staging_len as u64 {
                    break Err(Error::BufferSize {
                        what: "staging for a write".into(),
                        need: bytes as usize,
                        got: self.staging_len,
                    });
                }
                if let Err(e) = region.write_gather(at, src) {
                    break Err(Error::config(e));
                }
                let token = self.next_token;
                self.next_token += 1;
                let slice = [LocalSlice {
                    key,
                    offset: at,
                    len: bytes,
                }];
                let key = self.peers[i].key;
                match self.transport.post_write(
                    link,
                    &slice,
                    &key,
                    offset,
                    Some(imm.encode()),
                    token,
                ) {
                    Ok(()) => {
                        self.staging_busy[slot] = Some(token);
                        break Ok(());
                    }
                    Err(Error::Backpressure { .. }) => {}
                    Err(e) => break Err(e),
                }
            }
            if Instant::now() > deadline {
                break Err(Error::Timeout {
                    op: "send window",
                    peer: self.peers[i].peer.to_string(),
                    after: self.io_timeout,
                });
            }
            let mut out = Vec::new();
            self.transport.poll(&mut out, Duration::from_millis(1))?;
            for c in &out {
                self.on_sent(c);
            }
            self.backlog.extend(out);
        };
        match result {
            Ok(()) => {
                let s = &mut self.peers[i].stats;
                s.sent += 1;
                s.sent_bytes += bytes;
                if copies {
                    s.copied_bytes += bytes;
                }
                Ok(())
            }
            Err(
                e @ (Error::BufferSize { .. }
                | Error::Unsupported(_)
                | Error::Config(_)
                | Error::InvalidArgument(_)),
            ) => Err(e),
            Err(e) => {
                self.mark_lost(i, e.to_string());
                Err(self.lost_error(i))
            }
        }
    }

    fn on_sent(&mut self, c: &Completion) {
        if let Completion::Sent { token } = c {
            for b in &mut self.staging_busy {
                if *b == Some(*token) {
                    *b = None;
                }
            }
        }
    }

    /// Polls the transport (waiting up to `timeout` for the first
    /// completion) and appends per-peer events to `out`.
    pub(crate) fn poll(&mut self, timeout: Duration, out: &mut Vec<Event>) -> Result<()> {
        self.completions.clear();
        self.completions.append(&mut self.backlog);
        let wait = if self.completions.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        self.transport.poll(&mut self.completions, wait)?;
        for c in self.completions.drain(..) {
            let (link, lost) = match c {
                Completion::Arrival { link, imm } => {
                    if let Some(Some(peer)) = self.link_to_peer.get(link) {
                        out.push(Event::Arrival {
                            peer: *peer,
                            imm: Imm::decode(imm),
                        });
                    }
                    continue;
                }
                Completion::Sent { token } => {
                    for b in &mut self.staging_busy {
                        if *b == Some(token) {
                            *b = None;
                        }
                    }
                    continue;
                }
                Completion::LinkClosed { link } => {
                    if let Some(Some(peer)) = self.link_to_peer.get(link).copied() {
                        let p = &mut self.peers[peer];
                        if p.stats.lost.is_none() {
                            tracing::debug!(peer = %p.peer, "peer closed the link in order");
                            p.stats.lost = Some("peer shut down".into());
                            out.push(Event::Lost { peer });
                        }
                    }
                    continue;
                }
                Completion::LinkDown { link, reason } => (link, reason),
                Completion::LinkError { link, reason } => {
                    (link, format!("protocol error: {reason}"))
                }
            };
            if let Some(Some(peer)) = self.link_to_peer.get(link).copied() {
                let p = &mut self.peers[peer];
                if p.stats.lost.is_none() {
                    tracing::warn!(peer = %p.peer, "peer lost: {lost}");
                    p.stats.lost = Some(lost);
                    out.push(Event::Lost { peer });
                }
            }
        }
        Ok(())
    }
}

/// Wall-clock nanoseconds, for trace stamps (comparable across processes
/// of one host; across hosts only as good as their clock sync).
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
