//! Pinned host memory the GPU reads and writes (staging, mirrors).

use super::*;

/// Pinned host memory (`cuMemHostAlloc`), freed on drop: the staging area
/// of host-to-device copies that must not wait.
#[derive(Debug)]
pub struct Pinned {
    ptr: usize,
    len: usize,
}

// SAFETY: plain memory owned by this value; writes go through
// `stage_to_device`, whose caller orders them.
unsafe impl Send for Pinned {}
// SAFETY: as for `Send`.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// `len` zeroed bytes of pinned host memory.
    pub fn new(device: i32, len: usize) -> Result<Pinned> {
        Pinned::with_flags(device, len, 0)
    }

    fn with_flags(device: i32, len: usize, flags: u32) -> Result<Pinned> {
        Device::get(device)?;
        let d = driver()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; `cuMemHostAlloc` flags.
            unsafe { (d.mem_host_alloc)(&mut p, len.max(1), flags) },
            || format!("cuMemHostAlloc({len} bytes)"),
        )?;
        // SAFETY: `p` is at least `len` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
        Ok(Pinned {
            ptr: p as usize,
            len,
        })
    }

    /// Copies `bytes` to `at` in the pinned buffer, then enqueues their copy
    /// to device address `dst` on `stream` (null: the legacy default
    /// stream), without waiting.
    ///
    /// # Safety
    /// `[dst, dst + bytes.len())` must be device memory that stays
    /// allocated until the copy ran, and `[at, at + bytes.len())` of this
    /// buffer must not be written again before then (the caller's
    /// ordering: a send slot is not refilled before its sends completed).
    pub unsafe fn stage_to_device(
        &self,
        device: i32,
        at: usize,
        bytes: &[u8],
        dst: u64,
        stream: CuStream,
    ) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if at.checked_add(bytes.len()).is_none_or(|e| e > self.len) {
            return Err(Error::invalid(format!(
                "{} bytes at {at} outside a pinned buffer of {}",
                bytes.len(),
                self.len
            )));
        }
        Device::get(device)?;
        let d = driver()?;
        let p = (self.ptr + at) as *mut u8;
        // SAFETY: inside our allocation (checked above); by the caller's
        // contract no copy is still reading these bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
        check(
            // SAFETY: pinned source bytes that stay unchanged until the
            // copy ran (caller's contract), and the caller's device range.
            unsafe { (d.memcpy_htod_async)(dst, p.cast(), bytes.len(), stream) },
            || format!("cuMemcpyHtoDAsync({} bytes)", bytes.len()),
        )
    }
}

impl Pinned {
    /// Copies `bytes` to `at` in the buffer (no device copy).
    ///
    /// # Safety
    /// No copy enqueued from `[at, at + bytes.len())` may still be pending.
    pub unsafe fn write(&self, at: usize, bytes: &[u8]) -> Result<()> {
        if at.checked_add(bytes.len()).is_none_or(|e| e > self.len) {
            return Err(Error::invalid(format!(
                "{} bytes at {at} outside a pinned buffer of {}",
                bytes.len(),
                self.len
            )));
        }
        // SAFETY: inside our allocation (checked above); by the caller's
        // contract no copy is reading these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.ptr + at) as *mut u8, bytes.len())
        };
        Ok(())
    }

    /// Copies `out.len()` bytes at `at` out of the buffer.
    pub fn read(&self, at: usize, out: &mut [u8]) -> Result<()> {
        if at.checked_add(out.len()).is_none_or(|e| e > self.len) {
            return Err(Error::invalid(format!(
                "{} bytes at {at} outside a pinned buffer of {}",
                out.len(),
                self.len
            )));
        }
        // SAFETY: inside our allocation (checked above); writers are the
        // owner's `stage_to_device` calls, which it orders with this read.
        unsafe {
            std::ptr::copy_nonoverlapping((self.ptr + at) as *const u8, out.as_mut_ptr(), out.len())
        };
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            // SAFETY: allocated in `new`, freed once.
            let _ = unsafe { (d.mem_free_host)(self.ptr as *mut c_void) };
        }
    }
}

/// Synchronous copy of device bytes at `src` into `out`.
///
/// # Safety
/// `[src, src + out.len())` must be device memory that stays allocated
/// for the call.
pub unsafe fn copy_from_device(device: i32, out: &mut [u8], src: u64) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    Device::get(device)?;
    let d = driver()?;
    // Small reads (message headers) go through a pinned bounce buffer and
    // a non-blocking stream of this thread: the DMA lands in the buffer
    // directly, and the read waits neither for the default stream nor for
    // this rank's own outgoing copies (which the legacy default stream
    // would wait for). Bytes a peer's copy wrote are complete before its
    // notice came, so any later read sees them.
    const BOUNCE: usize = 4096;
    thread_local! {
        static READER: std::cell::RefCell<Vec<(i32, Pinned, Stream)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if out.len() <= BOUNCE {
        let done = READER.with(|r| -> Result<bool> {
            let mut r = r.borrow_mut();
            if !r.iter().any(|(o, _, _)| *o == device) {
                let dev = Device::get(device)?;
                match (
                    Pinned::with_flags(device, BOUNCE, driver::CU_MEMHOSTALLOC_PORTABLE),
                    Stream::new(&dev),
                ) {
                    (Ok(p), Ok(s)) => r.push((device, p, s)),
                    _ => return Ok(false),
                }
            }
            let Some((_, p, stream)) = r.iter().find(|(o, _, _)| *o == device) else {
                return Ok(false);
            };
            check(
                // SAFETY: the caller's contract covers `src`; the bounce
                // buffer has `BOUNCE >= out.len()` bytes and is read only
                // after the stream synchronised below.
                unsafe {
                    (d.memcpy_dtoh_async)(p.ptr as *mut c_void, src, out.len(), stream.raw())
                },
                || format!("cuMemcpyDtoHAsync({} bytes)", out.len()),
            )?;
            // SAFETY: our stream.
            check(unsafe { (d.stream_synchronize)(stream.raw()) }, || {
                "cuStreamSynchronize(reader)".into()
            })?;
            // SAFETY: the copy completed; `out.len()` bytes of the buffer
            // hold it.
            unsafe {
                std::ptr::copy_nonoverlapping(p.ptr as *const u8, out.as_mut_ptr(), out.len())
            };
            Ok(true)
        })?;
        if done {
            return Ok(());
        }
    }
    check(
        // SAFETY: the caller's contract covers `src`; `out` is a live slice.
        unsafe { (d.memcpy_dtoh)(out.as_mut_ptr().cast(), src, out.len()) },
        || format!("cuMemcpyDtoH({} bytes)", out.len()),
    )
}

/// Synchronous copy between two addresses of the unified address space
/// (either may be host or device memory).
///
/// # Safety
/// Both ranges must be valid memory the driver knows, for `n` bytes.
pub unsafe fn copy(device: i32, dst: u64, src: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    Device::get(device)?;
    let d = driver()?;
    // SAFETY: the caller's contract.
    check(unsafe { (d.memcpy)(dst, src, n) }, || {
        format!("cuMemcpy({n} bytes)")
    })?;
    legacy_sync(d)
}
