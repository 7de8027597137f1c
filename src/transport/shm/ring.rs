//! A single-producer, single-consumer ring of write notices in shared
//! memory.
//!
//! Each 32-byte entry carries its own sequence number (index + 1), stored
//! last: the consumer knows an entry is new by reading the entry itself, so
//! one notice costs one cache line crossing cores, not a line for the entry
//! plus a line for a shared head index. The consumer's tail index lives on
//! its own cache line; the producer reads it only when its cached copy says
//! the ring is full, which a correct mesh (a few messages in flight per
//! link) never reaches.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of the ring header (the consumer's tail line, and a spare line).
pub const RING_HEADER: usize = 128;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 32;
const SEQ_OFF: usize = 24;

/// The entry flag for "this write carries an imm".
pub const FLAG_IMM: u32 = 1;
/// The entry flag for "the producer closed the link in order".
pub const FLAG_CLOSE: u32 = 2;

/// A write notice: `len` bytes landed at `offset` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// Target region id.
    pub region: u32,
    /// Payload length.
    pub len: u32,
    /// Offset in the region.
    pub offset: u64,
    /// The immediate.
    pub imm: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// Bytes a ring of `cap` entries occupies.
pub fn ring_bytes(cap: u32) -> usize {
    RING_HEADER + cap as usize * ENTRY_LEN
}

/// A view of one ring inside a mapping. The producer's position is its
/// own (one producer per ring, for the life of the link).
#[derive(Debug)]
pub struct Ring {
    base: *mut u8,
    cap: u32,
    head: u64,
    cached_tail: u64,
}

// SAFETY: the ring is a view of shared memory; entries are written only by
// the one producer and the tail only by the one consumer (the SPSC contract
// the transport keeps: one link end per side), through atomics for the
// fields that publish.
unsafe impl Send for Ring {}

/// What `pop` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pop {
    /// An entry.
    Entry(Entry),
    /// Nothing new.
    Empty,
}

impl Ring {
    /// A ring of `cap` entries at `base`.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and point at [`ring_bytes`]`(cap)`
    /// bytes of (shared) memory that stay mapped as long as the ring is
    /// used, zeroed when the ring was first created.
    pub unsafe fn new(base: *mut u8, cap: u32) -> Ring {
        Ring {
            base,
            cap: cap.max(1),
            head: 0,
            cached_tail: 0,
        }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: `base` is aligned and mapped (`new`'s contract).
        unsafe { &*self.base.cast::<AtomicU64>() }
    }

    fn slot(&self, i: u64) -> *mut u8 {
        // SAFETY: the index is reduced modulo `cap`, so the slot lies in the
        // mapped entry array.
        unsafe {
            self.base
                .add(RING_HEADER + (i % u64::from(self.cap)) as usize * ENTRY_LEN)
        }
    }

    fn seq(&self, i: u64) -> &AtomicU32 {
        // SAFETY: inside the slot (see `slot`), 4-byte aligned (slots are
        // 32-byte aligned, the field is at 24).
        unsafe { &*self.slot(i).add(SEQ_OFF).cast::<AtomicU32>() }
    }

    /// Producer: appends `e`; `false` if the ring is full.
    pub fn push(&mut self, e: Entry) -> bool {
        let cap = u64::from(self.cap);
        if self.head.wrapping_sub(self.cached_tail) >= cap {
            self.cached_tail = self.tail().load(Ordering::Acquire);
            if self.head.wrapping_sub(self.cached_tail) >= cap {
                return false;
            }
        }
        let h = self.head;
        let mut b = [0u8; SEQ_OFF];
        b[0..4].copy_from_slice(&e.region.to_le_bytes());
        b[4..8].copy_from_slice(&e.len.to_le_bytes());
        b[8..16].copy_from_slice(&e.offset.to_le_bytes());
        b[16..20].copy_from_slice(&e.imm.to_le_bytes());
        b[20..24].copy_from_slice(&e.flags.to_le_bytes());
        // SAFETY: the slot is in the mapping and, until its sequence says
        // otherwise, the consumer does not read it.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.slot(h), SEQ_OFF) };
        // SeqCst (not just Release) so that the consumer's "sleeping" flag,
        // read after this store, cannot be seen stale (see the doorbell in
        // the transport).
        self.seq(h)
            .store((h as u32).wrapping_add(1), Ordering::SeqCst);
        self.head = h.wrapping_add(1);
        true
    }

    /// Consumer: takes the oldest entry.
    pub fn pop(&self) -> Pop {
        let t = self.tail().load(Ordering::Relaxed);
        if self.seq(t).load(Ordering::SeqCst) != (t as u32).wrapping_add(1) {
            return Pop::Empty;
        }
        let mut b = [0u8; SEQ_OFF];
        // SAFETY: in the mapping; the sequence load (acquire) made the
        // producer's entry bytes visible.
        unsafe { std::ptr::copy_nonoverlapping(self.slot(t), b.as_mut_ptr(), SEQ_OFF) };
        self.tail().store(t.wrapping_add(1), Ordering::Release);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[8..16]);
        Pop::Entry(Entry {
            region: u32_at(0),
            len: u32_at(4),
            offset: u64::from_le_bytes(off),
            imm: u32_at(16),
            flags: u32_at(20),
        })
    }

    /// Whether the consumer has anything to take.
    pub fn is_empty(&self) -> bool {
        let t = self.tail().load(Ordering::Relaxed);
        self.seq(t).load(Ordering::SeqCst) != (t as u32).wrapping_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::sys::Mapping;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn push_pop_full_and_corrupt() {
        let m = Mapping::anonymous(ring_bytes(4)).unwrap();
        // SAFETY: fresh zeroed anonymous mapping of the right size; one
        // producer view and one consumer view.
        let (mut p, c) = unsafe { (Ring::new(m.ptr(), 4), Ring::new(m.ptr(), 4)) };
        assert_eq!(c.pop(), Pop::Empty);
        for round in 0..3u32 {
            for i in 0..4 {
                let e = Entry {
                    imm: round * 10 + i,
                    ..Entry::default()
                };
                assert!(p.push(e));
            }
            assert!(!p.push(Entry::default()), "full");
            for i in 0..4 {
                let want = Entry {
                    imm: round * 10 + i,
                    ..Entry::default()
                };
                assert_eq!(c.pop(), Pop::Entry(want));
            }
            assert!(c.is_empty());
        }
    }

    /// Producer and consumer on two threads, through a shared mapping:
    /// every entry arrives exactly once, in order, across many wraps.
    #[test]
    fn concurrent_stress_exactly_once() {
        const N: u64 = 2_000_000;
        let m = Arc::new(Mapping::anonymous(ring_bytes(64)).unwrap());
        let prod = {
            let m = m.clone();
            std::thread::spawn(move || {
                // SAFETY: as above; this thread is the only producer.
                let mut r = unsafe { Ring::new(m.ptr(), 64) };
                let mut i = 0u64;
                while i < N {
                    let e = Entry {
                        region: (i >> 32) as u32,
                        len: i as u32,
                        offset: i.wrapping_mul(0x9e37_79b9),
                        imm: !(i as u32),
                        flags: FLAG_IMM,
                    };
                    if r.push(e) {
                        i += 1;
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        };
        // SAFETY: as above; this thread is the only consumer.
        let r = unsafe { Ring::new(m.ptr(), 64) };
        let mut next = 0u64;
        while next < N {
            match r.pop() {
                Pop::Entry(e) => {
                    assert_eq!(e.len, next as u32);
                    assert_eq!(e.offset, next.wrapping_mul(0x9e37_79b9));
                    assert_eq!(e.imm, !(next as u32));
                    next += 1;
                }
                Pop::Empty => std::thread::yield_now(),
            }
        }
        prod.join().unwrap();
        assert_eq!(r.pop(), Pop::Empty);
    }
}
