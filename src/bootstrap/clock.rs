//! A rank's clock against the rendezvous server's, estimated at join the
//! way NTP does: the rank sends `ClockProbe { t0 }`, the server answers
//! `ClockEcho { t0, t1, t2 }` (its clock when the probe arrived and when
//! it answered), the rank notes `t3` when the echo arrives. Then
//!
//! ```text
//! offset = ((t1 - t0) + (t2 - t3)) / 2     server clock − rank clock
//! delay  = (t3 - t0) - (t2 - t1)           time on the wire, both ways
//! ```
//!
//! and the true offset lies within `delay / 2` of the estimate whatever the
//! split of the delay between the two ways. Of several probes the one with
//! the smallest delay is kept: its bound is the tightest.
//!
//! Used for traces: every stamp a rank takes is on its own wall clock, and
//! `afmesh trace merge` moves each rank's stamps onto the server's clock.

use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{recv, send};
use crate::error::{Error, Result};
use crate::proto::Message;

/// This host's wall clock, nanoseconds since the Unix epoch (what trace
/// stamps are taken with).
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A rank's clock offset against the rendezvous server's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockOffset {
    /// Server clock minus this rank's clock (ns): add it to a local stamp
    /// to put it on the server's clock.
    pub offset_ns: i64,
    /// The true offset is within this many ns of `offset_ns`.
    pub error_ns: u64,
    /// Probes the estimate was taken from (0: no estimate; offset 0).
    pub rounds: u32,
}

/// One probe's four stamps: sent (rank), received and answered (server),
/// echo received (rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Rank clock when the probe left.
    pub t0: u64,
    /// Server clock when it arrived.
    pub t1: u64,
    /// Server clock when the echo left.
    pub t2: u64,
    /// Rank clock when the echo arrived.
    pub t3: u64,
}

impl Probe {
    /// Time on the wire, both ways (ns); `None` for stamps that go
    /// backwards (a clock stepped during the probe).
    fn delay(&self) -> Option<u64> {
        let round = self.t3.checked_sub(self.t0)?;
        let held = self.t2.checked_sub(self.t1)?;
        round.checked_sub(held)
    }

    fn offset(&self) -> i64 {
        let a = self.t1 as i128 - self.t0 as i128;
        let b = self.t2 as i128 - self.t3 as i128;
        ((a + b) / 2) as i64
    }
}

/// The estimate from the probe with the smallest delay; `None` if no
/// probe is usable.
pub fn estimate(probes: &[Probe]) -> Option<ClockOffset> {
    let best = probes
        .iter()
        .filter_map(|p| p.delay().map(|d| (d, p)))
        .min_by_key(|(d, _)| *d)?;
    Some(ClockOffset {
        offset_ns: best.1.offset(),
        // Round the half up: the bound must hold.
        error_ns: best.0.div_ceil(2),
        rounds: probes.len() as u32,
    })
}

/// Probes the server `rounds` times on `stream` (before the hello) and
/// returns the estimate.
pub(crate) fn probe(
    stream: &mut TcpStream,
    rounds: u32,
    timeout: Duration,
    server: &str,
) -> Result<ClockOffset> {
    let mut probes = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t0 = wall_ns();
        send(
            stream,
            &Message::ClockProbe { sent_ns: t0 },
            timeout,
            server,
        )?;
        match recv(stream, timeout, server)? {
            Message::ClockEcho {
                probe_ns,
                received_ns,
                sent_ns,
            } if probe_ns == t0 => probes.push(Probe {
                t0,
                t1: received_ns,
                t2: sent_ns,
                t3: wall_ns(),
            }),
            other => {
                return Err(Error::BadFrame {
                    peer: server.to_string(),
                    reason: format!(
                        "expected the echo of clock probe {t0}, got {}",
                        other.kind()
                    ),
                })
            }
        }
    }
    estimate(&probes).ok_or_else(|| Error::BadFrame {
        peer: server.to_string(),
        reason: format!("none of {rounds} clock probes gave a usable round trip"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_probe_wins_and_bounds_the_true_offset() {
        // Server clock = rank clock + 1000; one-way delays vary.
        let truth = 1000i64;
        let at = |t0: u64, up: u64, hold: u64, down: u64| {
            let t1 = (t0 + up) as i64 + truth;
            let t2 = t1 + hold as i64;
            let t3 = (t2 - truth) as u64 + down;
            Probe {
                t0,
                t1: t1 as u64,
                t2: t2 as u64,
                t3,
            }
        };
        let probes = [
            at(10_000, 300, 5, 10),
            at(20_000, 20, 50, 30),
            at(30_000, 500, 1, 500),
        ];
        let e = estimate(&probes).unwrap();
        assert_eq!(e.rounds, 3);
        assert_eq!(e.error_ns, 25); // the second: 50 ns on the wire
        assert!((e.offset_ns - truth).unsigned_abs() <= e.error_ns);
        assert_eq!(e.offset_ns, truth - 5); // (20 − 30) / 2 off
    }

    #[test]
    fn stamps_going_backwards_are_not_used() {
        let bad = Probe {
            t0: 100,
            t1: 5,
            t2: 4,
            t3: 90,
        };
        assert_eq!(estimate(&[bad]), None);
        assert_eq!(estimate(&[]), None);
    }
}
