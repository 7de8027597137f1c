//! Shared mappings of named files in `/dev/shm`, and anonymous ones.
//!
//! A [`Mapping`] is an address range that other processes may write at
//! any time, so it never hands out `&[u8]`: callers get the raw pointer, or
//! a reference to a type made only of atomics ([`AtomicOnly`]), which is
//! sound however the other side writes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicI32, AtomicI64, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
};

/// Where named segments live.
pub const SHM_DIR: &str = "/dev/shm";

/// A shared, read-write mapping: of a file in [`SHM_DIR`], or anonymous.
/// Unmapped when dropped; the file's name is not removed (see [`unlink`]).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` owns nothing but the range it mapped and unmaps it
// once, from whichever thread drops it (munmap has no thread affinity). It
// gives out only the raw pointer, whose every use is `unsafe` and bound by
// the protocol of the memory behind it, and references to `AtomicOnly`
// types, which are `Sync`. That memory is written by other processes at
// any moment anyway, so another thread of this one adds no new kind of
// access.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` allows only raw-pointer and atomic
// access.
unsafe impl Sync for Mapping {}

/// A type that can be viewed in memory other processes write: every byte
/// of it lies inside an atomic, and every bit pattern (all zeroes
/// included) is a valid value.
///
/// # Safety
///
/// Implement it only for `#[repr(C)]` structs (or arrays) whose fields are
/// all `AtomicOnly` themselves; padding is fine, as it is never read. A
/// plain integer field is not allowed: a `&T` promises that nobody writes
/// it, which a peer process does not keep.
pub unsafe trait AtomicOnly: Sync {}

macro_rules! atomic_only {
    ($($t:ty),*) => {
        // SAFETY: atomics are valid for every bit pattern and every access
        // to them is atomic.
        $(unsafe impl AtomicOnly for $t {})*
    };
}
atomic_only!(
    AtomicU8,
    AtomicU16,
    AtomicU32,
    AtomicU64,
    AtomicUsize,
    AtomicI32,
    AtomicI64
);

// SAFETY: an array's bytes are exactly its elements' bytes, with no
// padding between them.
unsafe impl<T: AtomicOnly, const N: usize> AtomicOnly for [T; N] {}

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

fn open_fd(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = path_of(name)?;
    // SAFETY: `path` is a valid NUL-terminated string; the mode argument is
    // read only with O_CREAT.
    let fd = crate::syscall!(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn size_of_file(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: an all-zero `stat` is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is writable.
    crate::syscall!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    usize::try_from(st.st_size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file size out of range"))
}

fn set_len(fd: &OwnedFd, len: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    // SAFETY: `fd` is open for writing.
    crate::syscall!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(|_| ())
}

impl Mapping {
    /// Creates `name` exclusively with `len` zeroed bytes and maps it. If
    /// anything after the creation fails, the name is removed again.
    pub fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let fd = open_fd(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL)?;
        let r = set_len(&fd, len).and_then(|()| map(Some(&fd), len));
        if r.is_err() {
            let _ = unlink(name);
        }
        r
    }

    /// As [`Mapping::create`], but first takes an exclusive lock on the
    /// file ([`crate::lock_exclusive`]), before the file has any length,
    /// and returns the descriptor that holds it: the lock lasts while that
    /// descriptor is open, that is while this process lives.
    pub fn create_locked(name: &str, len: usize) -> io::Result<(Mapping, OwnedFd)> {
        let fd = open_fd(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL)?;
        let r = crate::lock_exclusive(fd.as_fd())
            .and_then(|()| set_len(&fd, len))
            .and_then(|()| map(Some(&fd), len));
        match r {
            Ok(m) => Ok((m, fd)),
            Err(e) => {
                let _ = unlink(name);
                Err(e)
            }
        }
    }

    /// Maps an existing file, whole.
    pub fn open(name: &str) -> io::Result<Mapping> {
        Mapping::open_keeping_fd(name).map(|(m, _)| m)
    }

    /// As [`Mapping::open`], and returns the descriptor too (to test the
    /// owner's lock, even once the name is gone).
    pub fn open_keeping_fd(name: &str) -> io::Result<(Mapping, OwnedFd)> {
        let fd = open_fd(name, libc::O_RDWR)?;
        let len = size_of_file(&fd)?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{SHM_DIR}/{name} is empty"),
            ));
        }
        map(Some(&fd), len).map(|m| (m, fd))
    }

    /// Opens `name`, creating it if it does not exist, and maps its first
    /// `len` bytes, growing the file to `len` if it is shorter (never
    /// shrinking it). Returns the mapping and whether this call created
    /// the file. Several processes may race here: one creates, all map
    /// the same bytes; the creator is the one to initialise them.
    pub fn open_or_create(name: &str, len: usize) -> io::Result<(Mapping, bool)> {
        let (fd, created) = match open_fd(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) {
            Ok(fd) => (fd, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                (open_fd(name, libc::O_RDWR)?, false)
            }
            Err(e) => return Err(e),
        };
        if size_of_file(&fd)? < len {
            set_len(&fd, len)?;
        }
        map(Some(&fd), len).map(|m| (m, created))
    }

    /// An anonymous shared mapping of `len` zeroed bytes (threads of one
    /// process, and children forked after it).
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        map(None, len)
    }

    /// Start of the mapping (page-aligned).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least a byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `T` at byte offset `off`.
    ///
    /// # Panics
    ///
    /// If `T` at `off` does not fit in the mapping or `off` is not aligned
    /// for `T`: offsets are the caller's layout, so a bad one is a bug.
    pub fn at<T: AtomicOnly>(&self, off: usize) -> &T {
        let fits = off
            .checked_add(std::mem::size_of::<T>())
            .is_some_and(|end| end <= self.len);
        assert!(
            fits && off.is_multiple_of(std::mem::align_of::<T>()),
            "{} at offset {off} does not fit a mapping of {} bytes",
            std::any::type_name::<T>(),
            self.len
        );
        // SAFETY: in bounds and aligned (the mapping is page-aligned;
        // asserted above); `T: AtomicOnly` is valid for any bytes and only
        // accessed atomically; the reference borrows `self`, so the range
        // stays mapped while it lives.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<T>() }
    }
}

fn map(fd: Option<&OwnedFd>, len: usize) -> io::Result<Mapping> {
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
    }
    let (flags, raw) = match fd {
        Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing, so
    // nothing of ours is replaced; `raw` is open (or -1 with
    // MAP_ANONYMOUS). The mapping stays valid after the descriptor closes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw,
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
        // SAFETY: exactly the range we mapped, unmapped once; every
        // reference `at` gave out borrowed `self` and has ended.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Removes a segment's name (mappings of it stay valid).
pub fn unlink(name: &str) -> io::Result<()> {
    let path = path_of(name)?;
    // SAFETY: `path` is a valid NUL-terminated string.
    crate::syscall!(unsafe { libc::unlink(path.as_ptr()) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A name no other test (or test run) uses, removed when dropped.
    struct Name(String);

    impl Name {
        fn new(tag: &str) -> Name {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            Name(format!("afmesh-sys-test.{tag}.{}.{n}", std::process::id()))
        }
    }

    impl Drop for Name {
        fn drop(&mut self) {
            let _ = unlink(&self.0);
        }
    }

    #[test]
    fn create_then_open_share_the_bytes() {
        let name = Name::new("roundtrip");
        let a = Mapping::create(&name.0, 8192).unwrap();
        assert_eq!(a.len(), 8192);
        let b = Mapping::open(&name.0).unwrap();
        assert_eq!(b.len(), 8192, "open maps the whole file");
        assert_ne!(a.ptr(), b.ptr(), "two mappings of one file");
        // SAFETY: both mappings are 8192 bytes long; no one else uses them.
        unsafe {
            assert_eq!(*b.ptr().add(4000), 0, "created zeroed");
            a.ptr().add(4000).write(0xa5);
            assert_eq!(*b.ptr().add(4000), 0xa5);
        }
        a.at::<AtomicU64>(8).store(7, Ordering::Release);
        assert_eq!(b.at::<AtomicU64>(8).load(Ordering::Acquire), 7);
        assert_eq!(
            Mapping::create(&name.0, 8192).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists,
            "create is exclusive"
        );
        unlink(&name.0).unwrap();
        assert_eq!(
            Mapping::open(&name.0).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // Mappings outlive the name.
        assert_eq!(a.at::<AtomicU64>(8).load(Ordering::Acquire), 7);
    }

    #[test]
    fn open_or_create_creates_once_and_grows() {
        let name = Name::new("ooc");
        let (a, created) = Mapping::open_or_create(&name.0, 4096).unwrap();
        assert!(created);
        a.at::<AtomicU32>(0).store(42, Ordering::Release);
        let (b, created) = Mapping::open_or_create(&name.0, 4096).unwrap();
        assert!(!created);
        assert_eq!(b.at::<AtomicU32>(0).load(Ordering::Acquire), 42);
        let (c, created) = Mapping::open_or_create(&name.0, 16384).unwrap();
        assert!(!created);
        assert_eq!(c.len(), 16384);
        assert_eq!(Mapping::open(&name.0).unwrap().len(), 16384, "file grew");
        let (d, _) = Mapping::open_or_create(&name.0, 4096).unwrap();
        assert_eq!(d.len(), 4096, "maps what was asked");
        assert_eq!(
            Mapping::open(&name.0).unwrap().len(),
            16384,
            "never shrinks"
        );
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        for bad in ["", "a/b", "../x", "nul\0byte", &"x".repeat(201)] {
            assert_eq!(
                Mapping::create(bad, 4096).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
        let name = Name::new("empty");
        assert_eq!(
            Mapping::create(&name.0, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            Mapping::open(&name.0).unwrap_err().kind(),
            io::ErrorKind::NotFound,
            "a failed create leaves no name behind"
        );
        assert!(Mapping::anonymous(0).is_err());
    }

    #[test]
    fn anonymous_mappings_are_zeroed_and_shared_by_threads() {
        let m = std::sync::Arc::new(Mapping::anonymous(4096).unwrap());
        assert!(!m.is_empty());
        assert_eq!(
            m.at::<[AtomicU32; 1024]>(0)[1023].load(Ordering::Relaxed),
            0
        );
        let m2 = m.clone();
        std::thread::spawn(move || m2.at::<AtomicU32>(4092).store(9, Ordering::Release))
            .join()
            .unwrap();
        assert_eq!(m.at::<AtomicU32>(4092).load(Ordering::Acquire), 9);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn at_past_the_end_panics() {
        Mapping::anonymous(4096).unwrap().at::<AtomicU64>(4090);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn at_misaligned_panics() {
        Mapping::anonymous(4096).unwrap().at::<AtomicU32>(2);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn at_overflowing_offset_panics() {
        Mapping::anonymous(4096).unwrap().at::<AtomicU8>(usize::MAX);
    }
}
