//! Where each message lands: slot offsets in the registered regions.
//!
//! FFN rank: one input slot per (stage, attention rank); attention rank:
//! one output slot per (stage, FFN rank). A slot is the 64-byte header then
//! the payload, rounded up to 64 bytes so that slots never share a cache
//! line.

use crate::error::{Error, Result};
use crate::proto::{Geometry, HEADER_LEN};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub spec: Geometry,
    pub m: usize,
    pub n: usize,
    pub in_slot: usize,
    pub out_slot: usize,
}

fn round64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

impl Layout {
    pub fn new(spec: Geometry, m: u32, n: u32) -> Result<Layout> {
        if spec.stages == 0 || spec.stages > crate::proto::header::MAX_STAGES {
            return Err(Error::config(format!(
                "stages = {} (must be 1..={})",
                spec.stages,
                crate::proto::header::MAX_STAGES
            )));
        }
        if m == 0 || n == 0 {
            return Err(Error::config(format!(
                "mesh {m}A+{n}F: need at least one rank of each role"
            )));
        }
        let too_big = || {
            Error::config(format!(
                "stage geometry overflows: {} stages, {} tokens, row_bytes {}, out_row_bytes {}, side_bytes {} ({m}A+{n}F)",
                spec.stages, spec.max_tokens, spec.row_bytes, spec.out_row_bytes, spec.side_bytes
            ))
        };
        let mt = spec.max_tokens as usize;
        let in_slot = mt
            .checked_mul(spec.row_bytes as usize)
            .and_then(|x| x.checked_add(spec.side_bytes as usize + HEADER_LEN))
            .map(round64)
            .ok_or_else(too_big)?;
        let out_slot = mt
            .checked_mul(spec.out_row_bytes as usize)
            .and_then(|x| x.checked_add(HEADER_LEN))
            .map(round64)
            .ok_or_else(too_big)?;
        if in_slot > u32::MAX as usize || out_slot > u32::MAX as usize {
            return Err(too_big());
        }
        let l = Layout {
            spec,
            m: m as usize,
            n: n as usize,
            in_slot,
            out_slot,
        };
        l.in_region_len().ok_or_else(too_big)?;
        l.out_region_len().ok_or_else(too_big)?;
        Ok(l)
    }

    pub fn stages(&self) -> usize {
        self.spec.stages as usize
    }

    /// Bytes of an FFN rank's input region.
    pub fn in_region_len(&self) -> Option<usize> {
        self.stages().checked_mul(self.m)?.checked_mul(self.in_slot)
    }

    /// Bytes of an attention rank's output region.
    pub fn out_region_len(&self) -> Option<usize> {
        self.stages()
            .checked_mul(self.n)?
            .checked_mul(self.out_slot)
    }

    /// Offset of attention rank `a`'s input slot for `stage` on an FFN rank.
    pub fn in_offset(&self, stage: usize, a: usize) -> usize {
        (stage * self.m + a) * self.in_slot
    }

    /// Offset of FFN rank `f`'s output slot for `stage` on an attention rank.
    pub fn out_offset(&self, stage: usize, f: usize) -> usize {
        (stage * self.n + f) * self.out_slot
    }
}
