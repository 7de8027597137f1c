//! Caller memory through the buffer protocol, without a copy.
//!
//! The wheel is built against the stable ABI of CPython 3.9 (abi3-py39),
//! whose limited API gained `Py_buffer` only in 3.11. The struct and the two
//! calls used here (`PyObject_GetBuffer`, `PyBuffer_Release`) are exported
//! by every CPython 3 interpreter with this same layout (unchanged since
//! 3.3; 3.11 put it in the stable ABI as it was), so they are declared here
//! instead of raising the floor to 3.11.
//!
//! An object without the buffer protocol (a torch tensor, a DLPack
//! producer) is first turned into a numpy view of the same memory by
//! `afmesh._buffers.as_buffer`, which refuses what cannot be viewed without
//! a copy (device memory, non-contiguous layouts).

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::errors::invalid;

/// CPython's `Py_buffer`.
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: isize,
    itemsize: isize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut isize,
    strides: *mut isize,
    suboffsets: *mut isize,
    internal: *mut c_void,
}

const PYBUF_WRITABLE: c_int = 0x0001;
const PYBUF_FORMAT: c_int = 0x0004;
/// Shape without strides: the exporter must be C-contiguous (and, unlike
/// a bare SIMPLE request, this may be combined with FORMAT).
const PYBUF_ND: c_int = 0x0008;

extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

/// An exported buffer: the exporter keeps the memory where it is (numpy
/// refuses to resize an exported array) until this is dropped.
pub struct Held {
    raw: RawBuffer,
    /// The buffer's struct format character, when it has a simple one.
    format: Option<u8>,
}

// SAFETY: the export pins the memory; the Py_buffer is only handed back to
// the interpreter with the GIL held (Drop attaches), from whatever thread.
unsafe impl Send for Held {}
// SAFETY: `&Held` only reads the pointer and length.
unsafe impl Sync for Held {}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("buf", &self.raw.buf)
            .field("len", &self.raw.len)
            .finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        Python::attach(|_py| {
            // SAFETY: `raw` was filled by a successful PyObject_GetBuffer
            // and is released exactly once, with the GIL held.
            unsafe { PyBuffer_Release(&mut self.raw) }
        });
    }
}

static AS_BUFFER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

impl Held {
    fn export(obj: &Bound<'_, PyAny>, flags: c_int) -> PyResult<Held> {
        let mut raw = RawBuffer {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        };
        // SAFETY: `obj` is a live object (we hold the GIL through `Bound`)
        // and `raw` is a properly laid out Py_buffer to fill.
        let rc = unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut raw, flags) };
        if rc != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let format = if raw.format.is_null() {
            None
        } else {
            // SAFETY: a non-null format is a NUL-terminated string owned
            // by the export.
            let f = unsafe { std::ffi::CStr::from_ptr(raw.format) }.to_bytes();
            match f {
                [c] | [b'<' | b'=' | b'@', c] => Some(*c),
                _ => None,
            }
        };
        Ok(Held { raw, format })
    }

    /// `obj`'s memory, read-only, C-contiguous, without a copy.
    pub fn read(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Held> {
        Self::get(obj, PYBUF_ND | PYBUF_FORMAT, what)
    }

    /// `obj`'s memory, writable, C-contiguous, without a copy.
    pub fn write(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Held> {
        Self::get(obj, PYBUF_ND | PYBUF_WRITABLE | PYBUF_FORMAT, what)
    }

    fn get(obj: &Bound<'_, PyAny>, flags: c_int, what: &str) -> PyResult<Held> {
        let first = match Self::export(obj, flags) {
            Ok(h) => return Ok(h),
            Err(e) => e,
        };
        let py = obj.py();
        // A buffer that refused the request (not contiguous, read-only):
        // say so; afmesh never makes a copy to get around it.
        if first.is_instance_of::<pyo3::exceptions::PyBufferError>(py)
            || first.is_instance_of::<pyo3::exceptions::PyValueError>(py)
        {
            return Err(invalid(format!(
                "{what}: {first} (afmesh uses caller memory in place: pass a C-contiguous{} buffer)",
                if flags & PYBUF_WRITABLE != 0 { ", writable" } else { "" }
            )));
        }
        // Not a buffer: let the Python side find a view of the
        // same memory (torch, DLPack), or say why there is none.
        let conv = AS_BUFFER.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py.import("afmesh._buffers")?.getattr("as_buffer")?.unbind())
        })?;
        let writable = flags & PYBUF_WRITABLE != 0;
        let view = conv.bind(py).call1((obj, writable, what)).map_err(|e| {
            if e.is_instance_of::<crate::errors::Error>(py) {
                e
            } else {
                invalid(format!("{what}: {first}; {e}"))
            }
        })?;
        Self::export(&view, flags).map_err(|e| invalid(format!("{what}: {e}")))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.raw.len <= 0 || self.raw.buf.is_null() {
            return &[];
        }
        // SAFETY: the export keeps `len` bytes at `buf` valid until drop;
        // concurrent writers are the caller's own threads (as with any
        // buffer handed to C), and these bytes are only copied.
        unsafe { std::slice::from_raw_parts(self.raw.buf as *const u8, self.raw.len as usize) }
    }

    /// The bytes, writable (only for exports taken with `write`).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self) -> &mut [u8] {
        if self.raw.len <= 0 || self.raw.buf.is_null() || self.raw.readonly != 0 {
            return &mut [];
        }
        // SAFETY: a writable export of `len` bytes, valid until drop; the
        // library writes it only during the call that borrows it.
        unsafe { std::slice::from_raw_parts_mut(self.raw.buf as *mut u8, self.raw.len as usize) }
    }

    /// Address and length, for registering the memory.
    pub fn raw_parts(&self) -> (*mut u8, usize) {
        (self.raw.buf as *mut u8, self.raw.len.max(0) as usize)
    }

    /// The struct format character (`f`, `e`, `B` ...), if simple.
    pub fn format(&self) -> Option<u8> {
        self.format
    }
}

/// Caller memory registered with a rank: kept exported for as long as the
/// rank or any view of its region lives.
pub type Keep = Option<Arc<Held>>;

static DEVICE_PARTS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The device address and length of a C-contiguous CUDA tensor or
/// `__cuda_array_interface__` object, in place (`afmesh._buffers.device_parts`
/// reads them), for ranks whose stage memory is on a GPU. The caller keeps
/// `obj` alive until the copies the call enqueues ran (the rank classes
/// hold a reference: see `AttentionRank::held`, `FfnRank::held`).
pub fn device_parts(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(u64, usize)> {
    let py = obj.py();
    let f = DEVICE_PARTS.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py
            .import("afmesh._buffers")?
            .getattr("device_parts")?
            .unbind())
    })?;
    f.bind(py).call1((obj, what))?.extract()
}

static DEVICE_STREAM: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The CUDA stream a copy out of `obj` must wait for (its producer's):
/// `stream` when given (an int handle or an object with `.cuda_stream`),
/// else torch's current stream on a torch tensor's device, else a
/// `__cuda_array_interface__` object's `stream` field, else 0 (the legacy
/// default stream); `afmesh._buffers.device_stream` decides. A torch
/// tensor on another GPU than `device` is refused by name.
pub fn device_stream(
    obj: &Bound<'_, PyAny>,
    stream: Option<&Bound<'_, PyAny>>,
    what: &str,
    device: Option<i32>,
) -> PyResult<u64> {
    let py = obj.py();
    let f = DEVICE_STREAM.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py
            .import("afmesh._buffers")?
            .getattr("device_stream")?
            .unbind())
    })?;
    f.bind(py).call1((obj, stream, what, device))?.extract()
}
