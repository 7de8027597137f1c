//! Zero-copy views: the memory object numpy arrays keep alive, and the
//! lease that says whether a view may still be used.
//!
//! A view is a numpy array (an `afmesh.View`, an ndarray subclass made by
//! `afmesh._views`) whose base is a [`Memory`]: the rank's registered
//! region, held by an `Arc`, so the bytes stay mapped for as long as any
//! array over them lives, even after the rank is shut down. Whether the
//! bytes still mean what they meant is the [`Lease`]'s business: the
//! package revokes it when the library may write the bytes again (the
//! batch was answered, the stage dispatched again, the rank shut down), and
//! a `View` checks it on every use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use afmesh::transport::{MemoryKind, Region};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::buffer::Keep;
use crate::errors::{invalid, StaleView};

/// A registered region, exported to numpy through `__array_interface__`.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct Memory {
    region: Arc<Region>,
    _keep: Keep,
}

#[pymethods]
impl Memory {
    /// numpy's array interface over the whole region (bytes).
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("shape", (self.region.len(),))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.region.addr(), false))?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.region.len()
    }
}

/// A view of a rank's stage memory on a GPU: CUDA consumers (torch's
/// `torch.as_tensor(v, device="cuda")`, CuPy, Numba) read it in place
/// through `__cuda_array_interface__` (version 3), which raises
/// `afmesh.StaleView` once the lease ended, like a host view's uses. The
/// bytes were complete on the device before the view was handed out, so
/// no stream is named (consumers synchronise nothing). The region stays
/// allocated for as long as this object lives; a tensor made from it does
/// not hold it: keep the view (or the rank) while the tensor is used.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct DeviceView {
    _region: Arc<Region>,
    _keep: Keep,
    ptr: u64,
    shape: Vec<usize>,
    typestr: String,
    nbytes: usize,
    lease: Py<Lease>,
}

#[pymethods]
impl DeviceView {
    /// The CUDA array interface over the bytes, in place.
    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = self.lease.get();
        if !l.alive() {
            return Err(StaleView::new_err(format!("device view: {}", l.why())));
        }
        let d = PyDict::new(py);
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", &self.typestr)?;
        d.set_item("data", (self.ptr, false))?;
        d.set_item("strides", py.None())?;
        d.set_item("version", 3)?;
        Ok(d)
    }
    /// The shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }
    /// The device address of the first byte.
    #[getter]
    fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Bytes viewed.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }
    /// Whether the view may still be used.
    #[getter]
    fn valid(&self) -> bool {
        self.lease.get().alive()
    }
    fn __repr__(&self) -> String {
        format!(
            "DeviceView(ptr={:#x}, shape={:?}, typestr={:?}, valid={})",
            self.ptr,
            self.shape,
            self.typestr,
            self.valid()
        )
    }
}

/// Whether views of one batch or one combine may still be used.
#[pyclass(frozen, module = "afmesh._afmesh")]
pub struct Lease {
    alive: AtomicBool,
    why: std::sync::Mutex<String>,
}

#[pymethods]
impl Lease {
    /// True until the memory is handed back.
    #[getter]
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
    /// Why the lease ended (the message of StaleView).
    #[getter]
    pub fn why(&self) -> String {
        self.why.lock().map(|w| w.clone()).unwrap_or_default()
    }
}

impl Lease {
    pub fn new() -> Lease {
        Lease {
            alive: AtomicBool::new(true),
            why: std::sync::Mutex::new(String::new()),
        }
    }
    pub fn revoke(&self, why: &str) {
        if self.alive.swap(false, Ordering::AcqRel) {
            if let Ok(mut w) = self.why.lock() {
                *w = why.to_string();
            }
        }
    }
}

/// A rank's receive region as numpy sees it: one uint8 root array, views
/// are slices of it.
pub struct Root {
    root: PyOnceLock<Py<PyAny>>,
}

static MAKE_VIEW: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

impl Root {
    pub fn new() -> Root {
        Root {
            root: PyOnceLock::new(),
        }
    }

    fn root<'py>(
        &self,
        py: Python<'py>,
        region: &Arc<Region>,
        keep: &Keep,
    ) -> PyResult<&Py<PyAny>> {
        self.root.get_or_try_init(py, || {
            let mem = Py::new(
                py,
                Memory {
                    region: region.clone(),
                    _keep: keep.clone(),
                },
            )?;
            Ok(py
                .import("numpy")?
                .getattr("asarray")?
                .call1((mem,))?
                .unbind())
        })
    }

    /// A view of `len` bytes at `offset` of the region as `dtype` with
    /// `rows` rows (or 1-D when `rows` is None), checked against `lease`.
    #[allow(clippy::too_many_arguments)]
    pub fn view<'py>(
        &self,
        py: Python<'py>,
        region: &Arc<Region>,
        keep: &Keep,
        offset: usize,
        len: usize,
        dtype: &Bound<'py, PyAny>,
        rows: Option<usize>,
        lease: &Py<Lease>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if region.kind() != MemoryKind::Host {
            return device_view(py, region, keep, offset, len, dtype, rows, lease);
        }
        let root = self.root(py, region, keep)?;
        let make = MAKE_VIEW.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py.import("afmesh._views")?.getattr("make_view")?.unbind())
        })?;
        let args = PyTuple::new(
            py,
            [
                root.bind(py).clone(),
                offset.into_pyobject(py)?.into_any(),
                len.into_pyobject(py)?.into_any(),
                dtype.clone(),
                rows.into_pyobject(py)?.into_any(),
                lease.bind(py).clone().into_any(),
            ],
        )?;
        make.bind(py).call1(args)
    }
}

/// [`Root::view`] for device memory: a [`DeviceView`] of `dtype` (a
/// numpy dtype or its name, e.g. `uint8`, `float16`; bfloat16 as
/// `uint16`, then `.view(torch.bfloat16)`).
#[allow(clippy::too_many_arguments)]
fn device_view<'py>(
    py: Python<'py>,
    region: &Arc<Region>,
    keep: &Keep,
    offset: usize,
    len: usize,
    dtype: &Bound<'py, PyAny>,
    rows: Option<usize>,
    lease: &Py<Lease>,
) -> PyResult<Bound<'py, PyAny>> {
    let dt = py.import("numpy")?.getattr("dtype")?.call1((dtype,))?;
    let typestr: String = dt.getattr("str")?.extract()?;
    let item: usize = dt.getattr("itemsize")?.extract()?;
    let shape = match rows {
        Some(r) if r > 0 => {
            let row = len / r;
            if item == 0 || !row.is_multiple_of(item) {
                return Err(invalid(format!(
                    "a row of {row} bytes is not a whole number of {typestr} items"
                )));
            }
            vec![r, row / item]
        }
        Some(_) => vec![0, 0],
        None => {
            if item == 0 || !len.is_multiple_of(item) {
                return Err(invalid(format!(
                    "{len} bytes are not a whole number of {typestr} items"
                )));
            }
            vec![len / item]
        }
    };
    let ptr = region.addr_of(offset, len).map_err(invalid)?;
    Ok(Py::new(
        py,
        DeviceView {
            _region: region.clone(),
            _keep: keep.clone(),
            ptr,
            shape,
            typestr,
            nbytes: len,
            lease: lease.clone_ref(py),
        },
    )?
    .into_bound(py)
    .into_any())
}
