//! `afmesh.FfnRank` and `afmesh.Batch`: gather every attention rank's
//! block for a stage, answer each with its rows.

use std::sync::{Arc, Mutex};

use afmesh::transport::Region;
use pyo3::prelude::*;

use crate::buffer::{device_parts, device_stream, Held, Keep};
use crate::common::{lock, stats_dict};
use crate::errors::{invalid, to_py, BufferSize, StaleView};
use crate::mesh::StageSpec;
use crate::views::{Lease, Root};
use crate::wait::{blocking, seconds};

/// An FFN rank of a mesh. One call at a time (a second thread gets
/// `afmesh.Busy`); `interrupt()` may be called from any thread.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct FfnRank {
    inner: Mutex<Option<afmesh::FfnRank>>,
    /// Per stage, the CUDA sources of its answers since its last batch was
    /// handed out: the copies out of them may still be pending on the
    /// GPU, so torch's caching allocator must not get their memory back
    /// before the stage's next batch (every attention rank dispatches it
    /// again only after it took this rank's answer, sent after the copies).
    held: Mutex<Vec<Vec<Py<PyAny>>>>,
    interrupter: afmesh::Interrupter,
    region: Arc<Region>,
    root: Root,
    /// Leases of the batches handed out and not answered yet.
    out: Mutex<Vec<Py<Lease>>>,
    rank: u32,
    m: usize,
    n: usize,
    spec: afmesh::StageSpec,
    /// The stage memory's GPU, when it is on one.
    device: Option<i32>,
    /// Caller memory, dropped after the rank (fields drop in order).
    keep: Keep,
}

const WHAT: &str = "the FFN rank";

impl FfnRank {
    pub fn new(r: afmesh::FfnRank, keep: Keep) -> FfnRank {
        FfnRank {
            interrupter: r.interrupter(),
            region: r.receive_region().clone(),
            root: Root::new(),
            out: Mutex::new(Vec::new()),
            rank: r.rank(),
            m: r.attention_ranks(),
            n: r.ffn_ranks(),
            spec: r.spec(),
            device: match r.memory() {
                afmesh::transport::MemoryKind::Cuda { device } => Some(device),
                _ => None,
            },
            held: Mutex::new((0..r.spec().stages).map(|_| Vec::new()).collect()),
            inner: Mutex::new(Some(r)),
            keep,
        }
    }

    fn batch(slf: &Bound<'_, Self>, b: afmesh::Batch) -> PyResult<Batch> {
        let this = slf.get();
        let base = this.region.addr() as usize;
        let at = |s: &[u8]| {
            if s.is_empty() {
                (0, 0)
            } else {
                ((s.as_ptr() as usize).wrapping_sub(base), s.len())
            }
        };
        let senders = b.senders();
        // The stage came back: the copies of its last answer ran.
        if let Ok(mut h) = this.held.lock() {
            if let Some(v) = h.get_mut(b.stage() as usize) {
                v.clear();
            }
        }
        let lease = Py::new(slf.py(), Lease::new())?;
        if let Ok(mut out) = this.out.lock() {
            out.retain(|l| l.get().alive());
            out.push(lease.clone_ref(slf.py()));
        }
        // Device memory has no host slices: the rows by address, the side
        // blocks (small, host data) copied out once.
        let row = b.row_bytes();
        let (tokens_at, side_at, sides) = if this.device.is_some() {
            let mut sides = Vec::with_capacity(senders);
            for a in 0..senders {
                let mut buf = vec![0u8; this.spec.side_bytes as usize];
                let n = b.copy_side(a, &mut buf).map_err(to_py)?;
                buf.truncate(n);
                sides.push(buf);
            }
            let tokens_at = (0..senders)
                .map(|a| {
                    b.tokens_addr(a)
                        .map(|p| ((p as usize).wrapping_sub(base), b.token_count(a) * row))
                        .unwrap_or((0, 0))
                })
                .collect();
            (tokens_at, vec![(0, 0); senders], Some(sides))
        } else {
            (
                (0..senders).map(|a| at(b.tokens(a))).collect(),
                (0..senders).map(|a| at(b.side(a))).collect(),
                None,
            )
        };
        Ok(Batch {
            rank: slf.clone().unbind(),
            stage: b.stage(),
            sequence: b.sequence(),
            row_bytes: row,
            max_tokens: b.max_tokens(),
            matrix_at: b.matrix().map(at),
            counts: (0..senders).map(|a| b.token_count(a)).collect(),
            tokens_at,
            side_at,
            sides,
            posted: (0..senders).map(|a| b.posted_ns(a)).collect(),
            landed: (0..senders).map(|a| b.landed_ns(a)).collect(),
            lease,
            inner: Mutex::new(Some(b)),
        })
    }

    /// `respond` on a rank whose stage memory is on a GPU: each output is
    /// a CUDA tensor (or `__cuda_array_interface__` object) of exactly
    /// `token_count(a) × out_row_bytes` bytes, copied device to device once
    /// the work enqueued so far on `stream` (default: the producers', one
    /// for all outputs; `afmesh._buffers.device_stream`) ran. The outputs
    /// are held until the stage's next batch is handed out.
    fn respond_device(
        &self,
        py: Python<'_>,
        batch: &Batch,
        outputs: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let out_row = self.spec.out_row_bytes as usize;
        let mut ptrs = Vec::new();
        let mut objs = Vec::new();
        let mut on: Option<u64> = None;
        for (a, o) in outputs.try_iter()?.enumerate() {
            let o = o?;
            let what = format!("respond output {a}");
            let (ptr, len) = device_parts(&o, &what)?;
            let s = device_stream(&o, stream, &what, self.device)?;
            match on {
                Some(prev) if prev != s => {
                    return Err(invalid(format!(
                        "{what}: produced on stream {s:#x}, output 0 on {prev:#x}; pass stream= (one the copies wait for)"
                    )))
                }
                _ => on = Some(s),
            }
            objs.push(o.unbind());
            let want = batch.counts.get(a).copied().unwrap_or(0) * out_row;
            if len != want {
                return Err(BufferSize::new_err(format!(
                    "respond output {a}: {len} bytes, A{a} sent {} rows of {out_row} bytes back: {want}",
                    batch.counts.get(a).copied().unwrap_or(0)
                )));
            }
            ptrs.push(ptr);
        }
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let b = Self::take(batch)?;
        let stage = batch.stage;
        let on = on.unwrap_or(0);
        // SAFETY: `on` is the stream the caller named (`stream=`, whose
        // docs ask for a live stream of this rank's device), torch's
        // current stream on the outputs' device, the stream their
        // `__cuda_array_interface__` producer published, or 0; the driver
        // refuses a handle of another context. The outputs stay allocated:
        // `held` keeps references until the stage's next batch, which the
        // attention ranks dispatch only after this answer (sent after the
        // copies) reached them.
        let res = py.detach(|| unsafe { r.respond_device_on(b, &ptrs, on) });
        // Held whatever the outcome (a failure may follow an enqueued copy).
        if let Ok(mut h) = self.held.lock() {
            if let Some(v) = h.get_mut(stage as usize) {
                // Once per object (a retried refusal does not grow it).
                for o in objs {
                    if !v.iter().any(|h| h.is(&o)) {
                        v.push(o);
                    }
                }
            }
        }
        Self::settle(batch, res)
    }

    /// Takes the batch out of its Python object for an answer.
    fn take(batch: &Batch) -> PyResult<afmesh::Batch> {
        let mut g = batch
            .inner
            .lock()
            .map_err(|_| invalid("respond: the batch's lock is poisoned"))?;
        g.take().ok_or_else(|| {
            StaleView::new_err(format!(
                "respond: batch (stage {}, sequence {}) was already answered",
                batch.stage, batch.sequence
            ))
        })
    }

    /// After an answer: the batch comes back if it was refused unchanged,
    /// else its views end.
    fn settle(batch: &Batch, r: Result<(), afmesh::RespondError>) -> PyResult<()> {
        match r {
            Ok(()) => {
                batch.lease.get().revoke("the batch was answered (respond)");
                Ok(())
            }
            Err(afmesh::RespondError {
                batch: Some(b),
                error,
            }) => {
                if let Ok(mut g) = batch.inner.lock() {
                    *g = Some(b);
                }
                Err(to_py(error))
            }
            Err(e) => {
                batch.lease.get().revoke("the batch was answered (respond)");
                Err(to_py(e.error))
            }
        }
    }
}

#[pymethods]
impl FfnRank {
    /// This rank's index among the FFN ranks.
    #[getter]
    fn rank(&self) -> u32 {
        self.rank
    }
    /// Number of attention ranks (M).
    #[getter]
    fn attention_ranks(&self) -> usize {
        self.m
    }
    /// Number of FFN ranks (N).
    #[getter]
    fn ffn_ranks(&self) -> usize {
        self.n
    }
    /// The stage geometry.
    #[getter]
    fn spec(&self) -> StageSpec {
        StageSpec::from_rust(self.spec)
    }

    /// Waits up to `timeout` seconds for the oldest stage that every
    /// attention rank has dispatched to. GIL released; Ctrl-C raises
    /// KeyboardInterrupt within ~25 ms (nothing consumed).
    #[pyo3(signature = (timeout = 10.0))]
    fn get_batch(slf: &Bound<'_, Self>, timeout: f64) -> PyResult<Batch> {
        let timeout = seconds(timeout, "timeout")?;
        let this = slf.get();
        let mut g = lock(&this.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let b = blocking(slf.py(), timeout, |slice| r.get_batch(slice))?;
        drop(g);
        Self::batch(slf, b)
    }

    /// Non-blocking `get_batch`: a batch, or None.
    fn try_get_batch(slf: &Bound<'_, Self>) -> PyResult<Option<Batch>> {
        let this = slf.get();
        let mut g = lock(&this.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let b = r.try_get_batch().map_err(to_py)?;
        drop(g);
        b.map(|b| Self::batch(slf, b)).transpose()
    }

    /// Sends each attention rank `a` its rows `outputs[a]` (any
    /// C-contiguous buffers of `batch.token_count(a) × out_row_bytes`
    /// bytes; copied into the send slots) and frees the stage. The batch's
    /// views end here: using one raises `afmesh.StaleView`. Refused
    /// arguments leave the batch as it was (answer it again).
    ///
    /// On a rank whose stage memory is on a GPU, the outputs are CUDA
    /// tensors (or `__cuda_array_interface__` objects) copied device to
    /// device, and the copies start only after the work enqueued so far on
    /// `stream`: an int `CUstream` handle or an object with `.cuda_stream`
    /// (a `torch.cuda.Stream`), a live stream of the rank's device; by
    /// default torch's current stream on the outputs' device, else their
    /// `__cuda_array_interface__` `stream` (one for all outputs), else the
    /// legacy default stream. The rank holds references to the outputs
    /// until the stage's next batch is handed out, so their memory is not
    /// reused under the copies; writing to them before then, from a stream
    /// not ordered after the copies, races with them. `stream` is ignored
    /// on host ranks.
    #[pyo3(signature = (batch, outputs, stream = None))]
    fn respond(
        &self,
        py: Python<'_>,
        batch: &Batch,
        outputs: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if self.device.is_some() {
            return self.respond_device(py, batch, outputs, stream);
        }
        let held = outputs
            .try_iter()?
            .enumerate()
            .map(|(a, o)| Held::read(&o?, &format!("respond output {a}")))
            .collect::<PyResult<Vec<_>>>()?;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let b = Self::take(batch)?;
        let res = py.detach(|| {
            let slices: Vec<&[u8]> = held.iter().map(|h| h.bytes()).collect();
            r.respond(b, &slices)
        });
        Self::settle(batch, res)
    }

    /// Answers with rows gathered from several buffers, each copied
    /// straight into the send slot: `parts[a]` is a list of `(byte_offset,
    /// buffer)` for attention rank `a`, placed at that offset of its rows
    /// (`token_count(a) × out_row_bytes` bytes; bytes no part covers keep
    /// the slot's previous contents). Otherwise as `respond`.
    fn respond_parts(
        &self,
        py: Python<'_>,
        batch: &Batch,
        parts: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let out_row = self.spec.out_row_bytes as usize;
        let mut held: Vec<Vec<(usize, Held)>> = Vec::new();
        for (a, list) in parts.try_iter()?.enumerate() {
            let limit = batch.counts.get(a).copied().unwrap_or(0) * out_row;
            let mut mine = Vec::new();
            for (i, item) in list?.try_iter()?.enumerate() {
                let (off, buf): (usize, Bound<'_, PyAny>) = item?.extract().map_err(|_| {
                    invalid(format!(
                        "respond_parts: parts[{a}][{i}] is not an (offset, buffer) pair"
                    ))
                })?;
                let h = Held::read(&buf, "respond_parts buffer")?;
                if off
                    .checked_add(h.bytes().len())
                    .is_none_or(|end| end > limit)
                {
                    return Err(BufferSize::new_err(format!(
                        "respond_parts: parts[{a}][{i}] covers bytes {off}..{} of A{a}'s {limit} bytes of rows",
                        off.saturating_add(h.bytes().len())
                    )));
                }
                mine.push((off, h));
            }
            held.push(mine);
        }
        if held.len() != self.m {
            return Err(invalid(format!(
                "respond_parts: {} part lists for {} attention ranks",
                held.len(),
                self.m
            )));
        }
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let b = Self::take(batch)?;
        let res = py.detach(|| {
            r.respond_with(b, |_, a, rows| {
                for (off, h) in &held[a] {
                    let src = h.bytes();
                    rows[*off..*off + src.len()].copy_from_slice(src);
                }
            })
        });
        Self::settle(batch, res)
    }

    /// Makes progress without waiting.
    fn progress(&self) -> PyResult<()> {
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        r.progress().map_err(to_py)
    }

    /// Counters per attention rank, as a dict.
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let g = lock(&self.inner, WHAT)?;
        let r = g.as_ref().ok_or_else(|| invalid("shut down"))?;
        stats_dict(py, &r.stats())
    }

    /// A barrier of the running mesh, through the scheduler: returns once
    /// every rank of the named roles (this one's among them) has called
    /// it; each rank of those roles must call each such barrier. Waits
    /// with the GIL released up to `timeout` seconds, then raises
    /// `afmesh.Timeout` (still inside: calling again with the same roles
    /// waits on for the same barrier). With `all_groups`, the ranks of
    /// those roles in every instance group of the job (StepMesh's
    /// `instance_barrier=True`), numbered apart; else this group's mesh.
    #[pyo3(signature = (attention = true, ffn = true, timeout = 30.0, all_groups = false))]
    fn barrier(
        &self,
        py: Python<'_>,
        attention: bool,
        ffn: bool,
        timeout: f64,
        all_groups: bool,
    ) -> PyResult<()> {
        if !attention && !ffn {
            return Err(invalid("barrier: name at least one role (attention, ffn)"));
        }
        let timeout = seconds(timeout, "timeout")?;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let roles = afmesh::Roles { attention, ffn };
        if all_groups {
            blocking(py, timeout, |slice| r.barrier_all_groups(roles, slice))
        } else {
            blocking(py, timeout, |slice| r.barrier(roles, slice))
        }
    }

    /// Wakes this rank's blocked wait (from any thread): it raises
    /// `afmesh.Interrupted`.
    fn interrupt(&self) {
        self.interrupter.interrupt();
    }

    /// Leaves the mesh in order. Batches not answered are dropped; their
    /// views are stale.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.take();
        if let Ok(mut out) = self.out.lock() {
            for l in out.drain(..) {
                l.get().revoke("the rank was shut down");
            }
        }
        match r {
            Some(r) => py.detach(|| r.shutdown()).map_err(to_py),
            None => Ok(()),
        }
    }

    /// Whether the rank was shut down.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(false)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if !self.closed() {
            self.shutdown(py)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "FfnRank(rank={}, attention_ranks={}, ffn_ranks={})",
            self.rank, self.m, self.n
        )
    }
}

/// One gathered stage: every attention rank's block, viewed in place in
/// the registered input slots until `FfnRank.respond` answers it; then
/// every view raises `afmesh.StaleView` when used.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct Batch {
    inner: Mutex<Option<afmesh::Batch>>,
    rank: Py<FfnRank>,
    stage: u32,
    sequence: u32,
    row_bytes: usize,
    max_tokens: usize,
    /// The stage's matrix (offset, bytes), under the matrix layout.
    matrix_at: Option<(usize, usize)>,
    counts: Vec<usize>,
    tokens_at: Vec<(usize, usize)>,
    side_at: Vec<(usize, usize)>,
    /// The side blocks, copied out of device memory (device ranks only).
    sides: Option<Vec<Vec<u8>>>,
    posted: Vec<u64>,
    landed: Vec<u64>,
    lease: Py<Lease>,
}

impl Batch {
    fn check_lease(&self) -> PyResult<()> {
        if !self.lease.get().alive() {
            return Err(StaleView::new_err(format!(
                "batch (stage {}, sequence {}): {}",
                self.stage,
                self.sequence,
                self.lease.get().why()
            )));
        }
        Ok(())
    }

    fn check(&self, a: usize) -> PyResult<()> {
        self.check_lease()?;
        if a >= self.counts.len() {
            return Err(invalid(format!(
                "attention rank {a}: the batch has {} senders",
                self.counts.len()
            )));
        }
        Ok(())
    }

    fn view<'py>(
        &self,
        py: Python<'py>,
        at: (usize, usize),
        dtype: Option<&Bound<'py, PyAny>>,
        rows: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let rank = self.rank.get();
        let dt = match dtype {
            Some(d) => d.clone(),
            None => "uint8".into_pyobject(py)?.into_any(),
        };
        rank.root.view(
            py,
            &rank.region,
            &rank.keep,
            at.0,
            at.1,
            &dt,
            rows,
            &self.lease,
        )
    }
}

#[pymethods]
impl Batch {
    /// The stage.
    #[getter]
    fn stage(&self) -> u32 {
        self.stage
    }
    /// The stage's sequence number.
    #[getter]
    fn sequence(&self) -> u32 {
        self.sequence
    }
    /// Number of senders (attention ranks).
    #[getter]
    fn senders(&self) -> usize {
        self.counts.len()
    }
    /// Bytes of one dispatched row.
    #[getter]
    fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// Tokens from all senders.
    #[getter]
    fn total_tokens(&self) -> usize {
        self.counts.iter().sum()
    }
    /// Whether the views are still valid (not answered yet).
    #[getter]
    fn valid(&self) -> bool {
        self.lease.get().alive()
    }
    /// Tokens attention rank `a` sent.
    fn token_count(&self, a: usize) -> usize {
        self.counts.get(a).copied().unwrap_or(0)
    }
    /// When attention rank `a` posted its dispatch (its clock, ns).
    fn posted_ns(&self, a: usize) -> u64 {
        self.posted.get(a).copied().unwrap_or(0)
    }
    /// When attention rank `a`'s dispatch was seen here (ns).
    fn landed_ns(&self, a: usize) -> u64 {
        self.landed.get(a).copied().unwrap_or(0)
    }

    /// Attention rank `a`'s rows, zero-copy: a (token_count(a),
    /// row_bytes/itemsize) array of `dtype` (default uint8), valid until
    /// the batch is answered.
    #[pyo3(signature = (a, dtype = None))]
    fn tokens<'py>(
        &self,
        py: Python<'py>,
        a: usize,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check(a)?;
        self.view(py, self.tokens_at[a], dtype, Some(self.counts[a]))
    }

    /// Most tokens per sender: the matrix's rows per sender.
    #[getter]
    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The whole stage as one matrix, zero-copy: a (senders × max_tokens,
    /// row_bytes/itemsize) array of `dtype` (default uint8), valid until
    /// the batch is answered; attention rank `a`'s rows start at row
    /// `a × max_tokens` (`sender_rows(a)`). Rows past a sender's
    /// token_count are stale (what an earlier dispatch left there).
    /// Only under the matrix layout (`Mesh(..., layout="matrix")` or
    /// AFMESH_LAYOUT=matrix); otherwise ValueError.
    #[pyo3(signature = (dtype = None))]
    fn matrix<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check_lease()?;
        let Some(at) = self.matrix_at else {
            return Err(invalid(
                "this mesh uses the slots layout, which has no matrix (Mesh(..., layout=\"matrix\") or AFMESH_LAYOUT=matrix on every rank)",
            ));
        };
        self.view(py, at, dtype, Some(self.counts.len() * self.max_tokens))
    }

    /// The rows of the matrix that hold attention rank `a`'s tokens, as
    /// `(start, count)`: from row `a × max_tokens`, `token_count(a)` of
    /// them. Only under the matrix layout; otherwise ValueError.
    fn sender_rows(&self, a: usize) -> PyResult<(usize, usize)> {
        self.check(a)?;
        if self.matrix_at.is_none() {
            return Err(invalid(
                "this mesh uses the slots layout, which has no matrix",
            ));
        }
        Ok((a * self.max_tokens, self.counts[a]))
    }

    /// Attention rank `a`'s side block, zero-copy (1-D, `dtype` default
    /// uint8), valid until the batch is answered.
    #[pyo3(signature = (a, dtype = None))]
    fn side<'py>(
        &self,
        py: Python<'py>,
        a: usize,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.check(a)?;
        if let Some(sides) = &self.sides {
            // Device memory: the copy taken when the batch arrived.
            let dt = match dtype {
                Some(d) => d.clone(),
                None => "uint8".into_pyobject(py)?.into_any(),
            };
            let bytes = pyo3::types::PyBytes::new(py, &sides[a]);
            return py
                .import("numpy")?
                .getattr("frombuffer")?
                .call1((bytes, dt));
        }
        self.view(py, self.side_at[a], dtype, None)
    }

    fn __repr__(&self) -> String {
        format!(
            "Batch(stage={}, sequence={}, senders={}, total_tokens={}, valid={})",
            self.stage,
            self.sequence,
            self.counts.len(),
            self.total_tokens(),
            self.lease.get().alive()
        )
    }
}
