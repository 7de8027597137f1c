//! Where each message is built and where it lands: slot offsets in the
//! send and receive regions.
//!
//! A dispatch slot is the 64-byte header, the side area
//! (`round_up_64(side_bytes)`, the side block at its start), then the rows
//! (`max_tokens × row_bytes`) at the fixed 64-aligned offset
//! [`Layout::rows_at`]. A combine slot is the header then the rows
//! (`max_tokens × out_row_bytes`). Slots are rounded up to 64 bytes so that
//! they never share a cache line. A message is the prefix of its slot:
//! header, side area, and the rows actually sent.
//!
//! Receive regions: an FFN rank has a dispatch slot per (stage, attention
//! rank), an attention rank a combine slot per (stage, FFN rank). Send
//! regions: an attention rank has a dispatch slot per stage (the same
//! message goes to every FFN rank), an FFN rank a combine slot per (stage,
//! attention rank). A message leaves its send slot and lands in a receive
//! slot of the same shape.
//!
//! Under [`StageLayout::Matrix`] an FFN rank's input region is, per stage,
//! the M head slots (header and side area, `rows_at` bytes each) and then
//! one `[M × max_tokens, row_bytes]` matrix (64-aligned), attention rank
//! `a`'s rows from row `a × max_tokens`. Send slots keep their shape: a
//! dispatch leaves as two writes, the rows into the matrix and then the
//! head (header and side area, with the imm) into its head slot.

use crate::error::{Error, Result};
use crate::proto::{Geometry, Role, StageLayout, HEADER_LEN};
use crate::transport::slots::SendSlots;
use crate::transport::{MemoryKind, Region};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub spec: Geometry,
    pub m: usize,
    pub n: usize,
    /// Bytes of a dispatch slot.
    pub in_slot: usize,
    /// Bytes of a combine slot.
    pub out_slot: usize,
    /// Bytes of the side area of a dispatch slot.
    pub side_area: usize,
    /// Where dispatches land on an FFN rank.
    pub stage_layout: StageLayout,
    /// Bytes of one stage of an FFN rank's input region.
    pub in_stage: usize,
}

fn round64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

impl Layout {
    pub fn new(spec: Geometry, m: u32, n: u32, stage_layout: StageLayout) -> Result<Layout> {
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
        let side_area = round64(spec.side_bytes as usize);
        let in_slot = mt
            .checked_mul(spec.row_bytes as usize)
            .and_then(|x| x.checked_add(side_area + HEADER_LEN))
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
        let head = HEADER_LEN + side_area;
        let in_stage = match stage_layout {
            StageLayout::Slots => (m as usize).checked_mul(in_slot),
            StageLayout::Matrix => (m as usize)
                .checked_mul(mt)
                .and_then(|x| x.checked_mul(spec.row_bytes as usize))
                .map(round64)
                .and_then(|x| x.checked_add((m as usize).checked_mul(head)?)),
        }
        .ok_or_else(too_big)?;
        let l = Layout {
            spec,
            m: m as usize,
            n: n as usize,
            in_slot,
            out_slot,
            side_area,
            stage_layout,
            in_stage,
        };
        l.in_region_len().ok_or_else(too_big)?;
        l.out_region_len().ok_or_else(too_big)?;
        l.attention_send_len().ok_or_else(too_big)?;
        l.ffn_send_len().ok_or_else(too_big)?;
        Ok(l)
    }

    pub fn stages(&self) -> usize {
        self.spec.stages as usize
    }

    /// Bytes of an FFN rank's input region.
    pub fn in_region_len(&self) -> Option<usize> {
        self.stages().checked_mul(self.in_stage)
    }

    /// Bytes of an attention rank's output region.
    pub fn out_region_len(&self) -> Option<usize> {
        self.stages()
            .checked_mul(self.n)?
            .checked_mul(self.out_slot)
    }

    /// Bytes of an attention rank's send region: a dispatch slot per stage.
    pub fn attention_send_len(&self) -> Option<usize> {
        self.stages().checked_mul(self.in_slot)
    }

    /// Bytes of an FFN rank's send region: a combine slot per (stage,
    /// attention rank).
    pub fn ffn_send_len(&self) -> Option<usize> {
        self.stages()
            .checked_mul(self.m)?
            .checked_mul(self.out_slot)
    }

    /// A rank's send slots in `kind` memory (library memory,
    /// process-private: peers never write it; a GPU's for device ranks).
    pub fn send_slots_in(&self, role: Role, kind: MemoryKind) -> Result<SendSlots> {
        self.send_slots_from(role, |len| match kind {
            MemoryKind::Host => Region::alloc(len).map_err(Error::config),
            MemoryKind::Cuda { device } => Region::alloc_device(device, len.max(1)),
        })
    }

    /// A rank's send slots in the region `make(len)` gives.
    pub(crate) fn send_slots_from(
        &self,
        role: Role,
        make: impl FnOnce(usize) -> Result<Region>,
    ) -> Result<SendSlots> {
        let (len, slot, count) = match role {
            Role::Attention => (self.attention_send_len(), self.in_slot, self.stages()),
            Role::Ffn => (self.ffn_send_len(), self.out_slot, self.stages() * self.m),
        };
        let len = len.ok_or_else(|| Error::config("send region size overflows"))?;
        SendSlots::new(make(len)?, slot, count)
    }

    /// Offset of the rows in a dispatch slot (64-aligned).
    pub fn rows_at(&self) -> usize {
        HEADER_LEN + self.side_area
    }

    /// Offset of attention rank `a`'s input slot for `stage` on an FFN rank
    /// (its head slot under the matrix layout): where its header lands.
    pub fn in_offset(&self, stage: usize, a: usize) -> usize {
        match self.stage_layout {
            StageLayout::Slots => (stage * self.m + a) * self.in_slot,
            StageLayout::Matrix => stage * self.in_stage + a * self.rows_at(),
        }
    }

    /// Offset of the `[M × max_tokens, row_bytes]` matrix of `stage` on an
    /// FFN rank; `None` under the slots layout.
    pub fn matrix_offset(&self, stage: usize) -> Option<usize> {
        match self.stage_layout {
            StageLayout::Slots => None,
            StageLayout::Matrix => Some(stage * self.in_stage + self.m * self.rows_at()),
        }
    }

    /// Offset of attention rank `a`'s rows for `stage` on an FFN rank.
    pub fn in_rows_offset(&self, stage: usize, a: usize) -> usize {
        match self.matrix_offset(stage) {
            None => self.in_offset(stage, a) + self.rows_at(),
            Some(at) => at + a * self.spec.max_tokens as usize * self.spec.row_bytes as usize,
        }
    }

    /// The engine's view of an FFN rank's input region: where (stage,
    /// peer)'s header is, and, under the matrix layout, its rows.
    pub fn in_receive(&self) -> crate::engine::Places {
        crate::engine::Places {
            stage_stride: self.in_stage,
            peer_stride: match self.stage_layout {
                StageLayout::Slots => self.in_slot,
                StageLayout::Matrix => self.rows_at(),
            },
            rows: self.matrix_offset(0).map(|at| crate::engine::MatrixRows {
                at,
                peer_stride: self.spec.max_tokens as usize * self.spec.row_bytes as usize,
                side_area: self.side_area,
            }),
        }
    }

    /// The engine's view of an attention rank's output region (combine
    /// slots, header first).
    pub fn out_receive(&self) -> crate::engine::Places {
        crate::engine::Places {
            stage_stride: self.n * self.out_slot,
            peer_stride: self.out_slot,
            rows: None,
        }
    }

    /// Offset of FFN rank `f`'s output slot for `stage` on an attention rank.
    pub fn out_offset(&self, stage: usize, f: usize) -> usize {
        (stage * self.n + f) * self.out_slot
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn side_area_sits_before_the_rows_at_a_64_aligned_offset() {
        let spec = Geometry {
            stages: 3,
            max_tokens: 5,
            row_bytes: 10,
            out_row_bytes: 6,
            side_bytes: 70,
        };
        let l = Layout::new(spec, 2, 4, StageLayout::Slots).unwrap();
        assert_eq!(l.side_area, 128);
        assert_eq!(l.rows_at(), 64 + 128);
        assert_eq!(l.in_slot, (64 + 128 + 50usize).div_ceil(64) * 64);
        assert_eq!(l.out_slot, 128);
        assert_eq!(l.in_offset(2, 1), 5 * l.in_slot);
        assert_eq!(l.out_offset(1, 3), 7 * l.out_slot);
        // Send regions: a dispatch slot per stage; a combine slot per
        // (stage, attention rank).
        let a = l.send_slots_in(Role::Attention, MemoryKind::Host).unwrap();
        assert_eq!((a.count(), a.slot_len()), (3, l.in_slot));
        let f = l.send_slots_in(Role::Ffn, MemoryKind::Host).unwrap();
        assert_eq!((f.count(), f.slot_len()), (6, l.out_slot));
        let none = Layout::new(
            Geometry {
                side_bytes: 0,
                ..spec
            },
            1,
            1,
            StageLayout::Slots,
        )
        .unwrap();
        assert_eq!(none.rows_at(), 64);
    }

    #[test]
    fn overflow_is_a_config_error_naming_the_geometry() {
        let spec = Geometry {
            stages: 128,
            max_tokens: u32::MAX,
            row_bytes: u32::MAX,
            out_row_bytes: 1,
            side_bytes: 0,
        };
        match Layout::new(spec, 1, 1, StageLayout::Matrix) {
            Err(Error::Config(m)) => {
                assert!(
                    m.contains("row_bytes 4294967295") && !m.contains('{'),
                    "{m}"
                )
            }
            other => panic!("expected Config, got {other:?}"),
        }
    }

    #[test]
    fn the_matrix_layout_puts_heads_first_then_one_matrix_per_stage() {
        let spec = Geometry {
            stages: 2,
            max_tokens: 3,
            row_bytes: 10,
            out_row_bytes: 6,
            side_bytes: 70,
        };
        let l = Layout::new(spec, 4, 2, StageLayout::Matrix).unwrap();
        let head = 64 + 128;
        // Per stage: 4 heads, then 4 × 3 rows of 10 bytes (rounded to 64).
        assert_eq!(l.in_stage, 4 * head + 128);
        assert_eq!(l.in_region_len(), Some(2 * l.in_stage));
        assert_eq!(l.in_offset(1, 2), l.in_stage + 2 * head);
        assert_eq!(l.matrix_offset(1), Some(l.in_stage + 4 * head));
        assert_eq!(l.in_rows_offset(1, 3), l.in_stage + 4 * head + 3 * 30);
        assert_eq!(l.matrix_offset(0).unwrap() % 64, 0);
        // Senders' rows are adjacent: a's last row ends where a + 1 begins.
        assert_eq!(l.in_rows_offset(0, 1) + 30, l.in_rows_offset(0, 2));
        // Send slots and the combine side are unchanged.
        let slots = Layout::new(spec, 4, 2, StageLayout::Slots).unwrap();
        assert_eq!((l.in_slot, l.out_slot), (slots.in_slot, slots.out_slot));
        assert_eq!(l.out_region_len(), slots.out_region_len());
        assert_eq!(slots.matrix_offset(0), None);
        assert_eq!(slots.in_rows_offset(1, 3), slots.in_offset(1, 3) + head);
    }
}
