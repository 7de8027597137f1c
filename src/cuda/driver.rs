//! The CUDA driver API, loaded at run time.
//!
//! `libcuda.so.1` is opened with `dlopen` on the first CUDA request and
//! every symbol afmesh calls is resolved then, before any is used. A host
//! without the driver, or with one too old for a symbol we need, gets
//! [`Error::Unsupported`] naming CUDA and what was missing; nothing panics
//! and nothing links against libcuda (`ldd` of the binary and of
//! `libafmesh.so` shows no CUDA). `AFMESH_CUDA_LIBRARY` names another file
//! to open (a test points it at a file that does not exist).
//!
//! Why not `cudarc`: afmesh needs about thirty driver calls. cudarc's
//! bindings are generated for the whole driver API (and, behind features,
//! the runtime, NVRTC, cuBLAS, NCCL ...): tens of thousands of lines that
//! every build compiles, on two-core CI machines, to reach a handful of
//! functions; and its dynamic loader panics on a missing library or symbol,
//! so we would have to probe with our own `dlopen` first anyway. Here the
//! probe *is* the loader: one table of function pointers, filled once.
//! Entry points only newer drivers have (`cuMemGetHandleForAddressRange`,
//! `cuDeviceGetUuid_v2`, `cuStreamWaitValue32_v2`, `cuStreamWriteValue32_v2`,
//! `cuMemHostRegister_v2`) are optional: absent, only their feature is
//! unsupported.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// `CUresult`.
pub type CuResult = c_int;
/// `CUdevice`.
pub type CuDevice = c_int;
/// `CUcontext`.
pub type CuContext = *mut c_void;
/// `CUdeviceptr`.
pub type CuDevicePtr = u64;
/// `CUstream`.
pub type CuStream = *mut c_void;
/// `CUevent`.
pub type CuEvent = *mut c_void;

/// `CUipcMemHandle`: 64 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CuIpcMemHandle {
    /// The handle's bytes.
    pub reserved: [u8; 64],
}

/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CuResult = 0;
/// `CUDA_ERROR_NOT_READY`.
pub const CUDA_ERROR_NOT_READY: CuResult = 600;
/// `CU_STREAM_NON_BLOCKING`.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`.
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_EVENT_DEFAULT`.
pub const CU_EVENT_DEFAULT: c_uint = 0;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
pub const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`.
pub const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: c_int = 2;
/// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
pub const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
/// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`.
pub const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: c_int = 11;
/// `CU_POINTER_ATTRIBUTE_RANGE_SIZE`.
pub const CU_POINTER_ATTRIBUTE_RANGE_SIZE: c_int = 12;
/// `CU_MEMORYTYPE_DEVICE`.
pub const CU_MEMORYTYPE_DEVICE: c_uint = 2;
/// `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`.
pub const CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD: c_int = 1;
/// `CU_STREAM_WAIT_VALUE_GEQ`.
pub const CU_STREAM_WAIT_VALUE_GEQ: c_uint = 0;
/// `CU_MEMHOSTALLOC_DEVICEMAP`.
pub const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 2;
/// `CU_MEMHOSTALLOC_PORTABLE`.
pub const CU_MEMHOSTALLOC_PORTABLE: c_uint = 1;

macro_rules! driver_table {
    (
        required { $($name:ident = $sym:literal : fn($($arg:ty),*);)* }
        optional { $($oname:ident = $osym:literal : fn($($oarg:ty),*);)* }
    ) => {
        /// The driver's entry points afmesh calls (module docs).
        #[allow(missing_docs)]
        pub struct Driver {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> CuResult,)*
            $(pub $oname: Option<unsafe extern "C" fn($($oarg),*) -> CuResult>,)*
        }

        impl Driver {
            fn resolve(lib: *mut c_void, path: &str) -> std::result::Result<Driver, String> {
                Ok(Driver {
                    $($name: {
                        let p = symbol(lib, $sym).ok_or_else(|| {
                            format!("{path} has no {} (driver too old?)", $sym)
                        })?;
                        // SAFETY: `p` is the address of the driver's
                        // exported function of this name, whose C
                        // signature is the one declared here (cuda.h).
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> CuResult>(p) }
                    },)*
                    $($oname: symbol(lib, $osym).map(|p| {
                        // SAFETY: as above, for an entry point newer
                        // drivers have.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($oarg),*) -> CuResult>(p) }
                    }),)*
                })
            }
        }
    };
}

driver_table! {
    required {
        init = "cuInit": fn(c_uint);
        device_get_count = "cuDeviceGetCount": fn(*mut c_int);
        device_get = "cuDeviceGet": fn(*mut CuDevice, c_int);
        device_can_access_peer = "cuDeviceCanAccessPeer": fn(*mut c_int, CuDevice, CuDevice);
        primary_ctx_retain = "cuDevicePrimaryCtxRetain": fn(*mut CuContext, CuDevice);
        ctx_set_current = "cuCtxSetCurrent": fn(CuContext);
        ctx_get_current = "cuCtxGetCurrent": fn(*mut CuContext);
        ctx_enable_peer_access = "cuCtxEnablePeerAccess": fn(CuContext, c_uint);
        mem_alloc = "cuMemAlloc_v2": fn(*mut CuDevicePtr, usize);
        mem_free = "cuMemFree_v2": fn(CuDevicePtr);
        memset_d8 = "cuMemsetD8_v2": fn(CuDevicePtr, u8, usize);
        mem_get_address_range = "cuMemGetAddressRange_v2": fn(*mut CuDevicePtr, *mut usize, CuDevicePtr);
        pointer_get_attribute = "cuPointerGetAttribute": fn(*mut c_void, c_int, CuDevicePtr);
        memcpy = "cuMemcpy": fn(CuDevicePtr, CuDevicePtr, usize);
        memcpy_htod = "cuMemcpyHtoD_v2": fn(CuDevicePtr, *const c_void, usize);
        memcpy_dtoh = "cuMemcpyDtoH_v2": fn(*mut c_void, CuDevicePtr, usize);
        memcpy_async = "cuMemcpyAsync": fn(CuDevicePtr, CuDevicePtr, usize, CuStream);
        memcpy_htod_async = "cuMemcpyHtoDAsync_v2": fn(CuDevicePtr, *const c_void, usize, CuStream);
        memcpy_dtoh_async = "cuMemcpyDtoHAsync_v2": fn(*mut c_void, CuDevicePtr, usize, CuStream);
        memcpy_peer_async = "cuMemcpyPeerAsync": fn(CuDevicePtr, CuContext, CuDevicePtr, CuContext, usize, CuStream);
        ipc_get_mem_handle = "cuIpcGetMemHandle": fn(*mut CuIpcMemHandle, CuDevicePtr);
        ipc_open_mem_handle = "cuIpcOpenMemHandle_v2": fn(*mut CuDevicePtr, CuIpcMemHandle, c_uint);
        ipc_close_mem_handle = "cuIpcCloseMemHandle": fn(CuDevicePtr);
        stream_create = "cuStreamCreate": fn(*mut CuStream, c_uint);
        stream_destroy = "cuStreamDestroy_v2": fn(CuStream);
        stream_synchronize = "cuStreamSynchronize": fn(CuStream);
        stream_query = "cuStreamQuery": fn(CuStream);
        stream_wait_event = "cuStreamWaitEvent": fn(CuStream, CuEvent, c_uint);
        event_create = "cuEventCreate": fn(*mut CuEvent, c_uint);
        event_destroy = "cuEventDestroy_v2": fn(CuEvent);
        event_record = "cuEventRecord": fn(CuEvent, CuStream);
        event_query = "cuEventQuery": fn(CuEvent);
        event_synchronize = "cuEventSynchronize": fn(CuEvent);
        event_elapsed_time = "cuEventElapsedTime": fn(*mut f32, CuEvent, CuEvent);
        mem_host_alloc = "cuMemHostAlloc": fn(*mut *mut c_void, usize, c_uint);
        mem_free_host = "cuMemFreeHost": fn(*mut c_void);
        mem_host_get_device_pointer = "cuMemHostGetDevicePointer_v2": fn(*mut CuDevicePtr, *mut c_void, c_uint);
    }
    optional {
        get_error_name = "cuGetErrorName": fn(CuResult, *mut *const c_char);
        device_get_uuid_v2 = "cuDeviceGetUuid_v2": fn(*mut [u8; 16], CuDevice);
        device_get_uuid = "cuDeviceGetUuid": fn(*mut [u8; 16], CuDevice);
        stream_wait_value32 = "cuStreamWaitValue32_v2": fn(CuStream, CuDevicePtr, u32, c_uint);
        stream_write_value32 = "cuStreamWriteValue32_v2": fn(CuStream, CuDevicePtr, u32, c_uint);
        mem_host_register = "cuMemHostRegister_v2": fn(*mut c_void, usize, c_uint);
        mem_host_unregister = "cuMemHostUnregister": fn(*mut c_void);
        pointer_get_attributes = "cuPointerGetAttributes": fn(c_uint, *mut c_int, *mut *mut c_void, CuDevicePtr);
        mem_get_handle_for_address_range = "cuMemGetHandleForAddressRange": fn(*mut c_void, CuDevicePtr, usize, c_int, u64);
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Driver(libcuda)")
    }
}

fn symbol(lib: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: `lib` is a handle `dlopen` returned and never closed; `c`
    // is a NUL-terminated string that outlives the call.
    let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn dlerror() -> String {
    // SAFETY: `dlerror` returns NULL or a NUL-terminated string valid
    // until the next dl* call on this thread; we copy it at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn load() -> std::result::Result<Driver, String> {
    let path = std::env::var("AFMESH_CUDA_LIBRARY").unwrap_or_else(|_| "libcuda.so.1".into());
    let c = CString::new(path.clone()).map_err(|_| format!("{path:?} holds a NUL byte"))?;
    // SAFETY: `c` is NUL-terminated; loading the NVIDIA driver library runs
    // its initialisers, which is what every CUDA program does.
    let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return Err(format!("{path} could not be loaded: {}", dlerror()));
    }
    let d = Driver::resolve(lib, &path)?;
    // Any helper thread it starts: off a pinned caller's core.
    let rc = super::threads::off_pinned_cpu(|| {
        // SAFETY: `cuInit(0)` is the driver's documented first call; flags 0.
        unsafe { (d.init)(0) }
    });
    if rc != CUDA_SUCCESS {
        return Err(format!(
            "cuInit failed: {} (no GPU or driver usable here)",
            name_of(&d, rc)
        ));
    }
    Ok(d)
}

/// The driver, loaded on first use; [`Error::Unsupported`] naming CUDA
/// where it is not usable here.
pub fn driver() -> Result<&'static Driver> {
    static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Unsupported(format!("CUDA is not available: {e}")))
}

/// Whether the CUDA driver loads and initialises here.
pub fn available() -> bool {
    driver().is_ok()
}

fn name_of(d: &Driver, rc: CuResult) -> String {
    if let Some(f) = d.get_error_name {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: `p` is a valid out-pointer; the driver stores a pointer to
        // a static NUL-terminated string or leaves it NULL.
        if unsafe { f(rc, &mut p) } == CUDA_SUCCESS && !p.is_null() {
            // SAFETY: a static string from the driver (above).
            return unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        }
    }
    format!("CUresult {rc}")
}

/// Turns a driver return code into afmesh's error, naming the call.
pub fn check(rc: CuResult, what: impl FnOnce() -> String) -> Result<()> {
    if rc == CUDA_SUCCESS {
        return Ok(());
    }
    let name = driver()
        .map(|d| name_of(d, rc))
        .unwrap_or_else(|_| format!("CUresult {rc}"));
    Err(Error::io(
        format!("CUDA {}", what()),
        std::io::Error::other(name),
    ))
}
