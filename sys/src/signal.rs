//! Process lifetime for a parent and its children: [`die_with_parent`],
//! for a child between fork and exec, and [`on_terminate`], which turns
//! SIGTERM and SIGINT into a flag that a parent's wait loop checks before
//! it kills and reaps its children.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// The last terminating signal received; 0 while none has come.
static TERMINATED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(sig: libc::c_int) {
    // A store to a lock-free atomic is async-signal-safe.
    TERMINATED.store(sig, Ordering::SeqCst);
}

/// From now on SIGTERM and SIGINT do not end the process: they are
/// recorded, and [`terminated`] reports them. Idempotent.
pub fn on_terminate() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores to an atomic, which is
        // async-signal-safe; `sa_mask` is initialised by sigemptyset.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            crate::syscall!(libc::sigaction(sig, &sa, std::ptr::null_mut()))?;
        }
    }
    Ok(())
}

/// The terminating signal recorded since [`on_terminate`], if any.
pub fn terminated() -> Option<i32> {
    match TERMINATED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// For a child between fork and exec (`CommandExt::pre_exec`): the kernel
/// sends it SIGKILL when the thread that forked it ends; and if `parent`
/// (the forking process's pid, read before the fork) has already gone, so
/// that the signal would never come, the child fails to start.
///
/// Async-signal-safe: two system calls, no allocation (the error is a raw
/// OS error).
pub fn die_with_parent(parent: u32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    crate::syscall!(unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    // SAFETY: getppid cannot fail and touches no memory.
    let now = unsafe { libc::getppid() };
    if u32::try_from(now).ok() != Some(parent) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}
