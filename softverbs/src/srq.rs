//! Shared receive queues: one receive ring in shared memory that the
//! queue pairs created on it consume.

use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::abi::*;
use crate::events::{Element, EventQueue};
use crate::fabric::Kind;
use crate::memory::pd_id;
use crate::shm::Mapping;
use crate::{fabric, fabric_or_errno, guard, qp, ring, set_errno};

#[repr(C)]
pub struct Srq {
    pub ibv: ibv_srq,
    pub shared: Arc<SrqShared>,
}

#[derive(Debug)]
pub struct SrqShared {
    pub slot: usize,
    pub gen: u32,
    pub ring: Arc<Mapping>,
    pub name: String,
    pub max_sge: u32,
    pub max_wr: u32,
    /// The context's async events, and the `ibv_srq *` they name.
    pub events: Arc<EventQueue>,
    pub handle: std::sync::atomic::AtomicUsize,
    /// Queue pairs created on it (destroying it meanwhile is EBUSY).
    pub users: std::sync::atomic::AtomicUsize,
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`; `attr` is valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_srq(
    pd: *mut ibv_pd,
    attr: *mut ibv_srq_init_attr,
) -> *mut ibv_srq {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        let Some(pdid) = pd_id(pd) else {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        };
        if attr.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        // SAFETY: non-NULL, caller-provided.
        let a = unsafe { &mut *attr };
        if a.attr.max_wr == 0
            || a.attr.max_wr > qp::MAX_WR
            || a.attr.max_sge as usize > ring::MAX_SGE
        {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Srq) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        f.srq(slot).pd.store(pdid, Ordering::Relaxed);
        let name = f.file(Kind::Srq, slot, gen);
        let ring = match ring::rq_create(&name, a.attr.max_wr) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("softverbs: create SRQ: {e}");
                f.release(Kind::Srq, slot);
                set_errno(libc::ENOMEM);
                return ptr::null_mut();
            }
        };
        f.publish(Kind::Srq, slot);
        // SAFETY: `pd` is live.
        let context = unsafe { (*pd).context };
        // SAFETY: contexts handed out are `Context`s.
        let events = unsafe { (*context.cast::<crate::device::Context>()).events.clone() };
        crate::memory::pd_use(pd, true);
        let srq = Box::new(Srq {
            ibv: ibv_srq {
                context,
                srq_context: a.srq_context,
                pd,
                handle: slot as u32,
                mutex: pthread_mutex::default(),
                cond: pthread_cond::default(),
                events_completed: 0,
            },
            shared: Arc::new(SrqShared {
                slot,
                gen,
                ring,
                name,
                max_sge: a.attr.max_sge.max(1),
                max_wr: a.attr.max_wr,
                events,
                handle: std::sync::atomic::AtomicUsize::new(0),
                users: std::sync::atomic::AtomicUsize::new(0),
            }),
        });
        let p = Box::into_raw(srq);
        // SAFETY: just made.
        unsafe { (&*p).shared.handle.store(p as usize, Ordering::Release) };
        p.cast()
    })
}

/// # Safety
/// `srq` came from `ibv_create_srq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_srq(srq: *mut ibv_srq) -> i32 {
    guard(libc::EIO, || {
        if srq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live SRQ.
        if unsafe { (&*srq.cast::<Srq>()).shared.users.load(Ordering::Acquire) } > 0 {
            return libc::EBUSY;
        }
        // SAFETY: from `Box::into_raw`, destroyed once.
        let s = unsafe { Box::from_raw(srq.cast::<Srq>()) };
        crate::memory::pd_use(s.ibv.pd, false);
        s.shared.handle.store(0, Ordering::Release);
        armed_forget(&s.shared);
        s.shared.events.forget(Element::Srq(srq as usize));
        if let Ok(f) = fabric::get() {
            f.release(Kind::Srq, s.shared.slot);
        }
        ring::forget(&s.shared.name);
        0
    })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_srq(srq: *mut ibv_srq, attr: *mut ibv_srq_attr) -> i32 {
    if srq.is_null() || attr.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: a live SRQ; `attr` writable.
    unsafe {
        let s = &(&*srq.cast::<Srq>()).shared;
        attr.write(ibv_srq_attr {
            max_wr: s.max_wr,
            max_sge: s.max_sge,
            srq_limit: ring::rq_limit(&s.ring),
        });
    }
    0
}

/// Only the limit can change (resizing is not emulated, EINVAL as on a
/// device without `IBV_DEVICE_SRQ_RESIZE`). Arming it makes
/// `IBV_EVENT_SRQ_LIMIT_REACHED` fire once when a receive taken from the
/// SRQ leaves fewer than the limit; then it is disarmed (0).
///
/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_modify_srq(
    srq: *mut ibv_srq,
    attr: *mut ibv_srq_attr,
    mask: i32,
) -> i32 {
    if srq.is_null() || attr.is_null() || mask & IBV_SRQ_MAX_WR != 0 {
        return libc::EINVAL;
    }
    if mask & IBV_SRQ_LIMIT != 0 {
        // SAFETY: a live SRQ; `attr` readable.
        let (s, limit) = unsafe { (&(&*srq.cast::<Srq>()).shared, (*attr).srq_limit) };
        if limit > s.max_wr {
            return libc::EINVAL;
        }
        ring::rq_arm_limit(&s.ring, limit);
        if limit > 0 {
            armed_add(s);
        }
    }
    0
}

/// This process's SRQs with an armed limit; `ARMED` is their count, so
/// that polling pays one load when there are none.
static ARMED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn armed() -> &'static std::sync::Mutex<Vec<std::sync::Weak<SrqShared>>> {
    static A: std::sync::OnceLock<std::sync::Mutex<Vec<std::sync::Weak<SrqShared>>>> =
        std::sync::OnceLock::new();
    A.get_or_init(|| std::sync::Mutex::new(Vec::new()))
}

fn armed_add(s: &Arc<SrqShared>) {
    let mut v = armed().lock().unwrap_or_else(|e| e.into_inner());
    if !v.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(s))) {
        v.push(Arc::downgrade(s));
        ARMED.store(v.len(), Ordering::Release);
    }
}

fn armed_forget(s: &Arc<SrqShared>) {
    let mut v = armed().lock().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(s)));
    ARMED.store(v.len(), Ordering::Release);
}

/// Raises `IBV_EVENT_SRQ_LIMIT_REACHED` for this process's SRQs whose
/// limit a sender's take crossed. The take happens in the sender's
/// process, so the owner notices here, called when it polls a CQ (where
/// the receive's completion arrives).
pub(crate) fn check_limits() {
    if ARMED.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut v = armed().lock().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| {
        let Some(s) = w.upgrade() else { return false };
        if ring::rq_take_limit_hit(&s.ring) {
            let h = s.handle.load(Ordering::Acquire);
            if h != 0 {
                s.events.raise(IBV_EVENT_SRQ_LIMIT_REACHED, Element::Srq(h));
            }
        }
        // Still armed, or fired but not yet seen.
        ring::rq_limit(&s.ring) > 0
    });
    ARMED.store(v.len(), Ordering::Release);
}

/// The `post_srq_recv` op behind `ibv_post_srq_recv`.
///
/// # Safety
/// Pointers are valid.
pub unsafe extern "C" fn post_srq_recv(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad: *mut *mut ibv_recv_wr,
) -> i32 {
    guard(libc::EIO, || {
        if srq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live SRQ.
        let s = unsafe { &(*srq.cast::<Srq>()).shared };
        // SAFETY: forwarded contract.
        unsafe { qp::post_recv_list(&s.ring, s.max_sge, wr, bad) }
    })
}
