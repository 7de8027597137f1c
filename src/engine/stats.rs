//! Counters: per peer, and a rank's view of all its peers.

use super::Histogram;
use crate::error::Peer;

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
    /// Attention ranks: nanoseconds from posting a dispatch to seeing this
    /// FFN rank's combine of it (one clock, this rank's).
    pub round_trip_ns: Histogram,
    /// FFN ranks: nanoseconds from this attention rank's dispatch landing
    /// to the response being posted (one clock, this rank's).
    pub ffn_ns: Histogram,
}

/// Counters of a rank, per peer of the other role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankStats {
    /// Backend name.
    pub transport: String,
    /// One entry per peer, by rank.
    pub peers: Vec<(Peer, PeerStats)>,
    /// What the transports' post paths did (verbs: work requests,
    /// signalled ones, registrations after setup).
    pub wire: crate::transport::WireCounters,
}

impl RankStats {
    /// Messages rejected from all peers.
    pub fn rejected(&self) -> u64 {
        self.peers.iter().map(|p| p.1.rejected).sum()
    }
}
