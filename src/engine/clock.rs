//! The stamp clock: wall-clock nanoseconds at the price of a cycle-counter
//! read.
//!
//! Every message carries stamps (posted, landed, processed, answered) and
//! an 8-byte layer takes four of them on its critical path. A wall-clock
//! read through the vDSO costs ~50 ns on a VM; `rdtsc` ~12 ns. So where the
//! kernel itself keeps time with the timestamp counter (clocksource `tsc`:
//! the counter is invariant and agrees between CPUs), a thread reads the
//! real wall clock now and then (an *anchor*: the counter just before and
//! just after, the midpoint paired with the wall time) and in between
//! interpolates from the latest anchor at the rate measured between two
//! anchors at least [`CALIBRATE_NS`] apart.
//!
//! Error against the real clock: the anchor's pairing, within half the
//! counter reads around its clock read — a pair more than
//! [`MAX_PAIRING_TICKS`] apart was interrupted (on this VM one in ~10^4
//! is, by up to milliseconds) and is retried, then dropped — plus the rate error over the time since the
//! anchor: a rate from a baseline of at least 1 ms is off by at most
//! ~50 ns / 1 ms = 5e-5, so over [`REANCHOR_NS`] (100 µs) ~5 ns. An NTP
//! slew (≤ 500 ppm) adds at most 50 ns before the next anchor; a step is
//! seen at the next anchor, as the real clock's readers see it at their
//! next read, and restarts the baseline (an anchor more than 10 µs from
//! where the rate puts it) so the rate is not skewed by it. The baseline restarts every second, so the rate follows a
//! slewing clock. Stamps of one thread may step back by those few ns at an
//! anchor; users take differences with `saturating_sub`.
//!
//! Elsewhere (another clocksource, another architecture) every stamp is a
//! real read.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::bootstrap::clock::wall_ns;

/// Longest interpolation from one anchor.
pub(crate) const REANCHOR_NS: u64 = 100_000;
/// Shortest baseline a rate is measured over.
pub(crate) const CALIBRATE_NS: u64 = 1_000_000;
/// A baseline longer than this restarts at the next anchor.
const BASELINE_NS: u64 = 1_000_000_000;
/// An anchor this far (or 1/1000 of the time since the last one) from
/// where the rate puts it is a clock step: the baseline restarts.
const STEP_NS: u64 = 10_000;

/// One thread's anchors.
#[derive(Debug, Clone, Copy)]
struct Anchors {
    /// The baseline's first anchor: (counter, wall ns).
    first: (u64, u64),
    /// The latest anchor.
    last: (u64, u64),
    /// Nanoseconds per tick, 32.32 fixed point; 0 until calibrated.
    rate: u64,
    /// Ticks an interpolation may span (REANCHOR_NS at `rate`).
    span: u64,
}

const NONE: Anchors = Anchors {
    first: (0, 0),
    last: (0, 0),
    rate: 0,
    span: 0,
};

thread_local! {
    static ANCHORS: Cell<Anchors> = const { Cell::new(NONE) };
}

/// Whether the kernel keeps time with the timestamp counter.
fn counter_is_clock() -> bool {
    static TSC: OnceLock<bool> = OnceLock::new();
    *TSC.get_or_init(|| {
        afmesh_sys::timestamp_counter().is_some()
            && std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|s| s.trim() == "tsc")
    })
}

/// Wall-clock nanoseconds since the Unix epoch (see the module docs).
#[inline]
pub(crate) fn now_ns() -> u64 {
    let Some(t) = afmesh_sys::timestamp_counter() else {
        return wall_ns();
    };
    match interpolate(&ANCHORS.with(Cell::get), t) {
        Some(ns) => ns,
        None => anchor(),
    }
}

/// Wall ns at counter `t` from the latest anchor, if it is calibrated and
/// recent enough.
#[inline]
fn interpolate(a: &Anchors, t: u64) -> Option<u64> {
    let since = t.wrapping_sub(a.last.0);
    (a.rate != 0 && since < a.span)
        .then(|| a.last.1 + ((u128::from(since) * u128::from(a.rate)) >> 32) as u64)
}

/// Most ticks between the counter reads around an anchor's clock read (a
/// clock read takes ~150): a wider pair was interrupted, and its midpoint
/// could be microseconds off.
const MAX_PAIRING_TICKS: u64 = 1024;
/// Pairings tried per anchor.
const PAIRING_TRIES: usize = 4;

/// Reads the real clock, makes it the thread's latest anchor and
/// recalibrates; returns the real time.
#[cold]
fn anchor() -> u64 {
    if !counter_is_clock() {
        return wall_ns();
    }
    let mut wall = 0;
    for _ in 0..PAIRING_TRIES {
        let (Some(before), w, Some(after)) = (
            afmesh_sys::timestamp_counter(),
            wall_ns(),
            afmesh_sys::timestamp_counter(),
        ) else {
            return wall_ns();
        };
        wall = w;
        if after >= before && after - before <= MAX_PAIRING_TICKS {
            let at = (before / 2 + after / 2 + (before & after & 1), w);
            ANCHORS.with(|c| c.set(calibrate(c.get(), at)));
            return w;
        }
    }
    // Interrupted every time: a real read, and the anchors left as they
    // were (the next stamp tries again).
    wall
}

/// The anchors after the anchor `at` (counter, wall ns).
fn calibrate(mut a: Anchors, at: (u64, u64)) -> Anchors {
    let fresh = a.first == (0, 0) || at.0 <= a.first.0 || at.1 <= a.first.1;
    if fresh {
        // First anchor, or the counter or the clock went back: start over,
        // keeping the rate (a counter that goes back is not to be trusted
        // with one, though: drop it).
        let rate = if at.0 <= a.first.0 { 0 } else { a.rate };
        return with_rate(
            Anchors {
                first: at,
                last: at,
                ..NONE
            },
            rate,
        );
    }
    // The clock stepped forward (or the thread slept long on a drifting
    // rate): the anchor disagrees with the interpolation from the last one
    // by more than 10 µs and 1/1000 of the time between them. Restart the
    // baseline there, keeping the rate.
    if a.rate != 0 && at.0 > a.last.0 {
        let since = at.0 - a.last.0;
        let expect = a.last.1 + ((u128::from(since) * u128::from(a.rate)) >> 32) as u64;
        let elapsed = expect.saturating_sub(a.last.1);
        if at.1.abs_diff(expect) > STEP_NS.max(elapsed / 1000) {
            return with_rate(
                Anchors {
                    first: at,
                    last: at,
                    ..NONE
                },
                a.rate,
            );
        }
    }
    let (ticks, ns) = (at.0 - a.first.0, at.1 - a.first.1);
    a.last = at;
    if ns >= CALIBRATE_NS {
        let rate = (u128::from(ns) << 32) / u128::from(ticks);
        a = with_rate(a, u64::try_from(rate).unwrap_or(0));
        if ns >= BASELINE_NS {
            a.first = at;
        }
    }
    a
}

fn with_rate(mut a: Anchors, rate: u64) -> Anchors {
    a.rate = rate;
    a.span = if rate == 0 {
        0
    } else {
        u64::try_from((u128::from(REANCHOR_NS) << 32) / u128::from(rate)).unwrap_or(u64::MAX)
    };
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter at 3 GHz from tick 1000 against a clock from 5 s.
    fn at(ns: u64) -> (u64, u64) {
        (1000 + ns * 3, 5_000_000_000 + ns)
    }

    #[test]
    fn calibrates_after_a_millisecond_and_interpolates() {
        let a = calibrate(NONE, at(0));
        assert_eq!(a.rate, 0, "one anchor gives no rate");
        let a = calibrate(a, at(CALIBRATE_NS / 2));
        assert_eq!(a.rate, 0, "half a millisecond is too short a baseline");
        let a = calibrate(a, at(CALIBRATE_NS));
        // 1/3 ns per tick.
        assert!((a.rate as i64 - (1i64 << 32) / 3).abs() <= 1, "{}", a.rate);
        assert_eq!(a.span.abs_diff(REANCHOR_NS * 3), 0, "{}", a.span);
        // 30 µs after the anchor, interpolated; past the span, not.
        let got = interpolate(&a, at(CALIBRATE_NS + 30_000).0).expect("in span");
        assert!(got.abs_diff(at(CALIBRATE_NS + 30_000).1) <= 1, "{got}");
        assert_eq!(interpolate(&a, at(CALIBRATE_NS + REANCHOR_NS + 1).0), None);
        assert_eq!(interpolate(&NONE, 5), None, "uncalibrated");
    }

    #[test]
    fn a_clock_step_forward_restarts_the_baseline_with_the_rate() {
        let a = calibrate(calibrate(NONE, at(0)), at(CALIBRATE_NS));
        // 50 µs later by the counter, but 100 ms later by the clock.
        let (t, w) = at(CALIBRATE_NS + 50_000);
        let b = calibrate(a, (t, w + 100_000_000));
        assert_eq!(
            (b.first, b.last, b.rate),
            ((t, w + 100_000_000), b.first, a.rate)
        );
        // Within the tolerance: an ordinary anchor.
        let c = calibrate(a, (t, w + 5_000));
        assert_eq!((c.first, c.last), (a.first, (t, w + 5_000)));
    }

    #[test]
    fn a_counter_going_back_drops_the_rate() {
        let a = calibrate(calibrate(NONE, at(0)), at(CALIBRATE_NS));
        assert_ne!(a.rate, 0);
        let back = calibrate(a, (10, at(2 * CALIBRATE_NS).1));
        assert_eq!((back.rate, back.span, back.first), (0, 0, back.last));
        // A clock stepped back keeps the rate but restarts the baseline.
        let stepped = calibrate(a, (at(3 * CALIBRATE_NS).0, 1));
        assert_eq!((stepped.rate, stepped.first), (a.rate, stepped.last));
    }

    #[test]
    fn the_baseline_restarts_after_a_second() {
        let a = calibrate(calibrate(NONE, at(0)), at(BASELINE_NS));
        assert_eq!(a.first, at(BASELINE_NS));
    }

    /// Against the real clock: stamps taken in a loop stay within a few
    /// microseconds of a real read (generous: the machine may be loaded).
    #[test]
    fn stays_near_the_wall_clock() {
        let start = wall_ns();
        let mut worst = 0u64;
        while wall_ns() - start < 20 * CALIBRATE_NS {
            let (w0, s, w1) = (wall_ns(), now_ns(), wall_ns());
            if s < w0 {
                worst = worst.max(w0 - s);
            } else if s > w1 {
                worst = worst.max(s - w1);
            }
        }
        assert!(worst < 20_000, "a stamp {worst} ns outside its real reads");
    }
}
