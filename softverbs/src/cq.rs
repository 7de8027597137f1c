//! Completion queues: a ring in shared memory that queue pairs of any
//! process push to and the owner polls, plus the owner's initiator
//! completions held back for the emulated acknowledgement delay.

use std::ffi::c_void;
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use crate::abi::*;
use crate::channel::Channel;
use crate::device::Context;
use crate::events::{Element, EventQueue};
use crate::fabric::{self, Kind};
use crate::shm::Mapping;
use crate::{fabric_or_errno, guard, ring, set_errno};

pub const MAX_CQE: u32 = 65536;

/// A completion queue: the handle the program holds, and the shared part
/// that queue pairs (and the progress thread) push to.
#[repr(C)]
pub struct Cq {
    pub ibv: ibv_cq,
    pub shared: Arc<CqShared>,
}

#[derive(Debug)]
pub struct CqShared {
    pub slot: usize,
    pub gen: u32,
    pub ring: Arc<Mapping>,
    pub name: String,
    /// Initiator completions waiting out the emulated acknowledgement
    /// delay, in order (see `qp::ack_delay`).
    pub deferred: Mutex<std::collections::VecDeque<(std::time::Instant, ibv_wc)>>,
    /// The context's async events, and whether `IBV_EVENT_CQ_ERR` was
    /// raised for this CQ's overflow.
    pub events: Arc<EventQueue>,
    pub overflow_reported: std::sync::atomic::AtomicBool,
    /// Queue pairs using it (destroying it meanwhile is EBUSY).
    pub users: std::sync::atomic::AtomicUsize,
}

impl CqShared {
    /// Moves every deferred completion that is due onto the ring. Returns
    /// when the next one is due, if any.
    pub fn flush_due(&self, f: &fabric::Fabric) -> Option<std::time::Instant> {
        let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        while let Some((due, wc)) = d.front() {
            if *due > now {
                return Some(*due);
            }
            let _ = ring::cq_push(f, &self.ring, wc, false);
            d.pop_front();
        }
        None
    }
}

/// Local CQs by fabric slot, for channel events.
pub(crate) fn local_cqs() -> &'static Mutex<std::collections::HashMap<usize, usize>> {
    static M: OnceLock<Mutex<std::collections::HashMap<usize, usize>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(std::collections::HashMap::new()))
}

/// # Safety
/// `ctx` came from `ibv_open_device`; `channel` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_cq(
    ctx: *mut ibv_context,
    cqe: i32,
    cq_context: *mut c_void,
    channel: *mut ibv_comp_channel,
    comp_vector: i32,
) -> *mut ibv_cq {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        // One completion vector (`num_comp_vectors`).
        if ctx.is_null() || cqe < 1 || cqe as u32 > MAX_CQE || comp_vector != 0 {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        // A completion channel belongs to the context that made it: the
        // kernel does not find another device's channel in this one.
        // SAFETY: a live channel (caller's contract).
        if !channel.is_null() && unsafe { (*channel).context } != ctx {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Cq) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let ch = if channel.is_null() {
            None
        } else {
            // SAFETY: a live channel (caller's contract).
            let c = unsafe { &mut *channel.cast::<Channel>() };
            c.ibv.refcnt += 1;
            Some((c.slot as u32, c.gen))
        };
        let name = f.file(Kind::Cq, slot, gen);
        let ring = match ring::cq_create(&name, cqe as u32, slot as u32, ch) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("softverbs: create CQ: {e}");
                f.release(Kind::Cq, slot);
                set_errno(libc::ENOMEM);
                return ptr::null_mut();
            }
        };
        f.publish(Kind::Cq, slot);
        // SAFETY: contexts handed out are `Context`s.
        let events = unsafe { (*ctx.cast::<Context>()).events.clone() };
        let cq = Box::new(Cq {
            ibv: ibv_cq {
                context: ctx,
                channel,
                cq_context,
                handle: slot as u32,
                cqe,
                mutex: pthread_mutex::default(),
                cond: pthread_cond::default(),
                comp_events_completed: 0,
                async_events_completed: 0,
            },
            shared: Arc::new(CqShared {
                slot,
                gen,
                ring,
                name,
                deferred: Mutex::new(std::collections::VecDeque::new()),
                events,
                overflow_reported: std::sync::atomic::AtomicBool::new(false),
                users: std::sync::atomic::AtomicUsize::new(0),
            }),
        });
        let p = Box::into_raw(cq);
        local_cqs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, p as usize);
        p.cast()
    })
}

/// # Safety
/// `cq` came from `ibv_create_cq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_cq(cq: *mut ibv_cq) -> i32 {
    guard(libc::EIO, || {
        if cq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live CQ.
        let users = unsafe { &(&*cq.cast::<Cq>()).shared.users };
        if users.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return libc::EBUSY;
        }
        // SAFETY: from `Box::into_raw` in `ibv_create_cq`, destroyed once.
        let c = unsafe { Box::from_raw(cq.cast::<Cq>()) };
        local_cqs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c.shared.slot);
        c.shared.events.forget(Element::Cq(cq as usize));
        if !c.ibv.channel.is_null() {
            // SAFETY: the channel outlives its CQs (EBUSY otherwise).
            unsafe { (*c.ibv.channel).refcnt -= 1 };
        }
        if let Ok(f) = fabric::get() {
            f.release(Kind::Cq, c.shared.slot);
        }
        ring::forget(&c.shared.name);
        0
    })
}

/// The `poll_cq` op behind `ibv_poll_cq`.
///
/// # Safety
/// `cq` is live; `wc` holds `n` entries.
pub unsafe extern "C" fn poll_cq(cq: *mut ibv_cq, n: i32, wc: *mut ibv_wc) -> i32 {
    guard(-1, || {
        if cq.is_null() || n < 0 || (n > 0 && wc.is_null()) {
            return -1;
        }
        // SAFETY: a live CQ; `wc` holds `n` entries (caller's contract).
        let (c, out) = unsafe {
            (
                &*cq.cast::<Cq>(),
                std::slice::from_raw_parts_mut(wc, n as usize),
            )
        };
        if let Ok(f) = fabric::get() {
            c.shared.flush_due(f);
        }
        crate::srq::check_limits();
        match ring::cq_pop(&c.shared.ring, out) {
            Ok(k) => k as i32,
            Err(()) => {
                // The overflow is also an affiliated async event, once.
                if !c
                    .shared
                    .overflow_reported
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    c.shared
                        .events
                        .raise(IBV_EVENT_CQ_ERR, Element::Cq(cq as usize));
                }
                set_errno(libc::EOVERFLOW);
                -1
            }
        }
    })
}

/// The `req_notify_cq` op behind `ibv_req_notify_cq`.
///
/// # Safety
/// `cq` is live.
pub unsafe extern "C" fn req_notify_cq(cq: *mut ibv_cq, solicited_only: i32) -> i32 {
    if cq.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: a live CQ.
    let c = unsafe { &*cq.cast::<Cq>() };
    ring::cq_arm(&c.shared.ring, if solicited_only != 0 { 2 } else { 1 });
    0
}
/// # Safety
/// `cq` is live.
#[no_mangle]
pub unsafe extern "C" fn ibv_ack_cq_events(cq: *mut ibv_cq, n: u32) {
    if !cq.is_null() {
        // SAFETY: a live CQ.
        unsafe { (*cq).comp_events_completed = (*cq).comp_events_completed.wrapping_add(n) };
    }
}
