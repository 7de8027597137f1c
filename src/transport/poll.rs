//! How a waiting thread waits: the policy every transport's `poll` follows.
//!
//! On a 2-core machine with three or more processes, pure busy-polling
//! starves the peer that has the work, so the default spins briefly (the
//! common case of a reply already on its way), yielding the CPU now and
//! then so a peer that shares the core can run, and then parks on the
//! transport's wake-up primitive. A rank pinned to its own core
//! (`AFMESH_CPU`) spins without yielding: the core is its own. Dedicated
//! cores on a real server can ask for pure spinning. [`Contention`] is
//! what the yielding default learns when its spins lose the core to other
//! work (the mux then parks without spinning for a while).

use std::time::{Duration, Instant};

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

/// A gap this long between two looks at the clock while spinning (32
/// polls apart) means the thread lost its core, if the kernel counted an
/// involuntary switch too.
pub const PREEMPTED_GAP: Duration = Duration::from_micros(200);
/// A stretch of 32 empty polls this much longer than the quickest such
/// stretch seen is counted as a gap: time the spinning thread did not run
/// (an interrupt, a preemption, or a hypervisor running something else on
/// the vCPU, which the guest kernel never counts). See [`Gaps`].
pub const SPIN_GAP: Duration = Duration::from_micros(5);
/// How long waits park without spinning after a spin was preempted.
pub const QUIET: Duration = Duration::from_millis(5);
/// The longest such period, for a core that stays contended.
pub const MAX_QUIET: Duration = Duration::from_secs(1);

/// What the machine took from spinning waits: each stretch between two
/// looks at the clock (32 empty polls apart) is measured against the
/// quickest one seen, and one at least [`SPIN_GAP`] longer counts as a gap
/// of that excess. A sample, not an account: only spinning is watched
/// (not the rank's own work, not parked waits), and the last stretch of
/// each wait, cut short by what it waited for, is not counted. Only spins
/// that never yield are measured (a yield hands the core to whoever waits
/// for it, a gap of the rank's own making), and only over backends whose
/// empty polls cost the same each time (`Transport::flat_polls`: shm,
/// cuda with GPU-announced notices; not tcp, which reads its sockets in
/// the poll).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Gaps {
    /// The quickest stretch seen, ns (`u64::MAX` before the first).
    quickest: u64,
    /// Nanoseconds of stretches measured.
    pub spun_ns: u64,
    /// Gaps seen.
    pub count: u64,
    /// Nanoseconds they took beyond the quickest stretch.
    pub lost_ns: u64,
}

impl Default for Gaps {
    fn default() -> Self {
        Gaps {
            quickest: u64::MAX,
            spun_ns: 0,
            count: 0,
            lost_ns: 0,
        }
    }
}

/// Equal when the counts are: the quickest stretch is the measurement's
/// own state, not part of what it found.
impl PartialEq for Gaps {
    fn eq(&self, o: &Gaps) -> bool {
        (self.spun_ns, self.count, self.lost_ns) == (o.spun_ns, o.count, o.lost_ns)
    }
}

impl Eq for Gaps {}

impl Gaps {
    /// What was counted after `earlier` (an earlier reading of the same
    /// counter): e.g. the timed layers of a run, without its warm-up.
    pub fn since(&self, earlier: &Gaps) -> Gaps {
        Gaps {
            quickest: self.quickest,
            spun_ns: self.spun_ns.saturating_sub(earlier.spun_ns),
            count: self.count.saturating_sub(earlier.count),
            lost_ns: self.lost_ns.saturating_sub(earlier.lost_ns),
        }
    }

    /// One stretch of `d` between two looks at the clock.
    #[inline]
    pub(crate) fn stretch(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.spun_ns = self.spun_ns.saturating_add(ns);
        self.quickest = self.quickest.min(ns);
        let extra = ns - self.quickest;
        if u128::from(extra) >= SPIN_GAP.as_nanos() {
            self.count += 1;
            self.lost_ns = self.lost_ns.saturating_add(extra);
        }
    }
}

/// What the waits know of this thread's core being shared.
#[derive(Debug, Default)]
pub(crate) struct Contention {
    /// Waits park without spinning until then.
    pub(crate) quiet_until: Option<Instant>,
    /// The last quiet period's length.
    pub(crate) quiet: Duration,
    /// The thread's involuntary switches at this wait's first look (or
    /// at the last preemption seen).
    pub(crate) seen: u64,
    /// Spins cut short by a preemption.
    pub(crate) preempted: u64,
}

impl Contention {
    /// Whether this wait may spin (`now`: its start).
    pub(crate) fn may_spin(&self, now: Instant) -> bool {
        self.quiet_until.is_none_or(|t| now >= t)
    }

    /// A spin's first look at the clock: the switches so far, against
    /// which a later gap in the same spin is judged (one `getrusage` per
    /// wait that spins past 32 polls; none on waits answered sooner).
    pub(crate) fn baseline(&mut self) {
        if let Ok(n) = crate::transport::shm::sys::preemptions() {
            self.seen = n;
        }
    }

    /// A spin saw a gap: whether the thread was preempted since the
    /// spin's first look (then the next waits park for a while).
    pub(crate) fn preempted(&mut self, now: Instant) -> bool {
        match crate::transport::shm::sys::preemptions() {
            Ok(n) => self.note(now, n),
            Err(_) => false,
        }
    }

    /// [`Contention::preempted`] with the thread's count `n` read.
    fn note(&mut self, now: Instant, n: u64) -> bool {
        // Another thread's count (a rank used from several threads) only
        // resets the baseline.
        let before = std::mem::replace(&mut self.seen, n);
        if n <= before {
            return false;
        }
        self.preempted += 1;
        // Preempted again soon after the last quiet period: the core is
        // still shared, so park longer.
        let again = self
            .quiet_until
            .is_some_and(|t| now.saturating_duration_since(t) < self.quiet * 4);
        self.quiet = if again {
            (self.quiet * 2).min(MAX_QUIET)
        } else {
            QUIET
        };
        self.quiet_until = Some(now + self.quiet);
        true
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

    #[test]
    fn gaps_are_stretches_well_over_the_quickest() {
        let us = Duration::from_micros;
        let mut g = Gaps::default();
        g.stretch(us(3));
        g.stretch(us(7)); // 4 us over the quickest: not a gap
        assert_eq!((g.count, g.lost_ns), (0, 0));
        g.stretch(us(15)); // 12 over
        assert_eq!((g.count, g.lost_ns), (1, 12_000));
        // A quicker stretch lowers the bar for the next ones only.
        g.stretch(us(1));
        g.stretch(us(6));
        assert_eq!((g.count, g.lost_ns), (2, 17_000));
        assert_eq!(g.spun_ns, 32_000);
        let before = g;
        g.stretch(us(40)); // 39 over
        let d = g.since(&before);
        assert_eq!((d.spun_ns, d.count, d.lost_ns), (40_000, 1, 39_000));
        assert_eq!(before.since(&g).count, 0, "an older reading saturates at 0");
        // A stretch too long for u64 nanoseconds saturates, never panics.
        g.stretch(Duration::MAX);
        assert_eq!(g.count, 4);
        assert_eq!(g.lost_ns, u64::MAX);
    }

    #[test]
    fn quiet_periods_double_while_preemptions_continue_and_reset_after() {
        let t0 = Instant::now();
        let mut c = Contention {
            seen: 10,
            ..Contention::default()
        };
        assert!(!c.note(t0, 10), "no new switch, no preemption");
        assert!(c.note(t0, 11));
        assert_eq!((c.quiet, c.quiet_until), (QUIET, Some(t0 + QUIET)));
        // Preempted again right after the period: twice as long.
        let t1 = t0 + QUIET + Duration::from_millis(1);
        assert!(c.note(t1, 12));
        assert_eq!(c.quiet, QUIET * 2);
        for _ in 0..20 {
            let t = c.quiet_until.unwrap();
            let n = c.seen + 1;
            assert!(c.note(t, n));
        }
        assert_eq!(c.quiet, MAX_QUIET);
        // Calm for a long while: back to the first period.
        let later = c.quiet_until.unwrap() + MAX_QUIET * 5;
        let n = c.seen + 1;
        assert!(c.note(later, n));
        assert_eq!(c.quiet, QUIET);
        // A lower count (another thread) resets the baseline only.
        assert!(!c.note(later, 3));
        assert!(c.note(later, 4));
        assert_eq!(c.preempted, 24);
    }
}
