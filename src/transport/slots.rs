//! Send slots: a rank's send region cut into fixed-size slots, each filled
//! in place and then posted as one write.
//!
//! A message is the prefix of one slot (header, then payload), so it leaves
//! from registered memory in one write. [`SendSlots`] hands out `&mut [u8]`
//! over a slot only while the slot is not posted: from
//! [`SendSlots::posted`] until the matching [`SendSlots::sent`] calls, the
//! transport may still be reading it (a NIC's DMA, a copy thread), and
//! [`SendSlots::fill`] refuses it.
//!
//! The region is process-private send memory: it is never registered for
//! remote writes, so no peer writes it, and this type owns it, so nothing
//! else in the process holds a view of it except through a borrow of this
//! type (and the transport, which reads a slot only while it is posted).

use std::sync::Arc;

use super::{MemoryKind, Region};
use crate::error::{Error, Result};

/// A message in a send slot: `len` bytes at `offset` of the send region,
/// the prefix of slot `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef {
    /// Which slot.
    pub slot: usize,
    /// Offset of the message in the send region (the slot's start).
    pub offset: usize,
    /// Bytes of the message.
    pub len: usize,
}

/// A send region of `count` slots of `slot_len` bytes each.
#[derive(Debug)]
pub struct SendSlots {
    region: Arc<Region>,
    slot_len: usize,
    /// Per slot: sends posted and not yet reported sent.
    pending: Vec<u32>,
}

impl SendSlots {
    /// Cuts `region` (which this takes over: nobody else may hold it) into
    /// `count` slots of `slot_len` bytes.
    pub fn new(region: Region, slot_len: usize, count: usize) -> Result<SendSlots> {
        match slot_len.checked_mul(count) {
            Some(need) if need <= region.len() => {}
            need => {
                return Err(Error::BufferSize {
                    what: format!("send region for {count} slots of {slot_len} bytes"),
                    need: need.unwrap_or(usize::MAX),
                    got: region.len(),
                })
            }
        }
        // Device slots: a pinned host shadow of the same layout, so a header
        // write is an enqueued copy rather than a wait (and the cuda backend
        // reads each message's header from it).
        let mut region = region;
        region.add_shadow()?;
        Ok(SendSlots {
            region: Arc::new(region),
            slot_len,
            pending: vec![0; count],
        })
    }

    /// The region, to register it with a transport (for local reads only:
    /// the soundness of [`SendSlots::fill`] rests on no peer writing it and
    /// the transport reading a slot only while it is posted).
    // Used once transports take writes from registered memory.
    #[allow(dead_code)]
    pub(crate) fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Number of slots.
    pub fn count(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of one slot.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Whether slot `i` exists and no send from it is pending.
    pub fn is_free(&self, i: usize) -> bool {
        self.pending.get(i) == Some(&0)
    }

    /// Sends from slot `i` posted and not yet reported sent.
    pub fn pending(&self, i: usize) -> u32 {
        self.pending.get(i).copied().unwrap_or(0)
    }

    fn check(&self, i: usize) -> Result<()> {
        if i >= self.pending.len() {
            return Err(Error::invalid(format!(
                "send slot {i}: only {} slots",
                self.pending.len()
            )));
        }
        Ok(())
    }

    /// Slot `i`, to write a message into; refused while a send from it is
    /// pending.
    pub fn fill(&mut self, i: usize) -> Result<&mut [u8]> {
        self.writable(i)?;
        if self.region.on_device() {
            return Err(Error::Unsupported(format!(
                "send slots in {} have no host view: write them through the device address",
                self.region.kind()
            )));
        }
        if self.slot_len == 0 {
            return Ok(&mut []);
        }
        let start = i * self.slot_len;
        // The region's address as a pointer. `Region::addr` exposed the
        // provenance of the allocation's pointer (`as` cast), so this cast
        // back is a pointer into the allocation.
        let base = self.region.addr() as usize as *mut u8;
        // SAFETY: `[start, start + slot_len)` lies inside the region: `i <
        // count` (checked above) and `count × slot_len <= len` (checked in
        // `new`), and the region's memory stays allocated while
        // `self.region` holds it. No other reference to these bytes exists
        // for the returned lifetime: `&mut self` is exclusive and every view
        // this type hands out (`message_bytes`, `region`) borrows `self`;
        // this type owns the region (taken by value in `new`); no peer
        // writes it (process-private send memory, never registered for
        // remote writes); and no transport reads the slot, because it is
        // not posted (`pending[i] == 0`, checked above). Every `u8` bit
        // pattern is valid.
        Ok(unsafe { std::slice::from_raw_parts_mut(base.add(start), self.slot_len) })
    }

    fn writable(&self, i: usize) -> Result<()> {
        self.check(i)?;
        if self.pending[i] != 0 {
            return Err(Error::invalid(format!(
                "send slot {i} is posted and not yet sent ({} sends pending)",
                self.pending[i]
            )));
        }
        Ok(())
    }

    /// Copies `bytes` to offset `at` of slot `i` (host or device memory);
    /// refused while a send from it is pending.
    pub fn write(&mut self, i: usize, at: usize, bytes: &[u8]) -> Result<()> {
        self.writable(i)?;
        if at
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.slot_len)
        {
            return Err(Error::BufferSize {
                what: format!("write into send slot {i} at {at}"),
                need: at.saturating_add(bytes.len()),
                got: self.slot_len,
            });
        }
        let off = i * self.slot_len + at;
        match (self.region.shadow(), self.region.kind()) {
            (Some(staging), MemoryKind::Cuda { device }) => {
                let dst = self
                    .region
                    .addr_of(off, bytes.len())
                    .map_err(Error::invalid)?;
                // SAFETY: `dst` is inside the device region (checked), which
                // lives as long as `self`; the staging bytes of this slot are
                // rewritten only when the slot is writable again, i.e. after
                // the sends that followed this copy completed (a posted
                // copy runs after the legacy-stream copies before it).
                unsafe {
                    staging.stage_to_device(device, off, bytes, dst, self.region.fill_stream())
                }
            }
            _ => self
                .region
                .write_gather(off as u64, &[bytes])
                .map_err(Error::invalid),
        }
    }

    /// Copies `bytes` to offset `at` of slot `i`'s pinned host shadow only
    /// (device slots whose prefix peers read from their host mirror: the
    /// device copy of those bytes is never made); refused while a send
    /// from the slot is pending, and for slots without a shadow.
    pub fn write_shadow(&mut self, i: usize, at: usize, bytes: &[u8]) -> Result<()> {
        self.writable(i)?;
        if at
            .checked_add(bytes.len())
            .is_none_or(|end| end > self.slot_len)
        {
            return Err(Error::BufferSize {
                what: format!("write into send slot {i}'s shadow at {at}"),
                need: at.saturating_add(bytes.len()),
                got: self.slot_len,
            });
        }
        let Some(shadow) = self.region.shadow() else {
            return Err(Error::invalid(format!(
                "send slot {i} has no pinned host shadow"
            )));
        };
        // SAFETY: the slot is writable, so every send from it completed,
        // and with them every copy that read its shadow bytes.
        unsafe { shadow.write(i * self.slot_len + at, bytes) }
    }

    /// The address of `len` bytes at offset `at` of slot `i` (a device
    /// address when the slots are device memory), for a copy into it;
    /// refused while a send from it is pending.
    pub fn addr(&mut self, i: usize, at: usize, len: usize) -> Result<u64> {
        self.writable(i)?;
        if at.checked_add(len).is_none_or(|end| end > self.slot_len) {
            return Err(Error::BufferSize {
                what: format!("range of send slot {i} at {at}"),
                need: at.saturating_add(len),
                got: self.slot_len,
            });
        }
        self.region
            .addr_of(i * self.slot_len + at, len)
            .map_err(Error::invalid)
    }

    /// The first `len` bytes of slot `i`, as a message to post.
    pub fn message(&self, i: usize, len: usize) -> Result<SlotRef> {
        self.check(i)?;
        if len > self.slot_len {
            return Err(Error::BufferSize {
                what: format!("message in send slot {i}"),
                need: len,
                got: self.slot_len,
            });
        }
        Ok(SlotRef {
            slot: i,
            offset: i * self.slot_len,
            len,
        })
    }

    /// The bytes of message `m`, for a transport that copies them before
    /// its write returns.
    pub fn message_bytes(&self, m: &SlotRef) -> Result<&[u8]> {
        self.check(m.slot)?;
        if m.offset != m.slot * self.slot_len || m.len > self.slot_len {
            return Err(Error::invalid(format!(
                "message of {} bytes at {} is not in send slot {}",
                m.len, m.offset, m.slot
            )));
        }
        self.region.slice(m.offset, m.len).map_err(Error::invalid)
    }

    /// `sends` more sends from slot `i` are posted: it is not filled again
    /// until as many [`SendSlots::sent`] calls came.
    pub fn posted(&mut self, i: usize, sends: u32) {
        if let Some(p) = self.pending.get_mut(i) {
            *p = p.saturating_add(sends);
        }
    }

    /// One send from slot `i` completed. Returns whether one was pending.
    pub fn sent(&mut self, i: usize) -> bool {
        match self.pending.get_mut(i) {
            Some(p) if *p > 0 => {
                *p -= 1;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn slots(count: usize, len: usize) -> SendSlots {
        SendSlots::new(Region::alloc(count * len).unwrap(), len, count).unwrap()
    }

    #[test]
    fn a_slot_is_filled_in_place_and_read_back_as_a_message() {
        let mut s = slots(3, 128);
        s.fill(1).unwrap()[..4].copy_from_slice(b"abcd");
        s.fill(2).unwrap()[0] = 9;
        let m = s.message(1, 4).unwrap();
        assert_eq!(
            m,
            SlotRef {
                slot: 1,
                offset: 128,
                len: 4
            }
        );
        assert_eq!(s.message_bytes(&m).unwrap(), b"abcd");
        assert_eq!(s.message_bytes(&s.message(2, 1).unwrap()).unwrap(), &[9]);
        assert_eq!(s.fill(0).unwrap().len(), 128);
    }

    #[test]
    fn a_posted_slot_is_refused_until_every_send_completed() {
        let mut s = slots(2, 64);
        s.posted(0, 2);
        assert!(!s.is_free(0) && s.is_free(1));
        assert!(matches!(s.fill(0), Err(Error::InvalidArgument(_))));
        assert!(s.fill(1).is_ok(), "other slots are unaffected");
        assert!(s.sent(0));
        assert_eq!(s.pending(0), 1);
        assert!(s.fill(0).is_err());
        assert!(s.sent(0));
        assert!(!s.sent(0), "nothing left to complete");
        assert!(s.is_free(0));
        assert!(s.fill(0).is_ok());
    }

    #[test]
    fn bounds_are_checked() {
        assert!(matches!(
            SendSlots::new(Region::alloc(100).unwrap(), 64, 2),
            Err(Error::BufferSize { need: 128, .. })
        ));
        assert!(SendSlots::new(Region::alloc(10).unwrap(), usize::MAX, 2).is_err());
        let mut s = slots(2, 64);
        assert!(s.fill(2).is_err());
        assert!(s.message(2, 1).is_err());
        assert!(s.message(1, 65).is_err());
        let forged = SlotRef {
            slot: 0,
            offset: 64,
            len: 8,
        };
        assert!(s.message_bytes(&forged).is_err());
        assert!(!s.is_free(2) && !s.sent(2));
        s.posted(7, 1); // no such slot: ignored
        assert!(s.is_free(0) && s.is_free(1));
        let mut empty = SendSlots::new(Region::alloc(0).unwrap(), 0, 3).unwrap();
        assert!(empty.fill(2).unwrap().is_empty());
    }
}
