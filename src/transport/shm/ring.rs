//! A single-producer, single-consumer ring of write notices in shared
//! memory.
//!
//! Each 32-byte entry is an encoded [`Notice`](crate::transport::notice)
//! and its own sequence number (index + 1), stored last: the consumer knows
//! an entry is new by reading the entry itself, so one notice costs one
//! cache line crossing cores, not a line for the entry plus a line for a
//! shared head index. The consumer's tail index lives on its own cache
//! line; the producer reads it only when its cached copy says the ring is
//! full, which a correct mesh (a few messages in flight per link) never
//! reaches.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::transport::notice::NOTICE_LEN;

/// Bytes of the ring header (the consumer's tail line, and a spare line).
pub const RING_HEADER: usize = 128;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 32;
/// The sequence word follows the notice.
const SEQ_OFF: usize = NOTICE_LEN;
const _: () = assert!(SEQ_OFF + 4 <= ENTRY_LEN && SEQ_OFF % 4 == 0);

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

    /// Producer: appends an encoded notice; `false` if the ring is full.
    pub fn push(&mut self, notice: &[u8; NOTICE_LEN]) -> bool {
        let cap = u64::from(self.cap);
        if self.head.wrapping_sub(self.cached_tail) >= cap {
            self.cached_tail = self.tail().load(Ordering::Acquire);
            if self.head.wrapping_sub(self.cached_tail) >= cap {
                return false;
            }
        }
        let h = self.head;
        // SAFETY: the slot is in the mapping and, until its sequence says
        // otherwise, the consumer does not read it.
        unsafe { std::ptr::copy_nonoverlapping(notice.as_ptr(), self.slot(h), NOTICE_LEN) };
        // SeqCst (not just Release) so that the consumer's "sleeping" flag,
        // read after this store, cannot be seen stale (see the doorbell in
        // the transport).
        self.seq(h)
            .store((h as u32).wrapping_add(1), Ordering::SeqCst);
        self.head = h.wrapping_add(1);
        true
    }

    /// Consumer: takes the oldest encoded notice.
    pub fn pop(&self) -> Option<[u8; NOTICE_LEN]> {
        let t = self.tail().load(Ordering::Relaxed);
        if self.seq(t).load(Ordering::SeqCst) != (t as u32).wrapping_add(1) {
            return None;
        }
        let mut b = [0u8; NOTICE_LEN];
        // SAFETY: in the mapping; the sequence load (acquire) made the
        // producer's entry bytes visible.
        unsafe { std::ptr::copy_nonoverlapping(self.slot(t), b.as_mut_ptr(), NOTICE_LEN) };
        self.tail().store(t.wrapping_add(1), Ordering::Release);
        Some(b)
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
    use crate::transport::notice::Notice;
    use std::sync::Arc;

    fn notice(i: u64) -> Notice {
        Notice {
            region: (i >> 32) as u32,
            len: i as u32,
            offset: i.wrapping_mul(0x9e37_79b9),
            imm: Some(!(i as u32)),
            close: false,
        }
    }

    #[test]
    fn push_pop_full() {
        let m = Mapping::anonymous(ring_bytes(4)).unwrap();
        // SAFETY: fresh zeroed anonymous mapping of the right size; one
        // producer view and one consumer view.
        let (mut p, c) = unsafe { (Ring::new(m.ptr(), 4), Ring::new(m.ptr(), 4)) };
        assert_eq!(c.pop(), None);
        for round in 0..3u64 {
            for i in 0..4 {
                assert!(p.push(&notice(round * 10 + i).encode()));
            }
            assert!(!p.push(&Notice::CLOSE.encode()), "full");
            for i in 0..4 {
                assert_eq!(c.pop(), Some(notice(round * 10 + i).encode()));
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
                    if r.push(&notice(i).encode()) {
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
                Some(b) => {
                    assert_eq!(Notice::decode(&b), Ok(notice(next)));
                    next += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        prod.join().unwrap();
        assert_eq!(r.pop(), None);
    }
}
