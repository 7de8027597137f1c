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

use afmesh::transport::Region;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::buffer::Keep;

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
