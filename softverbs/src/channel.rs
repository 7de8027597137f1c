//! Completion channels: an armed CQ that gains a completion raises one
//! event on its channel's queue in the fabric table, and
//! `ibv_get_cq_event` sleeps on that queue's futex.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::abi::*;
use crate::cq::{local_cqs, Cq};
use crate::fabric::{self, Kind};
use crate::{fabric_or_errno, guard, ring, set_errno, shm};

#[repr(C)]
pub struct Channel {
    pub ibv: ibv_comp_channel,
    pub slot: usize,
    pub gen: u32,
}

/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_comp_channel(ctx: *mut ibv_context) -> *mut ibv_comp_channel {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        if ctx.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Ch) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let c = f.ch(slot);
        c.head.store(0, Ordering::Relaxed);
        c.tail.store(0, Ordering::Relaxed);
        c.lock.store(0, Ordering::Relaxed);
        f.publish(Kind::Ch, slot);
        // SAFETY: plain eventfd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        Box::into_raw(Box::new(Channel {
            ibv: ibv_comp_channel {
                context: ctx,
                fd,
                refcnt: 0,
            },
            slot,
            gen,
        }))
        .cast()
    })
}

/// # Safety
/// `ch` came from `ibv_create_comp_channel`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_comp_channel(ch: *mut ibv_comp_channel) -> i32 {
    guard(libc::EIO, || {
        if ch.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live channel.
        if unsafe { (*ch).refcnt } > 0 {
            return libc::EBUSY;
        }
        // SAFETY: from `Box::into_raw`, freed once.
        let c = unsafe { Box::from_raw(ch.cast::<Channel>()) };
        if let Ok(f) = fabric::get() {
            f.release(Kind::Ch, c.slot);
        }
        if c.ibv.fd >= 0 {
            // SAFETY: our eventfd.
            unsafe { libc::close(c.ibv.fd) };
        }
        0
    })
}
/// Blocks until a CQ attached to `ch` has an event (or, on a non-blocking
/// channel fd, fails with EAGAIN).
///
/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_cq_event(
    ch: *mut ibv_comp_channel,
    cq_out: *mut *mut ibv_cq,
    ctx_out: *mut *mut c_void,
) -> i32 {
    guard(-1, || {
        let Ok(f) = fabric::get() else { return -1 };
        if ch.is_null() || cq_out.is_null() || ctx_out.is_null() {
            set_errno(libc::EINVAL);
            return -1;
        }
        // SAFETY: a live channel.
        let c = unsafe { &*ch.cast::<Channel>() };
        // SAFETY: fcntl on our own eventfd.
        let nonblock = unsafe { libc::fcntl(c.ibv.fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
        let slot = f.ch(c.slot);
        loop {
            let seen = slot.seq.load(Ordering::Acquire);
            if let Some(cq_slot) = ring::channel_pop(f, c.slot) {
                let cqs = local_cqs().lock().unwrap_or_else(|e| e.into_inner());
                let Some(&p) = cqs.get(&(cq_slot as usize)) else {
                    continue;
                };
                let cq = p as *mut Cq;
                // SAFETY: registered CQs are live until destroyed, which
                // removes them from the map under this lock.
                unsafe {
                    *cq_out = cq.cast();
                    *ctx_out = (*cq).ibv.cq_context;
                }
                return 0;
            }
            if nonblock {
                set_errno(libc::EAGAIN);
                return -1;
            }
            shm::futex_wait(&slot.seq, seen, Duration::from_millis(100));
        }
    })
}
