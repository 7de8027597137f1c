//! The operating-system calls the shared-memory transport needs: shared
//! mappings, process-shared futexes, watching a peer process, pinning.
//! Every `-1` becomes an `io::Error` through one macro.

use std::ffi::CString;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Turns a libc call's `-1` into the thread's `errno` as `io::Error`.
macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}

/// Where named segments live.
pub const SHM_DIR: &str = "/dev/shm";

/// A shared, read-write mapping of a file in [`SHM_DIR`].
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw
// pointers and atomics whose users uphold the segment protocol.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

fn path_of(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name.len() > 200 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad segment name {name:?}"),
        ));
    }
    CString::new(format!("{SHM_DIR}/{name}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in segment name"))
}

impl Mapping {
    /// Creates `name` exclusively with `len` zeroed bytes and maps it.
    pub fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let path = path_of(name)?;
        // SAFETY: `path` is a valid NUL-terminated string.
        let fd = syscall!(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        })?;
        // SAFETY: `fd` is the descriptor we just opened.
        let truncated = syscall!(unsafe { libc::ftruncate(fd, len as libc::off_t) });
        let r = truncated.and_then(|_| map(fd, len));
        // SAFETY: `fd` is ours; the mapping (if any) stays valid after close.
        unsafe { libc::close(fd) };
        if r.is_err() {
            let _ = unlink(name);
        }
        r
    }

    /// Maps an existing segment, whole.
    pub fn open(name: &str) -> io::Result<Mapping> {
        let path = path_of(name)?;
        // SAFETY: `path` is a valid NUL-terminated string.
        let fd = syscall!(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
        // SAFETY: a zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` is writable.
        let r = syscall!(unsafe { libc::fstat(fd, &mut st) })
            .and_then(|_| map(fd, st.st_size as usize));
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
        r
    }

    /// An anonymous shared mapping (tests, and threads of one process).
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        map(-1, len)
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn map(fd: libc::c_int, len: usize) -> io::Result<Mapping> {
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty segment"));
    }
    let flags = if fd == -1 {
        libc::MAP_SHARED | libc::MAP_ANONYMOUS
    } else {
        libc::MAP_SHARED
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing; `fd`
    // is open (or -1 with MAP_ANONYMOUS).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(Mapping {
        ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?,
        len,
    })
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing refers to it
        // once the last owner (an `Arc<Mapping>`) is dropped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Removes a segment's name (mappings stay valid).
pub fn unlink(name: &str) -> io::Result<()> {
    let path = path_of(name)?;
    // SAFETY: `path` is a valid NUL-terminated string.
    syscall!(unsafe { libc::unlink(path.as_ptr()) }).map(|_| ())
}

/// Sleeps while `*word == expected`, at most `timeout`. Process-shared.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // FUTEX_WAIT only reads it. EINTR/EAGAIN/ETIMEDOUT are all "go and look".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Wakes every waiter on `word`. Process-shared.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not touch it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Whether process `pid` exists (signal 0).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 checks for existence and sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Watches one peer process: through a pidfd (immune to pid reuse) where
/// the kernel has them, else by signal 0.
#[derive(Debug)]
pub struct PidWatch {
    pid: u32,
    pidfd: Option<libc::c_int>,
}

impl PidWatch {
    pub fn new(pid: u32) -> PidWatch {
        // SAFETY: pidfd_open takes a pid and flags, returns an fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        PidWatch {
            pid,
            pidfd: (fd >= 0).then_some(fd as libc::c_int),
        }
    }

    /// Whether the process is still running.
    pub fn alive(&self) -> bool {
        match self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let r = unsafe { libc::poll(&mut p, 1, 0) };
                // Readable means the process exited.
                !(r > 0 && p.revents & libc::POLLIN != 0)
            }
            None => pid_alive(self.pid),
        }
    }
}

impl Drop for PidWatch {
    fn drop(&mut self) {
        if let Some(fd) = self.pidfd {
            // SAFETY: the pidfd is ours.
            unsafe { libc::close(fd) };
        }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} out of range"),
        ));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays in bounds
    // (checked above); sched_setaffinity reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        syscall!(libc::sched_setaffinity(
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set
        ))
        .map(|_| ())
    }
}
