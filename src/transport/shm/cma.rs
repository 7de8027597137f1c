//! Cross-memory attach: copying straight into (or out of) another process's
//! memory with `process_vm_writev`/`process_vm_readv`, for receive regions
//! that are caller memory outside the shared segment. One copy, done by the
//! kernel on the sender's thread; allowed where the sender may ptrace the
//! receiver (same user, and no stricter Yama or container policy).

use std::io;

use super::Region;

/// Copies `len` bytes at `from` of local region `src` to address `addr` of
/// process `pid`. The caller has checked the remote range against the
/// peer's published region.
pub fn write_to(pid: u32, addr: u64, src: &Region, from: usize, len: usize) -> io::Result<()> {
    let (at, n) = src
        .check(from as u64, len as u64)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if (addr as usize).checked_add(n).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "remote range wraps the address space",
        ));
    }
    let mut done = 0usize;
    while done < n {
        let local = libc::iovec {
            iov_base: (src.addr() as usize + at + done) as *mut libc::c_void,
            iov_len: n - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: n - done,
        };
        // SAFETY: `local` lies inside `src` (checked above) and is only read;
        // the remote range is in another process, which the kernel checks
        // and writes; no memory of ours is written.
        let r = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "process_vm_writev moved no bytes",
            ));
        }
        done += r as usize;
    }
    Ok(())
}

/// Reads a u64 at `addr` of process `pid` (the reachability probe).
pub fn read_u64(pid: u32, addr: u64) -> io::Result<u64> {
    let mut v = 0u64;
    let local = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` is our own 8-byte variable, writable for the call.
    let r = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r != 8 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
    }
    Ok(v)
}

/// Lets any process of this user attach to this one (Yama's
/// `PR_SET_PTRACER_ANY`), so that peers can write caller memory published
/// here whether or not they descend from this process: without it, under
/// `ptrace_scope = 1`, one end of a link could reach the other and not the
/// reverse. A kernel without Yama refuses the call; nothing is needed then.
pub fn allow_attach() {
    // SAFETY: prctl with PR_SET_PTRACER takes plain integers and touches no
    // memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
}
