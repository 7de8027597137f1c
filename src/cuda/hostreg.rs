//! Host memory the device writes: an existing mapping (a peer's shared
//! memory segment) registered with the driver (`cuMemHostRegister`,
//! `DEVICEMAP`), and stream-ordered 32-bit stores into it
//! (`cuStreamWriteValue32`).

use super::*;

/// `CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP`.
const REGISTER_FLAGS: u32 = 0x01 | 0x02;

/// A range of host memory registered with the driver (pinned, mapped
/// into every context), unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration {
    base: usize,
    len: usize,
    dev: u64,
}

// SAFETY: a registration record; the memory itself is owned elsewhere.
unsafe impl Send for HostRegistration {}

impl HostRegistration {
    /// Registers the whole pages covering `[addr, addr + len)`.
    /// [`Error::Unsupported`] where the driver lacks the entry points.
    ///
    /// # Safety
    /// The range must be mapped host memory that stays mapped until the
    /// registration is dropped.
    pub unsafe fn new(device: &Device, addr: usize, len: usize) -> Result<HostRegistration> {
        let d = driver()?;
        let (Some(reg), Some(_), Some(_)) = (
            d.mem_host_register,
            d.mem_host_unregister,
            d.stream_write_value32,
        ) else {
            return Err(Error::Unsupported(
                "CUDA: this driver has no cuMemHostRegister_v2 / cuStreamWriteValue32_v2".into(),
            ));
        };
        if len == 0 {
            return Err(Error::invalid("CUDA host registration of 0 bytes"));
        }
        // SAFETY: `sysconf` has no memory effects.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let base = addr - addr % page;
        let end = (addr + len).div_ceil(page) * page;
        device.bind()?;
        check(
            // SAFETY: the caller's contract: mapped for the registration's
            // life; the range is whole pages of that mapping.
            unsafe { reg(base as *mut c_void, end - base, REGISTER_FLAGS) },
            || format!("cuMemHostRegister({} bytes)", end - base),
        )?;
        let mut dev: CuDevicePtr = 0;
        // SAFETY: `base` was registered just above with DEVICEMAP.
        let rc = unsafe { (d.mem_host_get_device_pointer)(&mut dev, base as *mut c_void, 0) };
        let me = HostRegistration {
            base,
            len: end - base,
            dev,
        };
        check(rc, || "cuMemHostGetDevicePointer".into())?;
        Ok(me)
    }

    /// The device address of host address `addr` (inside the range).
    pub fn device_addr(&self, addr: usize) -> Option<u64> {
        (addr >= self.base && addr < self.base + self.len)
            .then(|| self.dev + (addr - self.base) as u64)
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            if let Some(unreg) = d.mem_host_unregister {
                // SAFETY: registered in `new`, unregistered once.
                let _ = unsafe { unreg(self.base as *mut c_void) };
            }
        }
    }
}

impl Stream {
    /// Enqueues a store of `value` to the 32-bit word at device-visible
    /// address `addr` (see [`write_value32_on`]).
    ///
    /// # Safety
    /// As for [`write_value32_on`].
    pub unsafe fn write_value32(&self, addr: u64, value: u32) -> Result<()> {
        // SAFETY: our live stream; the caller's contract covers `addr`.
        unsafe { write_value32_on(self.raw(), addr, value) }
    }
}

/// Enqueues on `stream` a store of `value` to the 32-bit word at
/// device-visible address `addr`, after the work before it on the stream
/// and with a memory barrier: whoever sees the value sees that work's
/// writes (`cuStreamWriteValue32`, default flags).
///
/// # Safety
/// `stream` is a live stream of the current context; `addr` must stay
/// device-writable until the store ran (a [`HostRegistration`] that
/// outlives the stream's work), and nothing may rely on the word's old
/// value after it.
pub unsafe fn write_value32_on(stream: CuStream, addr: u64, value: u32) -> Result<()> {
    let d = driver()?;
    let f = d.stream_write_value32.ok_or_else(|| {
        Error::Unsupported("CUDA: this driver has no cuStreamWriteValue32_v2".into())
    })?;
    check(
        // SAFETY: the caller's contract.
        unsafe { f(stream, addr, value, 0) },
        || "cuStreamWriteValue32".into(),
    )
}
