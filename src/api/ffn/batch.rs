//! A gathered stage as the FFN rank's caller sees it: every attention
//! rank's rows and side block, viewed in place until it is answered.

use super::*;

#[derive(Debug)]
pub struct Batch {
    pub(super) stage: u32,
    pub(super) seq: u32,
    pub(super) row_bytes: usize,
    /// Offset of the rows in a slot (after the header and the side area).
    pub(super) rows_at: usize,
    /// Per attention rank, what its counted dispatch said.
    pub(super) parts: Vec<Part>,
    pub(super) region: Arc<Region>,
    pub(super) process_ns: u64,
}

/// One attention rank's part of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Part {
    /// Its input slot in the region.
    pub(super) offset: usize,
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
        self.row_bytes
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
            .slice(p.offset + self.rows_at, p.tokens as usize * self.row_bytes)
            .unwrap_or(&[])
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
            .addr_of(p.offset + self.rows_at, p.tokens as usize * self.row_bytes)
            .ok()
    }
    /// Copies attention rank `a`'s rows into `out` (from the GPU for
    /// device memory); returns their length.
    pub fn copy_tokens(&self, a: usize, out: &mut [u8]) -> Result<usize> {
        let p = self
            .parts
            .get(a)
            .ok_or_else(|| Error::invalid(format!("sender {a}: only {}", self.parts.len())))?;
        let n = p.tokens as usize * self.row_bytes;
        let Some(out) = out.get_mut(..n) else {
            return Err(Error::BufferSize {
                what: format!("copy of rows from {a}"),
                need: n,
                got: out.len(),
            });
        };
        self.region
            .copy_out(p.offset + self.rows_at, out)
            .map_err(Error::invalid)?;
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
