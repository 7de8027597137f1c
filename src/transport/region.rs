//! Registered memory regions.
//!
//! A region is a fixed run of bytes, 64-byte aligned when the library
//! allocates it, that peers write into through a transport (a receive
//! region) or that this rank posts writes from (a send region). Every
//! access through this type is bounds-checked first: a bad offset or length
//! is an error, never an access outside the region.
//!
//! Soundness: bytes that a peer may be writing are never handed out as a
//! Rust reference. The transports move bytes with raw-pointer copies and
//! system calls ([`Region::write_gather`], [`Region::copy_to`],
//! [`Region::read_fd`]); the engine reads headers with explicit volatile
//! loads ([`Region::load_line`], or the copy-out [`Region::copy_out`] where
//! a line does not serve). Shared views ([`Region::slice`]) are made
//! only over bytes the protocol has handed to this rank and that no writer
//! touches while the view lives: a gathered batch until it is responded to,
//! a completed combine until it is released, this rank's own send memory.
//! A peer that breaks the protocol can still change such bytes, exactly as
//! with RDMA; the caller then sees wrong numbers, and the next header check
//! rejects the peer's message.

use std::alloc::{self, Layout};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use super::shm::sys::Mapping;
use super::MemoryKind;

mod device;
mod huge;
#[cfg(test)]
pub(crate) use huge::huge_bytes_at;
pub use huge::HugePages;

/// Alignment of library-allocated regions: a cache line, and what GPUs and
/// NICs like for DMA.
pub const REGION_ALIGN: usize = 64;

enum Owner {
    /// Allocated here with this layout.
    Heap(Layout),
    /// A `Vec<u8>` the caller handed over (what rebuilds it: its pointer,
    /// length and capacity; the region may be a part of it).
    Vec {
        base: NonNull<u8>,
        len: usize,
        capacity: usize,
    },
    /// Memory the caller owns and keeps valid (`from_raw_parts`).
    Borrowed,
    /// Part of a shared mapping, kept alive by this reference.
    Mapped(#[allow(dead_code)] Arc<Mapping>),
    /// No allocation (zero-length region).
    Empty,
    /// A device allocation the library made (freed with it).
    Device(#[allow(dead_code)] crate::cuda::DeviceMemory),
    /// Device memory the caller owns and keeps valid.
    DeviceBorrowed,
}

/// Memory that peers may write into. Shared between the owner and the
/// transport through `Arc<Region>`.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    owner: Owner,
    kind: MemoryKind,
    /// Device send memory: a pinned host copy of what the library wrote
    /// into it (headers, side blocks), staged from there.
    shadow: Option<crate::cuda::Pinned>,
    /// Device send memory: the stream its fills are enqueued on (blocking:
    /// ordered with the legacy default stream, not with the link streams).
    fill: Option<crate::cuda::Stream>,
    /// Device receive memory: a host region of the same layout that peers
    /// write each message's header into as well (the cuda backend's), so
    /// headers are read without a device copy.
    mirror: std::sync::OnceLock<Arc<Region>>,
}

// SAFETY: a `Region` owns its allocation; all access goes through raw
// pointers with bounds checks, and concurrent writers and readers of the same
// bytes are excluded by the protocol (see the module docs), as with DMA.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: `&Region` only allows bounds-checked copies in and
// out and read-only views, and the stage protocol keeps writers off the bytes
// a view covers.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl Region {
    /// A zeroed region of `len` bytes, aligned to [`REGION_ALIGN`].
    pub fn alloc(len: usize) -> Result<Region, String> {
        if len == 0 {
            return Ok(Region {
                ptr: NonNull::dangling(),
                len: 0,
                owner: Owner::Empty,
                kind: MemoryKind::Host,
                shadow: None,
                fill: None,
                mirror: std::sync::OnceLock::new(),
            });
        }
        let layout = Layout::from_size_align(len, REGION_ALIGN)
            .map_err(|e| format!("region of {len} bytes: {e}"))?;
        // SAFETY: `layout` has non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or_else(|| format!("out of memory allocating {len} bytes"))?;
        Ok(Region {
            ptr,
            len,
            owner: Owner::Heap(layout),
            kind: MemoryKind::Host,
            shadow: None,
            fill: None,
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Caller memory: the region takes the vector over (its length is the
    /// region's length) and frees it when dropped.
    pub fn from_vec(v: Vec<u8>) -> Region {
        let len = v.len();
        Region::vec_part(v, 0, len)
    }

    /// Caller memory: `len` bytes at `offset` of `v`, which the region takes
    /// over and frees when dropped. This is how safe code places a region
    /// at an alignment of its choice, e.g. caller receive memory on huge
    /// pages ([`Region::huge_page_size`]): allocate `len + align` bytes,
    /// start at the first aligned address inside.
    pub fn from_vec_part(v: Vec<u8>, offset: usize, len: usize) -> Result<Region, String> {
        if offset.checked_add(len).is_none_or(|end| end > v.len()) {
            return Err(format!(
                "part {offset}+{len} outside the caller's vector of {} bytes",
                v.len()
            ));
        }
        Ok(Region::vec_part(v, offset, len))
    }

    /// `from_vec_part` once the part is known to lie inside `v`.
    fn vec_part(v: Vec<u8>, offset: usize, len: usize) -> Region {
        debug_assert!(offset + len <= v.len());
        let mut v = std::mem::ManuallyDrop::new(v);
        let (whole, capacity) = (v.len(), v.capacity());
        if capacity == 0 {
            return Region {
                ptr: NonNull::dangling(),
                len: 0,
                owner: Owner::Empty,
                kind: MemoryKind::Host,
                shadow: None,
                fill: None,
                mirror: std::sync::OnceLock::new(),
            };
        }
        // Vec's pointer is non-null whenever capacity > 0.
        let base = NonNull::new(v.as_mut_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: `offset + len <= v.len()` (the callers' precondition): the
        // part lies inside the vector's allocation.
        let ptr = unsafe { base.add(offset) };
        Region {
            ptr,
            len,
            owner: Owner::Vec {
                base,
                len: whole,
                capacity,
            },
            kind: MemoryKind::Host,
            shadow: None,
            fill: None,
            mirror: std::sync::OnceLock::new(),
        }
    }

    /// Caller memory that the caller keeps alive and does not otherwise
    /// touch while peers may write it (the C ABI's caller buffers).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, and stay
    /// valid and unused by the caller except through this region until the
    /// region (and every rank and batch holding it) is dropped.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Result<Region, String> {
        match NonNull::new(ptr) {
            None if len == 0 => Ok(Region {
                ptr: NonNull::dangling(),
                len: 0,
                owner: Owner::Empty,
                kind: MemoryKind::Host,
                shadow: None,
                fill: None,
                mirror: std::sync::OnceLock::new(),
            }),
            None => Err("caller memory pointer is NULL".into()),
            Some(ptr) => Ok(Region {
                ptr,
                len,
                owner: Owner::Borrowed,
                kind: MemoryKind::Host,
                shadow: None,
                fill: None,
                mirror: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Whether the bytes live on a device (the CPU must not dereference
    /// them; every access goes through a CUDA copy).
    pub(crate) fn on_device(&self) -> bool {
        matches!(self.owner, Owner::Device(_) | Owner::DeviceBorrowed)
    }

    fn device(&self) -> i32 {
        match self.kind {
            MemoryKind::Cuda { device } => device,
            MemoryKind::Host => 0,
        }
    }

    /// `len` bytes at `offset` of a shared mapping (a shm segment's region).
    pub(crate) fn from_mapping(
        map: Arc<Mapping>,
        offset: usize,
        len: usize,
    ) -> Result<Region, String> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len() && len > 0 => {}
            _ => {
                return Err(format!(
                    "region {offset}+{len} outside mapping of {} bytes",
                    map.len()
                ))
            }
        }
        // SAFETY: `offset` is inside the mapping (checked above).
        let p = unsafe { map.ptr().add(offset) };
        Ok(Region {
            ptr: NonNull::new(p).ok_or("null mapping")?,
            len,
            owner: Owner::Mapped(map),
            kind: MemoryKind::Host,
            shadow: None,
            fill: None,
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Whether the region lies inside `map`.
    pub(crate) fn is_in(&self, map: &Mapping) -> bool {
        let (a, b) = (map.ptr() as usize, map.ptr() as usize + map.len());
        let p = self.ptr.as_ptr() as usize;
        p >= a && p + self.len <= b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address (for transports that register it with hardware).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Checks that `[offset, offset + len)` lies inside the region.
    pub fn check(&self, offset: u64, len: u64) -> Result<(usize, usize), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok((offset as usize, len as usize)),
            _ => Err(format!(
                "write of {len} bytes at offset {offset} outside region of {} bytes",
                self.len
            )),
        }
    }

    /// Copies the concatenation of `srcs` to `offset`, after checking bounds.
    pub fn write_gather(&self, offset: u64, srcs: &[&[u8]]) -> Result<(), String> {
        let total: u64 = srcs.iter().map(|s| s.len() as u64).sum();
        let (mut at, _) = self.check(offset, total)?;
        if self.on_device() {
            for s in srcs {
                // SAFETY: `[at, at + s.len())` is inside the device
                // allocation (checked above), which lives as long as `self`.
                unsafe { crate::cuda::copy_to_device(self.device(), self.addr() + at as u64, s) }
                    .map_err(|e| e.to_string())?;
                at += s.len();
            }
            return Ok(());
        }
        for s in srcs {
            // SAFETY: `check` proved `[offset, offset + total)` is inside the
            // allocation, and `at + s.len()` stays within it; `s` is a
            // distinct borrow that cannot overlap memory we own exclusively
            // through raw pointers.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), self.ptr.as_ptr().add(at), s.len());
            }
            at += s.len();
        }
        Ok(())
    }

    /// The 64 bytes at `offset` of host memory, read with eight volatile
    /// 8-byte loads: a message header, which a replay may be landing on
    /// while it is read. `None` when they are not inside the region, not
    /// 8-byte aligned, or on a device ([`Region::copy_out`] serves those).
    #[inline]
    pub(crate) fn load_line(&self, offset: usize) -> Option<[u8; 64]> {
        if offset.checked_add(64)? > self.len || self.on_device() {
            return None;
        }
        let base = self.ptr.as_ptr().wrapping_add(offset);
        if !(base as usize).is_multiple_of(8) {
            return None;
        }
        let mut out = [0u8; 64];
        for (i, o) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: `[offset + 8i, offset + 8i + 8)` is inside the host
            // allocation (checked above) and 8-byte aligned; a volatile read
            // of shared memory yields some u64 whatever a writer does.
            let w = unsafe { std::ptr::read_volatile(base.add(i * 8).cast::<u64>()) };
            o.copy_from_slice(&w.to_ne_bytes());
        }
        Some(out)
    }

    /// Copies `out.len()` bytes at `offset` out of the region with volatile
    /// reads, for bytes a peer may still be writing (message headers).
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<(), String> {
        let (at, n) = self.check(offset as u64, out.len() as u64)?;
        if self.on_device() {
            // SAFETY: the range is inside the device allocation (checked
            // above), which lives as long as `self`.
            return unsafe {
                crate::cuda::copy_from_device(self.device(), out, self.addr() + at as u64)
            }
            .map_err(|e| e.to_string());
        }
        let base = self.ptr.as_ptr().wrapping_add(at);
        let mut i = 0;
        if (base as usize).is_multiple_of(8) {
            // Word by word where aligned (headers are 64-byte aligned).
            while i + 8 <= n {
                // SAFETY: `[at + i, at + i + 8)` is inside the allocation
                // (checked above) and 8-byte aligned; a volatile read of
                // shared memory yields some u64 whatever a writer does.
                let w = unsafe { std::ptr::read_volatile(base.add(i).cast::<u64>()) };
                out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            }
        }
        while i < n {
            // SAFETY: `at + i` is inside the allocation (checked above); a
            // volatile byte read of shared memory yields some `u8`.
            out[i] = unsafe { std::ptr::read_volatile(base.add(i)) };
            i += 1;
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` of this region to `dst_offset` of
    /// `dst` (the in-process transports' "wire"), after checking both.
    pub fn copy_to(
        &self,
        offset: u64,
        len: u64,
        dst: &Region,
        dst_offset: u64,
    ) -> Result<(), String> {
        let (from, n) = self.check(offset, len)?;
        let (to, _) = dst.check(dst_offset, len)?;
        if n == 0 {
            return Ok(());
        }
        if self.on_device() || dst.on_device() {
            let device = if self.on_device() {
                self.device()
            } else {
                dst.device()
            };
            // SAFETY: both ranges are inside their allocations (checked
            // above), which the driver knows (unified addressing).
            return unsafe {
                crate::cuda::copy(device, dst.addr() + to as u64, self.addr() + from as u64, n)
            }
            .map_err(|e| e.to_string());
        }
        // SAFETY: both ranges are inside their allocations (checked above);
        // `copy` allows them to overlap (a region copying into itself).
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(from), dst.ptr.as_ptr().add(to), n) };
        Ok(())
    }

    /// One `read(2)` from `fd` into `[offset, offset + len)`, straight into
    /// the region (no staging buffer). Returns the bytes read (0 at EOF).
    /// A range outside the region is `InvalidInput`, before any read.
    pub fn read_fd(&self, offset: u64, len: u64, fd: RawFd) -> std::io::Result<usize> {
        let (at, n) = self
            .check(offset, len)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if n == 0 {
            return Ok(0);
        }
        if self.on_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("a socket cannot read into {}", self.kind),
            ));
        }
        // SAFETY: the destination range is inside the allocation (checked
        // above); the kernel writes at most `n` bytes there, and no Rust
        // reference to those bytes exists while it does (module docs).
        let r = unsafe { libc::read(fd, self.ptr.as_ptr().add(at).cast(), n) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// One `readv(2)` from `fd`: up to `len` bytes straight into
    /// `[offset, offset + len)`, and what follows them on the stream into
    /// `spill` (a stream reader's next frame header). Returns the bytes
    /// read, the region's first (0 at EOF). A range outside the region is
    /// `InvalidInput`, before any read.
    pub fn read_fd_spill(
        &self,
        offset: u64,
        len: u64,
        fd: RawFd,
        spill: &mut [u8],
    ) -> std::io::Result<usize> {
        let (at, n) = self
            .check(offset, len)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if self.on_device() && n > 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("a socket cannot read into {}", self.kind),
            ));
        }
        let iov = [
            libc::iovec {
                iov_base: self.ptr.as_ptr().wrapping_add(at).cast(),
                iov_len: n,
            },
            libc::iovec {
                iov_base: spill.as_mut_ptr().cast(),
                iov_len: spill.len(),
            },
        ];
        // SAFETY: the first range is inside the allocation (checked above;
        // empty when `n` is 0) and no Rust reference to those bytes exists
        // while the kernel writes them (module docs); the second is `spill`,
        // borrowed mutably for the call. The kernel writes at most each
        // iovec's length into it.
        let r = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// What memory this is.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// The address of `[offset, offset + len)` (a device address for device
    /// memory), after checking that the range lies inside.
    pub fn addr_of(&self, offset: usize, len: usize) -> Result<u64, String> {
        let (at, _) = self.check(offset as u64, len as u64)?;
        Ok(self.addr() + at as u64)
    }

    /// A read-only view of `[offset, offset + len)`: only for bytes that no
    /// writer touches while the view lives (module docs).
    pub fn slice(&self, offset: usize, len: usize) -> Result<&[u8], String> {
        let (at, n) = self.check(offset as u64, len as u64)?;
        if n == 0 {
            return Ok(&[]);
        }
        // By kind, not by where the bytes are: memory standing in for a
        // GPU's behaves as the GPU's would.
        if self.kind != MemoryKind::Host {
            return Err(format!(
                "{} has no host view: use its device address, or copy it out",
                self.kind
            ));
        }
        // SAFETY: the range is inside the allocation (checked above) and
        // lives as long as `&self`; callers view only bytes that the stage
        // protocol keeps writers off while the view lives (module docs).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), n) })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.owner {
            // SAFETY: allocated by `alloc_zeroed` with exactly this layout.
            Owner::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            Owner::Vec {
                base,
                len,
                capacity,
            } => {
                // SAFETY: pointer, length and capacity came from a `Vec<u8>`
                // that `from_vec_part` took over and never freed.
                drop(unsafe { Vec::from_raw_parts(base.as_ptr(), len, capacity) });
            }
            Owner::Mapped(_)
            | Owner::Borrowed
            | Owner::Empty
            | Owner::Device(_)
            | Owner::DeviceBorrowed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_line_is_read_whole_or_not_at_all() {
        let r = Region::alloc(256).unwrap();
        let bytes: Vec<u8> = (0..=255).collect();
        r.write_gather(0, &[&bytes]).unwrap();
        let mut h = [0u8; 64];
        r.copy_out(64, &mut h).unwrap();
        assert_eq!(r.load_line(64), Some(h));
        assert_eq!(r.load_line(192).map(|l| l[63]), Some(255));
        // Past the end, unaligned, wrapping, empty: the copy-out serves.
        assert_eq!(r.load_line(193), None);
        assert_eq!(r.load_line(1), None);
        assert_eq!(r.load_line(usize::MAX - 3), None);
        assert_eq!(Region::alloc(0).unwrap().load_line(0), None);
    }

    #[test]
    fn a_part_of_a_vector_is_bounded_and_freed_whole() {
        let v: Vec<u8> = (0..=255).collect();
        let r = Region::from_vec_part(v, 16, 32).unwrap();
        assert_eq!(r.len(), 32);
        assert_eq!(r.slice(0, 2).unwrap(), &[16, 17]);
        assert!(r.write_gather(31, &[&[1, 2]]).is_err());
        drop(r);
        let e = Region::from_vec_part(vec![0u8; 8], 4, 5).unwrap_err();
        assert!(e.contains("outside the caller's vector of 8 bytes"), "{e}");
        assert!(Region::from_vec_part(vec![0u8; 8], usize::MAX, 2).is_err());
        assert!(Region::from_vec_part(Vec::new(), 0, 0).unwrap().is_empty());
    }

    /// Caller memory on huge-page boundaries is moved onto huge pages,
    /// contents kept; what holds no whole huge page, and library memory,
    /// are left alone.
    #[test]
    fn caller_memory_is_advised_onto_huge_pages() {
        let page = Region::huge_page_size();
        if page == 0 {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let v: Vec<u8> = (0..3 * page).map(|i| (i % 251) as u8).collect();
        let start = v.as_ptr() as usize;
        let offset = start.next_multiple_of(page) - start;
        let r = Region::from_vec_part(v, offset, 2 * page).unwrap();
        let got = r.advise_huge_pages();
        assert_eq!((got.page, got.advised), (page, 2 * page), "{got:?}");
        assert!(got.hinted, "{got:?}");
        let pattern = |i: usize| ((offset + i) % 251) as u8;
        assert!(r
            .slice(0, 2 * page)
            .unwrap()
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(i)));
        if got.collapsed {
            let huge = huge_bytes_at(r.addr()).expect("the region's mapping in smaps");
            assert!(
                huge >= 2 * page,
                "{huge} bytes on huge pages, want {}",
                2 * page
            );
        } else {
            eprintln!("MADV_COLLAPSE refused here (kernel older than 6.1?): only hinted");
        }

        let small = Region::from_vec(vec![1u8; page / 2]);
        assert_eq!(small.advise_huge_pages().advised, 0);
        let library = Region::alloc(3 * page).unwrap();
        assert_eq!(library.advise_huge_pages(), HugePages::default());
    }

    #[test]
    fn bounds_are_checked() {
        let r = Region::alloc(100).unwrap();
        assert_eq!(r.addr() % REGION_ALIGN as u64, 0);
        assert!(r.write_gather(90, &[&[1; 10]]).is_ok());
        assert!(r.write_gather(91, &[&[1; 10]]).is_err());
        assert!(r.write_gather(u64::MAX, &[&[1]]).is_err());
        assert!(r.slice(95, 6).is_err());
        assert_eq!(r.slice(90, 10).unwrap(), &[1; 10]);
        r.write_gather(0, &[&[7, 8, 9]]).unwrap();
        assert_eq!(r.slice(0, 3).unwrap(), &[7, 8, 9]);
    }

    #[test]
    fn gather_concatenates_and_vec_round_trips() {
        let r = Region::from_vec(vec![0u8; 8]);
        r.write_gather(1, &[&[1, 2], &[], &[3]]).unwrap();
        assert_eq!(r.slice(0, 8).unwrap(), &[0, 1, 2, 3, 0, 0, 0, 0]);
        let e = Region::alloc(0).unwrap();
        assert!(e.is_empty() && e.slice(0, 0).unwrap().is_empty());
    }
}
