//! How a waiting thread waits: the policy every transport's `poll` follows.
//!
//! On a 2-core machine with three or more processes, pure busy-polling
//! starves the peer that has the work, so the default spins briefly (the
//! common case of a reply already on its way), yielding the CPU now and
//! then so a peer that shares the core can run, and then parks on the
//! transport's wake-up primitive. A rank pinned to its own core
//! (`AFMESH_CPU`) spins without yielding: the core is its own. Dedicated
//! cores on a real server can ask for pure spinning.

use std::time::Duration;

use crate::error::{Error, Result};

/// A waiting policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollPolicy {
    /// Busy-poll until the deadline (dedicated cores only).
    Spin,
    /// Busy-poll for `spin`, then park.
    SpinThenPark {
        /// How long to busy-poll.
        spin: Duration,
        /// Yield the CPU every few polls while spinning (off when the rank
        /// owns its core).
        yield_cpu: bool,
    },
    /// Park at once.
    Block,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::SpinThenPark {
            spin: Duration::from_micros(20),
            yield_cpu: true,
        }
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
                Some(Ok(us)) => Ok(PollPolicy::SpinThenPark {
                    spin: Duration::from_micros(us),
                    yield_cpu: true,
                }),
                _ => Err(Error::config(format!(
                    "AFMESH_POLL={s:?}: expected spin, park, park:<micros> or block"
                ))),
            },
        }
    }

    /// The same policy for a thread that owns its core: no yielding, and
    /// at least 2 ms of spinning before parking — waking a parked thread
    /// pinned to an idle core costs that core's wake-up (on a VM, the
    /// hypervisor rescheduling a halted vCPU: up to milliseconds), while
    /// spinning on an owned core costs nothing else.
    pub fn pinned(self) -> PollPolicy {
        match self {
            PollPolicy::SpinThenPark { spin, .. } => PollPolicy::SpinThenPark {
                spin: spin.max(Duration::from_millis(2)),
                yield_cpu: false,
            },
            other => other,
        }
    }

    /// One pause of a busy-poll loop (`spins` counts them). Yielding every
    /// 16th pause lets a peer that shares our core (a 2-core box with more
    /// ranks than cores) run now instead of after our whole spin; if none
    /// does, the yield returns at once. A pinned rank never yields.
    #[inline]
    pub fn relax(self, spins: u32, _spun: Duration) {
        match self {
            PollPolicy::SpinThenPark {
                yield_cpu: true, ..
            } if spins % 16 == 15 => std::thread::yield_now(),
            _ => std::hint::spin_loop(),
        }
    }

    /// How long to busy-poll before parking, within a wait of `timeout`.
    pub fn spin_for(self, timeout: Duration) -> Duration {
        match self {
            PollPolicy::Spin => timeout,
            PollPolicy::SpinThenPark { spin, .. } => spin.min(timeout),
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
            PollPolicy::SpinThenPark {
                spin: Duration::from_micros(5),
                yield_cpu: true
            }
        );
        assert_eq!(
            PollPolicy::parse("park").unwrap().pinned(),
            PollPolicy::SpinThenPark {
                spin: Duration::from_millis(2),
                yield_cpu: false
            }
        );
        assert_eq!(PollPolicy::Spin.pinned(), PollPolicy::Spin);
        let e = PollPolicy::parse("fast").unwrap_err().to_string();
        assert!(e.contains("AFMESH_POLL"), "{e}");
    }
}
