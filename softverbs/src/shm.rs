//! Shared memory for the emulated fabric: named mappings in `/dev/shm`,
//! process-shared spin locks that survive a holder's death, and futexes.

use std::ffi::CString;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A shared read-write mapping of a file in `/dev/shm`.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory; users go through atomics and the locks
// below.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

fn path(name: &str) -> io::Result<CString> {
    CString::new(format!("/dev/shm/{name}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

impl Mapping {
    /// Opens (creating if needed) `name` with at least `len` bytes.
    /// Returns the mapping and whether this call created the file.
    pub fn open_or_create(name: &str, len: usize) -> io::Result<(Mapping, bool)> {
        let p = path(name)?;
        // SAFETY: `p` is NUL-terminated.
        let mut fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        };
        let created = fd >= 0;
        if !created {
            // SAFETY: as above.
            fd = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let r = (|| {
            // SAFETY: `fd` is open; a zeroed stat is a valid out-parameter.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if (st.st_size as usize) < len {
                // SAFETY: `fd` is open for writing.
                if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            map(fd, len)
        })();
        // SAFETY: `fd` is ours; the mapping outlives it.
        unsafe { libc::close(fd) };
        r.map(|m| (m, created))
    }

    /// Maps an existing file, whole.
    pub fn open(name: &str) -> io::Result<Mapping> {
        let p = path(name)?;
        // SAFETY: `p` is NUL-terminated.
        let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a zeroed stat is a valid out-parameter; `fd` is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let r = if unsafe { libc::fstat(fd, &mut st) } != 0 {
            Err(io::Error::last_os_error())
        } else {
            map(fd, st.st_size as usize)
        };
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
        r
    }

    /// Creates `name` exclusively with `len` zeroed bytes.
    pub fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let p = path(name)?;
        // SAFETY: `p` is NUL-terminated.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open for writing.
        let r = if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            Err(io::Error::last_os_error())
        } else {
            map(fd, len)
        };
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
        if r.is_err() {
            unlink(name);
        }
        r
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// A reference to a `T` at `off`, bounds- and alignment-checked.
    pub fn at<T>(&self, off: usize) -> &T {
        assert!(off + std::mem::size_of::<T>() <= self.len && off % std::mem::align_of::<T>() == 0);
        // SAFETY: in bounds and aligned (asserted); the types used are
        // atomics or plain integers, valid for any bit pattern, and live as
        // long as the mapping.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<T>() }
    }
}

fn map(fd: libc::c_int, len: usize) -> io::Result<Mapping> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty shared file",
        ));
    }
    // SAFETY: a fresh shared mapping of an open file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
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
        // SAFETY: exactly the range we mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub fn unlink(name: &str) {
    if let Ok(p) = path(name) {
        // SAFETY: `p` is NUL-terminated.
        unsafe { libc::unlink(p.as_ptr()) };
    }
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

pub fn my_pid() -> u32 {
    std::process::id()
}

/// A process-shared spin lock in shared memory. The word holds the
/// holder's pid, so a lock left by a dead process is taken over.
pub struct SpinGuard<'a> {
    word: &'a AtomicU32,
}

pub fn lock(word: &AtomicU32) -> SpinGuard<'_> {
    let me = my_pid();
    let mut spins = 0u32;
    loop {
        let cur = word.load(Ordering::Relaxed);
        if cur == 0
            && word
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return SpinGuard { word };
        }
        spins += 1;
        if spins % 64 == 0 {
            std::thread::yield_now();
        }
        if spins % 4096 == 0 && cur != 0 && cur != me && !pid_alive(cur) {
            // The holder died inside its critical section: take over.
            if word
                .compare_exchange(cur, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SpinGuard { word };
            }
        }
        std::hint::spin_loop();
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.word.store(0, Ordering::Release);
    }
}

pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid aligned u32; FUTEX_WAIT only reads it.
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

pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid aligned u32.
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
