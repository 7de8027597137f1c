//! What both rank classes share: the one-call-at-a-time lock, stats as a
//! dict, dtype names, trace stamps.

use std::sync::{Mutex, MutexGuard, TryLockError};

use afmesh::{Dtype, Histogram, RankStats};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::buffer::Held;
use crate::errors::{invalid, Busy, ShutdownError};

/// The rank behind a Python object: `None` once shut down. Calls take it
/// with `try_lock`: a second thread calling in while one waits gets
/// `afmesh.Busy` at once instead of queueing behind a released GIL.
pub fn lock<'a, R>(m: &'a Mutex<Option<R>>, what: &str) -> PyResult<MutexGuard<'a, Option<R>>> {
    let g = match m.try_lock() {
        Ok(g) => g,
        // A panic inside a call was turned into a Python exception; the
        // rank itself is still consistent (the library has no panics on
        // peers' or callers' input), so it stays usable.
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Err(Busy::new_err(format!(
                "{what} is in use by another thread: one call at a time per rank (interrupt() may be called from anywhere)"
            )))
        }
    };
    if g.is_none() {
        return Err(ShutdownError::new_err(format!("{what} was shut down")));
    }
    Ok(g)
}

fn hist<'py>(py: Python<'py>, h: &Histogram) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("count", h.count())?;
    d.set_item("min", h.min())?;
    d.set_item("max", h.max())?;
    d.set_item("mean", h.mean())?;
    d.set_item("p50", h.quantile(0.5))?;
    d.set_item("p99", h.quantile(0.99))?;
    Ok(d)
}

/// A rank's counters as a dict: `{"transport": str, "peers": [{...}],
/// "stragglers": [{...}], "spin_gaps": {"spun_ns", "count", "lost_ns"}}`.
pub fn stats_dict(py: Python<'_>, s: &RankStats) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("transport", &s.transport)?;
    let peers = PyList::empty(py);
    for (peer, p) in &s.peers {
        let e = PyDict::new(py);
        e.set_item("peer", peer.to_string())?;
        e.set_item("sent", p.sent)?;
        e.set_item("sent_bytes", p.sent_bytes)?;
        e.set_item("copied_bytes", p.copied_bytes)?;
        e.set_item("received", p.received)?;
        e.set_item("rejected", p.rejected)?;
        e.set_item("lost", p.lost.clone())?;
        e.set_item("round_trip_ns", hist(py, &p.round_trip_ns)?)?;
        e.set_item("ffn_ns", hist(py, &p.ffn_ns)?)?;
        e.set_item("late_ns", hist(py, &p.late_ns)?)?;
        e.set_item("arrival_ns", hist(py, &p.arrival_ns)?)?;
        peers.append(e)?;
    }
    d.set_item("peers", peers)?;
    // Attention ranks: FFN ranks that answered stages last, most often
    // first: {"peer", "count", "mean_late_ns", "max_late_ns"}.
    let stragglers = PyList::empty(py);
    for st in s.stragglers() {
        let e = PyDict::new(py);
        e.set_item("peer", st.peer.to_string())?;
        e.set_item("count", st.count)?;
        e.set_item("mean_late_ns", st.mean_late_ns)?;
        e.set_item("max_late_ns", st.max_late_ns)?;
        stragglers.append(e)?;
    }
    d.set_item("stragglers", stragglers)?;
    // What the machine took from the rank's spinning waits.
    let g = PyDict::new(py);
    g.set_item("spun_ns", s.spin_gaps.spun_ns)?;
    g.set_item("count", s.spin_gaps.count)?;
    g.set_item("lost_ns", s.spin_gaps.lost_ns)?;
    d.set_item("spin_gaps", g)?;
    Ok(d.into_any().unbind())
}

/// The element type of a sum: `dtype` by name (`"f32"`, `"float32"`,
/// `numpy.float32`, `torch.bfloat16` ...), or `out`'s own format.
pub fn dtype_of(dtype: Option<&Bound<'_, PyAny>>, out: &Held) -> PyResult<Dtype> {
    let name = match dtype {
        Some(d) => {
            let name = if let Ok(s) = d.extract::<String>() {
                s
            } else if let Ok(n) = d.getattr("__name__") {
                n.str()?.to_string()
            } else if let Ok(n) = d.getattr("name") {
                n.str()?.to_string()
            } else {
                d.str()?.to_string()
            };
            name.trim_start_matches("torch.").to_ascii_lowercase()
        }
        None => match out.format() {
            Some(b'f') => "f32".into(),
            Some(b'e') => "f16".into(),
            f => {
                return Err(invalid(format!(
                    "combine sum: out's element format is {:?}; pass dtype= (f32, f16 or bf16)",
                    f.map(char::from)
                )))
            }
        },
    };
    match name.as_str() {
        "f32" | "float32" | "float" => Ok(Dtype::F32),
        "f16" | "float16" | "half" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::Bf16),
        _ => Err(invalid(format!(
            "dtype {name:?}: expected f32, f16 or bf16"
        ))),
    }
}

/// Trace stamps of one combine (wall clock, ns): dispatch posted, landed
/// on the FFN rank, handed to its caller, answered, and seen back here.
#[pyclass(frozen, get_all, eq, module = "afmesh._afmesh")]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Trace {
    /// Dispatch posted (attention clock).
    pub post_ns: u64,
    /// Dispatch landed (FFN clock).
    pub land_ns: u64,
    /// Batch handed to the FFN's caller (FFN clock).
    pub process_ns: u64,
    /// Combine posted (FFN clock).
    pub respond_ns: u64,
    /// Combine seen by the attention rank (attention clock).
    pub back_ns: u64,
}

#[pymethods]
impl Trace {
    /// Time on the wire both ways (needs synchronized clocks across hosts).
    fn network_ns(&self) -> u64 {
        self.rust().network_ns()
    }
    /// Time inside the FFN rank, landing to response.
    fn ffn_ns(&self) -> u64 {
        self.rust().ffn_ns()
    }
    fn __repr__(&self) -> String {
        format!(
            "Trace(post_ns={}, land_ns={}, process_ns={}, respond_ns={}, back_ns={})",
            self.post_ns, self.land_ns, self.process_ns, self.respond_ns, self.back_ns
        )
    }
}

impl Trace {
    pub fn from_rust(t: afmesh::Trace) -> Trace {
        Trace {
            post_ns: t.post_ns,
            land_ns: t.land_ns,
            process_ns: t.process_ns,
            respond_ns: t.respond_ns,
            back_ns: t.back_ns,
        }
    }
    fn rust(&self) -> afmesh::Trace {
        afmesh::Trace {
            post_ns: self.post_ns,
            land_ns: self.land_ns,
            process_ns: self.process_ns,
            respond_ns: self.respond_ns,
            back_ns: self.back_ns,
        }
    }
}
