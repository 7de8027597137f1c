//! `afmesh_ffn_*`: an FFN rank, which takes each stage's gathered batch
//! and sends every attention rank its rows back.

use std::ffi::c_void;

use afmesh_core::{Error, FfnRank, Mesh, RankStats, StageSpec};

use crate::args::{bytes, ms, obj};
use crate::batch::afmesh_batch;
use crate::config::{afmesh_config, afmesh_stage_spec, construct, memory_len, Buffers, Source};
use crate::error::{afmesh_result, boundary, invalid, Fail};
use crate::handle::{
    abort_of, afmesh_peer_stats, afmesh_rank_counters, afmesh_rank_info, counters_of, finalize_of,
    free_of, info_of, interrupt_of, progress_of, slot_of, stats_of, Handle, RankOps, Slot,
};

/// An FFN rank (opaque). One call at a time per handle: a call made while
/// another thread is inside one fails with `AFMESH_ERR_BUSY`; only
/// `afmesh_ffn_abort` and `afmesh_ffn_interrupt` may run alongside.
#[derive(Debug)]
pub struct afmesh_ffn {
    slot: Slot<FfnRank>,
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
    fn progress(&mut self) -> afmesh_core::Result<()> {
        FfnRank::progress(self)
    }
    fn interrupter(&self) -> afmesh_core::Interrupter {
        FfnRank::interrupter(self)
    }
}

impl Handle for afmesh_ffn {
    type Rank = FfnRank;
    fn slot(&self) -> &Slot<FfnRank> {
        &self.slot
    }
}

fn ffn_handle(mesh: Mesh, spec: StageSpec, buffers: Buffers) -> Result<afmesh_ffn, Error> {
    let rank = match buffers {
        Buffers::Library => mesh.ffn(spec)?,
        Buffers::Device(d) => mesh.ffn_on_device(spec, d)?,
        Buffers::Caller(r) => mesh.ffn_with_region(spec, r)?,
    };
    Ok(afmesh_ffn {
        slot: Slot::new(rank),
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

/// Waits up to `timeout_ms` for the oldest stage every attention rank has
/// dispatched to; `*out` owns the batch (free with `afmesh_batch_free`,
/// after `afmesh_ffn_respond`). Blocks; `afmesh_ffn_interrupt` from another
/// thread ends the wait with `AFMESH_ERR_INTERRUPTED`, `afmesh_ffn_abort`
/// with `AFMESH_ERR_SHUTDOWN`.
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
        let f = unsafe { slot_of(f, "f") }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let batch = f.with(|r| Ok(r.get_batch(ms(timeout_ms))?))?;
        let b = Box::into_raw(Box::new(afmesh_batch { batch: Some(batch) }));
        // SAFETY: checked non-NULL.
        unsafe { out.write(b) };
        Ok(())
    })
}

/// Non-blocking `afmesh_ffn_get_batch`: makes progress, and if a stage is
/// complete writes a new batch into `*out`; if none is, writes NULL into
/// `*out`. Both are `AFMESH_OK`: "nothing yet" is a successful poll, not
/// an error (as `rustls_acceptor_accept` answers a ClientHello still
/// arriving), so `r != AFMESH_OK` stays a failure test. A lost attention
/// rank the next stage needs is `AFMESH_ERR_PEER_LOST`. Never blocks.
///
/// # Safety
/// `f` is NULL or live; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_try_get_batch(
    f: *mut afmesh_ffn,
    out: *mut *mut afmesh_batch,
) -> afmesh_result {
    boundary("afmesh_ffn_try_get_batch", || {
        // SAFETY: the caller's contract.
        let f = unsafe { slot_of(f, "f") }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let b = match f.with(|r| Ok(r.try_get_batch()?))? {
            Some(batch) => Box::into_raw(Box::new(afmesh_batch { batch: Some(batch) })),
            None => std::ptr::null_mut(),
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(b) };
        Ok(())
    })
}

/// Sends each attention rank `i` its rows `outputs[i]` (`lens[i]` bytes =
/// its token count × out_row_bytes); `count` must be M. Returns once the
/// data is handed to the transport.
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
        let (f, b) = unsafe { (slot_of(f, "f")?, obj(b, "b")?) };
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
        f.with(|rank| {
            let batch = b
                .batch
                .take()
                .ok_or_else(|| invalid("the batch was already answered"))?;
            rank.respond(batch, &outs).map_err(|e| {
                // Refused arguments give the batch back: it can be answered
                // again.
                b.batch = e.batch;
                Fail::from(e.error)
            })
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

/// Writes the rank's counters into `*out`: what its transports did and
/// what the machine took from its spinning waits (`afmesh_rank_counters`;
/// set `out->size`, e.g. with `AFMESH_RANK_COUNTERS_INIT`). Never blocks.
///
/// # Safety
/// `out` is NULL or writable for the `size` bytes it declares; `f` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_counters(
    f: *mut afmesh_ffn,
    out: *mut afmesh_rank_counters,
) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_counters", || unsafe { counters_of(f, out) })
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

/// Makes progress without waiting (see `afmesh_attention_progress`).
///
/// # Safety
/// `f` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_progress(f: *mut afmesh_ffn) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_progress", || unsafe { progress_of(f) })
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

/// Drops every link at once (see `afmesh_attention_abort`). Any thread,
/// even while another is inside a call on `f`: that call returns
/// `AFMESH_ERR_SHUTDOWN` within a few milliseconds.
///
/// # Safety
/// `f` is NULL or live (not freed, nor being freed).
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_abort(f: *mut afmesh_ffn) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_abort", || unsafe { abort_of(f) })
}

/// Wakes a wait blocked in `afmesh_ffn_get_batch` on another thread (see
/// `afmesh_attention_interrupt`). Any thread; never blocks.
///
/// # Safety
/// `f` is NULL or live (not freed, nor being freed).
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_interrupt(f: *mut afmesh_ffn) -> afmesh_result {
    // SAFETY: forwarded contract.
    boundary("afmesh_ffn_interrupt", || unsafe { interrupt_of(f) })
}

/// Frees the handle (aborting it first if still live). NULL is a no-op.
/// The owner's call: no other call on `f`, from any thread, may run during
/// or after it (abort, join the other thread, then free).
///
/// # Safety
/// `f` is NULL or a handle from `afmesh_ffn_new*` not yet freed, and no
/// other call on it runs during or after this one.
#[no_mangle]
pub unsafe extern "C" fn afmesh_ffn_free(f: *mut afmesh_ffn) {
    // SAFETY: forwarded contract.
    let _ = boundary("afmesh_ffn_free", || unsafe { free_of(f) });
}
