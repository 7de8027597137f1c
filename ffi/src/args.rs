//! Checks on what C passes in: handle pointers, byte buffers, strings and
//! timeouts. Each NULL or malformed argument becomes
//! `AFMESH_ERR_INVALID_ARGUMENT` with a message naming it.

use std::ffi::{c_char, c_void, CStr};
use std::time::Duration;

use crate::error::{invalid, Fail};

/// `&mut *ptr`, or an error naming the argument.
///
/// # Safety
/// `ptr` is NULL or points to a live `T` not aliased for the call.
pub(crate) unsafe fn obj<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL pointers come from this library's `_new` functions
    // (the caller's contract) and are used from one thread at a time.
    unsafe { ptr.as_mut() }.ok_or_else(|| invalid(format!("{name} is NULL")))
}

/// `&*ptr`, or an error naming the argument.
///
/// # Safety
/// `ptr` is NULL or points to a live `T`.
pub(crate) unsafe fn obj_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, Fail> {
    // SAFETY: as for `obj`.
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("{name} is NULL")))
}

/// A byte slice from C; NULL is allowed only for an empty one.
///
/// # Safety
/// `ptr` is NULL or valid for reads of `len` bytes for the call.
pub(crate) unsafe fn bytes<'a>(
    ptr: *const c_void,
    len: usize,
    name: &str,
) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{name} is NULL but its length is {len}")));
    }
    // SAFETY: non-NULL and valid for `len` bytes (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// An optional C string.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
pub(crate) unsafe fn opt_str(ptr: *const c_char, name: &str) -> Result<Option<String>, Fail> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid(format!("{name} is not UTF-8")))
}

pub(crate) fn ms(timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_ms))
}
