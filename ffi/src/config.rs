//! How a C caller describes a mesh: [`afmesh_config`] (sized and
//! versioned so it can grow), the stage geometry, and the shared body of
//! the constructors that turns them, or the environment, into a joined rank.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use afmesh_core::transport::{MemoryKind, PollPolicy, Region};
use afmesh_core::{Error, Mesh, MeshConfig, StageLayout, StageSpec, TransportKind};

use crate::args::{obj_ref, opt_str};
use crate::error::{invalid, Fail};

/// Version of [`afmesh_config`] this library knows (2 added
/// `memory_kind` and `device`, 3 `layout`; a config of an older version,
/// of that version's size, still works: host memory, the slots layout).
pub const AFMESH_CONFIG_VERSION: u32 = 3;

/// `afmesh_config.layout`: each attention rank's dispatch in an input
/// slot of its own (header, side block, rows); the default.
pub const AFMESH_LAYOUT_SLOTS: u32 = 0;
/// `afmesh_config.layout`: every stage's dispatched rows form one
/// `[M × max_tokens, row_bytes]` matrix on each FFN rank
/// (`afmesh_batch_matrix`); needs links that deliver in order (tcp, shm,
/// cuda, verbs with `AFMESH_QPS=1`). Every rank must agree.
pub const AFMESH_LAYOUT_MATRIX: u32 = 1;

/// `afmesh_config.memory_kind`: stage buffers in host memory.
pub const AFMESH_MEMORY_HOST: u32 = 0;
/// `afmesh_config.memory_kind`: stage buffers on CUDA device
/// `afmesh_config.device` (library-allocated there, or the `_with_buffer`
/// constructors' buffer is a device pointer of that device).
pub const AFMESH_MEMORY_CUDA: u32 = 1;

/// How a rank joins its mesh. Initialise with `AFMESH_CONFIG_INIT`, then
/// set fields; `size` and `version` let later versions add fields. The
/// strings are copied during the call that reads the config: they need to
/// stay valid only until it returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct afmesh_config {
    /// `sizeof(afmesh_config)`.
    pub size: u32,
    /// `AFMESH_CONFIG_VERSION`.
    pub version: u32,
    /// Rendezvous server, `"host:port"` (required).
    pub scheduler: *const c_char,
    /// Attention ranks M (required).
    pub num_attention: u32,
    /// FFN ranks N (required).
    pub num_ffn: u32,
    /// Preferred rank, or -1 for any.
    pub rank: i32,
    /// Job name, or NULL for `"afmesh"`.
    pub job: *const c_char,
    /// Host identity, or NULL for the hostname.
    pub host_id: *const c_char,
    /// `"auto"`, `"tcp"`, `"shm"` or `"verbs"`, or NULL for auto.
    pub transport: *const c_char,
    /// `"park"`, `"park:<us>"`, `"spin"` or `"block"`, or NULL for park.
    pub poll: *const c_char,
    /// Bound on joining, ms (0: 30000).
    pub setup_timeout_ms: u32,
    /// Bound on one blocking socket write, ms (0: 10000).
    pub io_timeout_ms: u32,
    /// Non-zero: this rank runs the rendezvous server at `scheduler`.
    pub embed_scheduler: u32,
    /// CPU to pin the joining thread to, or -1.
    pub cpu: i32,
    /// Version 2: `AFMESH_MEMORY_HOST` or `AFMESH_MEMORY_CUDA`.
    pub memory_kind: u32,
    /// Version 2: the CUDA device ordinal, for `AFMESH_MEMORY_CUDA`.
    pub device: i32,
    /// Version 3: `AFMESH_LAYOUT_SLOTS` or `AFMESH_LAYOUT_MATRIX`.
    pub layout: u32,
}

/// Bytes of a version 1 [`afmesh_config`] (everything before
/// `memory_kind`).
const CONFIG_V1_SIZE: usize = std::mem::offset_of!(afmesh_config, memory_kind);
/// Bytes of a version 2 [`afmesh_config`] (everything before `layout`).
const CONFIG_V2_SIZE: usize = std::mem::offset_of!(afmesh_config, layout);

/// The stage geometry; every rank of a mesh uses the same one.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct afmesh_stage_spec {
    /// Micro-batches in flight (1..=128).
    pub stages: u32,
    /// Most tokens one attention rank dispatches per stage.
    pub max_tokens: u32,
    /// Bytes of one dispatched row.
    pub row_bytes: u32,
    /// Bytes of one combined row.
    pub out_row_bytes: u32,
    /// Most bytes of the side block.
    pub side_bytes: u32,
}

fn spec_of(s: &afmesh_stage_spec) -> StageSpec {
    StageSpec {
        stages: s.stages,
        max_tokens: s.max_tokens,
        row_bytes: s.row_bytes,
        out_row_bytes: s.out_row_bytes,
        side_bytes: s.side_bytes,
    }
}

/// Reads a caller's config, honouring its declared size.
///
/// # Safety
/// `cfg` is NULL or points to at least `cfg->size` readable bytes whose
/// string fields are NULL or NUL-terminated.
pub(crate) unsafe fn config_of(
    cfg: *const afmesh_config,
) -> Result<(MeshConfig, MemoryKind), Fail> {
    if cfg.is_null() {
        return Err(invalid("config is NULL"));
    }
    // SAFETY: `size` and `version` are the first two fields of every
    // version; the contract gives at least `size` readable bytes, and a
    // config is never smaller than them.
    let (size, version) = unsafe { ((*cfg).size as usize, (*cfg).version) };
    if version == 0 || version > AFMESH_CONFIG_VERSION {
        return Err(invalid(format!(
            "config version {version} (this library knows 1..={AFMESH_CONFIG_VERSION}; use AFMESH_CONFIG_INIT)"
        )));
    }
    // Every field of the declared version must be there.
    let need = match version {
        1 => CONFIG_V1_SIZE,
        2 => CONFIG_V2_SIZE,
        _ => std::mem::size_of::<afmesh_config>(),
    };
    if size < need {
        return Err(invalid(format!(
            "config size {size} is smaller than version {version}'s {need} (use AFMESH_CONFIG_INIT)"
        )));
    }
    // Read only what the caller's version has; later fields stay zero
    // (host memory).
    // SAFETY: all-zero is a valid `afmesh_config` (NULL strings, zeros).
    let mut copy: afmesh_config = unsafe { std::mem::zeroed() };
    // SAFETY: `need` bytes are readable (contract, checked against
    // `size`), and `copy` has room for them (`need <= size_of`).
    unsafe {
        std::ptr::copy_nonoverlapping(
            cfg.cast::<u8>(),
            (&mut copy as *mut afmesh_config).cast::<u8>(),
            need,
        );
    }
    let c = &copy;
    let kind = match (version, c.memory_kind) {
        (1, _) | (_, AFMESH_MEMORY_HOST) => MemoryKind::Host,
        (_, AFMESH_MEMORY_CUDA) if c.device >= 0 => MemoryKind::Cuda { device: c.device },
        (_, AFMESH_MEMORY_CUDA) => {
            return Err(invalid(format!(
                "config.device {} for CUDA memory",
                c.device
            )))
        }
        (_, k) => {
            return Err(invalid(format!(
                "config.memory_kind {k} (AFMESH_MEMORY_HOST or AFMESH_MEMORY_CUDA)"
            )))
        }
    };
    // SAFETY: string fields are NULL or NUL-terminated (contract).
    let scheduler = unsafe { opt_str(c.scheduler, "config.scheduler") }?
        .ok_or_else(|| invalid("config.scheduler is NULL"))?;
    let mut m = MeshConfig::new(scheduler, c.num_attention, c.num_ffn);
    m.layout = match c.layout {
        AFMESH_LAYOUT_SLOTS => StageLayout::Slots,
        AFMESH_LAYOUT_MATRIX => StageLayout::Matrix,
        l => {
            return Err(invalid(format!(
                "config.layout {l} (AFMESH_LAYOUT_SLOTS or AFMESH_LAYOUT_MATRIX)"
            )))
        }
    };
    if c.rank >= 0 {
        m.rank = Some(c.rank as u32);
    }
    // SAFETY: as above.
    if let Some(j) = unsafe { opt_str(c.job, "config.job") }? {
        m.job = j;
    }
    // SAFETY: as above.
    if let Some(h) = unsafe { opt_str(c.host_id, "config.host_id") }? {
        m.host_id = h;
    }
    // SAFETY: as above.
    if let Some(t) = unsafe { opt_str(c.transport, "config.transport") }? {
        m.transport = TransportKind::parse(&t).map_err(Fail::from)?;
    }
    // SAFETY: as above.
    if let Some(p) = unsafe { opt_str(c.poll, "config.poll") }? {
        m.poll = PollPolicy::parse(&p).map_err(Fail::from)?;
    }
    if c.setup_timeout_ms > 0 {
        m.setup_timeout = Duration::from_millis(u64::from(c.setup_timeout_ms));
    }
    if c.io_timeout_ms > 0 {
        m.io_timeout = Duration::from_millis(u64::from(c.io_timeout_ms));
    }
    m.embed_scheduler = c.embed_scheduler != 0;
    if c.cpu >= 0 {
        m.cpu = Some(c.cpu as usize);
    }
    Ok((m, kind))
}

/// Where a rank's stage buffers come from.
pub(crate) enum Buffers {
    /// Library-allocated host memory.
    Library,
    /// Library-allocated on this CUDA device.
    Device(i32),
    /// The caller's buffer (host or device memory).
    Caller(Region),
}

/// Where a constructor's configuration comes from.
pub(crate) enum Source {
    Config(*const afmesh_config),
    Env,
}

/// The shared body of the constructors: config, spec, optional caller
/// buffer, join, box the handle into `*out`.
///
/// # Safety
/// Pointers are NULL or valid as the public constructors document.
pub(crate) unsafe fn construct<H>(
    source: Source,
    spec: *const afmesh_stage_spec,
    buffer: Option<(*mut c_void, usize)>,
    out: *mut *mut H,
    join: impl FnOnce(Mesh, StageSpec, Buffers) -> Result<H, Error>,
) -> Result<(), Fail> {
    crate::log::init();
    // Arguments first, then configuration.
    // SAFETY: forwarded contract.
    let spec = spec_of(unsafe { obj_ref(spec, "spec") }?);
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let (mesh, kind) = match source {
        Source::Config(cfg) => {
            // SAFETY: forwarded contract.
            let (m, k) = unsafe { config_of(cfg) }?;
            (Mesh::new(m), k)
        }
        Source::Env => (Mesh::from_env()?, MemoryKind::Host),
    };
    let buffers = match (buffer, kind) {
        (None, MemoryKind::Host) => Buffers::Library,
        (None, MemoryKind::Cuda { device }) => Buffers::Device(device),
        (Some((p, _)), _) if p.is_null() => return Err(invalid("buffer is NULL")),
        (Some((p, len)), MemoryKind::Host) => Buffers::Caller(
            // SAFETY: the caller keeps `buffer` valid for `len` bytes for
            // the life of the handle (the `_with_buffer` contract).
            unsafe { Region::from_raw_parts(p.cast(), len) }.map_err(invalid)?,
        ),
        (Some((p, len)), MemoryKind::Cuda { device }) => {
            // SAFETY: the caller keeps the device buffer allocated for the
            // life of the handle (the `_with_buffer` contract); the driver
            // is asked what it is before anything uses it.
            let r = unsafe { Region::from_device_ptr(p as u64, len) }?;
            if r.kind() != kind {
                return Err(invalid(format!(
                    "buffer is {} but config.device is {device}",
                    r.kind()
                )));
            }
            Buffers::Caller(r)
        }
    };
    let h = Box::into_raw(Box::new(join(mesh, spec, buffers)?));
    // SAFETY: checked non-NULL.
    unsafe { out.write(h) };
    Ok(())
}

/// # Safety
/// Pointers are NULL or valid.
pub(crate) unsafe fn memory_len(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    out: *mut usize,
    attention: bool,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let ((cfg, _), spec) = unsafe { (config_of(cfg)?, obj_ref(spec, "spec")?) };
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let mesh = Mesh::new(cfg);
    let n = if attention {
        mesh.attention_memory_len(spec_of(spec))?
    } else {
        mesh.ffn_memory_len(spec_of(spec))?
    };
    // SAFETY: checked non-NULL.
    unsafe { out.write(n) };
    Ok(())
}
