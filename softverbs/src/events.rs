//! Asynchronous events: each open device context has a queue of
//! `ibv_async_event`s and an eventfd as its `async_fd`, in semaphore mode,
//! so the fd is readable exactly while events wait, as the kernel's is.
//! `ibv_get_async_event` blocks on it unless the program made it
//! non-blocking (then EAGAIN), like the real one.
//!
//! Raised here: `IBV_EVENT_QP_FATAL` (the fault switch's `fatal`),
//! `IBV_EVENT_QP_LAST_WQE_REACHED` (a QP on an SRQ enters the error
//! state), `IBV_EVENT_SRQ_LIMIT_REACHED` (an armed SRQ fell below its
//! limit), `IBV_EVENT_CQ_ERR` (a completion queue overflowed) and
//! `IBV_EVENT_PORT_ERR` / `IBV_EVENT_PORT_ACTIVE` (the fault switch's
//! port faults). Events are raised in the process that owns the object.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::abi::*;
use crate::{guard, set_errno};

/// The element of an event: a CQ, QP or SRQ handle, or a port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Cq(usize),
    Qp(usize),
    Srq(usize),
    Port(i32),
}

/// One context's event queue (shared with the objects that raise events,
/// so it outlives the context if they do).
#[derive(Debug)]
pub struct EventQueue {
    fd: OwnedFd,
    queue: Mutex<VecDeque<(u32, Element)>>,
}

impl EventQueue {
    pub fn new() -> std::io::Result<Arc<EventQueue>> {
        // SAFETY: plain eventfd; blocking like the kernel's async fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(EventQueue {
            // SAFETY: a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            queue: Mutex::new(VecDeque::new()),
        }))
    }

    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Queues an event and makes the fd readable for it.
    pub fn raise(&self, event_type: u32, element: Element) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((event_type, element));
        let one = 1u64;
        // SAFETY: writing 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Drops the events not yet read that name `element` (its object is
    /// being destroyed), as the kernel does.
    pub fn forget(&self, element: Element) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, e)| *e != element);
    }
}

fn queue_of(ctx: *mut ibv_context) -> Option<&'static EventQueue> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: contexts handed out are `Context`s, live until closed (the
    // caller's contract for every verb taking one).
    let c = unsafe { &*ctx.cast::<crate::device::Context>() };
    // SAFETY: the queue lives as long as the context (which holds an Arc);
    // the reference does not escape the exported call using it.
    Some(unsafe { &*Arc::as_ptr(&c.events) })
}

/// # Safety
/// `ctx` came from `ibv_open_device`; `event` is writable.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_async_event(
    ctx: *mut ibv_context,
    event: *mut ibv_async_event,
) -> i32 {
    guard(-1, || {
        let Some(q) = queue_of(ctx) else {
            set_errno(libc::EINVAL);
            return -1;
        };
        if event.is_null() {
            set_errno(libc::EINVAL);
            return -1;
        }
        loop {
            let mut n = 0u64;
            // SAFETY: reading 8 bytes into a local from our eventfd; it
            // blocks unless the program made the fd non-blocking.
            let r = unsafe { libc::read(q.fd(), (&mut n as *mut u64).cast(), 8) };
            if r != 8 {
                // errno is read(2)'s: EAGAIN on a non-blocking fd, EINTR.
                return -1;
            }
            let next = q
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            // None: its object was destroyed after it was raised.
            if let Some((t, e)) = next {
                let element = match e {
                    Element::Cq(p) | Element::Qp(p) | Element::Srq(p) => {
                        ibv_async_element { ptr: p }
                    }
                    Element::Port(n) => ibv_async_element { port_num: n },
                };
                // SAFETY: non-NULL, caller-provided.
                unsafe {
                    event.write(ibv_async_event {
                        element,
                        event_type: t,
                    })
                };
                return 0;
            }
        }
    })
}

/// Counts the event as handled on its object (`ibv_destroy_*` of the
/// real library waits for these counts; here destroying never waits).
///
/// # Safety
/// `event` came from `ibv_get_async_event` and its object is live.
#[no_mangle]
pub unsafe extern "C" fn ibv_ack_async_event(event: *mut ibv_async_event) {
    if event.is_null() {
        return;
    }
    // SAFETY: a valid event (caller's contract); its element is the
    // pointer member for these types.
    unsafe {
        let e = &*event;
        match e.event_type {
            IBV_EVENT_CQ_ERR => {
                let cq = e.element.ptr as *mut ibv_cq;
                if !cq.is_null() {
                    (*cq).async_events_completed = (*cq).async_events_completed.wrapping_add(1);
                }
            }
            IBV_EVENT_SRQ_ERR | IBV_EVENT_SRQ_LIMIT_REACHED => {
                let srq = e.element.ptr as *mut ibv_srq;
                if !srq.is_null() {
                    (*srq).events_completed = (*srq).events_completed.wrapping_add(1);
                }
            }
            IBV_EVENT_QP_FATAL
            | IBV_EVENT_QP_REQ_ERR
            | IBV_EVENT_QP_ACCESS_ERR
            | IBV_EVENT_COMM_EST
            | IBV_EVENT_SQ_DRAINED
            | IBV_EVENT_PATH_MIG
            | IBV_EVENT_PATH_MIG_ERR
            | IBV_EVENT_QP_LAST_WQE_REACHED => {
                let qp = e.element.ptr as *mut ibv_qp;
                if !qp.is_null() {
                    (*qp).events_completed = (*qp).events_completed.wrapping_add(1);
                }
            }
            _ => {}
        }
    }
}
