//! Verbs of features this device does not have, answered as rdma-core
//! answers for a provider without them (its `dummy_ops`): EOPNOTSUPP, as a
//! return value or in errno. Without these exports the calls would reach
//! the system libibverbs, which would read a `verbs_context` these
//! contexts do not have. Also the small queries that only describe.

use std::ffi::c_void;
use std::ptr;

use crate::abi::*;
use crate::set_errno;

/// `IBV_REREG_MR_ERR_INPUT`.
const REREG_MR_ERR_INPUT: i32 = -1;

#[no_mangle]
pub extern "C" fn ibv_rereg_mr(
    _mr: *mut ibv_mr,
    _flags: i32,
    _pd: *mut ibv_pd,
    _addr: *mut c_void,
    _length: usize,
    _access: i32,
) -> i32 {
    set_errno(libc::EOPNOTSUPP);
    REREG_MR_ERR_INPUT
}

#[no_mangle]
pub extern "C" fn ibv_resize_cq(_cq: *mut ibv_cq, _cqe: i32) -> i32 {
    libc::EOPNOTSUPP
}

#[no_mangle]
pub extern "C" fn ibv_query_ece(_qp: *mut ibv_qp, _ece: *mut c_void) -> i32 {
    libc::EOPNOTSUPP
}

#[no_mangle]
pub extern "C" fn ibv_set_ece(_qp: *mut ibv_qp, _ece: *mut c_void) -> i32 {
    libc::EOPNOTSUPP
}

/// Address handles serve UD queue pairs, which are not emulated.
#[no_mangle]
pub extern "C" fn ibv_create_ah(_pd: *mut ibv_pd, _attr: *mut ibv_ah_attr) -> *mut c_void {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

#[no_mangle]
pub extern "C" fn ibv_create_ah_from_wc(
    _pd: *mut ibv_pd,
    _wc: *mut ibv_wc,
    _grh: *mut c_void,
    _port: u8,
) -> *mut c_void {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

/// No address handle was ever handed out.
#[no_mangle]
pub extern "C" fn ibv_destroy_ah(_ah: *mut c_void) -> i32 {
    libc::EINVAL
}

#[no_mangle]
pub extern "C" fn ibv_attach_mcast(_qp: *mut ibv_qp, _gid: *const ibv_gid, _lid: u16) -> i32 {
    libc::EOPNOTSUPP
}

#[no_mangle]
pub extern "C" fn ibv_detach_mcast(_qp: *mut ibv_qp, _gid: *const ibv_gid, _lid: u16) -> i32 {
    libc::EOPNOTSUPP
}

/// Sharing a context between processes by its command fd.
#[no_mangle]
pub extern "C" fn ibv_import_device(_cmd_fd: i32) -> *mut ibv_context {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

#[no_mangle]
pub extern "C" fn ibv_import_pd(_ctx: *mut ibv_context, _handle: u32) -> *mut ibv_pd {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

#[no_mangle]
pub extern "C" fn ibv_import_mr(_pd: *mut ibv_pd, _handle: u32) -> *mut ibv_mr {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

/// No ordering promise beyond the IB spec's (rdma-core's answer for a
/// provider that makes none): 0.
#[no_mangle]
pub extern "C" fn ibv_query_qp_data_in_order(_qp: *mut ibv_qp, _op: u32, _flags: u32) -> i32 {
    0
}
