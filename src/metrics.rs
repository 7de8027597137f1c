//! Health for long-running ranks: `AFMESH_METRICS=ADDR:PORT` serves the
//! rank's stats in Prometheus text format (version 0.0.4) at `/metrics`.
//!
//! A small thread owns a plain `TcpListener` and answers one request per
//! connection. The stats belong to the rank's thread, so the server asks
//! for them: it raises a flag, and the rank's engine, which looks at the
//! flag (one relaxed atomic load) each time it polls its transport,
//! publishes a snapshot. A rank that is not inside a call for a while
//! cannot answer; the scrape then gets the last snapshot, with its age in
//! `afmesh_snapshot_age_seconds`. Nothing is done per message, and nothing
//! at all when the variable is unset.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
// std's atomics, not `crate::sync`'s: two flags between a rank and its
// server thread, no lock-free structure for loom to model.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{Histogram, PeerStats, RankStats};
use crate::error::{Error, Peer, Result};

/// How long a scrape waits for the rank to publish a fresh snapshot.
const FRESH_WAIT: Duration = Duration::from_millis(100);
/// Bound on reading a request and writing the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Histogram bucket bounds exported, in seconds.
const BOUNDS_S: [f64; 22] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
    0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// What the rank and the server share.
#[derive(Debug)]
struct Shared {
    /// The server wants a snapshot.
    want: AtomicBool,
    /// The server is stopping.
    stop: AtomicBool,
    snapshot: Mutex<Option<(RankStats, Instant)>>,
    fresh: Condvar,
}

/// The rank's side: publishes a snapshot when asked.
#[derive(Debug)]
pub(crate) struct Metrics {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Bound, not yet served.
    listener: Option<TcpListener>,
    thread: Option<JoinHandle<()>>,
}

impl Metrics {
    /// `AFMESH_METRICS`, if set: the address to serve on.
    pub(crate) fn address_from_env() -> Result<Option<String>> {
        match std::env::var("AFMESH_METRICS") {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(Error::config(format!("AFMESH_METRICS: {e}"))),
        }
    }

    /// Binds `addr` (before the rank joins, so a bad address fails
    /// early); [`Metrics::start`] serves.
    pub(crate) fn bind(addr: &str) -> Result<Metrics> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("AFMESH_METRICS={addr}: bind"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io(format!("AFMESH_METRICS={addr}: local address"), e))?;
        Ok(Metrics {
            shared: Arc::new(Shared {
                want: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                snapshot: Mutex::new(None),
                fresh: Condvar::new(),
            }),
            addr: bound,
            listener: Some(listener),
            thread: None,
        })
    }

    /// Starts serving the stats of rank `me`.
    pub(crate) fn start(&mut self, me: Peer) -> Result<()> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let s = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("afmesh-metrics".into())
            .spawn(move || accept_loop(&listener, &s, me))
            .map_err(|e| Error::io("spawn the metrics thread", e))?;
        self.thread = Some(thread);
        tracing::info!("{me}: metrics at http://{}/metrics", self.addr);
        Ok(())
    }

    /// Whether the server asked for a snapshot (cheap: one atomic load).
    #[inline]
    pub(crate) fn wanted(&self) -> bool {
        self.shared.want.load(Ordering::Relaxed)
    }

    /// Hands the server a snapshot.
    pub(crate) fn publish(&self, stats: RankStats) {
        self.shared.want.store(false, Ordering::Relaxed);
        let mut g = self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *g = Some((stats, Instant::now()));
        self.shared.fresh.notify_all();
    }

    /// Stops the server (its thread ends at its next accept, which this
    /// makes happen).
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.stop.store(true, Ordering::SeqCst);
            // Wakes the accept; the thread then sees `stop`.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
            let _ = t.join();
        }
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Shared, me: Peer) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = conn else { continue };
        if let Err(e) = answer(&mut stream, shared, me) {
            tracing::debug!("metrics: {e}");
        }
    }
}

/// Reads one request and answers it.
fn answer(stream: &mut TcpStream, shared: &Shared, me: Peer) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "try /metrics\n".to_string())
    } else {
        ("200 OK", render(me, snapshot(shared)))
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// Asks the rank for a snapshot and waits a little for it; the last one
/// otherwise.
fn snapshot(shared: &Shared) -> Option<(RankStats, Duration)> {
    let asked = Instant::now();
    shared.want.store(true, Ordering::Relaxed);
    let mut g = shared.snapshot.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = asked + FRESH_WAIT;
    while g.as_ref().is_none_or(|(_, at)| *at < asked) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        g = shared
            .fresh
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    g.as_ref().map(|(s, at)| (s.clone(), at.elapsed()))
}

/// The stats as Prometheus text.
pub fn render_stats(me: Peer, stats: &RankStats, age: Duration) -> String {
    render(me, Some((stats.clone(), age)))
}

/// A metric family drawn from every peer's stats: name, help, the value.
type Family<T> = (&'static str, &'static str, fn(&PeerStats) -> T);
/// A histogram family: name, help, the histogram.
type HistogramFamily = (&'static str, &'static str, fn(&PeerStats) -> &Histogram);

fn render(me: Peer, snap: Option<(RankStats, Duration)>) -> String {
    let mut o = String::new();
    let Some((stats, age)) = snap else {
        let _ = writeln!(
            o,
            "# HELP afmesh_up Whether the rank has published its stats.\n# TYPE afmesh_up gauge\nafmesh_up{{rank=\"{me}\"}} 0"
        );
        return o;
    };
    let r = format!("rank=\"{me}\"");
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "afmesh_up",
        "gauge",
        "Whether the rank has published its stats.",
    );
    let _ = writeln!(o, "afmesh_up{{{r}}} 1");
    family(
        &mut o,
        "afmesh_info",
        "gauge",
        "The rank and the transport of its links.",
    );
    let _ = writeln!(o, "afmesh_info{{{r},transport=\"{}\"}} 1", stats.transport);
    family(
        &mut o,
        "afmesh_snapshot_age_seconds",
        "gauge",
        "Age of these stats (the rank publishes them while inside a call).",
    );
    let _ = writeln!(
        o,
        "afmesh_snapshot_age_seconds{{{r}}} {:.6}",
        age.as_secs_f64()
    );
    family(
        &mut o,
        "afmesh_layers_total",
        "counter",
        "Stages completed: combines seen by an attention rank, batches answered by an FFN rank.",
    );
    let layers = stats
        .peers
        .iter()
        .map(|(_, p)| p.round_trip_ns.count().max(p.ffn_ns.count()))
        .min()
        .unwrap_or(0);
    let _ = writeln!(o, "afmesh_layers_total{{{r}}} {layers}");
    let g = &stats.spin_gaps;
    for (name, help, v) in [
        (
            "afmesh_spin_seconds_total",
            "Time the rank's waits spun, as their clock looks measured it.",
            g.spun_ns as f64 / 1e9,
        ),
        (
            "afmesh_spin_gaps_total",
            "Stretches of that spinning in which the thread did not run (5 us or more over the quickest): interrupts, preemption, a hypervisor.",
            g.count as f64,
        ),
        (
            "afmesh_spin_gap_seconds_total",
            "Time those gaps took.",
            g.lost_ns as f64 / 1e9,
        ),
    ] {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name}{{{r}}} {v}");
    }
    let counters: [Family<u64>; 5] = [
        (
            "afmesh_messages_sent_total",
            "Messages written to the peer.",
            |p| p.sent,
        ),
        (
            "afmesh_bytes_sent_total",
            "Bytes written to the peer, headers included.",
            |p| p.sent_bytes,
        ),
        (
            "afmesh_bytes_copied_total",
            "Bytes of those the library itself copied on the way.",
            |p| p.copied_bytes,
        ),
        (
            "afmesh_messages_received_total",
            "Messages from the peer that counted.",
            |p| p.received,
        ),
        (
            "afmesh_errors_total",
            "Messages from the peer that were rejected (stale, duplicate, bad).",
            |p| p.rejected,
        ),
    ];
    for (name, help, get) in counters {
        family(&mut o, name, "counter", help);
        for (peer, p) in &stats.peers {
            let _ = writeln!(o, "{name}{{{r},peer=\"{peer}\"}} {}", get(p));
        }
    }
    family(
        &mut o,
        "afmesh_link_up",
        "gauge",
        "1 while the link to the peer is up, 0 once the peer is lost.",
    );
    for (peer, p) in &stats.peers {
        let _ = writeln!(
            o,
            "afmesh_link_up{{{r},peer=\"{peer}\"}} {}",
            u8::from(p.lost.is_none())
        );
    }
    let histograms: [HistogramFamily; 4] = [
        (
            "afmesh_round_trip_seconds",
            "Attention ranks: dispatch posted to the peer's combine seen.",
            |p| &p.round_trip_ns,
        ),
        (
            "afmesh_ffn_seconds",
            "FFN ranks: the peer's dispatch landed to the response posted.",
            |p| &p.ffn_ns,
        ),
        (
            "afmesh_straggler_seconds",
            "Attention ranks: how much later than the one before the peer answered, each time it answered a stage last.",
            |p| &p.late_ns,
        ),
        (
            "afmesh_arrival_seconds",
            "One way: the peer posted a message to this rank counting it (dispatch to arrival on FFN ranks, the combine's way back on attention ranks; the peer's clock).",
            |p| &p.arrival_ns,
        ),
    ];
    for (name, help, get) in histograms {
        family(&mut o, name, "histogram", help);
        for (peer, p) in &stats.peers {
            histogram(&mut o, name, &format!("{r},peer=\"{peer}\""), get(p));
        }
    }
    o
}

/// One histogram's `_bucket`, `_sum` and `_count` lines. A bucket counts
/// the values recorded in histogram buckets that start at or below its
/// bound (so within the histogram's precision).
fn histogram(o: &mut String, name: &str, labels: &str, h: &Histogram) {
    let buckets: Vec<(u64, u64)> = h.buckets().collect();
    let mut i = 0;
    let mut seen = 0u64;
    for b in BOUNDS_S {
        let ns = (b * 1e9) as u64;
        while i < buckets.len() && buckets[i].0 <= ns {
            seen += buckets[i].1;
            i += 1;
        }
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{b}\"}} {seen}");
    }
    let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(o, "{name}_sum{{{labels}}} {:.9}", h.sum() as f64 / 1e9);
    let _ = writeln!(o, "{name}_count{{{labels}}} {}", h.count());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn stats() -> RankStats {
        let mut p0 = PeerStats {
            sent: 3,
            sent_bytes: 300,
            received: 3,
            ..PeerStats::default()
        };
        for us in [1, 3, 40, 700] {
            p0.round_trip_ns.record(us * 1000);
        }
        let p1 = PeerStats {
            lost: Some("gone".into()),
            rejected: 2,
            ..PeerStats::default()
        };
        let mut spin_gaps = crate::transport::Gaps::default();
        spin_gaps.spun_ns = 2_000_000_000;
        spin_gaps.count = 7;
        spin_gaps.lost_ns = 35_000;
        RankStats {
            transport: "shm".into(),
            peers: vec![(Peer::Ffn(0), p0), (Peer::Ffn(1), p1)],
            wire: Default::default(),
            spin_gaps,
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn the_text_format_carries_counters_links_and_cumulative_buckets() {
        let t = render_stats(Peer::Attention(1), &stats(), Duration::from_millis(3));
        let r = "rank=\"A1\"";
        assert_eq!(value(&t, &format!("afmesh_up{{{r}}}")), 1.0);
        assert_eq!(
            value(&t, &format!("afmesh_bytes_sent_total{{{r},peer=\"F0\"}}")),
            300.0
        );
        assert_eq!(
            value(&t, &format!("afmesh_errors_total{{{r},peer=\"F1\"}}")),
            2.0
        );
        assert_eq!(value(&t, &format!("afmesh_spin_seconds_total{{{r}}}")), 2.0);
        assert_eq!(value(&t, &format!("afmesh_spin_gaps_total{{{r}}}")), 7.0);
        assert_eq!(
            value(&t, &format!("afmesh_spin_gap_seconds_total{{{r}}}")),
            35e-6
        );
        assert_eq!(
            value(&t, &format!("afmesh_link_up{{{r},peer=\"F0\"}}")),
            1.0
        );
        assert_eq!(
            value(&t, &format!("afmesh_link_up{{{r},peer=\"F1\"}}")),
            0.0
        );
        let b = |le: &str| {
            value(
                &t,
                &format!("afmesh_round_trip_seconds_bucket{{{r},peer=\"F0\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(
            [
                b("0.000001"),
                b("0.000005"),
                b("0.00005"),
                b("0.001"),
                b("+Inf")
            ],
            [1.0, 2.0, 3.0, 4.0, 4.0]
        );
        assert_eq!(
            value(
                &t,
                &format!("afmesh_round_trip_seconds_count{{{r},peer=\"F0\"}}")
            ),
            4.0
        );
        let sum = value(
            &t,
            &format!("afmesh_round_trip_seconds_sum{{{r},peer=\"F0\"}}"),
        );
        assert!((sum - 744e-6).abs() < 1e-9, "{sum}");
        // Every sample line belongs to a declared family.
        let families: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| families.contains(b))
                .unwrap_or(name);
            assert!(families.contains(&base), "{l}");
        }
    }
}
