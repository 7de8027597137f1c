//! Sharing device memory: CUDA IPC handles between processes, dma-buf handles for NICs.

use super::*;

/// The IPC handle of the allocation that starts at `base`.
pub fn ipc_handle(device: i32, base: u64) -> Result<CuIpcMemHandle> {
    Device::get(device)?;
    let d = driver()?;
    let mut h = CuIpcMemHandle { reserved: [0; 64] };
    // SAFETY: valid out-pointer; `base` is an allocation's start (the
    // caller found it with `pointer_info`).
    check(unsafe { (d.ipc_get_mem_handle)(&mut h, base) }, || {
        format!("cuIpcGetMemHandle({base:#x})")
    })?;
    Ok(h)
}

/// Another process's allocation, mapped here through its IPC handle;
/// unmapped on drop.
#[derive(Debug)]
pub struct IpcMapping {
    base: u64,
    /// Bytes of the mapped allocation (the driver's, not the peer's word).
    size: u64,
    device: Device,
}

impl IpcMapping {
    /// Maps `handle` into `device`'s context (peer access enabled lazily).
    pub fn open(device: &Device, handle: &CuIpcMemHandle) -> Result<IpcMapping> {
        let d = driver()?;
        device.bind()?;
        let mut base: CuDevicePtr = 0;
        check(
            // SAFETY: valid out-pointer; the handle is 64 bytes by value.
            unsafe {
                (d.ipc_open_mem_handle)(
                    &mut base,
                    *handle,
                    driver::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
                )
            },
            || "cuIpcOpenMemHandle".into(),
        )?;
        let mut m = IpcMapping {
            base,
            size: 0,
            device: *device,
        };
        let (mut start, mut size) = (0u64, 0usize);
        check(
            // SAFETY: valid out-pointers; `base` was just mapped here.
            unsafe { (d.mem_get_address_range)(&mut start, &mut size, base) },
            || format!("cuMemGetAddressRange({base:#x}) of an IPC mapping"),
        )?;
        // The mapping starts at the allocation's base; what lies past
        // `start + size` is not the peer's memory.
        m.size = (start + size as u64).saturating_sub(base);
        Ok(m)
    }

    /// Where the allocation is mapped here.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes mapped from `base` (what the driver says the allocation
    /// holds: a peer's claim about its region is checked against this).
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: a mapping of ours, closed once.
            let _ = unsafe { (d.ipc_close_mem_handle)(self.base) };
        }
    }
}

/// A dma-buf for the device allocation holding `[ptr, ptr + len)`, for
/// registering device memory with a NIC (`ibv_reg_dmabuf_mr`): the
/// allocation's base, the fd, and the offset of `ptr` in the dma-buf.
#[derive(Debug)]
pub struct DmaBuf {
    /// Start of the allocation the dma-buf covers.
    pub base: u64,
    /// Bytes it covers.
    pub len: usize,
    /// Offset of the caller's pointer from `base`.
    pub offset: u64,
    /// The dma-buf file descriptor.
    pub fd: OwnedFd,
}

/// Exports the allocation holding `[ptr, ptr + len)` as a dma-buf
/// (`cuMemGetHandleForAddressRange`). [`Error::Unsupported`] without CUDA
/// or with a driver that lacks the call.
pub fn dmabuf(ptr: u64, len: usize) -> Result<DmaBuf> {
    let info = pointer_info(ptr, len)?;
    let d = driver()?;
    let f = d.mem_get_handle_for_address_range.ok_or_else(|| {
        Error::Unsupported(
            "CUDA: this driver has no cuMemGetHandleForAddressRange (dma-buf)".into(),
        )
    })?;
    let mut fd: i32 = -1;
    check(
        // SAFETY: the handle type DMA_BUF_FD writes an int fd; the range is a
        // whole allocation (from `pointer_info`).
        unsafe {
            f(
                (&mut fd as *mut i32).cast::<c_void>(),
                info.base,
                info.size,
                driver::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        },
        || "cuMemGetHandleForAddressRange(DMA_BUF_FD)".into(),
    )?;
    if fd < 0 {
        return Err(Error::Unsupported(
            "CUDA: cuMemGetHandleForAddressRange gave no dma-buf fd".into(),
        ));
    }
    Ok(DmaBuf {
        base: info.base,
        len: info.size,
        offset: ptr - info.base,
        // SAFETY: a fresh fd the driver handed to us; we own it now.
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
    })
}
