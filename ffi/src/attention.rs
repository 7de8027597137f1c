//! `afmesh_attention_*`: an attention rank, which dispatches rows to every
//! FFN rank and waits for their combined partials.

use std::ffi::c_void;

use afmesh_core::{AttentionRank, DispatchHandle, Dtype, Error, Mesh, RankStats, StageSpec};

use crate::args::{bytes, ms};
use crate::config::{afmesh_config, afmesh_stage_spec, construct, memory_len, Buffers, Source};
use crate::error::afmesh_result::{self, AFMESH_ERR_BUFFER_SIZE};
use crate::error::{boundary, invalid, Fail};
use crate::handle::{
    abort_of, afmesh_peer_stats, afmesh_rank_counters, afmesh_rank_info, counters_of, finalize_of,
    free_of, info_of, interrupt_of, progress_of, slot_of, stats_of, Handle, RankOps, Slot,
};

/// A dispatch in flight.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_dispatch {
    /// The stage.
    pub stage: u32,
    /// The stage's sequence number.
    pub sequence: u32,
}

/// Element types for the combine sums (values fixed).
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

/// How an `afmesh_dtype` crosses the boundary. The header names the
/// parameter `afmesh_dtype` (cbindgen.toml renames this type), which C
/// passes as an int; Rust reads it as one, so a value outside the enum is
/// refused instead of being undefined behaviour.
pub type afmesh_dtype_arg = i32;

fn dtype_of(dtype: afmesh_dtype_arg) -> Result<Dtype, Fail> {
    match dtype {
        0 => Ok(Dtype::F32),
        1 => Ok(Dtype::F16),
        2 => Ok(Dtype::Bf16),
        d => Err(invalid(format!("dtype {d} is not an afmesh_dtype"))),
    }
}

/// Trace stamps of one FFN rank's answer to a combine (wall clock, ns).
/// Differences across hosts need synchronized clocks.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_trace {
    /// Dispatch posted (attention clock).
    pub post_ns: u64,
    /// Dispatch landed (FFN clock).
    pub land_ns: u64,
    /// Batch handed to the FFN's caller (FFN clock).
    pub process_ns: u64,
    /// Combine posted (FFN clock).
    pub respond_ns: u64,
    /// Combine seen by the attention rank (attention clock).
    pub back_ns: u64,
}

/// An attention rank (opaque). One call at a time per handle: a call made
/// while another thread is inside one fails with `AFMESH_ERR_BUSY`; only
/// `afmesh_attention_abort` and `afmesh_attention_interrupt` may run
/// alongside.
#[derive(Debug)]
pub struct afmesh_attention {
    slot: Slot<AttentionRank>,
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
    fn progress(&mut self) -> afmesh_core::Result<()> {
        AttentionRank::progress(self)
    }
    fn interrupter(&self) -> afmesh_core::Interrupter {
        AttentionRank::interrupter(self)
    }
}

impl Handle for afmesh_attention {
    type Rank = AttentionRank;
    fn slot(&self) -> &Slot<AttentionRank> {
        &self.slot
    }
}

fn attention_handle(
    mesh: Mesh,
    spec: StageSpec,
    buffers: Buffers,
) -> Result<afmesh_attention, Error> {
    let rank = match buffers {
        Buffers::Library => mesh.attention(spec)?,
        Buffers::Device(d) => mesh.attention_on_device(spec, d)?,
        Buffers::Caller(r) => mesh.attention_with_region(spec, r)?,
    };
    Ok(afmesh_attention {
        slot: Slot::new(rank),
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
/// handle is freed. Any alignment works. Peers on this host write it with
/// cross-memory attach (one kernel copy; needs ptrace permission between
/// the ranks, else setup fails naming what to change); at memcpy speed
/// only where it is on huge pages: align `buffer` to 2 MiB (the huge page
/// size) and make `len` a multiple of it, e.g. `posix_memalign(&buffer,
/// 1 << 21, len)`, and afmesh puts it on transparent huge pages at setup.
/// The parts outside whole huge pages stay on 4 KiB pages, which the
/// kernel pins one by one on every write (about 1.5× a memcpy there).
/// A peer in another process may still write the buffer until it has seen
/// this rank leave: after freeing the handle, keep the memory mapped (and
/// unused) until the peers have left too, or the process exits. Ranks of
/// one process never reach each other's caller memory this way (such links
/// take tcp, or fail when shm is forced).
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

/// Sends `tokens` (whole rows) and `side` to every FFN rank for `stage`.
/// Returns once the data is handed to the transport (does not wait for the
/// FFN); the buffers may be reused at once.
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
                slot_of(a, "a")?,
                bytes(tokens, tokens_len, "tokens")?,
                bytes(side, side_len, "side")?,
            )
        };
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let h = a.with(|r| Ok(r.dispatch(stage, tokens, side)?))?;
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

/// Fills a dispatch in place for `afmesh_attention_dispatch_with`: writes
/// the rows (`rows_len` = tokens × row_bytes bytes) at `rows` and the side
/// block at the start of `side` (`side_cap` = side_bytes bytes), and
/// returns the side block's length. Both areas are the stage's registered
/// send slot, valid only during the call, and keep their bytes between
/// dispatches of the stage. An empty area is NULL with length 0.
pub type afmesh_fill_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        rows: *mut c_void,
        rows_len: usize,
        side: *mut c_void,
        side_cap: usize,
    ) -> usize,
>;

/// Zero-copy `afmesh_attention_dispatch`: sends `tokens` rows to every FFN
/// rank for `stage`, built in place by `fill(user, rows, rows_len, side,
/// side_cap)`, which runs once, inside this call, before anything is sent
/// (no copy is made). Checked before `fill` runs: the stage exists and is
/// idle, `tokens` is at most `max_tokens`, no FFN rank is lost. A side
/// length over `side_cap` is refused after `fill`
/// (`AFMESH_ERR_INVALID_ARGUMENT`); nothing is sent then and the stage
/// stays idle. May wait (bounded) for the slot's previous message to leave.
///
/// # Safety
/// `a` is NULL or live; `out` is NULL or writable; `fill` writes only
/// inside the two areas it is given and does not call afmesh functions on
/// `a` (the handle is in use: such a call fails with `AFMESH_ERR_BUSY`),
/// nor unwind or longjmp out of the call.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_dispatch_with(
    a: *mut afmesh_attention,
    stage: u32,
    tokens: u32,
    fill: afmesh_fill_fn,
    user: *mut c_void,
    out: *mut afmesh_dispatch,
) -> afmesh_result {
    boundary("afmesh_attention_dispatch_with", || {
        // SAFETY: the caller's contract.
        let a = unsafe { slot_of(a, "a") }?;
        let fill = fill.ok_or_else(|| invalid("fill is NULL"))?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let area = |s: &mut [u8]| {
            if s.is_empty() {
                std::ptr::null_mut()
            } else {
                s.as_mut_ptr().cast::<c_void>()
            }
        };
        let h = a.with(|r| {
            Ok(r.dispatch_with(stage, tokens as usize, |rows, side| {
                // SAFETY: both areas are valid for writes of their lengths
                // for the call; `fill` keeps inside them (the caller's
                // contract), and a call back into this handle is refused
                // (it is held).
                unsafe { fill(user, area(rows), rows.len(), area(side), side.len()) }
            })?)
        })?;
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
/// valid until `stage` is dispatched again; an empty one (0 tokens) is
/// NULL. Blocks; `afmesh_attention_interrupt` from another thread ends
/// the wait with `AFMESH_ERR_INTERRUPTED` (the combine stays to be taken),
/// `afmesh_attention_abort` with `AFMESH_ERR_SHUTDOWN`.
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
        let a = unsafe { slot_of(a, "a") }?;
        if partials.is_null() {
            return Err(invalid("partials is NULL"));
        }
        if tokens_out.is_null() {
            return Err(invalid("tokens_out is NULL"));
        }
        a.with(|rank| {
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
                    .filter(|s| !s.is_empty())
                    .map_or(std::ptr::null(), |s| s.as_ptr().cast::<c_void>());
                // SAFETY: `partials` holds at least `n` pointers (checked).
                unsafe { partials.add(f).write(p) };
            }
            // SAFETY: checked non-NULL.
            unsafe { tokens_out.write(c.tokens() as u32) };
            Ok(())
        })
    })
}

/// Waits up to `timeout_ms` for the combine of `handle` and writes the
/// element-wise sum of the N partials into `out` (`tokens *
/// out_row_bytes` bytes). `out` and `dtype` are checked first: a refused
/// call leaves the combine in place. Blocks.
///
/// # Safety
/// `a` is NULL or live; `out` is NULL or writable for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_wait_combine_sum(
    a: *mut afmesh_attention,
    handle: afmesh_dispatch,
    dtype: afmesh_dtype_arg,
    timeout_ms: u32,
    out: *mut c_void,
    out_len: usize,
) -> afmesh_result {
    boundary("afmesh_attention_wait_combine_sum", || {
        // SAFETY: the caller's contract.
        let a = unsafe { slot_of(a, "a") }?;
        let dtype = dtype_of(dtype)?;
        if out.is_null() && out_len > 0 {
            return Err(invalid("out is NULL"));
        }
        let h = DispatchHandle::from_parts(handle.stage, handle.sequence);
        // SAFETY: `out` is writable for `out_len` bytes (contract).
        let out = unsafe { out_bytes(out, out_len) };
        // Checks `out` before it takes the combine: a refused call leaves
        // the combine in place for a retry.
        a.with(|rank| Ok(rank.wait_combine_sum(h, dtype, out, ms(timeout_ms))?))?;
        Ok(())
    })
}

/// `out` as a slice; NULL only with `out_len` 0 (checked by the caller).
///
/// # Safety
/// `out` is non-NULL and writable for `out_len` bytes, not aliased by
/// afmesh memory, or `out_len` is 0.
unsafe fn out_bytes<'a>(out: *mut c_void, out_len: usize) -> &'a mut [u8] {
    if out_len == 0 {
        &mut []
    } else {
        // SAFETY: forwarded contract.
        unsafe { std::slice::from_raw_parts_mut(out.cast::<u8>(), out_len) }
    }
}

/// Non-blocking `afmesh_attention_wait_combine_sum`: makes progress, and if
/// the combine of `handle` is complete writes the sum into `out` and sets
/// `*done_out` to true; if it is not complete yet, sets `*done_out` to
/// false and consumes nothing (poll again later). "Not yet" is a success
/// (`AFMESH_OK`), not an error code: every other result is a failure.
/// `out` and `dtype` are checked as `afmesh_attention_wait_combine_sum`
/// checks them, whether or not the combine is in. Never blocks.
///
/// # Safety
/// `a` is NULL or live; `out` is NULL or writable for `out_len` bytes;
/// `done_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_try_combine_sum(
    a: *mut afmesh_attention,
    handle: afmesh_dispatch,
    dtype: afmesh_dtype_arg,
    out: *mut c_void,
    out_len: usize,
    done_out: *mut bool,
) -> afmesh_result {
    boundary("afmesh_attention_try_combine_sum", || {
        // SAFETY: the caller's contract.
        let a = unsafe { slot_of(a, "a") }?;
        let dtype = dtype_of(dtype)?;
        if out.is_null() && out_len > 0 {
            return Err(invalid("out is NULL"));
        }
        if done_out.is_null() {
            return Err(invalid("done_out is NULL"));
        }
        let h = DispatchHandle::from_parts(handle.stage, handle.sequence);
        // SAFETY: `out` is writable for `out_len` bytes (contract).
        let out = unsafe { out_bytes(out, out_len) };
        let done = a.with(|rank| Ok(rank.try_combine_sum(h, dtype, out)?.is_some()))?;
        // SAFETY: checked non-NULL.
        unsafe { done_out.write(done) };
        Ok(())
    })
}

/// Waits up to `timeout_ms` until the combine of every one of the `count`
/// dispatches in `handles` is complete, without taking them: take each
/// with `afmesh_attention_wait_combine*` (which then returns at once).
/// `count` 0 returns at once. Blocks (interruptible as
/// `afmesh_attention_wait_combine`).
///
/// # Safety
/// `a` is NULL or live; `handles` is NULL or readable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_wait_all(
    a: *mut afmesh_attention,
    handles: *const afmesh_dispatch,
    count: usize,
    timeout_ms: u32,
) -> afmesh_result {
    boundary("afmesh_attention_wait_all", || {
        // SAFETY: the caller's contract.
        let a = unsafe { slot_of(a, "a") }?;
        let handles: &[afmesh_dispatch] = if count == 0 {
            &[]
        } else if handles.is_null() {
            return Err(invalid(format!("handles is NULL but count is {count}")));
        } else {
            // SAFETY: non-NULL and readable for `count` elements (contract).
            unsafe { std::slice::from_raw_parts(handles, count) }
        };
        let hs: Vec<DispatchHandle> = handles
            .iter()
            .map(|h| DispatchHandle::from_parts(h.stage, h.sequence))
            .collect();
        a.with(|rank| Ok(rank.wait_all(&hs, ms(timeout_ms))?))
    })
}

/// Trace stamps of each FFN rank's answer to the last combine taken on
/// `stage` (by any `afmesh_attention_wait_combine*` or
/// `afmesh_attention_try_combine_sum`): writes N entries, FFN rank order,
/// into `out` (which holds `cap`) and N into `*count_out`. Valid from the
/// combine until `stage` is dispatched again; fails with
/// `AFMESH_ERR_INVALID_ARGUMENT` while the stage is in flight. All zeros
/// before the stage's first combine. Never blocks.
///
/// # Safety
/// `a` is NULL or live; `out` is NULL or writable for `cap` entries;
/// `count_out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_trace(
    a: *mut afmesh_attention,
    stage: u32,
    out: *mut afmesh_trace,
    cap: usize,
    count_out: *mut usize,
) -> afmesh_result {
    boundary("afmesh_attention_trace", || {
        // SAFETY: the caller's contract.
        let a = unsafe { slot_of(a, "a") }?;
        if count_out.is_null() {
            return Err(invalid("count_out is NULL"));
        }
        a.with(|rank| {
            let n = rank.ffn_ranks();
            if stage >= rank.spec().stages {
                return Err(invalid(format!(
                    "stage {stage} of {} stages",
                    rank.spec().stages
                )));
            }
            if cap < n {
                return Err(Fail(
                    AFMESH_ERR_BUFFER_SIZE,
                    format!("trace array holds {cap}, need {n}"),
                ));
            }
            if out.is_null() {
                return Err(invalid("out is NULL"));
            }
            let mut traces = Vec::with_capacity(n);
            for f in 0..n {
                let t = rank.last_trace(stage, f).ok_or_else(|| {
                    invalid(format!(
                        "stage {stage} is in flight: its trace is read once its combine is taken"
                    ))
                })?;
                traces.push(afmesh_trace {
                    post_ns: t.post_ns,
                    land_ns: t.land_ns,
                    process_ns: t.process_ns,
                    respond_ns: t.respond_ns,
                    back_ns: t.back_ns,
                });
            }
            for (f, t) in traces.into_iter().enumerate() {
                // SAFETY: `out` holds `cap >= n` entries (checked, contract).
                unsafe { out.add(f).write(t) };
            }
            // SAFETY: checked non-NULL.
            unsafe { count_out.write(n) };
            Ok(())
        })
    })
}

/// Makes progress without waiting: counts whatever has landed and notices
/// lost peers. For callers that poll. Never blocks.
///
/// # Safety
/// `a` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_progress(a: *mut afmesh_attention) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_progress", || unsafe { progress_of(a) })
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

/// Writes the rank's counters into `*out`: what its transports did and
/// what the machine took from its spinning waits (`afmesh_rank_counters`;
/// set `out->size`, e.g. with `AFMESH_RANK_COUNTERS_INIT`). Never blocks.
///
/// # Safety
/// `out` is NULL or writable for the `size` bytes it declares; `a` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_counters(
    a: *mut afmesh_attention,
    out: *mut afmesh_rank_counters,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_counters", || unsafe {
        counters_of(a, out)
    })
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
/// Any thread, even while another is inside a call on `a`: a wait there
/// returns `AFMESH_ERR_SHUTDOWN` within a few milliseconds, and the links
/// are dropped as that call returns. Free the handle only after that
/// thread is done with it.
///
/// # Safety
/// `a` is NULL or live (not freed, nor being freed).
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_abort(a: *mut afmesh_attention) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_abort", || unsafe { abort_of(a) })
}

/// Wakes a wait blocked on `a` in another thread
/// (`afmesh_attention_wait_combine*`, `afmesh_attention_wait_all`, a
/// dispatch waiting for its slot): it returns `AFMESH_ERR_INTERRUPTED`
/// within a few milliseconds, having consumed nothing. If no wait is
/// blocked, the next one that would block returns it instead (one
/// interrupt, one wait); a wait whose answer is already there returns the
/// answer. The handle stays usable. Any thread; never blocks.
///
/// # Safety
/// `a` is NULL or live (not freed, nor being freed).
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_interrupt(a: *mut afmesh_attention) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_attention_interrupt", || unsafe { interrupt_of(a) })
}

/// Frees the handle (aborting it first if it is still live). NULL is a
/// no-op. The owner's call: no other call on `a`, from any thread, may run
/// during or after it (abort, join the other thread, then free).
///
/// # Safety
/// `a` is NULL or a handle from `afmesh_attention_new*` not yet freed, and
/// no other call on it runs during or after this one.
#[no_mangle]
pub unsafe extern "C" fn afmesh_attention_free(a: *mut afmesh_attention) {
    // SAFETY: forwarded contract.
    let _ = boundary("afmesh_attention_free", || unsafe { free_of(a) });
}
