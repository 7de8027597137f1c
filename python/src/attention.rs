//! `afmesh.AttentionRank`: dispatch token blocks, wait for the combines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use afmesh::transport::Region;
use afmesh::DispatchHandle as RustHandle;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::buffer::{device_parts, device_stream, Held, Keep};
use crate::common::{dtype_of, lock, stats_dict, Trace};
use crate::errors::{invalid, to_py, BufferSize, StaleView};
use crate::mesh::StageSpec;
use crate::views::{Lease, Root};
use crate::wait::{blocking, seconds};

/// A dispatch in flight; redeem it with `wait_combine` or `wait_combine_sum`.
#[pyclass(frozen, get_all, eq, hash, module = "afmesh._afmesh")]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DispatchHandle {
    /// The stage dispatched.
    pub stage: u32,
    /// The stage's sequence number for this dispatch.
    pub sequence: u32,
}

#[pymethods]
impl DispatchHandle {
    #[new]
    fn new(stage: u32, sequence: u32) -> Self {
        DispatchHandle { stage, sequence }
    }
    fn __repr__(&self) -> String {
        format!(
            "DispatchHandle(stage={}, sequence={})",
            self.stage, self.sequence
        )
    }
}

impl DispatchHandle {
    fn rust(&self) -> RustHandle {
        RustHandle::from_parts(self.stage, self.sequence)
    }
}

/// An attention rank of a mesh. One call at a time (a second thread gets
/// `afmesh.Busy`); `interrupt()` may be called from any thread.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct AttentionRank {
    inner: Mutex<Option<afmesh::AttentionRank>>,
    /// Per stage, the CUDA sources of its dispatches since its combine was
    /// last taken: the copies out of them may still be pending on the GPU,
    /// so torch's caching allocator must not get their memory back before
    /// the combine (which the FFN ranks sent only after the rows arrived).
    held: Mutex<Vec<Vec<Py<PyAny>>>>,
    interrupter: afmesh::Interrupter,
    region: Arc<Region>,
    root: Root,
    /// Per stage, the lease of the views of its last combine.
    leases: Mutex<Vec<Option<Py<Lease>>>>,
    rank: u32,
    m: usize,
    n: usize,
    spec: afmesh::StageSpec,
    /// The stage memory's GPU, when it is on one.
    device: Option<i32>,
    /// Caller memory, dropped after the rank (fields drop in order).
    keep: Keep,
}

const WHAT: &str = "the attention rank";

impl AttentionRank {
    pub fn new(r: afmesh::AttentionRank, keep: Keep) -> AttentionRank {
        let spec = r.spec();
        AttentionRank {
            interrupter: r.interrupter(),
            region: r.receive_region().clone(),
            root: Root::new(),
            leases: Mutex::new((0..spec.stages).map(|_| None).collect()),
            rank: r.rank(),
            m: r.attention_ranks(),
            n: r.ffn_ranks(),
            spec,
            device: match r.memory() {
                afmesh::transport::MemoryKind::Cuda { device } => Some(device),
                _ => None,
            },
            inner: Mutex::new(Some(r)),
            held: Mutex::new((0..spec.stages).map(|_| Vec::new()).collect()),
            keep,
        }
    }

    fn revoke(&self, stage: Option<u32>, why: &str) {
        if let Ok(mut l) = self.leases.lock() {
            for (s, lease) in l.iter_mut().enumerate() {
                if stage.is_none_or(|st| st as usize == s) {
                    if let Some(lease) = lease.take() {
                        lease.get().revoke(why);
                    }
                }
            }
        }
    }

    /// The stage's combine was taken: the copies out of its dispatches'
    /// sources ran, so they may go.
    fn release(&self, stage: u32) {
        if let Ok(mut h) = self.held.lock() {
            if let Some(v) = h.get_mut(stage as usize) {
                v.clear();
            }
        }
    }

    /// `dispatch` on a rank whose stage memory is on a GPU: `tokens` is a
    /// CUDA tensor (or `__cuda_array_interface__` object), copied device
    /// to device into the send slot once the work enqueued so far on
    /// `stream` (default: the producer's, `afmesh._buffers.device_stream`)
    /// ran. `tokens` is held until the stage's combine is taken.
    fn dispatch_device(
        &self,
        py: Python<'_>,
        stage: u32,
        tokens: &Bound<'_, PyAny>,
        side: Option<&Bound<'_, PyAny>>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<DispatchHandle> {
        let (ptr, len) = device_parts(tokens, "dispatch tokens")?;
        let on = device_stream(tokens, stream, "dispatch tokens", self.device)?;
        let s = side.map(|s| Held::read(s, "dispatch side")).transpose()?;
        let row = self.spec.row_bytes as usize;
        if row == 0 || !len.is_multiple_of(row) {
            return Err(BufferSize::new_err(format!(
                "dispatch tokens: {len} bytes are not whole rows of {row} bytes"
            )));
        }
        let n = len / row;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        if n <= self.spec.max_tokens as usize && r.stage_idle(stage) {
            self.revoke(Some(stage), "the stage was dispatched again");
        }
        let side = s.as_ref().map_or(&[][..], |s| s.bytes());
        // SAFETY: `on` is the stream the caller named (`stream=`, whose
        // docs ask for a live stream of this rank's device), torch's
        // current stream on the tensor's device, the stream a
        // `__cuda_array_interface__` producer published, or 0; the driver
        // refuses a handle of another context. `tokens` stays allocated:
        // `held` keeps a reference until the stage's combine is taken,
        // which the FFN ranks sent only after the copies ran.
        let res = py.detach(|| unsafe { r.dispatch_device_on(stage, ptr, n, side, on) });
        // Held whatever the outcome: a refusal may come after the copy was
        // enqueued; the stage's next taken combine lets it go.
        if let Ok(mut h) = self.held.lock() {
            if let Some(v) = h.get_mut(stage as usize) {
                // Once per object: a caller retrying a refused dispatch
                // (StageBusy) with the same tensor does not grow the list.
                if !v.iter().any(|o| o.is(tokens)) {
                    v.push(tokens.clone().unbind());
                }
            }
        }
        let h = res.map_err(to_py)?;
        Ok(DispatchHandle {
            stage: h.stage(),
            sequence: h.sequence(),
        })
    }

    /// The Python view of a combine just taken from `c`.
    fn combined(slf: &Bound<'_, Self>, c: &afmesh::Combined<'_>, stage: u32) -> PyResult<Combined> {
        let this = slf.get();
        let base = this.region.addr() as usize;
        let len = c.tokens() * this.spec.out_row_bytes as usize;
        let parts = (0..c.len())
            .map(|f| match this.device {
                // Device memory: no host slice, its address.
                Some(_) => c
                    .partial_addr(f)
                    .map(|p| ((p as usize).wrapping_sub(base), len))
                    .unwrap_or((0, 0)),
                None => c
                    .partial(f)
                    .map(|p| ((p.as_ptr() as usize).wrapping_sub(base), p.len()))
                    .unwrap_or((0, 0)),
            })
            .collect();
        let traces = (0..c.len())
            .map(|f| c.trace(f).map(Trace::from_rust).unwrap_or_default())
            .collect();
        this.release(stage);
        let lease = Py::new(slf.py(), Lease::new())?;
        if let Ok(mut l) = this.leases.lock() {
            if let Some(old) = l
                .get_mut(stage as usize)
                .and_then(|x| x.replace(lease.clone_ref(slf.py())))
            {
                old.get().revoke("the stage's combine was taken again");
            }
        }
        Ok(Combined {
            rank: slf.clone().unbind(),
            stage,
            tokens: c.tokens(),
            parts,
            traces,
            lease,
        })
    }
}

#[pymethods]
impl AttentionRank {
    /// This rank's index among the attention ranks.
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

    /// Sends `tokens` (whole rows of `row_bytes`; any C-contiguous buffer:
    /// numpy array, bytes, torch CPU tensor) and `side` to every FFN rank
    /// for `stage`. The bytes are copied into the stage's registered send
    /// slot, so the buffers may be reused at once. Views of the stage's
    /// previous combine end here. Releases the GIL.
    ///
    /// On a rank whose stage memory is on a GPU, `tokens` is a CUDA tensor
    /// (or `__cuda_array_interface__` object) copied device to device, and
    /// the copy starts only after the work enqueued so far on `stream`: an
    /// int `CUstream` handle or an object with `.cuda_stream` (a
    /// `torch.cuda.Stream`), a live stream of the rank's device; by default
    /// torch's current stream on the tensor's device, else the array's
    /// `__cuda_array_interface__` `stream`, else the legacy default stream.
    /// The rank holds a reference to `tokens` until the stage's combine is
    /// taken, so its memory is not reused under the copy; writing to it
    /// before then, from a stream not ordered after the copy, races with
    /// it. `stream` is ignored on host ranks.
    #[pyo3(signature = (stage, tokens, side = None, stream = None))]
    fn dispatch(
        &self,
        py: Python<'_>,
        stage: u32,
        tokens: &Bound<'_, PyAny>,
        side: Option<&Bound<'_, PyAny>>,
        stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<DispatchHandle> {
        if self.device.is_some() {
            return self.dispatch_device(py, stage, tokens, side, stream);
        }
        let t = Held::read(tokens, "dispatch tokens")?;
        let s = side.map(|s| Held::read(s, "dispatch side")).transpose()?;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        // Views of the stage's last combine end only if this dispatch can
        // go ahead (a refused one leaves them valid).
        let row = self.spec.row_bytes as usize;
        let fits = t.bytes().len() <= self.spec.max_tokens as usize * row
            && row > 0
            && t.bytes().len() % row == 0;
        if fits && r.stage_idle(stage) {
            self.revoke(Some(stage), "the stage was dispatched again");
        }
        let h = py
            .detach(|| r.dispatch(stage, t.bytes(), s.as_ref().map_or(&[][..], |s| s.bytes())))
            .map_err(to_py)?;
        Ok(DispatchHandle {
            stage: h.stage(),
            sequence: h.sequence(),
        })
    }

    /// Sends `tokens` rows gathered from several buffers, each copied
    /// straight into the send slot: `parts` is a list of `(byte_offset,
    /// buffer)` placed at that offset of the rows area (`tokens ×
    /// row_bytes` bytes; bytes no part covers keep the slot's previous
    /// contents). Otherwise as `dispatch`.
    #[pyo3(signature = (stage, tokens, parts, side = None))]
    fn dispatch_parts(
        &self,
        py: Python<'_>,
        stage: u32,
        tokens: usize,
        parts: &Bound<'_, PyAny>,
        side: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<DispatchHandle> {
        let rows_len = tokens
            .checked_mul(self.spec.row_bytes as usize)
            .ok_or_else(|| invalid(format!("dispatch_parts: tokens={tokens} overflows")))?;
        let mut held = Vec::new();
        for (i, item) in parts.try_iter()?.enumerate() {
            let (off, buf): (usize, Bound<'_, PyAny>) = item?.extract().map_err(|_| {
                invalid(format!(
                    "dispatch_parts: parts[{i}] is not an (offset, buffer) pair"
                ))
            })?;
            let h = Held::read(&buf, "dispatch_parts buffer")?;
            if off
                .checked_add(h.bytes().len())
                .is_none_or(|end| end > rows_len)
            {
                return Err(crate::errors::BufferSize::new_err(format!(
                    "dispatch_parts: parts[{i}] covers bytes {off}..{} of a rows area of {rows_len} bytes ({tokens} tokens)",
                    off.saturating_add(h.bytes().len())
                )));
            }
            held.push((off, h));
        }
        let s = side.map(|s| Held::read(s, "dispatch side")).transpose()?;
        let side_bytes = s.as_ref().map_or(&[][..], |s| s.bytes());
        if side_bytes.len() > self.spec.side_bytes as usize {
            return Err(crate::errors::BufferSize::new_err(format!(
                "dispatch side block of {} bytes exceeds side_bytes {}",
                side_bytes.len(),
                self.spec.side_bytes
            )));
        }
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        if tokens <= self.spec.max_tokens as usize && r.stage_idle(stage) {
            self.revoke(Some(stage), "the stage was dispatched again");
        }
        let h = py
            .detach(|| {
                r.dispatch_with(stage, tokens, |rows, area| {
                    for (off, h) in &held {
                        let b = h.bytes();
                        rows[*off..*off + b.len()].copy_from_slice(b);
                    }
                    area[..side_bytes.len()].copy_from_slice(side_bytes);
                    side_bytes.len()
                })
            })
            .map_err(to_py)?;
        Ok(DispatchHandle {
            stage: h.stage(),
            sequence: h.sequence(),
        })
    }

    /// Waits up to `timeout` seconds for every FFN rank's combine of
    /// `handle` and returns it: N partials viewed in place (valid until
    /// the stage is dispatched again). GIL released; Ctrl-C raises
    /// KeyboardInterrupt within ~25 ms and leaves the dispatch in flight.
    #[pyo3(signature = (handle, timeout = 10.0))]
    fn wait_combine(
        slf: &Bound<'_, Self>,
        handle: &DispatchHandle,
        timeout: f64,
    ) -> PyResult<Combined> {
        let py = slf.py();
        let timeout = seconds(timeout, "timeout")?;
        let this = slf.get();
        let mut g = lock(&this.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let h = handle.rust();
        blocking(py, timeout, |slice| r.wait_all(&[h], slice))?;
        let c = r.wait_combine(h, Duration::ZERO).map_err(to_py)?;
        Self::combined(slf, &c, handle.stage)
    }

    /// Waits for the combine of `handle` and writes the element-wise sum
    /// of the N partials into `out` (a writable C-contiguous buffer of at
    /// least `tokens × out_row_bytes` bytes); returns the bytes written.
    /// `dtype` is f32, f16 or bf16 (by name, numpy or torch dtype); by
    /// default `out`'s own (float32 or float16). `out` is checked before
    /// anything is consumed. GIL released; Ctrl-C as for `wait_combine`.
    #[pyo3(signature = (handle, out, dtype = None, timeout = 10.0))]
    fn wait_combine_sum(
        &self,
        py: Python<'_>,
        handle: &DispatchHandle,
        out: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        timeout: f64,
    ) -> PyResult<usize> {
        let timeout = seconds(timeout, "timeout")?;
        let o = Held::write(out, "combine sum output")?;
        let dtype = dtype_of(dtype, &o)?;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let h = handle.rust();
        let buf = o.bytes_mut();
        let n = blocking(py, timeout, |slice| {
            r.wait_combine_sum(h, dtype, buf, slice)
        })?;
        self.release(handle.stage);
        Ok(n)
    }

    /// Non-blocking `wait_combine`: the combine if complete, else None.
    fn try_combine(slf: &Bound<'_, Self>, handle: &DispatchHandle) -> PyResult<Option<Combined>> {
        let this = slf.get();
        let mut g = lock(&this.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        match r.try_combine(handle.rust()).map_err(to_py)? {
            Some(c) => Ok(Some(Self::combined(slf, &c, handle.stage)?)),
            None => Ok(None),
        }
    }

    /// Non-blocking `wait_combine_sum`: the bytes written, or None if the
    /// combine is not complete yet (nothing consumed then).
    #[pyo3(signature = (handle, out, dtype = None))]
    fn try_combine_sum(
        &self,
        handle: &DispatchHandle,
        out: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<usize>> {
        let o = Held::write(out, "combine sum output")?;
        let dtype = dtype_of(dtype, &o)?;
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        let n = r
            .try_combine_sum(handle.rust(), dtype, o.bytes_mut())
            .map_err(to_py)?;
        if n.is_some() {
            self.release(handle.stage);
        }
        Ok(n)
    }

    /// Waits up to `timeout` seconds until every handle's combine is
    /// complete, without taking them.
    #[pyo3(signature = (handles, timeout = 10.0))]
    fn wait_all(&self, py: Python<'_>, handles: Vec<DispatchHandle>, timeout: f64) -> PyResult<()> {
        let timeout = seconds(timeout, "timeout")?;
        let hs: Vec<RustHandle> = handles.iter().map(|h| h.rust()).collect();
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        blocking(py, timeout, |slice| r.wait_all(&hs, slice))
    }

    /// Trace stamps of FFN rank `f`'s answer to the last combine taken on
    /// `stage`; None while the stage is dispatched again, or out of range.
    fn last_trace(&self, stage: u32, f: usize) -> PyResult<Option<Trace>> {
        let g = lock(&self.inner, WHAT)?;
        let r = g.as_ref().ok_or_else(|| invalid("shut down"))?;
        Ok(r.last_trace(stage, f).map(Trace::from_rust))
    }

    /// Makes progress without waiting.
    fn progress(&self) -> PyResult<()> {
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.as_mut().ok_or_else(|| invalid("shut down"))?;
        r.progress().map_err(to_py)
    }

    /// Counters per FFN rank, as a dict.
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
    /// `afmesh.Interrupted`. With no wait blocked, the next one that would
    /// block does.
    fn interrupt(&self) {
        self.interrupter.interrupt();
    }

    /// Leaves the mesh in order. Views stay readable memory but are stale.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let mut g = lock(&self.inner, WHAT)?;
        let r = g.take();
        self.revoke(None, "the rank was shut down");
        // `held` stays until this object goes: a dispatch whose combine
        // was never taken may still have its copy queued.
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
            "AttentionRank(rank={}, attention_ranks={}, ffn_ranks={})",
            self.rank, self.m, self.n
        )
    }
}

/// The combined result of one dispatch: N partial blocks viewed in place
/// in the registered receive slots, valid until the stage is dispatched
/// again (then using a view raises `afmesh.StaleView`).
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct Combined {
    rank: Py<AttentionRank>,
    stage: u32,
    tokens: usize,
    /// Per FFN rank: offset and length in the receive region.
    parts: Vec<(usize, usize)>,
    traces: Vec<Trace>,
    lease: Py<Lease>,
}

#[pymethods]
impl Combined {
    /// The stage.
    #[getter]
    fn stage(&self) -> u32 {
        self.stage
    }
    /// Rows in each partial.
    #[getter]
    fn tokens(&self) -> usize {
        self.tokens
    }
    /// Whether the views are still valid.
    #[getter]
    fn valid(&self) -> bool {
        self.lease.get().alive()
    }
    fn __len__(&self) -> usize {
        self.parts.len()
    }

    /// FFN rank `f`'s rows, zero-copy: a (tokens, out_row_bytes/itemsize)
    /// array of `dtype` (default uint8).
    #[pyo3(signature = (f, dtype = None))]
    fn partial<'py>(
        &self,
        py: Python<'py>,
        f: usize,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !self.lease.get().alive() {
            return Err(StaleView::new_err(format!(
                "combine of stage {}: {}",
                self.stage,
                self.lease.get().why()
            )));
        }
        let (off, len) = *self
            .parts
            .get(f)
            .ok_or_else(|| invalid(format!("partial({f}): only {} FFN ranks", self.parts.len())))?;
        let rank = self.rank.get();
        let dt = match dtype {
            Some(d) => d.clone(),
            None => "uint8".into_pyobject(py)?.into_any(),
        };
        rank.root.view(
            py,
            &rank.region,
            &rank.keep,
            off,
            len,
            &dt,
            Some(self.tokens),
            &self.lease,
        )
    }

    /// All partials, in FFN-rank order.
    #[pyo3(signature = (dtype = None))]
    fn partials<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let l = PyList::empty(py);
        for f in 0..self.parts.len() {
            l.append(self.partial(py, f, dtype)?)?;
        }
        Ok(l)
    }

    /// Trace stamps of FFN rank `f`'s combine.
    fn trace(&self, f: usize) -> PyResult<Trace> {
        self.traces
            .get(f)
            .copied()
            .ok_or_else(|| invalid(format!("trace({f}): only {} FFN ranks", self.traces.len())))
    }

    fn __repr__(&self) -> String {
        format!(
            "Combined(stage={}, tokens={}, partials={}, valid={})",
            self.stage,
            self.tokens,
            self.parts.len(),
            self.lease.get().alive()
        )
    }
}
