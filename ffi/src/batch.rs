//! `afmesh_batch_*`: a stage gathered on an FFN rank, viewed in place. The
//! views point into the batch and stay valid until it is freed.

use std::ffi::c_void;

use afmesh_core::Batch;

use crate::args::obj_ref;
use crate::error::{afmesh_result, boundary, invalid, Fail};

/// A gathered stage on an FFN rank (opaque); free with `afmesh_batch_free`.
#[derive(Debug)]
pub struct afmesh_batch {
    /// `None` once answered: `afmesh_ffn_respond` took it.
    pub(crate) batch: Option<Batch>,
}

impl afmesh_batch {
    /// The batch, unless it was answered (its views ended then).
    pub(crate) fn live(&self) -> Result<&Batch, Fail> {
        self.batch
            .as_ref()
            .ok_or_else(|| invalid("the batch was already answered (afmesh_ffn_respond)"))
    }
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
/// answered or freed). An empty part is NULL with length 0.
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
    pub side_len: usize,
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
            tokens: view_ptr(t),
            token_count: count as u32,
            row_bytes: b.row_bytes() as u32,
            side: view_ptr(s),
            side_len: s.len(),
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(view) };
        Ok(())
    })
}

/// A view's pointer: NULL for an empty one (a Rust empty slice points
/// at a dangling, non-NULL address C must never see).
fn view_ptr(s: &[u8]) -> *const c_void {
    if s.is_empty() {
        std::ptr::null()
    } else {
        s.as_ptr().cast()
    }
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
