//! Cross-memory attach: copying straight into (or out of) another process's
//! memory with `process_vm_writev`/`process_vm_readv`, for receive regions
//! that are caller memory outside the shared segment. One copy, done by the
//! kernel on the sender's thread; allowed where the sender may ptrace the
//! receiver (same user, and no stricter Yama or container policy).

use std::io;

use super::Region;

/// Copies `len` bytes at `from` of local region `src` to address `addr` of
/// process `pid`.
///
/// # Safety
///
/// `pid` may name this very process (or one of its threads): then the
/// kernel writes `[addr, addr + len)` of our own memory, so that range must
/// be memory that no Rust reference covers while the call runs (a
/// [`Region`]'s bytes, which are only reached through raw pointers) and that
/// stays mapped. For another process the kernel checks the range; what it
/// writes there is that process's business (the shm backend writes only a
/// receive region the peer published, and the C and Python docs say caller
/// receive memory must outlive the rank's shutdown).
pub unsafe fn write_to(
    pid: u32,
    addr: u64,
    src: &Region,
    from: usize,
    len: usize,
) -> io::Result<()> {
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
        // the remote range is checked by the kernel, and where it is our own
        // memory the caller's contract says no reference covers it.
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

/// Why cross-memory attach to process `pid` failed with `e`, and what to
/// change: the reachability probe's message when a peer's caller memory
/// cannot be written from here.
pub fn attach_error(pid: u32, e: &io::Error) -> String {
    let what =
        format!("cannot reach the caller memory of process {pid} by cross-memory attach ({e})");
    let fix = match e.raw_os_error() {
        Some(libc::EPERM) => {
            "this process may not ptrace it: run the ranks as the same user; where \
             /proc/sys/kernel/yama/ptrace_scope is 2 or 3 set it to 0 or 1 (each rank \
             already allows any process of its user with PR_SET_PTRACER), or give the ranks \
             CAP_SYS_PTRACE (containers: --cap-add SYS_PTRACE)"
        }
        Some(libc::ENOSYS) => {
            "process_vm_readv/process_vm_writev are not available (a seccomp filter, e.g. \
             a container's default profile on an old runtime): allow them, or add \
             CAP_SYS_PTRACE"
        }
        Some(libc::ESRCH) => "no such process here: it exited, or runs in another pid namespace",
        _ => "check that the ranks may ptrace each other",
    };
    format!("{what}: {fix}; or let that rank receive into library-allocated buffers")
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

/// Puts caller receive memory on transparent huge pages where it can
/// ([`Region::advise_huge_pages`]) and says what it got: each write a peer
/// makes pins the target's pages first, one lookup per page, so at 4 KiB a
/// 1.8 MB message costs some 450 of them (process_vm_writev ~1.3–1.5× a
/// memcpy), and on 2 MiB pages it runs at memcpy speed.
pub fn advise(region: &Region) {
    let page = Region::huge_page_size();
    let got = region.advise_huge_pages();
    let (addr, len) = (region.addr(), region.len());
    if page == 0 {
        tracing::info!(
            "shm: caller receive memory {addr:#x}+{len}: this kernel has no transparent huge pages; peers' writes pin it 4 KiB at a time"
        );
    } else if got.advised == 0 {
        tracing::warn!(
            "shm: caller receive memory {addr:#x}+{len} holds no whole {} KiB page; peers' writes pin it 4 KiB at a time (align caller receive memory to {page} bytes for full speed)",
            page / 1024
        );
    } else if !got.hinted && !got.collapsed {
        tracing::info!(
            "shm: caller receive memory {addr:#x}+{len}: the kernel refused transparent huge pages for it; peers' writes pin it 4 KiB at a time"
        );
    } else if got.advised < len / 2 {
        tracing::warn!(
            "shm: caller receive memory {addr:#x}+{len}: only {} bytes on {} KiB pages{}, the unaligned rest on 4 KiB pages, which peers write ~1.5x slower (align caller receive memory to {page} bytes, its length a multiple of it)",
            got.advised,
            page / 1024,
            if got.collapsed { "" } else { " as they fault in" }
        );
    } else if got.advised < len {
        tracing::info!(
            "shm: caller receive memory {addr:#x}+{len}: {} bytes on {} KiB pages{}, the unaligned rest on 4 KiB pages (align caller receive memory to {page} bytes, its length a multiple of it, for full speed)",
            got.advised,
            page / 1024,
            if got.collapsed { "" } else { " as they fault in" }
        );
    } else {
        tracing::debug!(
            "shm: caller receive memory {addr:#x}+{len} on {} KiB pages{}",
            page / 1024,
            if got.collapsed {
                ""
            } else {
                " as it faults in"
            }
        );
    }
}
