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
    /// Attention ranks, the straggler record: each time this FFN rank's
    /// combine was the last of a stage to arrive, by how many nanoseconds
    /// it came after the one before it (its count is the stages it held
    /// up). Empty with a single FFN rank.
    pub late_ns: Histogram,
    /// One way, per message from this peer: nanoseconds from the peer
    /// posting it to this rank counting it — dispatch → arrival on an FFN
    /// rank, the combine's way back on an attention rank. The post stamp is
    /// the peer's clock: exact between ranks of one host, offset by the
    /// hosts' clock difference across hosts.
    pub arrival_ns: Histogram,
}

/// An FFN rank that answered stages last (see [`RankStats::stragglers`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Straggler {
    /// The FFN rank.
    pub peer: Peer,
    /// Stages it answered last.
    pub count: u64,
    /// Mean time it came after the next-to-last answer (ns).
    pub mean_late_ns: f64,
    /// Largest such time (ns).
    pub max_late_ns: u64,
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
    /// What the machine took from the rank's spinning waits: interrupts,
    /// preemption, or a hypervisor's own work on the vCPU, which no
    /// counter of the guest kernel shows.
    pub spin_gaps: crate::transport::Gaps,
}

impl RankStats {
    /// Messages rejected from all peers.
    pub fn rejected(&self) -> u64 {
        self.peers.iter().map(|p| p.1.rejected).sum()
    }

    /// Attention ranks: the FFN ranks that answered stages last, most
    /// often first (ties: the later on average first).
    pub fn stragglers(&self) -> Vec<Straggler> {
        let mut v: Vec<Straggler> = self
            .peers
            .iter()
            .filter(|(_, s)| !s.late_ns.is_empty())
            .map(|(peer, s)| Straggler {
                peer: *peer,
                count: s.late_ns.count(),
                mean_late_ns: s.late_ns.mean().unwrap_or(0.0),
                max_late_ns: s.late_ns.max().unwrap_or(0),
            })
            .collect();
        v.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(b.mean_late_ns.total_cmp(&a.mean_late_ns))
        });
        v
    }
}
