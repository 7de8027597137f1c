//! CUDA: the driver loaded at run time, and the few objects afmesh builds
//! on it (a device's primary context, device allocations, streams,
//! events, IPC handles, dma-buf handles).
//!
//! Every function here first loads the driver ([`driver::driver`]); where
//! CUDA is not usable it returns [`Error::Unsupported`] naming CUDA, so a
//! host without a GPU runs everything else and gets a clear error for a
//! device request. Calls that take a context make the device's primary
//! context current on the calling thread first (cheap: a thread-local
//! store in the driver), so a rank may be driven from any thread.

pub mod driver;
pub mod floor;

use std::ffi::c_void;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

pub use driver::CuStream;
pub use driver::{available, driver, CuIpcMemHandle};
use driver::{check, CuContext, CuDevice, CuDevicePtr, CuEvent};

use crate::error::{Error, Result};

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
        // SAFETY: valid out-pointer and a device handle from cuDeviceGet.
        check(unsafe { (d.primary_ctx_retain)(&mut ctx, dev) }, || {
            format!("cuDevicePrimaryCtxRetain({ordinal})")
        })?;
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

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        let d = driver()?;
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

/// A stream of a device, destroyed on drop.
#[derive(Debug)]
pub struct Stream {
    raw: usize,
    device: Device,
}

// SAFETY: a CUstream handle may be used from any thread once its context
// is current there (every use binds it first).
unsafe impl Send for Stream {}

impl Stream {
    /// A new non-blocking stream on `device`.
    pub fn new(device: &Device) -> Result<Stream> {
        Stream::with_flags(device, driver::CU_STREAM_NON_BLOCKING)
    }

    /// A new blocking stream on `device`: its work waits for what was
    /// enqueued before on the legacy default stream.
    pub fn blocking(device: &Device) -> Result<Stream> {
        Stream::with_flags(device, 0)
    }

    fn with_flags(device: &Device, flags: u32) -> Result<Stream> {
        let d = driver()?;
        device.bind()?;
        let mut s: CuStream = std::ptr::null_mut();
        check(
            // SAFETY: valid out-pointer; the context is current.
            unsafe { (d.stream_create)(&mut s, flags) },
            || "cuStreamCreate".into(),
        )?;
        Ok(Stream {
            raw: s as usize,
            device: *device,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> CuStream {
        self.raw as CuStream
    }

    /// Enqueues a copy of `n` bytes from `src` to `dst` (unified
    /// addresses; device to device goes over the copy engines).
    ///
    /// # Safety
    /// Both ranges must stay valid until the copy has completed on the
    /// stream (an event recorded after it completes).
    pub unsafe fn copy_async(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        let d = driver()?;
        // SAFETY: the caller's contract.
        check(unsafe { (d.memcpy_async)(dst, src, n, self.raw()) }, || {
            format!("cuMemcpyAsync({n} bytes)")
        })
    }

    /// Enqueues a peer copy (`cuMemcpyPeerAsync`) from `src` on device
    /// `from` to `dst` on device `to`.
    ///
    /// # Safety
    /// As for [`Stream::copy_async`].
    pub unsafe fn copy_peer_async(
        &self,
        dst: u64,
        to: &Device,
        src: u64,
        from: &Device,
        n: usize,
    ) -> Result<()> {
        let d = driver()?;
        check(
            // SAFETY: the caller's contract; contexts are retained primaries.
            unsafe { (d.memcpy_peer_async)(dst, to.ctx(), src, from.ctx(), n, self.raw()) },
            || format!("cuMemcpyPeerAsync({n} bytes)"),
        )
    }

    /// Makes later work on this stream wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<()> {
        let d = driver()?;
        check(
            // SAFETY: live handles.
            unsafe { (d.stream_wait_event)(self.raw(), event.raw(), 0) },
            || "cuStreamWaitEvent".into(),
        )
    }

    /// Blocks until all work on the stream is done.
    pub fn synchronize(&self) -> Result<()> {
        let d = driver()?;
        self.device.bind()?;
        // SAFETY: a live stream.
        check(unsafe { (d.stream_synchronize)(self.raw()) }, || {
            "cuStreamSynchronize".into()
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: our stream, destroyed once.
            let _ = unsafe { (d.stream_destroy)(self.raw()) };
        }
    }
}

/// An event (without timing unless asked), destroyed on drop.
#[derive(Debug)]
pub struct Event {
    raw: usize,
    device: Device,
}

// SAFETY: as for `Stream`.
unsafe impl Send for Event {}

impl Event {
    /// A new event on `device`; `timing` for [`Event::elapsed_ms`].
    pub fn new(device: &Device, timing: bool) -> Result<Event> {
        let d = driver()?;
        device.bind()?;
        let mut e: CuEvent = std::ptr::null_mut();
        let flags = if timing {
            driver::CU_EVENT_DEFAULT
        } else {
            driver::CU_EVENT_DISABLE_TIMING
        };
        // SAFETY: valid out-pointer; context current.
        check(unsafe { (d.event_create)(&mut e, flags) }, || {
            "cuEventCreate".into()
        })?;
        Ok(Event {
            raw: e as usize,
            device: *device,
        })
    }

    /// The raw handle.
    pub fn raw(&self) -> CuEvent {
        self.raw as CuEvent
    }

    /// Records the event at the current end of `stream` (raw handle, so a
    /// caller's stream works too).
    ///
    /// # Safety
    /// `stream` must be a live stream of this event's device (or null, the
    /// legacy default stream).
    pub unsafe fn record_raw(&self, stream: CuStream) -> Result<()> {
        let d = driver()?;
        // SAFETY: a live event; the caller's contract covers `stream`.
        check(unsafe { (d.event_record)(self.raw(), stream) }, || {
            "cuEventRecord".into()
        })
    }

    /// Records the event on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: `stream` is a live stream we own.
        unsafe { self.record_raw(stream.raw()) }
    }

    /// Whether the work before the record has completed; an error if it
    /// failed.
    pub fn done(&self) -> Result<bool> {
        let d = driver()?;
        // SAFETY: a live event.
        let rc = unsafe { (d.event_query)(self.raw()) };
        if rc == driver::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(rc, || "cuEventQuery".into())?;
        Ok(true)
    }

    /// Blocks until the event completes.
    pub fn synchronize(&self) -> Result<()> {
        let d = driver()?;
        self.device.bind()?;
        // SAFETY: a live event.
        check(unsafe { (d.event_synchronize)(self.raw()) }, || {
            "cuEventSynchronize".into()
        })
    }

    /// Milliseconds between `start` and this event (both timing events).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        let d = driver()?;
        let mut ms = 0f32;
        check(
            // SAFETY: live events and a valid out-pointer.
            unsafe { (d.event_elapsed_time)(&mut ms, start.raw(), self.raw()) },
            || "cuEventElapsedTime".into(),
        )?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            let _ = self.device.bind();
            // SAFETY: our event, destroyed once.
            let _ = unsafe { (d.event_destroy)(self.raw()) };
        }
    }
}

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

#[cfg(test)]
mod tests {
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
