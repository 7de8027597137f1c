//! Completion channels: an armed CQ that gains a completion raises one
//! event on its channel's queue in the fabric table, and
//! `ibv_get_cq_event` sleeps on that queue's futex.
//!
//! The channel's `fd` is readable while events may be pending, as a
//! kernel channel's is, whichever process raised them: a watcher thread of
//! the owner sleeps on the queue's futex and signals the fd (an eventfd)
//! when the queue's sequence moves; `ibv_get_cq_event` clears it when it
//! finds the queue empty. Programs that `poll(2)` the fd before a
//! non-blocking `ibv_get_cq_event` (the usual event loop) thus wake for
//! completions pushed by other processes.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// The fd watcher: its stop flag and thread.
    watcher: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// Signals `fd` whenever channel `slot`'s event sequence moves, until
/// `stop`.
fn watch(slot: usize, fd: i32, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    let f = fabric::get().ok()?;
    let mut last = f.ch(slot).seq.load(Ordering::Acquire);
    std::thread::Builder::new()
        .name("softverbs-channel".into())
        .spawn(move || {
            let seq = &f.ch(slot).seq;
            while !stop.load(Ordering::Acquire) {
                let now = seq.load(Ordering::Acquire);
                if now != last {
                    last = now;
                    let one = 1u64;
                    // SAFETY: writes 8 bytes to the channel's eventfd,
                    // which outlives this thread (joined before close).
                    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                }
                shm::futex_wait(seq, now, Duration::from_millis(100));
            }
        })
        .ok()
}

/// Clears the channel fd's readiness (without blocking).
fn clear_fd(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait; then an 8-byte read of our eventfd,
    // which does not block since it is readable.
    unsafe {
        if libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            libc::read(fd, (&mut v as *mut u64).cast(), 8);
        }
    }
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
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = if fd >= 0 {
            watch(slot, fd, stop.clone()).map(|h| (stop, h))
        } else {
            None
        };
        Box::into_raw(Box::new(Channel {
            ibv: ibv_comp_channel {
                context: ctx,
                fd,
                refcnt: 0,
            },
            slot,
            gen,
            watcher,
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
        let mut c = unsafe { Box::from_raw(ch.cast::<Channel>()) };
        if let Some((stop, h)) = c.watcher.take() {
            stop.store(true, Ordering::Release);
            if let Ok(f) = fabric::get() {
                shm::futex_wake(&f.ch(c.slot).seq);
            }
            let _ = h.join();
        }
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
                // Nothing pending: the fd stops being readable. An event
                // raised after this look moves the sequence, and the
                // watcher signals the fd again.
                clear_fd(c.ibv.fd);
                if slot.head.load(Ordering::Acquire) != slot.tail.load(Ordering::Acquire) {
                    continue;
                }
                set_errno(libc::EAGAIN);
                return -1;
            }
            shm::futex_wait(&slot.seq, seen, Duration::from_millis(100));
        }
    })
}
