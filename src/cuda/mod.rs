//! CUDA: the driver loaded at run time, and the few objects afmesh builds
//! on it (a device's primary context, device allocations, streams,
//! events, IPC handles, dma-buf handles).
//!
//! Every function here first loads the driver ([`driver::driver`]); where
//! CUDA is not usable it returns [`Error::Unsupported`] naming CUDA, so a
//! host without a GPU runs everything else and gets a clear error for a
//! device request. Calls that take a context make the device's primary
//! context current on the calling thread first (cheap: a thread-local
//! store in the driver), so a rank may be driven from any thread; it stays
//! current after the call (the thread's previous context is not restored:
//! a caller that drives another context on the same thread makes it
//! current again after calling into afmesh).

pub mod driver;
mod flag;
pub mod floor;
mod hostreg;
mod ipc;
mod pinned;
mod stream;
pub(crate) mod threads;

pub use flag::{wait_value_geq, HostFlag};
pub use hostreg::{write_value32_on, HostRegistration};
pub use ipc::{dmabuf, ipc_handle, DmaBuf, IpcMapping};
pub use pinned::{copy, copy_from_device, Pinned};
pub use stream::{Event, Stream};

use std::ffi::c_void;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

pub use driver::CuStream;
pub use driver::{available, driver, CuIpcMemHandle};
use driver::{check, CuContext, CuDevice, CuDevicePtr, CuEvent};

use crate::error::{Error, Result};

/// Whether `CUDA_DEVICE_MAX_CONNECTIONS` gives this process so few
/// hardware queues (1 or 2) that a stream parked in a stream wait can hold
/// up work on other streams (ARCHITECTURE.md, "Stream waits under one
/// hardware queue": with 1 every later stream stopped, with 2 one of 16).
pub fn few_hardware_queues() -> bool {
    few_queues(std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").ok().as_deref())
}

fn few_queues(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim().parse::<u32>(), Ok(1 | 2)))
}

/// One device: its ordinal and primary context (retained for the life of
/// the process, as the CUDA runtime does).
#[derive(Debug, Clone, Copy)]
pub struct Device {
    ordinal: i32,
    dev: CuDevice,
    ctx: usize,
}

impl Device {
    /// Device `ordinal` (as CUDA numbers the visible devices), its primary
    /// context made current on this thread.
    pub fn get(ordinal: i32) -> Result<Device> {
        static DEVICES: OnceLock<Mutex<Vec<Device>>> = OnceLock::new();
        // Fast path (every slot write and header read comes here): a
        // device seen before, without the lock or the count.
        const FAST: usize = 64;
        static KNOWN: [AtomicU64; FAST] = [const { AtomicU64::new(0) }; FAST];
        if let Some(k) = usize::try_from(ordinal).ok().and_then(|i| KNOWN.get(i)) {
            let v = k.load(Ordering::Acquire);
            if v != 0 {
                let dev = Device {
                    ordinal,
                    dev: (v >> 48) as CuDevice,
                    ctx: (v & ((1 << 48) - 1)) as usize,
                };
                dev.bind()?;
                return Ok(dev);
            }
        }
        let d = driver()?;
        let count = device_count()?;
        if ordinal < 0 || ordinal >= count {
            return Err(Error::invalid(format!(
                "CUDA device {ordinal}: {count} devices are visible"
            )));
        }
        let cache = DEVICES.get_or_init(|| Mutex::new(Vec::new()));
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dev) = cache.iter().find(|x| x.ordinal == ordinal) {
            dev.bind()?;
            return Ok(*dev);
        }
        let mut dev: CuDevice = 0;
        // SAFETY: valid out-pointer; ordinal checked against the count.
        check(unsafe { (d.device_get)(&mut dev, ordinal) }, || {
            format!("cuDeviceGet({ordinal})")
        })?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // The context's helper threads start here: off a pinned caller's
        // core.
        let rc = threads::off_pinned_cpu(|| {
            // SAFETY: valid out-pointer and a device handle from cuDeviceGet.
            unsafe { (d.primary_ctx_retain)(&mut ctx, dev) }
        });
        check(rc, || format!("cuDevicePrimaryCtxRetain({ordinal})"))?;
        let device = Device {
            ordinal,
            dev,
            ctx: ctx as usize,
        };
        device.bind()?;
        cache.push(device);
        // Context pointers are user-space addresses (below 2^48) and device
        // handles small: both fit one word, published once.
        let ctx_bits = device.ctx as u64;
        if ctx_bits < (1 << 48) && (0..1 << 16).contains(&dev) {
            if let Some(k) = usize::try_from(ordinal).ok().and_then(|i| KNOWN.get(i)) {
                k.store(((dev as u64) << 48) | ctx_bits, Ordering::Release);
            }
        }
        Ok(device)
    }

    /// The ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    fn ctx(&self) -> CuContext {
        self.ctx as CuContext
    }

    /// Makes this device's context current on the calling thread; when it
    /// is already (the common case: every post binds) only asks which one
    /// is (`cuCtxGetCurrent` reads the thread's state; `cuCtxSetCurrent`
    /// costs more, with a longer tail).
    pub fn bind(&self) -> Result<()> {
        let d = driver()?;
        let mut cur: CuContext = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        if unsafe { (d.ctx_get_current)(&mut cur) } == driver::CUDA_SUCCESS && cur == self.ctx() {
            return Ok(());
        }
        // SAFETY: a primary context retained in `get` and never released.
        check(unsafe { (d.ctx_set_current)(self.ctx()) }, || {
            "cuCtxSetCurrent".into()
        })
    }

    /// The device's UUID (the same from every process, whatever
    /// `CUDA_VISIBLE_DEVICES` numbers it).
    pub fn uuid(&self) -> Result<[u8; 16]> {
        let d = driver()?;
        let f = d
            .device_get_uuid_v2
            .or(d.device_get_uuid)
            .ok_or_else(|| Error::Unsupported("CUDA: this driver has no cuDeviceGetUuid".into()))?;
        let mut u = [0u8; 16];
        // SAFETY: a 16-byte out-buffer, which is what CUuuid is.
        check(unsafe { f(&mut u, self.dev) }, || "cuDeviceGetUuid".into())?;
        Ok(u)
    }

    /// Whether this device can reach `other`'s memory directly (NVLink or
    /// PCIe peer-to-peer); a device always reaches itself.
    pub fn can_access(&self, other: &Device) -> Result<bool> {
        if other.dev == self.dev {
            return Ok(true);
        }
        let d = driver()?;
        let mut ok = 0;
        check(
            // SAFETY: valid out-pointer and two device handles.
            unsafe { (d.device_can_access_peer)(&mut ok, self.dev, other.dev) },
            || "cuDeviceCanAccessPeer".into(),
        )?;
        Ok(ok != 0)
    }

    /// Lets this device's context reach `other`'s allocations (for plain
    /// peer copies; IPC mappings enable it lazily themselves).
    pub fn enable_peer(&self, other: &Device) -> Result<()> {
        if other.dev == self.dev {
            return Ok(());
        }
        let d = driver()?;
        self.bind()?;
        // SAFETY: a retained primary context; flags 0.
        let rc = unsafe { (d.ctx_enable_peer_access)(other.ctx(), 0) };
        // 704: CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED.
        if rc == 704 {
            return Ok(());
        }
        check(rc, || {
            format!(
                "cuCtxEnablePeerAccess({} -> {})",
                self.ordinal, other.ordinal
            )
        })
    }

    /// Finds the visible device with this UUID.
    pub fn by_uuid(uuid: &[u8; 16]) -> Result<Option<Device>> {
        for i in 0..device_count()? {
            let dev = Device::get(i)?;
            if &dev.uuid()? == uuid {
                return Ok(Some(dev));
            }
        }
        Ok(None)
    }
}

/// Number of visible devices.
pub fn device_count() -> Result<i32> {
    let d = driver()?;
    let mut n = 0;
    // SAFETY: valid out-pointer.
    check(unsafe { (d.device_get_count)(&mut n) }, || {
        "cuDeviceGetCount".into()
    })?;
    Ok(n)
}

/// A device allocation afmesh made (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceMemory {
    ptr: CuDevicePtr,
    len: usize,
    device: Device,
}

impl DeviceMemory {
    /// `len` zeroed bytes on `device` (`len > 0`).
    pub fn alloc(device: i32, len: usize) -> Result<DeviceMemory> {
        let dev = Device::get(device)?;
        let d = driver()?;
        let mut ptr: CuDevicePtr = 0;
        // SAFETY: valid out-pointer; the device's context is current.
        check(unsafe { (d.mem_alloc)(&mut ptr, len.max(1)) }, || {
            format!("cuMemAlloc({len} bytes on device {device})")
        })?;
        let m = DeviceMemory {
            ptr,
            len,
            device: dev,
        };
        // SAFETY: `[ptr, ptr + len)` is the allocation just made.
        check(unsafe { (d.memset_d8)(ptr, 0, len) }, || {
            "cuMemsetD8".into()
        })?;
        Ok(m)
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: an allocation of ours, freed once.
            let _ = unsafe { (d.mem_free)(self.ptr) };
        }
    }
}

/// What the driver says about a pointer the caller gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerInfo {
    /// The device whose memory it is.
    pub device: i32,
    /// Start of the allocation that holds it (caching allocators pack
    /// tensors into larger blocks).
    pub base: u64,
    /// Bytes of that allocation.
    pub size: usize,
}

/// Checks that `[ptr, ptr + len)` is device memory of one allocation and
/// says which device and allocation.
pub fn pointer_info(ptr: u64, len: usize) -> Result<PointerInfo> {
    let d = driver()?;
    if let Some(f) = d.pointer_get_attributes {
        // One driver call instead of three (this runs on every
        // `dispatch_device` and for every output of `respond_device`).
        let (mut mem_type, mut ordinal, mut base, mut size) = (0u32, -1i32, 0u64, 0usize);
        let mut attrs = [
            driver::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            driver::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            driver::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            driver::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut data: [*mut c_void; 4] = [
            (&mut mem_type as *mut u32).cast(),
            (&mut ordinal as *mut i32).cast(),
            (&mut base as *mut u64).cast(),
            (&mut size as *mut usize).cast(),
        ];
        // SAFETY: four attributes, each with an out-pointer of its type
        // (CUmemorytype and int: 32 bits; CUdeviceptr and size_t: 64 bits);
        // an unknown pointer gets zeroes, not an error.
        let rc = unsafe { f(4, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr) };
        if rc != driver::CUDA_SUCCESS || mem_type != driver::CU_MEMORYTYPE_DEVICE || size == 0 {
            return Err(Error::invalid(format!(
                "{ptr:#x} is not CUDA device memory (the driver does not know it as a device allocation)"
            )));
        }
        Device::get(ordinal)?;
        return in_allocation(ptr, len, ordinal, base, size);
    }
    let mut mem_type: u32 = 0;
    // SAFETY: the attribute is a 32-bit CUmemorytype written to a u32.
    let rc = unsafe {
        (d.pointer_get_attribute)(
            (&mut mem_type as *mut u32).cast::<c_void>(),
            driver::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    };
    if rc != driver::CUDA_SUCCESS || mem_type != driver::CU_MEMORYTYPE_DEVICE {
        return Err(Error::invalid(format!(
            "{ptr:#x} is not CUDA device memory (the driver does not know it as a device allocation)"
        )));
    }
    let mut ordinal: i32 = -1;
    check(
        // SAFETY: the attribute is a 32-bit int.
        unsafe {
            (d.pointer_get_attribute)(
                (&mut ordinal as *mut i32).cast::<c_void>(),
                driver::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        },
        || "cuPointerGetAttribute(DEVICE_ORDINAL)".into(),
    )?;
    Device::get(ordinal)?;
    let (mut base, mut size) = (0u64, 0usize);
    check(
        // SAFETY: valid out-pointers; `ptr` is device memory (checked above).
        unsafe { (d.mem_get_address_range)(&mut base, &mut size, ptr) },
        || format!("cuMemGetAddressRange({ptr:#x})"),
    )?;
    in_allocation(ptr, len, ordinal, base, size)
}

fn in_allocation(
    ptr: u64,
    len: usize,
    ordinal: i32,
    base: u64,
    size: usize,
) -> Result<PointerInfo> {
    let end = ptr.checked_add(len as u64);
    if end.is_none_or(|e| e > base + size as u64) {
        return Err(Error::BufferSize {
            what: format!("device buffer at {ptr:#x}: its allocation starts at {base:#x}"),
            need: (ptr - base) as usize + len,
            got: size,
        });
    }
    Ok(PointerInfo {
        device: ordinal,
        base,
        size,
    })
}

/// Synchronous copy of host bytes to device address `dst`.
///
/// # Safety
/// `[dst, dst + src.len())` must be device memory that stays allocated
/// for the call.
pub unsafe fn copy_to_device(device: i32, dst: u64, src: &[u8]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    Device::get(device)?;
    let d = driver()?;
    check(
        // SAFETY: the caller's contract covers `dst`; `src` is a live slice.
        unsafe { (d.memcpy_htod)(dst, src.as_ptr().cast(), src.len()) },
        || format!("cuMemcpyHtoD({} bytes)", src.len()),
    )?;
    legacy_sync(d)
}

/// Waits for the legacy default stream: a pageable host-to-device copy
/// may return before its DMA landed, a device-to-device `cuMemcpy` before
/// it ran, and the library's streams do not wait for that stream.
fn legacy_sync(d: &driver::Driver) -> Result<()> {
    // SAFETY: the null stream is the legacy default stream of the current
    // context (made current by the caller's `Device::get`).
    check(
        unsafe { (d.stream_synchronize)(std::ptr::null_mut()) },
        || "cuStreamSynchronize(default stream)".into(),
    )
}

/// Enqueues a copy of `n` bytes from `src` to `dst` (unified addresses)
/// on `stream` (null: the legacy default stream) and returns without
/// waiting.
///
/// # Safety
/// Both ranges must be device memory the driver knows, for `n` bytes, that
/// stays allocated until the copy ran; `src` must not be overwritten
/// before then by work the legacy default stream does not order.
pub unsafe fn copy_enqueued(
    device: i32,
    dst: u64,
    src: u64,
    n: usize,
    stream: CuStream,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    Device::get(device)?;
    let d = driver()?;
    check(
        // SAFETY: the caller's contract.
        unsafe { (d.memcpy_async)(dst, src, n, stream) },
        || format!("cuMemcpyAsync({n} bytes)"),
    )
}

/// Orders stream `waiter` of `device` after the work enqueued so far on
/// `stream` (a caller's `CUstream`/`cudaStream_t`): an event is recorded on
/// `stream` and `waiter` waits for it. The host does not wait. Not allowed
/// while `stream` is being captured into a CUDA graph (the library's
/// stream cannot join a capture).
///
/// # Safety
/// `stream` must be a live stream of `device`'s primary context, or 0;
/// `waiter` a live stream of it, or null.
pub unsafe fn order_after(device: i32, waiter: CuStream, stream: u64) -> Result<()> {
    static EVENTS: OnceLock<Mutex<Vec<(i32, Event)>>> = OnceLock::new();
    let dev = Device::get(device)?;
    let d = driver()?;
    let events = EVENTS.get_or_init(|| Mutex::new(Vec::new()));
    let mut events = events.lock().unwrap_or_else(|p| p.into_inner());
    if !events.iter().any(|(o, _)| *o == device) {
        events.push((device, Event::new(&dev, false)?));
    }
    let Some((_, e)) = events.iter().find(|(o, _)| *o == device) else {
        return Err(Error::invalid("no ordering event"));
    };
    // SAFETY: the caller's contract covers `stream`.
    unsafe { e.record_raw(stream as usize as CuStream) }?;
    // The wait captures the event as recorded now, so the one event may be
    // recorded again for the next call.
    check(
        // SAFETY: the caller's `waiter` (a live stream or null) and a live
        // event.
        unsafe { (d.stream_wait_event)(waiter, e.raw(), 0) },
        || "cuStreamWaitEvent".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::few_queues;

    #[test]
    fn few_queues_are_1_and_2() {
        assert!(few_queues(Some("1")));
        assert!(few_queues(Some(" 2 ")));
        for v in [
            None,
            Some(""),
            Some("0"),
            Some("4"),
            Some("8"),
            Some("32"),
            Some("x"),
        ] {
            assert!(!few_queues(v), "{v:?}");
        }
    }

    use super::*;

    #[test]
    fn without_a_driver_every_request_is_unsupported_naming_cuda() {
        if available() {
            return; // a GPU host: scripts/gpu-check covers it
        }
        for e in [
            Device::get(0).err(),
            DeviceMemory::alloc(0, 64).err(),
            pointer_info(0x1000, 8).err(),
            dmabuf(0x1000, 8).err(),
        ] {
            match e {
                Some(Error::Unsupported(m)) => assert!(m.contains("CUDA"), "{m}"),
                other => panic!("expected Unsupported naming CUDA, got {other:?}"),
            }
        }
    }
}
