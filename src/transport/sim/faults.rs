//! What the simulated network does to writes on one end of a link.

/// Faults applied to writes leaving one end of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fixed delay, virtual nanoseconds.
    pub delay_ns: u64,
    /// Extra random delay in `[0, jitter_ns]`; writes overtake each other.
    pub jitter_ns: u64,
    /// Chance per million that a write is lost.
    pub drop_per_million: u32,
    /// Chance per million that a write is delivered twice.
    pub duplicate_per_million: u32,
    /// Chance per million that a write lands with one bit of its last
    /// byte flipped (corruption that link-level checks missed).
    pub corrupt_per_million: u32,
    /// `Sent` this long after the post (the bytes leave then), instead of
    /// right after the landing. Smaller than the delay: `Sent` comes first.
    pub sent_delay_ns: Option<u64>,
}
