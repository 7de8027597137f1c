//! How a waiting thread waits: the policy every transport's `poll` follows.
//!
//! On a 2-core machine with three or more processes, pure busy-polling
//! starves the peer that has the work, so the default spins briefly (the
//! common case of a reply already on its way) and then parks on the
//! transport's wake-up primitive. Dedicated cores on a real server can ask
//! for pure spinning.

use std::time::Duration;

use crate::error::{Error, Result};

/// A waiting policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollPolicy {
    /// Busy-poll until the deadline (dedicated cores only).
    Spin,
    /// Busy-poll for this long, then yield a few times, then park.
    SpinThenPark(Duration),
    /// Park at once.
    Block,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::SpinThenPark(Duration::from_micros(20))
    }
}

impl PollPolicy {
    /// Parses `spin`, `park`, `park:<micros>` or `block` (the value of
    /// `AFMESH_POLL`).
    pub fn parse(s: &str) -> Result<PollPolicy> {
        let s = s.trim();
        match s {
            "spin" => Ok(PollPolicy::Spin),
            "block" => Ok(PollPolicy::Block),
            "park" | "" => Ok(PollPolicy::default()),
            _ => match s.strip_prefix("park:").map(str::parse::<u64>) {
                Some(Ok(us)) => Ok(PollPolicy::SpinThenPark(Duration::from_micros(us))),
                _ => Err(Error::config(format!(
                    "AFMESH_POLL={s:?}: expected spin, park, park:<micros> or block"
                ))),
            },
        }
    }

    /// How long to busy-poll before parking, within a wait of `timeout`.
    pub fn spin_for(self, timeout: Duration) -> Duration {
        match self {
            PollPolicy::Spin => timeout,
            PollPolicy::SpinThenPark(d) => d.min(timeout),
            PollPolicy::Block => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_values() {
        assert_eq!(PollPolicy::parse("spin").unwrap(), PollPolicy::Spin);
        assert_eq!(PollPolicy::parse("block").unwrap(), PollPolicy::Block);
        assert_eq!(
            PollPolicy::parse("park:5").unwrap(),
            PollPolicy::SpinThenPark(Duration::from_micros(5))
        );
        let e = PollPolicy::parse("fast").unwrap_err().to_string();
        assert!(e.contains("AFMESH_POLL"), "{e}");
    }
}
