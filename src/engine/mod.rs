//! Progress: the layer between the role APIs and a transport. It owns the
//! transport and the peer table, posts writes to peers by index, turns
//! transport completions into per-peer events, remembers which peers are
//! lost and why, and keeps the per-peer counters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Peer, Result};
use crate::proto::{Imm, RegionKey};
use crate::transport::{AnyTransport, Completion, LinkId, Transport};

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
    transport: AnyTransport,
    peers: Vec<PeerLink>,
    link_to_peer: Vec<Option<usize>>,
    completions: Vec<Completion>,
}

impl Engine {
    /// `peers[i]` is reached over `links[i]` and written at `keys[i]`.
    pub(crate) fn new(transport: AnyTransport, peers: Vec<(Peer, LinkId, RegionKey)>) -> Engine {
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
        }
    }

    pub(crate) fn transport_name(&self) -> &'static str {
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

    /// Writes `src` to peer `i` at `offset` of its region, with `imm`.
    #[inline]
    pub(crate) fn write(&mut self, i: usize, src: &[&[u8]], offset: u64, imm: Imm) -> Result<()> {
        if self.peers[i].stats.lost.is_some() {
            return Err(self.lost_error(i));
        }
        let p = &self.peers[i];
        match self
            .transport
            .write(p.link, src, &p.key, offset, Some(imm.encode()))
        {
            Ok(()) => {
                let copies = self.transport.copies(p.link);
                let bytes = src.iter().map(|s| s.len() as u64).sum::<u64>();
                let s = &mut self.peers[i].stats;
                s.sent += 1;
                s.sent_bytes += bytes;
                if copies {
                    s.copied_bytes += bytes;
                }
                Ok(())
            }
            Err(e @ (Error::BufferSize { .. } | Error::Unsupported(_) | Error::Config(_))) => {
                Err(e)
            }
            Err(e) => {
                self.mark_lost(i, e.to_string());
                Err(self.lost_error(i))
            }
        }
    }

    /// Polls the transport (waiting up to `timeout` for the first
    /// completion) and appends per-peer events to `out`.
    pub(crate) fn poll(&mut self, timeout: Duration, out: &mut Vec<Event>) -> Result<()> {
        self.completions.clear();
        self.transport.poll(&mut self.completions, timeout)?;
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
