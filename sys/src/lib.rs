//! afmesh-sys: the few Linux calls that afmesh's shared-memory transport
//! and softverbs both make, written once.
//!
//! * [`Mapping`]: shared read-write mappings of files in [`SHM_DIR`]
//!   (created exclusively, opened, or both) and anonymous shared ones;
//!   [`unlink`] removes a name.
//! * [`futex_wait`] / [`futex_wake`]: process-shared futexes, the sleep
//!   and wake-up of words in those mappings.
//! * [`pid_alive`] and [`PidWatch`]: whether a peer process still runs;
//!   [`lock_exclusive`] and [`locked_by_another`]: the same across pid
//!   namespaces, by an open-file-description lock on its segment.
//! * [`pin_to_cpu`]: pinning the calling thread; [`timestamp_counter`]:
//!   the CPU's cycle counter, for a cheap clock; [`preemptions`]: how often
//!   the calling thread lost its CPU.
//! * [`die_with_parent`], [`on_terminate`] and [`terminated`]: children
//!   that do not outlive their parent, and a parent that reaps them when
//!   it is told to stop.
//! * [`poll_ready`] and [`FdWatcher`]: waiting for sockets, directly or
//!   from a watcher thread that wakes a sleeper of another kind.
//!
//! Every libc call that reports failure as `-1` goes through one macro,
//! [`syscall!`], which turns it into the thread's `errno` as
//! [`std::io::Error`]. This crate is small on purpose: softverbs, an
//! `LD_PRELOAD` provider, links it without linking afmesh.

#![deny(unsafe_op_in_unsafe_fn)]

/// Turns a libc call's `-1` into the thread's `errno` as
/// [`std::io::Error`]; any other value is `Ok`.
///
/// ```
/// // SAFETY: getpid has no preconditions.
/// let pid = afmesh_sys::syscall!(unsafe { libc::getpid() }).unwrap();
/// assert_eq!(pid as u32, std::process::id());
/// ```
#[macro_export]
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r == -1 {
            ::std::result::Result::Err(::std::io::Error::last_os_error())
        } else {
            ::std::result::Result::Ok(r)
        }
    }};
}

mod cpu;
mod fd;
mod futex;
mod lock;
mod mapping;
mod process;
mod signal;
mod tcp;

pub use cpu::{allowed_cpus, pin_to_cpu, preemptions, timestamp_counter};
pub use fd::{poll_ready, FdWatcher};
pub use futex::{futex_wait, futex_wake};
pub use lock::{lock_exclusive, locked_by_another, random_u64};
pub use mapping::{unlink, AtomicOnly, Mapping, SHM_DIR};
pub use process::{pid_alive, PidWatch};
pub use signal::{die_with_parent, on_terminate, terminated};
pub use tcp::{tcp_acks, TcpAcks};
