//! Completion channels: an armed CQ that gains a completion raises one
//! event on its channel's queue in the fabric table, and
//! `ibv_get_cq_event` sleeps on that queue's futex.
//!
//! The channel's `fd` is a Unix datagram socket bound to a file beside the
//! fabric (`/dev/shm/softverbs.<ns>.ch.<slot>.<gen>`), so any process can
//! make it readable: whoever raises an event also sends it an empty
//! datagram (a doorbell; a full socket buffer is readable anyway). The
//! owner drains the doorbells when it finds the queue empty and rings its
//! own bell again if an event slipped in meanwhile, so the fd is readable
//! whenever events wait, for `poll(2)`/`epoll` waiters as with the
//! kernel's channel fd.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::abi::*;
use crate::cq::{local_cqs, Cq};
use crate::fabric::Fabric;
use crate::fabric::{self, Kind};
use crate::{fabric_or_errno, guard, ring, set_errno, shm};

/// The address of channel `slot`'s doorbell (generation `gen`).
fn doorbell_addr(f: &Fabric, slot: usize, gen: u32) -> Option<libc::sockaddr_un> {
    let path = format!("/dev/shm/{}", f.file(Kind::Ch, slot, gen));
    // SAFETY: plain data; all-zero is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.len() >= a.sun_path.len() {
        return None;
    }
    for (d, s) in a.sun_path.iter_mut().zip(path.bytes()) {
        *d = s as libc::c_char;
    }
    Some(a)
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;

/// Makes channel `slot`'s fd readable (from any process).
pub(crate) fn ring_doorbell(f: &Fabric, slot: usize) {
    static SENDER: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    // SAFETY: an unbound datagram socket, kept for the process's life.
    let s = *SENDER.get_or_init(|| unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
    });
    let gen = f.ch(slot).hdr.gen.load(Ordering::Acquire) & 0xfff;
    let Some(a) = doorbell_addr(f, slot, gen) else {
        return;
    };
    if s >= 0 {
        // SAFETY: a valid address; an empty datagram. Failure (a full
        // buffer: readable already; a channel gone) changes nothing.
        unsafe {
            libc::sendto(
                s,
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                (&a as *const libc::sockaddr_un).cast(),
                ADDR_LEN,
            )
        };
    }
}

/// Owner: empties the doorbell; rings it again if events still wait.
fn drain_doorbell(f: &Fabric, c: &Channel) {
    let mut b = 0u8;
    // SAFETY: our socket; one-byte buffer; never blocks.
    while unsafe { libc::recv(c.ibv.fd, (&mut b as *mut u8).cast(), 1, libc::MSG_DONTWAIT) } >= 0 {}
    if ring::channel_pending(f, c.slot) {
        ring_doorbell(f, c.slot);
    }
}

/// A datagram socket bound to channel `slot`'s doorbell address.
fn bind_doorbell(f: &Fabric, slot: usize, gen: u32) -> i32 {
    let Some(a) = doorbell_addr(f, slot, gen) else {
        return -1;
    };
    // SAFETY: plain socket calls on a fresh descriptor and a valid address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return -1;
        }
        libc::unlink(a.sun_path.as_ptr());
        if libc::bind(fd, (&a as *const libc::sockaddr_un).cast(), ADDR_LEN) != 0 {
            libc::close(fd);
            return -1;
        }
        fd
    }
}

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
        let fd = bind_doorbell(f, slot, gen);
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("softverbs: completion channel doorbell: {e}");
            f.release(Kind::Ch, slot);
            set_errno(e.raw_os_error().unwrap_or(libc::EMFILE));
            return ptr::null_mut();
        }
        f.publish(Kind::Ch, slot);
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
            // SAFETY: our socket.
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
        // SAFETY: fcntl on our own socket.
        let nonblock = unsafe { libc::fcntl(c.ibv.fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
        let slot = f.ch(c.slot);
        loop {
            let seen = slot.seq.load(Ordering::Acquire);
            if let Some(cq_slot) = ring::channel_pop(f, c.slot) {
                let cqs = local_cqs().lock().unwrap_or_else(|e| e.into_inner());
                let Some(&p) = cqs.get(&(cq_slot as usize)) else {
                    continue;
                };
                if !ring::channel_pending(f, c.slot) {
                    drain_doorbell(f, c);
                }
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
                drain_doorbell(f, c);
                set_errno(libc::EAGAIN);
                return -1;
            }
            shm::futex_wait(&slot.seq, seen, Duration::from_millis(100));
        }
    })
}
