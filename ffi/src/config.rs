//! How a C caller describes a mesh: [`afmesh_config`] (sized and
//! versioned so it can grow), the stage geometry, and the shared body of
//! the constructors that turns them, or the environment, into a joined rank.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use afmesh_core::transport::{PollPolicy, Region};
use afmesh_core::{Error, Mesh, MeshConfig, StageSpec, TransportKind};

use crate::args::{obj_ref, opt_str};
use crate::error::{invalid, Fail};

/// Version of [`afmesh_config`] this library knows.
pub const AFMESH_CONFIG_VERSION: u32 = 1;

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
}

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
pub(crate) unsafe fn config_of(cfg: *const afmesh_config) -> Result<MeshConfig, Fail> {
    // SAFETY: per this function's contract.
    let c = unsafe { obj_ref(cfg, "config") }?;
    if c.version == 0 || c.version > AFMESH_CONFIG_VERSION {
        return Err(invalid(format!(
            "config version {} (this library knows 1..={AFMESH_CONFIG_VERSION}; use AFMESH_CONFIG_INIT)",
            c.version
        )));
    }
    // Every field of version 1 must be there.
    if (c.size as usize) < std::mem::size_of::<afmesh_config>() {
        return Err(invalid(format!(
            "config size {} is smaller than version 1's {} (use AFMESH_CONFIG_INIT)",
            c.size,
            std::mem::size_of::<afmesh_config>()
        )));
    }
    // SAFETY: string fields are NULL or NUL-terminated (contract).
    let scheduler = unsafe { opt_str(c.scheduler, "config.scheduler") }?
        .ok_or_else(|| invalid("config.scheduler is NULL"))?;
    let mut m = MeshConfig::new(scheduler, c.num_attention, c.num_ffn);
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
    Ok(m)
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
    join: impl FnOnce(Mesh, StageSpec, Option<Region>) -> Result<H, Error>,
) -> Result<(), Fail> {
    crate::log::init();
    // Arguments first, then configuration.
    // SAFETY: forwarded contract.
    let spec = spec_of(unsafe { obj_ref(spec, "spec") }?);
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let mesh = match source {
        // SAFETY: forwarded contract.
        Source::Config(cfg) => Mesh::new(unsafe { config_of(cfg) }?),
        Source::Env => Mesh::from_env()?,
    };
    let region = match buffer {
        None => None,
        Some((p, _)) if p.is_null() => return Err(invalid("buffer is NULL")),
        // SAFETY: the caller keeps `buffer` valid for `len` bytes for the
        // life of the handle (the `_with_buffer` contract).
        Some((p, len)) => Some(unsafe { Region::from_raw_parts(p.cast(), len) }.map_err(invalid)?),
    };
    let h = Box::into_raw(Box::new(join(mesh, spec, region)?));
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
    let (cfg, spec) = unsafe { (config_of(cfg)?, obj_ref(spec, "spec")?) };
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
