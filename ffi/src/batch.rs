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

/// The stage's dispatched rows as one matrix (the matrix layout), viewed
/// in place: valid until the batch is answered or freed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct afmesh_matrix_view {
    /// The matrix's first byte: `rows × row_bytes` bytes, row-major,
    /// 64-byte aligned (a device pointer when the rank's stage memory is
    /// on a GPU).
    pub data: *const c_void,
    /// Rows: senders × `max_tokens`.
    pub rows: usize,
    /// Bytes of one row.
    pub row_bytes: usize,
    /// Rows per sender: sender `a`'s block starts at row `a × max_tokens`.
    pub max_tokens: usize,
}

/// The whole stage as one `[M × max_tokens, row_bytes]` matrix, zero-copy
/// (valid until the batch is answered or freed): sender `a`'s rows start
/// at row `a × max_tokens` (`afmesh_batch_sender_rows`). A sender that
/// sent fewer than `max_tokens` rows leaves the rest of its block stale
/// (what an earlier dispatch left there, zeros before the first).
/// `AFMESH_ERR_INVALID_ARGUMENT` unless the mesh uses the matrix layout
/// (`afmesh_config.layout = AFMESH_LAYOUT_MATRIX` or
/// `AFMESH_LAYOUT=matrix`). Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_batch_matrix(
    b: *const afmesh_batch,
    out: *mut afmesh_matrix_view,
) -> afmesh_result {
    boundary("afmesh_batch_matrix", || {
        // SAFETY: the caller's contract.
        let b = unsafe { obj_ref(b, "b") }?.live()?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let Some(addr) = b.matrix_addr() else {
            return Err(invalid(
                "this mesh uses the slots layout, which has no matrix: set afmesh_config.layout = AFMESH_LAYOUT_MATRIX (or AFMESH_LAYOUT=matrix) on every rank",
            ));
        };
        let view = afmesh_matrix_view {
            data: if b.matrix_len() == 0 {
                std::ptr::null()
            } else {
                addr as usize as *const c_void
            },
            rows: b.senders() * b.max_tokens(),
            row_bytes: b.row_bytes(),
            max_tokens: b.max_tokens(),
        };
        // SAFETY: checked non-NULL.
        unsafe { out.write(view) };
        Ok(())
    })
}

/// The rows of the matrix that hold attention rank `sender`'s tokens:
/// from row `*start`, `*count` of them (its token count). Outputs written
/// only on success; `AFMESH_ERR_INVALID_ARGUMENT` for a sender out of
/// range or a mesh without the matrix layout. Never blocks.
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn afmesh_batch_sender_rows(
    b: *const afmesh_batch,
    sender: u32,
    start: *mut usize,
    count: *mut usize,
) -> afmesh_result {
    boundary("afmesh_batch_sender_rows", || {
        // SAFETY: the caller's contract.
        let b = unsafe { obj_ref(b, "b") }?.live()?;
        if start.is_null() || count.is_null() {
            return Err(invalid("start or count is NULL"));
        }
        if sender as usize >= b.senders() {
            return Err(invalid(format!(
                "sender {sender} of {} senders",
                b.senders()
            )));
        }
        let Some(rows) = b.sender_rows(sender as usize) else {
            return Err(invalid(
                "this mesh uses the slots layout, which has no matrix (AFMESH_LAYOUT_MATRIX)",
            ));
        };
        // SAFETY: both checked non-NULL.
        unsafe {
            start.write(rows.start);
            count.write(rows.len());
        }
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
