//! Host-mapped flags a stream can wait on (`cuStreamWaitValue32`).

use super::*;

/// A 32-bit flag in pinned host memory that the device can read
/// (`cuMemHostAlloc` with `DEVICEMAP`): the host writes it, a stream waits
/// on it with [`Stream::wait_value_geq`].
#[derive(Debug)]
pub struct HostFlag {
    host: usize,
    dev: u64,
}

// SAFETY: the flag is written with atomic stores only; the pointer stays
// valid until drop.
unsafe impl Send for HostFlag {}

impl HostFlag {
    /// A new flag, zero, on `device`.
    pub fn new(device: &Device) -> Result<HostFlag> {
        let d = driver()?;
        device.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; 64 bytes (one cache line).
            unsafe { (d.mem_host_alloc)(&mut p, 64, driver::CU_MEMHOSTALLOC_DEVICEMAP) },
            || "cuMemHostAlloc".into(),
        )?;
        let mut dev: CuDevicePtr = 0;
        // SAFETY: `p` is mapped pinned memory just allocated.
        let rc = unsafe { (d.mem_host_get_device_pointer)(&mut dev, p, 0) };
        if let Err(e) = check(rc, || "cuMemHostGetDevicePointer".into()) {
            // SAFETY: allocated above, freed once.
            unsafe { (d.mem_free_host)(p) };
            return Err(e);
        }
        // SAFETY: `p` is 64 writable, aligned bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, 64) };
        Ok(HostFlag {
            host: p as usize,
            dev,
        })
    }

    /// Stores `v` (release), visible to a waiting stream.
    pub fn set(&self, v: u32) {
        // SAFETY: `host` is a live, 4-byte aligned word of ours; only
        // atomics touch it.
        let a = unsafe { &*(self.host as *const std::sync::atomic::AtomicU32) };
        a.store(v, std::sync::atomic::Ordering::Release);
    }

    /// Loads the flag (acquire).
    pub fn get(&self) -> u32 {
        // SAFETY: as in `set`.
        let a = unsafe { &*(self.host as *const std::sync::atomic::AtomicU32) };
        a.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The device-visible address.
    pub fn device_addr(&self) -> u64 {
        self.dev
    }
}

impl Drop for HostFlag {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            // SAFETY: allocated in `new`, freed once.
            let _ = unsafe { (d.mem_free_host)(self.host as *mut c_void) };
        }
    }
}

/// Makes later work on `stream` wait until the 32-bit word at
/// device-visible address `addr` is at least `value` (wrapping compare:
/// `(int32)(*addr - value) >= 0`), without the host waiting
/// (`cuStreamWaitValue32`).
///
/// # Safety
/// `stream` is a live stream (or 0, the legacy default stream) of the
/// current context; `addr` stays readable by the device until the wait is
/// satisfied (a [`HostFlag`] that outlives it).
pub unsafe fn wait_value_geq(stream: CuStream, addr: u64, value: u32) -> Result<()> {
    let d = driver()?;
    let f = d.stream_wait_value32.ok_or_else(|| {
        Error::Unsupported("CUDA: this driver has no cuStreamWaitValue32_v2".into())
    })?;
    check(
        // SAFETY: the caller's contract.
        unsafe { f(stream, addr, value, driver::CU_STREAM_WAIT_VALUE_GEQ) },
        || "cuStreamWaitValue32".into(),
    )
}
