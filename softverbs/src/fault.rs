//! The fault switch, `SOFTVERBS_FAULT`: injected errors for tests of
//! programs above the verbs (afmesh's verbs backend). A comma-separated
//! list of rules, read once per process:
//!
//! * `wr:<n>:<status>`: the n-th work request this process posts (counted
//!   from 1 over all its queue pairs, each element of a posted list
//!   counting once) is not executed; it completes with `<status>`, which
//!   is an `ibv_wc_status` name with or without its `IBV_WC_` prefix, in
//!   any case (`REM_ACCESS_ERR`, `retry_exc_err`), or its number (1–23).
//!   As after any error completion, the QP moves to the error state and
//!   the work requests behind it complete with `IBV_WC_WR_FLUSH_ERR`.
//! * `qp:<k>:wr:<n>:<status>`: the same for the n-th work request posted
//!   on the k-th queue pair this process created (from 1).
//! * `<status>` `fatal` instead: the QP fails as on an internal error with
//!   no completion of its own: `IBV_EVENT_QP_FATAL` on the context's
//!   async events, the QP moves to the error state and this and every
//!   later work request completes with `IBV_WC_WR_FLUSH_ERR`.
//! * `port-err:<ms>` / `port-active:<ms>`: port 1 of every device goes
//!   down (or back up) `<ms>` milliseconds after this process first opens
//!   a device: `ibv_query_port` says so, every open context gets
//!   `IBV_EVENT_PORT_ERR` (`IBV_EVENT_PORT_ACTIVE`), and while the port is
//!   down this process's work requests get no answer, so they complete
//!   with `IBV_WC_RETRY_EXC_ERR` after the QP's timeout and retries.
//!
//! `SOFTVERBS_FAIL_WR=<n>[:<status>]` (the first form of this switch, which
//! afmesh's verbs tests use) is read as one more rule `wr:<n>:<status>`,
//! the status defaulting to `REM_ACCESS_ERR`.
//!
//! A malformed value is reported on stderr and makes
//! `ibv_get_device_list` fail with EINVAL, so a typo never passes as a
//! run without faults.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::abi::*;
use crate::events::{Element, EventQueue};

/// What happens to a work request a rule picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Complete with this `ibv_wc_status`.
    Status(u32),
    /// `IBV_EVENT_QP_FATAL`, then flush.
    Fatal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WrRule {
    /// The k-th QP of the process, or any.
    qp: Option<u64>,
    n: u64,
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRule {
    after: Duration,
    up: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Faults {
    wrs: Vec<WrRule>,
    ports: Vec<PortRule>,
}

const STATUS_NAMES: [&str; 24] = [
    "SUCCESS",
    "LOC_LEN_ERR",
    "LOC_QP_OP_ERR",
    "LOC_EEC_OP_ERR",
    "LOC_PROT_ERR",
    "WR_FLUSH_ERR",
    "MW_BIND_ERR",
    "BAD_RESP_ERR",
    "LOC_ACCESS_ERR",
    "REM_INV_REQ_ERR",
    "REM_ACCESS_ERR",
    "REM_OP_ERR",
    "RETRY_EXC_ERR",
    "RNR_RETRY_EXC_ERR",
    "LOC_RDD_VIOL_ERR",
    "REM_INV_RD_REQ_ERR",
    "REM_ABORT_ERR",
    "INV_EECN_ERR",
    "INV_EEC_STATE_ERR",
    "FATAL_ERR",
    "RESP_TIMEOUT_ERR",
    "GENERAL_ERR",
    "TM_ERR",
    "TM_RNDV_INCOMPLETE",
];

fn action(s: &str) -> Result<Action, String> {
    if s.eq_ignore_ascii_case("fatal") {
        return Ok(Action::Fatal);
    }
    let status = match s.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let up = s.to_ascii_uppercase();
            let name = up.strip_prefix("IBV_WC_").unwrap_or(&up);
            STATUS_NAMES
                .iter()
                .position(|&k| k == name)
                .ok_or_else(|| {
                    format!("unknown status `{s}` (an ibv_wc_status name or number, or `fatal`)")
                })? as u32
        }
    };
    match status {
        0 => Err("status SUCCESS is not a fault".into()),
        1..=23 => Ok(Action::Status(status)),
        _ => Err(format!("status {status} is out of range (1-23)")),
    }
}

fn positive(what: &str, s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{what} `{s}` is not a number from 1")),
    }
}

/// Parses a `SOFTVERBS_FAULT` value.
pub fn parse(spec: &str) -> Result<Faults, String> {
    let mut f = Faults::default();
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let parts: Vec<&str> = rule.split(':').map(str::trim).collect();
        let bad = |why: String| format!("SOFTVERBS_FAULT rule `{rule}`: {why}");
        match parts.as_slice() {
            ["wr", n, st] => f.wrs.push(WrRule {
                qp: None,
                n: positive("work request", n).map_err(bad)?,
                action: action(st).map_err(bad)?,
            }),
            ["qp", k, "wr", n, st] => f.wrs.push(WrRule {
                qp: Some(positive("queue pair", k).map_err(bad)?),
                n: positive("work request", n).map_err(bad)?,
                action: action(st).map_err(bad)?,
            }),
            [kind @ ("port-err" | "port-active"), ms] => f.ports.push(PortRule {
                after: Duration::from_millis(
                    ms.parse()
                        .map_err(|_| bad(format!("`{ms}` is not milliseconds")))?,
                ),
                up: *kind == "port-active",
            }),
            _ => {
                return Err(bad(
                    "expected wr:<n>:<status>, qp:<k>:wr:<n>:<status>, port-err:<ms> or port-active:<ms>"
                        .into(),
                ))
            }
        }
    }
    f.ports.sort_by_key(|p| p.after);
    Ok(f)
}

/// `SOFTVERBS_FAIL_WR`'s `<n>[:<status>]` as a `SOFTVERBS_FAULT` rule.
fn fail_wr_rule(v: &str) -> String {
    match v.split_once(':') {
        Some((n, st)) => format!("wr:{}:{}", n.trim(), st.trim()),
        None => format!("wr:{}:REM_ACCESS_ERR", v.trim()),
    }
}

/// Both variables' rules, as one `SOFTVERBS_FAULT` value.
fn spec_from(fault: Option<&str>, fail_wr: Option<&str>) -> String {
    let mut rules: Vec<String> = fault.map(str::to_string).into_iter().collect();
    rules.extend(fail_wr.map(fail_wr_rule));
    rules.join(",")
}

/// This process's rules (none when neither variable is set).
pub fn get() -> Result<&'static Faults, String> {
    static F: OnceLock<Result<Faults, String>> = OnceLock::new();
    F.get_or_init(|| {
        let var = |k: &str| match std::env::var(k) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(format!("{k}: {e}")),
        };
        let (fault, fail_wr) = (var("SOFTVERBS_FAULT")?, var("SOFTVERBS_FAIL_WR")?);
        parse(&spec_from(fault.as_deref(), fail_wr.as_deref()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Work requests posted by this process so far.
static POSTED: AtomicU64 = AtomicU64::new(0);

impl Faults {
    /// Counts one posted work request: the `n`-th on the process's
    /// `qp`-th queue pair; what to do instead of executing it, if a rule
    /// picks it.
    pub fn on_post(&self, qp: u64, n: u64) -> Option<Action> {
        let global = POSTED.fetch_add(1, Ordering::Relaxed) + 1;
        self.wrs
            .iter()
            .find(|r| match r.qp {
                None => r.n == global,
                Some(k) => k == qp && r.n == n,
            })
            .map(|r| r.action)
    }
}

static PORT_DOWN: AtomicBool = AtomicBool::new(false);

/// Whether the port faults have taken port 1 down in this process.
pub fn port_down() -> bool {
    PORT_DOWN.load(Ordering::Acquire)
}

/// The event queues of this process's open contexts, for port events.
fn contexts() -> &'static Mutex<Vec<Weak<EventQueue>>> {
    static C: OnceLock<Mutex<Vec<Weak<EventQueue>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(Vec::new()))
}

/// A context was opened: it gets port events from now on; the first one
/// starts the port faults' clock.
pub fn context_opened(q: &std::sync::Arc<EventQueue>) {
    {
        let mut v = contexts().lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(std::sync::Arc::downgrade(q));
    }
    static CLOCK: std::sync::Once = std::sync::Once::new();
    CLOCK.call_once(|| {
        let Ok(f) = get() else { return };
        if f.ports.is_empty() {
            return;
        }
        let rules = f.ports.clone();
        let _ = std::thread::Builder::new()
            .name("softverbs-port-faults".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                for r in rules {
                    std::thread::sleep(r.after.saturating_sub(start.elapsed()));
                    PORT_DOWN.store(!r.up, Ordering::Release);
                    let ty = if r.up {
                        IBV_EVENT_PORT_ACTIVE
                    } else {
                        IBV_EVENT_PORT_ERR
                    };
                    let v = contexts().lock().unwrap_or_else(|e| e.into_inner());
                    for q in v.iter().filter_map(Weak::upgrade) {
                        q.raise(ty, Element::Port(1));
                    }
                }
            });
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        let f = parse("wr:3:REM_ACCESS_ERR, qp:2:wr:1:ibv_wc_retry_exc_err,wr:9:fatal,wr:4:13,port-err:50,port-active:20").unwrap();
        assert_eq!(
            f.wrs,
            vec![
                WrRule {
                    qp: None,
                    n: 3,
                    action: Action::Status(IBV_WC_REM_ACCESS_ERR)
                },
                WrRule {
                    qp: Some(2),
                    n: 1,
                    action: Action::Status(IBV_WC_RETRY_EXC_ERR)
                },
                WrRule {
                    qp: None,
                    n: 9,
                    action: Action::Fatal
                },
                WrRule {
                    qp: None,
                    n: 4,
                    action: Action::Status(IBV_WC_RNR_RETRY_EXC_ERR)
                },
            ]
        );
        assert_eq!(f.ports.len(), 2);
        assert!(f.ports[0].up && !f.ports[1].up, "sorted by time");
        assert_eq!(parse("").unwrap(), Faults::default());
    }

    #[test]
    fn fail_wr_is_a_wr_rule() {
        let f = parse(&spec_from(Some("wr:1:5"), Some("40:12"))).unwrap();
        assert_eq!(f.wrs[1].n, 40);
        assert_eq!(f.wrs[1].action, Action::Status(IBV_WC_RETRY_EXC_ERR));
        let f = parse(&spec_from(None, Some("7"))).unwrap();
        assert_eq!(f.wrs[0].action, Action::Status(IBV_WC_REM_ACCESS_ERR));
        assert!(parse(&spec_from(None, Some("x"))).is_err());
    }

    #[test]
    fn bad_rules_name_the_mistake() {
        for (spec, says) in [
            ("wr:0:REM_ACCESS_ERR", "not a number from 1"),
            ("wr:x:REM_ACCESS_ERR", "`x`"),
            ("wr:1:NOPE", "unknown status `NOPE`"),
            ("wr:1:SUCCESS", "not a fault"),
            ("wr:1:24", "out of range"),
            ("qp:0:wr:1:5", "queue pair `0`"),
            ("rw:1:5", "expected wr:<n>:<status>"),
            ("port-err:soon", "not milliseconds"),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(says) && e.contains(spec), "{spec}: {e}");
        }
    }
}
