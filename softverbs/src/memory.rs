//! Protection domains and memory regions: registering a region publishes
//! its key, owner, protection domain, access flags and range in the fabric
//! table, where peers' work requests check them.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::abi::*;
use crate::fabric::{self, Kind};
use crate::{fabric_or_errno, guard, set_errno};

#[repr(C)]
pub struct Pd {
    pub ibv: ibv_pd,
    pub id: u32,
    /// Memory regions, queue pairs and SRQs created on it: while any
    /// lives, deallocating it is EBUSY, as the kernel answers.
    pub users: AtomicUsize,
}

/// Counts one more (`up`) or one fewer object on `pd`.
pub(crate) fn pd_use(pd: *const ibv_pd, up: bool) {
    if pd.is_null() {
        return;
    }
    // SAFETY: PDs handed out are `Pd`s, live while objects use them.
    let u = unsafe { &(*pd.cast::<Pd>()).users };
    if up {
        u.fetch_add(1, Ordering::AcqRel);
    } else {
        u.fetch_sub(1, Ordering::AcqRel);
    }
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
            users: AtomicUsize::new(0),
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
    // SAFETY: a live PD.
    if unsafe { (*pd.cast::<Pd>()).users.load(Ordering::Acquire) } > 0 {
        return libc::EBUSY;
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

/// Checks `access` as the kernel's `ib_check_mr_access` does for a device
/// without on-demand paging or flush support; returns the flags to keep
/// (the optional ones dropped: a provider must accept them and may ignore
/// them, which is what rdma-core itself does when the kernel cannot pass
/// them on) or the errno.
pub(crate) fn check_access(access: u32) -> Result<u32, i32> {
    let mandatory = IBV_ACCESS_LOCAL_WRITE
        | IBV_ACCESS_REMOTE_WRITE
        | IBV_ACCESS_REMOTE_READ
        | IBV_ACCESS_REMOTE_ATOMIC
        | IBV_ACCESS_MW_BIND
        | IBV_ACCESS_ZERO_BASED
        | IBV_ACCESS_ON_DEMAND
        | IBV_ACCESS_HUGETLB
        | IBV_ACCESS_FLUSH_GLOBAL
        | IBV_ACCESS_FLUSH_PERSISTENT;
    if access & !(mandatory | IBV_ACCESS_OPTIONAL_RANGE) != 0 {
        return Err(libc::EINVAL);
    }
    // As the IB spec (and every NIC): remote write or atomic needs local
    // write.
    if access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC) != 0
        && access & IBV_ACCESS_LOCAL_WRITE == 0
    {
        return Err(libc::EINVAL);
    }
    // No on-demand paging and no persistent-memory flush on this device
    // (`ibv_query_device` does not advertise them).
    if access & (IBV_ACCESS_ON_DEMAND | IBV_ACCESS_FLUSH_GLOBAL | IBV_ACCESS_FLUSH_PERSISTENT) != 0
    {
        return Err(libc::EOPNOTSUPP);
    }
    Ok(access & !IBV_ACCESS_OPTIONAL_RANGE)
}

const PAGE: u64 = 4096;

/// Whether every page of `[addr, addr + len)` is mapped in this process,
/// as pinning it for a NIC requires (the kernel answers EFAULT otherwise).
fn mapped(addr: u64, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let Some(end) = addr.checked_add(len as u64) else {
        return false;
    };
    let start = addr & !(PAGE - 1);
    let pages = (end - start).div_ceil(PAGE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` holds one byte per page of the range; mincore only
    // inspects the mapping (ENOMEM: some page is not mapped).
    let r = unsafe {
        libc::mincore(
            start as *mut c_void,
            (end - start) as usize,
            vec.as_mut_ptr(),
        )
    };
    r == 0
}

/// # Safety
/// As `ibv_reg_mr`. Work requests name the region's bytes from `iova` on.
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
        let access = match check_access(access) {
            Ok(a) => a,
            Err(e) => {
                set_errno(e);
                return ptr::null_mut();
            }
        };
        // As the kernel: the iova keeps the address's offset in its page,
        // and neither range wraps.
        if (addr as u64 ^ iova) & (PAGE - 1) != 0 || iova.checked_add(length as u64).is_none() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        if !mapped(addr as u64, length) {
            set_errno(libc::EFAULT);
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
        s.iova.store(iova, Ordering::Relaxed);
        f.publish(Kind::Mr, slot);
        // SAFETY: `pd` is a live PD (checked non-NULL above).
        let context = unsafe { (*pd).context };
        pd_use(pd, true);
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

/// Device memory by dma-buf: this device has none, so, as rdma-core's
/// answer for a provider without it, NULL with errno EOPNOTSUPP.
///
/// # Safety
/// Always safe.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_dmabuf_mr(
    _pd: *mut ibv_pd,
    _offset: u64,
    _length: usize,
    _iova: u64,
    _fd: i32,
    _access: i32,
) -> *mut ibv_mr {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
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
        pd_use(m.ibv.pd, false);
        if let Ok(f) = fabric::get() {
            f.release(Kind::Mr, m.slot);
        }
        0
    })
}
