//! What a backend's post path did, made countable ([`WireCounters`]).

/// What a backend's post path did, for stats and the bench: the
/// data path's promises made countable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireCounters {
    /// Messages posted.
    pub messages: u64,
    /// Work requests posted for them (verbs: one per QP stripe), and for
    /// flushes and probes.
    pub work_requests: u64,
    /// Of those, signalled ones.
    pub signaled: u64,
    /// Zero-length flush/probe writes among the work requests.
    pub flushes: u64,
    /// Memory registrations after the first link came up.
    pub registrations_after_setup: u64,
    /// NICs in use (verbs rails; 0 for backends without any).
    pub rails: u8,
    /// Messages posted on each rail (the first `rails` entries).
    pub rail_messages: [u64; MAX_RAILS],
    /// Payload bytes posted on each rail.
    pub rail_bytes: [u64; MAX_RAILS],
    /// Received payload bytes the backend itself copied into the target
    /// region (tcp: small bodies read ahead with their header, one `read`
    /// instead of two; 0 for backends that place bytes directly).
    pub received_copied_bytes: u64,
    /// Waits whose spin was cut short because the thread lost its core to
    /// another task (filled in by the mux, see [`Mux`](super::Mux)): a core shared
    /// with other busy work.
    pub preempted_spins: u64,
}

/// Most NICs one rank drives (one per GPU of an 8-GPU host).
pub const MAX_RAILS: usize = 8;

impl std::ops::AddAssign for WireCounters {
    fn add_assign(&mut self, o: WireCounters) {
        self.messages += o.messages;
        self.work_requests += o.work_requests;
        self.signaled += o.signaled;
        self.flushes += o.flushes;
        self.registrations_after_setup += o.registrations_after_setup;
        self.received_copied_bytes += o.received_copied_bytes;
        self.preempted_spins += o.preempted_spins;
        self.rails = self.rails.max(o.rails);
        for i in 0..MAX_RAILS {
            self.rail_messages[i] += o.rail_messages[i];
            self.rail_bytes[i] += o.rail_bytes[i];
        }
    }
}
