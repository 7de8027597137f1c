//! Where a device rank's host time goes: the per-message legs from the
//! trace stamps, the rank thread's context switches and the process's
//! threads with their CPUs (the device bench's log lines).

use afmesh::Histogram;

/// Wall-clock nanoseconds (the clock the ranks' trace stamps use).
pub(super) fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// This thread's context switches so far, (voluntary, involuntary), from
/// /proc (zeros where it cannot be read).
pub(super) fn switches() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        get("voluntary_ctxt_switches:"),
        get("nonvoluntary_ctxt_switches:"),
    )
}

/// The process's threads as `name[allowed CPUs] voluntary/involuntary
/// switches`, for the log: who shares the rank's core.
pub(super) fn threads() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return String::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map_or("?", str::trim)
                .to_string()
        };
        out.push(format!(
            "{}[{}] {}/{}",
            comm.trim(),
            get("Cpus_allowed_list:"),
            get("voluntary_ctxt_switches:"),
            get("nonvoluntary_ctxt_switches:")
        ));
    }
    out.join(", ")
}

/// `name p50/p99` of a histogram, in microseconds.
pub(super) fn pct(name: &str, h: &Histogram) -> String {
    let q = |x| h.quantile(x).unwrap_or(0) as f64 / 1e3;
    format!("{name} {:.1}/{:.1}", q(0.5), q(0.99))
}

/// Where the timed layers' time goes, per message, from the trace stamps
/// (one host's wall clock): the dispatch call on the host, posted to seen
/// by the FFN rank, seen to answered there, answered to seen back here, and
/// seen back to the layer's wait returning.
#[derive(Default)]
pub(super) struct Legs {
    pub(super) call: Histogram,
    pub(super) out: Histogram,
    pub(super) ffn: Histogram,
    pub(super) back: Histogram,
    pub(super) wake: Histogram,
}

impl Legs {
    pub(super) fn line(&self) -> String {
        [
            pct("call", &self.call),
            pct("out", &self.out),
            pct("ffn", &self.ffn),
            pct("back", &self.back),
            pct("wake", &self.wake),
        ]
        .join(" | ")
    }
}
