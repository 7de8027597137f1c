//! A gathered stage as the FFN rank's caller sees it: every attention
//! rank's rows and side block, viewed in place until it is answered.

use super::*;

#[derive(Debug)]
pub struct Batch {
    pub(super) stage: u32,
    pub(super) seq: u32,
    pub(super) row_bytes: u32,
    pub(super) max_tokens: u32,
    /// Offset of the stage's `[M × max_tokens, row_bytes]` matrix, under
    /// the matrix layout (never 0: the heads come first). Small, so that
    /// a `RespondError` carrying the batch stays small.
    pub(super) matrix: Option<std::num::NonZeroUsize>,
    /// Per attention rank, what its counted dispatch said.
    pub(super) parts: Vec<Part>,
    pub(super) region: Arc<Region>,
    pub(super) process_ns: u64,
}

/// One attention rank's part of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Part {
    /// Its input slot (head slot, under the matrix layout) in the region:
    /// the header, then the side area.
    pub(super) offset: usize,
    /// Its rows in the region.
    pub(super) rows: usize,
    pub(super) tokens: u32,
    pub(super) side_len: u32,
    pub(super) post_ns: u64,
    pub(super) land_ns: u64,
    /// Its side block is in the region's host mirror only (a cuda peer).
    pub(super) mirrored: bool,
}

impl Batch {
    /// The stage.
    pub fn stage(&self) -> u32 {
        self.stage
    }
    /// The stage's sequence number.
    pub fn sequence(&self) -> u32 {
        self.seq
    }
    /// Number of senders (attention ranks).
    pub fn senders(&self) -> usize {
        self.parts.len()
    }
    /// Tokens attention rank `a` sent.
    pub fn token_count(&self, a: usize) -> usize {
        self.parts.get(a).map_or(0, |p| p.tokens as usize)
    }
    /// Bytes of one dispatched row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes as usize
    }
    /// Tokens from all senders.
    pub fn total_tokens(&self) -> usize {
        self.parts.iter().map(|p| p.tokens as usize).sum()
    }
    /// Attention rank `a`'s rows, zero-copy.
    pub fn tokens(&self, a: usize) -> &[u8] {
        let Some(p) = self.parts.get(a) else {
            return &[];
        };
        self.region
            .slice(p.rows, p.tokens as usize * self.row_bytes())
            .unwrap_or(&[])
    }
    /// The stage's rows as one `[M × max_tokens, row_bytes]` matrix,
    /// zero-copy: attention rank `a`'s rows start at row `a × max_tokens`
    /// ([`Batch::sender_rows`]). `None` unless the mesh uses the matrix
    /// layout ([`crate::StageLayout::Matrix`]), and for device memory (use
    /// [`Batch::matrix_addr`]).
    ///
    /// A sender that sent fewer than `max_tokens` rows leaves the rest of
    /// its block stale: rows past its count hold whatever an earlier
    /// dispatch of the stage left there (zeros before the first). A GEMM
    /// over the whole matrix computes on them too; use only the rows in
    /// each sender's range.
    pub fn matrix(&self) -> Option<&[u8]> {
        let at = self.matrix?.get();
        self.region.slice(at, self.matrix_len()).ok()
    }
    /// The matrix's address (a device address for device memory), valid
    /// while the batch lives; `None` under the slots layout.
    pub fn matrix_addr(&self) -> Option<u64> {
        let at = self.matrix?.get();
        self.region.addr_of(at, self.matrix_len()).ok()
    }
    /// Bytes of the matrix: `M × max_tokens × row_bytes`.
    pub fn matrix_len(&self) -> usize {
        self.parts.len() * self.max_tokens() * self.row_bytes()
    }
    /// Most tokens per sender (the matrix's rows per sender).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens as usize
    }
    /// The rows of the matrix that hold attention rank `a`'s tokens: from
    /// row `a × max_tokens`, `token_count(a)` of them. `None` for a sender
    /// out of range, and under the slots layout (no matrix).
    pub fn sender_rows(&self, a: usize) -> Option<std::ops::Range<usize>> {
        self.matrix?;
        let p = self.parts.get(a)?;
        let start = a * self.max_tokens();
        Some(start..start + p.tokens as usize)
    }
    /// Attention rank `a`'s side block, zero-copy.
    pub fn side(&self, a: usize) -> &[u8] {
        let Some(p) = self.parts.get(a) else {
            return &[];
        };
        self.region
            .slice(p.offset + HEADER_LEN, p.side_len as usize)
            .unwrap_or(&[])
    }
    /// What memory the batch's rows are in ([`Batch::tokens`] and
    /// [`Batch::side`] are empty for device memory: use
    /// [`Batch::tokens_addr`] and [`Batch::copy_side`]).
    pub fn memory(&self) -> MemoryKind {
        self.region.kind()
    }
    /// Attention rank `a`'s rows as an address (a device address for
    /// device memory), valid while the batch lives.
    pub fn tokens_addr(&self, a: usize) -> Option<u64> {
        let p = self.parts.get(a)?;
        self.region
            .addr_of(p.rows, p.tokens as usize * self.row_bytes())
            .ok()
    }
    /// Copies attention rank `a`'s rows into `out` (from the GPU for
    /// device memory); returns their length.
    pub fn copy_tokens(&self, a: usize, out: &mut [u8]) -> Result<usize> {
        let p = self
            .parts
            .get(a)
            .ok_or_else(|| Error::invalid(format!("sender {a}: only {}", self.parts.len())))?;
        let n = p.tokens as usize * self.row_bytes();
        let Some(out) = out.get_mut(..n) else {
            return Err(Error::BufferSize {
                what: format!("copy of rows from {a}"),
                need: n,
                got: out.len(),
            });
        };
        self.region.copy_out(p.rows, out).map_err(Error::invalid)?;
        Ok(n)
    }
    /// Copies attention rank `a`'s side block into `out` (for device
    /// memory: from the receive region's host mirror where a cuda peer
    /// left it, which never copies it to the device; else from the GPU);
    /// returns its length.
    pub fn copy_side(&self, a: usize, out: &mut [u8]) -> Result<usize> {
        let p = self
            .parts
            .get(a)
            .ok_or_else(|| Error::invalid(format!("sender {a}: only {}", self.parts.len())))?;
        let n = p.side_len as usize;
        let Some(out) = out.get_mut(..n) else {
            return Err(Error::BufferSize {
                what: format!("copy of side block {a}"),
                need: n,
                got: out.len(),
            });
        };
        if p.mirrored {
            // A cuda peer leaves header and side block in the host mirror.
            self.region.copy_header(p.offset + HEADER_LEN, out)
        } else {
            self.region.copy_out(p.offset + HEADER_LEN, out)
        }
        .map_err(Error::invalid)?;
        Ok(n)
    }
    /// When attention rank `a` posted its dispatch (its clock, ns).
    pub fn posted_ns(&self, a: usize) -> u64 {
        self.parts.get(a).map_or(0, |p| p.post_ns)
    }
    /// When attention rank `a`'s dispatch was seen here (ns).
    pub fn landed_ns(&self, a: usize) -> u64 {
        self.parts.get(a).map_or(0, |p| p.land_ns)
    }
}
