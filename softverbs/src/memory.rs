//! Protection domains and memory regions: registering a region publishes
//! its key, owner, protection domain, access flags and range in the fabric
//! table, where peers' work requests check them.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;

use crate::abi::*;
use crate::fabric::{self, Kind};
use crate::{fabric_or_errno, guard, set_errno};

#[repr(C)]
pub struct Pd {
    pub ibv: ibv_pd,
    pub id: u32,
}

pub(crate) fn pd_id(pd: *const ibv_pd) -> Option<u32> {
    if pd.is_null() {
        return None;
    }
    // SAFETY: PDs handed out are `Pd`s.
    Some(unsafe { (*pd.cast::<Pd>()).id })
}

/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_alloc_pd(ctx: *mut ibv_context) -> *mut ibv_pd {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        if ctx.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let id = f.next_pd();
        Box::into_raw(Box::new(Pd {
            ibv: ibv_pd {
                context: ctx,
                handle: id,
            },
            id,
        }))
        .cast()
    })
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dealloc_pd(pd: *mut ibv_pd) -> i32 {
    if pd.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: from `Box::into_raw` in `ibv_alloc_pd`, freed once.
    drop(unsafe { Box::from_raw(pd.cast::<Pd>()) });
    0
}

#[repr(C)]
pub struct Mr {
    pub ibv: ibv_mr,
    pub slot: usize,
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`; `addr` is valid for `length` bytes while
/// registered.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    access: i32,
) -> *mut ibv_mr {
    // SAFETY: forwarded contract.
    unsafe { ibv_reg_mr_iova2(pd, addr, length, addr as u64, access as u32) }
}

/// # Safety
/// As `ibv_reg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: i32,
) -> *mut ibv_mr {
    // SAFETY: forwarded contract.
    unsafe { ibv_reg_mr_iova2(pd, addr, length, iova, access as u32) }
}

/// # Safety
/// As `ibv_reg_mr`. Only `iova == addr` is emulated.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova2(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: u32,
) -> *mut ibv_mr {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        let Some(pdid) = pd_id(pd) else {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        };
        let known = IBV_ACCESS_LOCAL_WRITE
            | IBV_ACCESS_REMOTE_WRITE
            | IBV_ACCESS_REMOTE_READ
            | IBV_ACCESS_REMOTE_ATOMIC;
        // As the IB spec (and every NIC): remote write needs local write;
        // a region must be somewhere; iova other than the address is not
        // emulated.
        let bad = (addr.is_null() && length > 0)
            || access & !(known | 0xfff0) != 0
            || (access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC) != 0
                && access & IBV_ACCESS_LOCAL_WRITE == 0)
            || iova != addr as u64;
        if bad {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Mr) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let key = fabric::key_of(slot, gen);
        let s = f.mr(slot);
        s.key.store(key, Ordering::Relaxed);
        s.pd.store(pdid, Ordering::Relaxed);
        s.access.store(access, Ordering::Relaxed);
        s.addr.store(addr as u64, Ordering::Relaxed);
        s.len.store(length as u64, Ordering::Relaxed);
        f.publish(Kind::Mr, slot);
        // SAFETY: `pd` is a live PD (checked non-NULL above).
        let context = unsafe { (*pd).context };
        Box::into_raw(Box::new(Mr {
            ibv: ibv_mr {
                context,
                pd,
                addr,
                length,
                handle: key,
                lkey: key,
                rkey: key,
            },
            slot,
        }))
        .cast()
    })
}

/// # Safety
/// `mr` came from `ibv_reg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dereg_mr(mr: *mut ibv_mr) -> i32 {
    guard(libc::EIO, || {
        if mr.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: from `Box::into_raw` in `ibv_reg_mr_iova2`, freed once.
        let m = unsafe { Box::from_raw(mr.cast::<Mr>()) };
        if let Ok(f) = fabric::get() {
            f.release(Kind::Mr, m.slot);
        }
        0
    })
}
