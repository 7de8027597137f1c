//! `afmesh_ffn_*`: an FFN rank, which takes each stage's gathered batch
//! and sends every attention rank its rows back.

use std::ffi::c_void;

use afmesh_core::transport::Region;
use afmesh_core::{Error, FfnRank, Mesh, RankStats, StageSpec};

use crate::args::{bytes, ms, obj};
use crate::batch::afmesh_batch;
use crate::config::{afmesh_config, afmesh_stage_spec, construct, memory_len, Source};
use crate::error::{afmesh_result, boundary, invalid, Fail};
use crate::handle::{
    abort_of, afmesh_peer_stats, afmesh_rank_info, finalize_of, info_of, progress_of, stats_of,
    Handle, RankOps, State,
};

/// An FFN rank (opaque).
#[derive(Debug)]
pub struct afmesh_ffn {
    state: State<FfnRank>,
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
}

impl Handle for afmesh_ffn {
    type Rank = FfnRank;
    fn state(&mut self) -> &mut State<FfnRank> {
        &mut self.state
    }
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
        let f = unsafe { obj(f, "f") }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let b = match f.state.live("FFN rank")?.try_get_batch()? {
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
