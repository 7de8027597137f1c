//! The C ABI of afmesh: `libafmesh.so` / `libafmesh.a` and
//! `include/afmesh.h` (generated from this file by cbindgen).
//!
//! Conventions (after rustls-ffi and NCCL):
//! * opaque handles with `_new`/`_free` pairs; `_free(NULL)` does nothing;
//! * every fallible function returns an [`afmesh_result`] whose values are
//!   fixed forever; [`afmesh_last_error_message`] gives the detail;
//! * the object comes first and outputs last; outputs are written only on
//!   success; there are no in/out parameters;
//! * every body runs inside a panic boundary: a Rust panic becomes
//!   `AFMESH_ERR_PANIC`, never an unwind into C or an abort;
//! * every pointer is checked for NULL;
//! * configuration is a struct that carries its size and version
//!   (`AFMESH_CONFIG_INIT`), or the environment.
//!
//! Handles are not thread-safe: use one from one thread at a time (several
//! handles on several threads are fine). Functions that wait say so and
//! take a timeout.
//!
//! Only afmesh's public Rust API is used here.

#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use afmesh_core::transport::{PollPolicy, Region};
use afmesh_core::{
    AttentionRank, Batch, DispatchHandle, Dtype, Error, FfnRank, Mesh, MeshConfig, Peer, RankStats,
    StageSpec, TransportKind,
};

/// Result codes. The values are part of the ABI and never change.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum afmesh_result {
    /// Success.
    AFMESH_OK = 0,
    /// A NULL pointer or an out-of-range value was passed.
    AFMESH_ERR_INVALID_ARGUMENT = 1,
    /// Bad configuration (the message names the setting).
    AFMESH_ERR_CONFIG = 2,
    /// A bounded wait ran out.
    AFMESH_ERR_TIMEOUT = 3,
    /// A peer's process or link is gone.
    AFMESH_ERR_PEER_LOST = 4,
    /// A stage was dispatched again before its combine completed.
    AFMESH_ERR_STAGE_BUSY = 5,
    /// A peer sent something that breaks the protocol.
    AFMESH_ERR_BAD_FRAME = 6,
    /// A buffer has the wrong size.
    AFMESH_ERR_BUFFER_SIZE = 7,
    /// Authentication or job identity failed.
    AFMESH_ERR_AUTH = 8,
    /// Not supported by this build or transport.
    AFMESH_ERR_UNSUPPORTED = 9,
    /// The handle was finalized or aborted.
    AFMESH_ERR_SHUTDOWN = 10,
    /// An operating-system error.
    AFMESH_ERR_IO = 11,
    /// A bug inside afmesh was caught at the boundary.
    AFMESH_ERR_PANIC = 12,
}

use afmesh_result::*;

/// Version of [`afmesh_config`] this library knows.
pub const AFMESH_CONFIG_VERSION: u32 = 1;

/// How a rank joins its mesh. Initialise with `AFMESH_CONFIG_INIT`, then
/// set fields; `size` and `version` let later versions add fields.
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
    /// `"auto"`, `"tcp"` or `"shm"`, or NULL for auto.
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

/// A dispatch in flight.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_dispatch {
    /// The stage.
    pub stage: u32,
    /// The stage's sequence number.
    pub sequence: u32,
}

/// Element types for `afmesh_attention_wait_combine_sum` (values fixed).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum afmesh_dtype {
    /// IEEE binary32.
    AFMESH_DTYPE_F32 = 0,
    /// IEEE binary16.
    AFMESH_DTYPE_F16 = 1,
    /// bfloat16.
    AFMESH_DTYPE_BF16 = 2,
}

/// Who a rank is.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_rank_info {
    /// This rank within its role.
    pub rank: u32,
    /// Attention ranks M.
    pub num_attention: u32,
    /// FFN ranks N.
    pub num_ffn: u32,
    /// Stages.
    pub stages: u32,
}

/// Counters for one peer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_peer_stats {
    /// 1: attention rank, 2: FFN rank.
    pub role: u32,
    /// Its rank.
    pub rank: u32,
    /// Messages written to it.
    pub sent: u64,
    /// Bytes written to it.
    pub sent_bytes: u64,
    /// Messages from it that counted.
    pub received: u64,
    /// Messages from it that were rejected.
    pub rejected: u64,
    /// Non-zero if it is lost.
    pub lost: u32,
}

/// What a batch is.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_batch_meta {
    /// The stage.
    pub stage: u32,
    /// The stage's sequence number.
    pub sequence: u32,
    /// Number of senders (attention ranks).
    pub senders: u32,
    /// Tokens from all senders.
    pub total_tokens: u32,
}

/// One sender's part of a batch, viewed in place (valid until the batch is
/// freed).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct afmesh_sender_view {
    /// Its rows, `token_count * row_bytes` bytes.
    pub tokens: *const c_void,
    /// Rows it sent.
    pub token_count: u32,
    /// Bytes of one row.
    pub row_bytes: u32,
    /// Its side block.
    pub side: *const c_void,
    /// Bytes of the side block.
    pub side_len: u32,
}

#[derive(Debug)]
enum State<T> {
    Live(T),
    Finalized,
    Aborted,
}

impl<T> State<T> {
    fn live(&mut self, what: &str) -> Result<&mut T, Fail> {
        match self {
            State::Live(t) => Ok(t),
            State::Finalized => Err(Fail(AFMESH_ERR_SHUTDOWN, format!("{what} was finalized"))),
            State::Aborted => Err(Fail(AFMESH_ERR_SHUTDOWN, format!("{what} was aborted"))),
        }
    }
}

/// An attention rank (opaque).
#[derive(Debug)]
pub struct afmesh_attention {
    state: State<AttentionRank>,
}

/// An FFN rank (opaque).
#[derive(Debug)]
pub struct afmesh_ffn {
    state: State<FfnRank>,
}

/// A gathered stage on an FFN rank (opaque); free with `afmesh_batch_free`.
#[derive(Debug)]
pub struct afmesh_batch {
    /// `None` once answered: `afmesh_ffn_respond` took it.
    batch: Option<Batch>,
}

impl afmesh_batch {
    fn live(&self) -> Result<&Batch, Fail> {
        self.batch
            .as_ref()
            .ok_or_else(|| invalid("the batch was already answered (afmesh_ffn_respond)"))
    }
}

struct Fail(afmesh_result, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::Timeout { .. } => AFMESH_ERR_TIMEOUT,
            Error::PeerLost { .. } => AFMESH_ERR_PEER_LOST,
            Error::StageBusy { .. } => AFMESH_ERR_STAGE_BUSY,
            Error::BadFrame { .. } => AFMESH_ERR_BAD_FRAME,
            Error::BufferSize { .. } => AFMESH_ERR_BUFFER_SIZE,
            Error::Auth(_) => AFMESH_ERR_AUTH,
            Error::Config(_) => AFMESH_ERR_CONFIG,
            Error::InvalidArgument(_) => AFMESH_ERR_INVALID_ARGUMENT,
            Error::Unsupported(_) => AFMESH_ERR_UNSUPPORTED,
            Error::Shutdown(_) => AFMESH_ERR_SHUTDOWN,
            Error::Io { .. } => AFMESH_ERR_IO,
            _ => AFMESH_ERR_IO,
        };
        Fail(code, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Fail {
    Fail(AFMESH_ERR_INVALID_ARGUMENT, msg.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs `f` inside the panic boundary and turns its outcome into a code.
fn boundary(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> afmesh_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => AFMESH_OK,
        Ok(Err(Fail(code, msg))) => {
            set_last_error(&format!("{name}: {msg}"));
            code
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "{name}: internal error (panic caught at the C boundary): {what}"
            ));
            AFMESH_ERR_PANIC
        }
    }
}

/// `&mut *ptr`, or an error naming the argument.
///
/// # Safety
/// `ptr` is NULL or points to a live `T` not aliased for the call.
unsafe fn obj<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL pointers come from this library's `_new` functions
    // (the caller's contract) and are used from one thread at a time.
    unsafe { ptr.as_mut() }.ok_or_else(|| invalid(format!("{name} is NULL")))
}

/// `&*ptr`, or an error naming the argument.
///
/// # Safety
/// `ptr` is NULL or points to a live `T`.
unsafe fn obj_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, Fail> {
    // SAFETY: as for `obj`.
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("{name} is NULL")))
}

/// A byte slice from C; NULL is allowed only for an empty one.
///
/// # Safety
/// `ptr` is NULL or valid for reads of `len` bytes for the call.
unsafe fn bytes<'a>(ptr: *const c_void, len: usize, name: &str) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{name} is NULL but its length is {len}")));
    }
    // SAFETY: non-NULL and valid for `len` bytes (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// An optional C string.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn opt_str(ptr: *const c_char, name: &str) -> Result<Option<String>, Fail> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid(format!("{name} is not UTF-8")))
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
unsafe fn config_of(cfg: *const afmesh_config) -> Result<MeshConfig, Fail> {
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

fn write_stats(
    stats: RankStats,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> Result<(), Fail> {
    if count_out.is_null() {
        return Err(invalid("count_out is NULL"));
    }
    let n = stats.peers.len();
    if cap < n {
        return Err(Fail(
            AFMESH_ERR_BUFFER_SIZE,
            format!("stats array holds {cap}, need {n}"),
        ));
    }
    if n > 0 && out.is_null() {
        return Err(invalid("out is NULL"));
    }
    for (i, (peer, s)) in stats.peers.iter().enumerate() {
        let (role, rank) = match peer {
            Peer::Attention(r) => (1, *r),
            Peer::Ffn(r) => (2, *r),
            _ => (0, 0),
        };
        let v = afmesh_peer_stats {
            role,
            rank,
            sent: s.sent,
            sent_bytes: s.sent_bytes,
            received: s.received,
            rejected: s.rejected,
            lost: u32::from(s.lost.is_some()),
        };
        // SAFETY: `out` holds `cap >= n` elements (the caller's contract).
        unsafe { out.add(i).write(v) };
    }
    // SAFETY: checked non-NULL above.
    unsafe { count_out.write(n) };
    Ok(())
}

/// What the C handles of both roles share.
trait RankOps: Sized {
    const WHAT: &'static str;
    fn shutdown(self) -> afmesh_core::Result<()>;
    fn info(&self) -> afmesh_rank_info;
    fn stats(&self) -> RankStats;
}

impl RankOps for AttentionRank {
    const WHAT: &'static str = "attention rank";
    fn shutdown(self) -> afmesh_core::Result<()> {
        AttentionRank::shutdown(self)
    }
    fn info(&self) -> afmesh_rank_info {
        afmesh_rank_info {
            rank: self.rank(),
            num_attention: self.attention_ranks() as u32,
            num_ffn: self.ffn_ranks() as u32,
            stages: self.spec().stages,
        }
    }
    fn stats(&self) -> RankStats {
        AttentionRank::stats(self)
    }
}

impl RankOps for FfnRank {
    const WHAT: &'static str = "FFN rank";
    fn shutdown(self) -> afmesh_core::Result<()> {
        FfnRank::shutdown(self)
    }
    fn info(&self) -> afmesh_rank_info {
        afmesh_rank_info {
            rank: self.rank(),
            num_attention: self.attention_ranks() as u32,
            num_ffn: self.ffn_ranks() as u32,
            stages: self.spec().stages,
        }
    }
    fn stats(&self) -> RankStats {
        FfnRank::stats(self)
    }
}

trait Handle {
    type Rank: RankOps;
    fn state(&mut self) -> &mut State<Self::Rank>;
}

impl Handle for afmesh_attention {
    type Rank = AttentionRank;
    fn state(&mut self) -> &mut State<AttentionRank> {
        &mut self.state
    }
}

impl Handle for afmesh_ffn {
    type Rank = FfnRank;
    fn state(&mut self) -> &mut State<FfnRank> {
        &mut self.state
    }
}

/// # Safety
/// `h` is NULL or a live handle; `out` is NULL or writable.
unsafe fn info_of<H: Handle>(h: *mut H, out: *mut afmesh_rank_info) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let info = h.state().live(H::Rank::WHAT)?.info();
    // SAFETY: checked non-NULL.
    unsafe { out.write(info) };
    Ok(())
}

/// # Safety
/// As `write_stats`, and `h` is NULL or live.
unsafe fn stats_of<H: Handle>(
    h: *mut H,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    let stats = h.state().live(H::Rank::WHAT)?.stats();
    write_stats(stats, out, cap, count_out)
}

/// # Safety
/// `h` is NULL or live.
unsafe fn finalize_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    match std::mem::replace(h.state(), State::Finalized) {
        State::Live(r) => r.shutdown().map_err(Fail::from),
        other => {
            *h.state() = other;
            h.state().live(H::Rank::WHAT).map(|_| ())
        }
    }
}

/// # Safety
/// `h` is NULL or live.
unsafe fn abort_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    drop(std::mem::replace(h.state(), State::Aborted));
    Ok(())
}

fn ms(timeout_ms: u32) -> Duration {
    Duration::from_millis(u64::from(timeout_ms))
}

/// The library version, e.g. `"0.1.0"`. Thread-safe; never blocks.
#[no_mangle]
pub extern "C" fn afmesh_version() -> *const c_char {
    static V: &CStr = c"0.1.0";
    V.as_ptr()
}

/// A static description of a result code (any value). Thread-safe; never
/// blocks.
#[no_mangle]
pub extern "C" fn afmesh_result_str(result: i32) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"success",
        1 => c"invalid argument",
        2 => c"configuration error",
        3 => c"timeout",
        4 => c"peer lost",
        5 => c"stage busy",
        6 => c"bad frame",
        7 => c"buffer size",
        8 => c"authentication failed",
        9 => c"unsupported",
        10 => c"shut down",
        11 => c"I/O error",
        12 => c"internal error (panic)",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The message of the last failure on this thread (never NULL; empty if
/// none). Valid until the next failing call on this thread. Thread-safe.
#[no_mangle]
pub extern "C" fn afmesh_last_error_message() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// Where a constructor's configuration comes from.
enum Source {
    Config(*const afmesh_config),
    Env,
}

/// The shared body of the constructors: config, spec, optional caller
/// buffer, join, box the handle into `*out`.
///
/// # Safety
/// Pointers are NULL or valid as the public constructors document.
unsafe fn construct<H>(
    source: Source,
    spec: *const afmesh_stage_spec,
    buffer: Option<(*mut c_void, usize)>,
    out: *mut *mut H,
    join: impl FnOnce(Mesh, StageSpec, Option<Region>) -> Result<H, Error>,
) -> Result<(), Fail> {
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

fn attention_handle(
    mesh: Mesh,
    spec: StageSpec,
    region: Option<Region>,
) -> Result<afmesh_attention, Error> {
    let rank = match region {
        None => mesh.attention(spec)?,
        Some(r) => mesh.attention_with_region(spec, r)?,
    };
    Ok(afmesh_attention {
        state: State::Live(rank),
    })
}

fn ffn_handle(mesh: Mesh, spec: StageSpec, region: Option<Region>) -> Result<afmesh_ffn, Error> {
    let rank = match region {
        None => mesh.ffn(spec)?,
        Some(r) => mesh.ffn_with_region(spec, r)?,
    };
    Ok(afmesh_ffn {
        state: State::Live(rank),
    })
}

/// Joins a mesh as an attention rank with library-allocated slots. Blocks
/// until the mesh forms (bounded by `setup_timeout_ms`). On success `*out`
/// owns a new handle; free it with `afmesh_attention_free`. Thread-safe
/// (it creates a new handle).
///
/// # Safety
/// `cfg` and `spec` are NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_new(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    out: *mut *mut afmesh_attention,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_new", || unsafe {
        construct(Source::Config(cfg), spec, None, out, attention_handle)
    })
}

/// Like `afmesh_attention_new`, configured from the environment
/// (`AFMESH_*`, `DMLC_*`).
///
/// # Safety
/// `spec` is NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_new_from_env(
    spec: *const afmesh_stage_spec,
    out: *mut *mut afmesh_attention,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_new_from_env", || unsafe {
        construct(Source::Env, spec, None, out, attention_handle)
    })
}

/// Like `afmesh_attention_new`, with the output slots in caller memory
/// `buffer` of `len` bytes (at least `afmesh_attention_memory_len`). The
/// buffer must stay valid, and untouched except through afmesh, until the
/// handle is freed. Caller memory is reached over tcp (shared memory needs
/// library-allocated buffers).
///
/// # Safety
/// As `afmesh_attention_new`, and `buffer` is valid for `len` bytes until
/// the handle is freed.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_new_with_buffer(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    buffer: *mut c_void,
    len: usize,
    out: *mut *mut afmesh_attention,
) -> afmesh_result {
    boundary("afmesh_attention_new_with_buffer", || {
        // SAFETY: forwarded contract.
        unsafe {
            construct(
                Source::Config(cfg),
                spec,
                Some((buffer, len)),
                out,
                attention_handle,
            )
        }
    })
}

/// Bytes of caller memory an attention rank needs for `spec` in the mesh of
/// `cfg`. Never blocks; thread-safe.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_memory_len(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    out: *mut usize,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_memory_len", || unsafe {
        memory_len(cfg, spec, out, true)
    })
}

/// Joins a mesh as an FFN rank with library-allocated slots (see
/// `afmesh_attention_new`). Free with `afmesh_ffn_free`.
///
/// # Safety
/// `cfg` and `spec` are NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_new(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    out: *mut *mut afmesh_ffn,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_new", || unsafe {
        construct(Source::Config(cfg), spec, None, out, ffn_handle)
    })
}

/// Like `afmesh_ffn_new`, configured from the environment.
///
/// # Safety
/// `spec` is NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_new_from_env(
    spec: *const afmesh_stage_spec,
    out: *mut *mut afmesh_ffn,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_new_from_env", || unsafe {
        construct(Source::Env, spec, None, out, ffn_handle)
    })
}

/// Like `afmesh_ffn_new`, with the input slots in caller memory (see
/// `afmesh_attention_new_with_buffer`).
///
/// # Safety
/// As `afmesh_ffn_new`, and `buffer` is valid for `len` bytes until the
/// handle and every batch from it are freed.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_new_with_buffer(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    buffer: *mut c_void,
    len: usize,
    out: *mut *mut afmesh_ffn,
) -> afmesh_result {
    boundary("afmesh_ffn_new_with_buffer", || {
        // SAFETY: forwarded contract.
        unsafe {
            construct(
                Source::Config(cfg),
                spec,
                Some((buffer, len)),
                out,
                ffn_handle,
            )
        }
    })
}

/// Bytes of caller memory an FFN rank needs. Never blocks; thread-safe.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_memory_len(
    cfg: *const afmesh_config,
    spec: *const afmesh_stage_spec,
    out: *mut usize,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_memory_len", || unsafe {
        memory_len(cfg, spec, out, false)
    })
}

/// # Safety
/// Pointers are NULL or valid.
unsafe fn memory_len(
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

/// Sends `tokens` (whole rows) and `side` to every FFN rank for `stage`.
/// Returns once the data is handed to the transport (does not wait for the
/// FFN); the buffers may be reused at once. Not thread-safe per handle.
///
/// # Safety
/// `a` is NULL or a live handle; `tokens`/`side` are NULL (with length 0)
/// or readable for their lengths; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_dispatch(
    a: *mut afmesh_attention,
    stage: u32,
    tokens: *const c_void,
    tokens_len: usize,
    side: *const c_void,
    side_len: usize,
    out: *mut afmesh_dispatch,
) -> afmesh_result {
    boundary("afmesh_attention_dispatch", || {
        // SAFETY: the caller's contract.
        let (a, tokens, side) = unsafe {
            (
                obj(a, "a")?,
                bytes(tokens, tokens_len, "tokens")?,
                bytes(side, side_len, "side")?,
            )
        };
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let h = a
            .state
            .live("attention rank")?
            .dispatch(stage, tokens, side)?;
        // SAFETY: checked non-NULL.
        unsafe {
            out.write(afmesh_dispatch {
                stage: h.stage(),
                sequence: h.sequence(),
            })
        };
        Ok(())
    })
}

/// Waits up to `timeout_ms` for every FFN rank's combine of `handle`.
/// Writes one pointer per FFN rank into `partials` (which holds
/// `partials_cap` pointers; at least N) and the row count into
/// `*tokens_out`. Each partial is `tokens * out_row_bytes` bytes and stays
/// valid until `stage` is dispatched again. Blocks. Not thread-safe per
/// handle.
///
/// # Safety
/// `a` is NULL or live; `partials` is NULL or writable for `partials_cap`
/// pointers; `tokens_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_wait_combine(
    a: *mut afmesh_attention,
    handle: afmesh_dispatch,
    timeout_ms: u32,
    partials: *mut *const c_void,
    partials_cap: usize,
    tokens_out: *mut u32,
) -> afmesh_result {
    boundary("afmesh_attention_wait_combine", || {
        // SAFETY: the caller's contract.
        let a = unsafe { obj(a, "a") }?;
        if partials.is_null() {
            return Err(invalid("partials is NULL"));
        }
        if tokens_out.is_null() {
            return Err(invalid("tokens_out is NULL"));
        }
        let rank = a.state.live("attention rank")?;
        let n = rank.ffn_ranks();
        if partials_cap < n {
            return Err(Fail(
                AFMESH_ERR_BUFFER_SIZE,
                format!("partials holds {partials_cap} pointers, need {n}"),
            ));
        }
        let h = DispatchHandle::from_parts(handle.stage, handle.sequence);
        let c = rank.wait_combine(h, ms(timeout_ms))?;
        for f in 0..n {
            let p = c
                .partial(f)
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<c_void>());
            // SAFETY: `partials` holds at least `n` pointers (checked).
            unsafe { partials.add(f).write(p) };
        }
        // SAFETY: checked non-NULL.
        unsafe { tokens_out.write(c.tokens() as u32) };
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the combine of `handle` and writes the
/// element-wise sum of the N partials (`dtype`: an `afmesh_dtype` value)
/// into `out` (`tokens * out_row_bytes` bytes). Blocks.
///
/// # Safety
/// `a` is NULL or live; `out` is NULL or writable for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_wait_combine_sum(
    a: *mut afmesh_attention,
    handle: afmesh_dispatch,
    dtype: i32,
    timeout_ms: u32,
    out: *mut c_void,
    out_len: usize,
) -> afmesh_result {
    boundary("afmesh_attention_wait_combine_sum", || {
        // SAFETY: the caller's contract.
        let a = unsafe { obj(a, "a") }?;
        let dtype = match dtype {
            0 => Dtype::F32,
            1 => Dtype::F16,
            2 => Dtype::Bf16,
            d => return Err(invalid(format!("dtype {d} is not an afmesh_dtype"))),
        };
        if out.is_null() && out_len > 0 {
            return Err(invalid("out is NULL"));
        }
        let rank = a.state.live("attention rank")?;
        let h = DispatchHandle::from_parts(handle.stage, handle.sequence);
        let c = rank.wait_combine(h, ms(timeout_ms))?;
        let need = c.tokens() * rank_out_row(&c);
        if out_len != need {
            return Err(Fail(
                AFMESH_ERR_BUFFER_SIZE,
                format!(
                    "sum output of {out_len} bytes for {} tokens, need {need}",
                    c.tokens()
                ),
            ));
        }
        if need == 0 {
            return Ok(());
        }
        // SAFETY: `out` is writable for `out_len` bytes (contract), and
        // not aliased by afmesh memory.
        let out = unsafe { std::slice::from_raw_parts_mut(out.cast::<u8>(), out_len) };
        c.sum_into(dtype, out)?;
        Ok(())
    })
}

fn rank_out_row(c: &afmesh_core::Combined<'_>) -> usize {
    if c.tokens() == 0 {
        return 0;
    }
    c.partial(0).map_or(0, |p| p.len() / c.tokens())
}

/// Who this attention rank is. Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_info(
    a: *mut afmesh_attention,
    out: *mut afmesh_rank_info,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_info", || unsafe { info_of(a, out) })
}

/// Per-FFN-rank counters: writes up to `cap` entries into `out` and their
/// number into `*count_out`. Never blocks.
///
/// # Safety
/// `out` is NULL or writable for `cap` entries; other pointers NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_stats(
    a: *mut afmesh_attention,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_stats", || unsafe {
        stats_of(a, out, cap, count_out)
    })
}

/// Leaves the mesh in order (tells the scheduler and every peer). The
/// handle stays allocated: later calls fail with `AFMESH_ERR_SHUTDOWN`
/// until it is freed. Blocks briefly (bounded).
///
/// # Safety
/// `a` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_finalize(a: *mut afmesh_attention) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_finalize", || unsafe { finalize_of(a) })
}

/// Drops every link at once, for an engine that is failing; peers see the
/// links go. The handle stays allocated (later calls fail with
/// `AFMESH_ERR_SHUTDOWN`). Never blocks on peers.
///
/// # Safety
/// `a` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_abort(a: *mut afmesh_attention) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_abort", || unsafe { abort_of(a) })
}

/// Frees the handle (aborting it first if it is still live). NULL is a
/// no-op.
///
/// # Safety
/// `a` is NULL or a handle from `afmesh_attention_new*` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_free(a: *mut afmesh_attention) {
    let _ = boundary("afmesh_attention_free", || {
        if !a.is_null() {
            // SAFETY: `a` came from `Box::into_raw` in a constructor and is
            // freed once (the caller's contract).
            drop(unsafe { Box::from_raw(a) });
        }
        Ok(())
    });
}

/// Waits up to `timeout_ms` for the oldest stage every attention rank has
/// dispatched to; `*out` owns the batch (free with `afmesh_batch_free`,
/// after `afmesh_ffn_respond`). Blocks. Not thread-safe per handle.
///
/// # Safety
/// `f` is NULL or live; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_get_batch(
    f: *mut afmesh_ffn,
    timeout_ms: u32,
    out: *mut *mut afmesh_batch,
) -> afmesh_result {
    boundary("afmesh_ffn_get_batch", || {
        // SAFETY: the caller's contract.
        let f = unsafe { obj(f, "f") }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let batch = f.state.live("FFN rank")?.get_batch(ms(timeout_ms))?;
        let b = Box::into_raw(Box::new(afmesh_batch { batch: Some(batch) }));
        // SAFETY: checked non-NULL.
        unsafe { out.write(b) };
        Ok(())
    })
}

/// What a batch is. Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_batch_info(
    b: *const afmesh_batch,
    out: *mut afmesh_batch_meta,
) -> afmesh_result {
    boundary("afmesh_batch_info", || {
        // SAFETY: the caller's contract.
        let b = unsafe { obj_ref(b, "b") }?.live()?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let info = afmesh_batch_meta {
            stage: b.stage(),
            sequence: b.sequence(),
            senders: b.senders() as u32,
            total_tokens: b.total_tokens() as u32,
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Attention rank `sender`'s part of the batch, zero-copy (valid until the
/// batch is answered or freed). Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_batch_sender(
    b: *const afmesh_batch,
    sender: u32,
    out: *mut afmesh_sender_view,
) -> afmesh_result {
    boundary("afmesh_batch_sender", || {
        // SAFETY: the caller's contract.
        let b = unsafe { obj_ref(b, "b") }?.live()?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let a = sender as usize;
        if a >= b.senders() {
            return Err(invalid(format!(
                "sender {sender} of {} senders",
                b.senders()
            )));
        }
        let t = b.tokens(a);
        let s = b.side(a);
        let count = b.token_count(a);
        let view = afmesh_sender_view {
            tokens: t.as_ptr().cast(),
            token_count: count as u32,
            row_bytes: b.row_bytes() as u32,
            side: s.as_ptr().cast(),
            side_len: s.len() as u32,
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(view) };
        Ok(())
    })
}

/// Frees a batch. NULL is a no-op.
///
/// # Safety
/// `b` is NULL or a batch from `afmesh_ffn_get_batch` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn afmesh_batch_free(b: *mut afmesh_batch) {
    let _ = boundary("afmesh_batch_free", || {
        if !b.is_null() {
            // SAFETY: from `Box::into_raw` in `afmesh_ffn_get_batch`, freed
            // once (the caller's contract).
            drop(unsafe { Box::from_raw(b) });
        }
        Ok(())
    });
}

/// Sends each attention rank `i` its rows `outputs[i]` (`lens[i]` bytes =
/// its token count × out_row_bytes); `count` must be M. Returns once the
/// data is handed to the transport. Not thread-safe per handle.
///
/// The batch is answered by this call: its views end, and later use of it
/// (info, sender views, respond) fails with `AFMESH_ERR_INVALID_ARGUMENT`;
/// it still needs `afmesh_batch_free`. If the arguments are refused
/// (`AFMESH_ERR_INVALID_ARGUMENT`, `AFMESH_ERR_BUFFER_SIZE`), nothing was
/// sent and the batch can be answered again.
///
/// # Safety
/// `f`, `b` are NULL or live; `outputs` and `lens` are NULL or readable
/// for `count` elements, each output readable for its length.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_respond(
    f: *mut afmesh_ffn,
    b: *mut afmesh_batch,
    outputs: *const *const c_void,
    lens: *const usize,
    count: usize,
) -> afmesh_result {
    boundary("afmesh_ffn_respond", || {
        // SAFETY: the caller's contract.
        let (f, b) = unsafe { (obj(f, "f")?, obj(b, "b")?) };
        if outputs.is_null() {
            return Err(invalid("outputs is NULL"));
        }
        if lens.is_null() {
            return Err(invalid("lens is NULL"));
        }
        let mut outs: Vec<&[u8]> = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: `outputs`/`lens` hold `count` elements (contract).
            let (p, n) = unsafe { (*outputs.add(i), *lens.add(i)) };
            // SAFETY: each output is readable for its length (contract).
            outs.push(unsafe { bytes(p, n, &format!("outputs[{i}]")) }?);
        }
        let rank = f.state.live("FFN rank")?;
        let batch = b
            .batch
            .take()
            .ok_or_else(|| invalid("the batch was already answered"))?;
        rank.respond(batch, &outs).map_err(|e| {
            // Refused arguments give the batch back: it can be answered again.
            b.batch = e.batch;
            Fail::from(e.error)
        })
    })
}

/// Who this FFN rank is. Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_info(
    f: *mut afmesh_ffn,
    out: *mut afmesh_rank_info,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_info", || unsafe { info_of(f, out) })
}

/// Per-attention-rank counters (see `afmesh_attention_stats`).
///
/// # Safety
/// As for `afmesh_attention_stats`.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_stats(
    f: *mut afmesh_ffn,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_stats", || unsafe {
        stats_of(f, out, cap, count_out)
    })
}

/// Leaves the mesh in order (see `afmesh_attention_finalize`).
///
/// # Safety
/// `f` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_finalize(f: *mut afmesh_ffn) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_finalize", || unsafe { finalize_of(f) })
}

/// Drops every link at once (see `afmesh_attention_abort`).
///
/// # Safety
/// `f` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_abort(f: *mut afmesh_ffn) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_abort", || unsafe { abort_of(f) })
}

/// Frees the handle (aborting it first if still live). NULL is a no-op.
///
/// # Safety
/// `f` is NULL or a handle from `afmesh_ffn_new*` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_free(f: *mut afmesh_ffn) {
    let _ = boundary("afmesh_ffn_free", || {
        if !f.is_null() {
            // SAFETY: from `Box::into_raw` in a constructor, freed once.
            drop(unsafe { Box::from_raw(f) });
        }
        Ok(())
    });
}
