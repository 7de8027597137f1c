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
//!
//! Orderings, and what each pairs with:
//!
//! * `push` stores the sequence with `Release` after writing the notice;
//!   `pop` (and `is_empty`) load it with `Acquire`. A consumer that sees
//!   the sequence sees the notice.
//! * `pop` stores the tail with `Release` after copying the notice out;
//!   `push` loads it with `Acquire` when the ring looks full. The producer
//!   rewrites a slot only after the consumer is done reading it.
//! * `pop` loads the tail `Relaxed`: only the consumer writes it.
//!
//! Parking is not the ring's business: the producer's "publish, then see
//! whether the consumer sleeps" against the consumer's "announce sleep,
//! then re-check" is ordered by the `SeqCst` fences of the doorbell
//! (`segment::Bell`), which run after `push` and before the re-check.
//! On x86 every access here is a plain `mov`.
//!
//! The ring's code is generic over where its slots live ([`Slots`]), so
//! loom can run it: the `loom_tests` below push three notices through a
//! ring of two over loom's memory and check that each arrives once, in
//! order, intact; `segment`'s check the doorbell on top of the ring.
//! `scripts/loom` runs both. Weakening any of the orderings above (or
//! either doorbell fence) makes loom fail them.

use crate::sync::shared::{AtomicU32, AtomicU64};
use crate::sync::Ordering;
use crate::transport::notice::NOTICE_LEN;

/// Bytes of the ring header (the consumer's tail line, and a spare line).
pub const RING_HEADER: usize = 128;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 32;
/// The sequence word follows the notice.
const SEQ_OFF: usize = NOTICE_LEN;
const _: () = assert!(SEQ_OFF + 4 <= ENTRY_LEN && SEQ_OFF.is_multiple_of(4));

/// Bytes a ring of `cap` entries occupies.
pub fn ring_bytes(cap: u32) -> usize {
    RING_HEADER + cap as usize * ENTRY_LEN
}

/// Where a ring keeps its tail, its sequence words and its notices:
/// [`Mapped`] shared memory in production, loom-modelled memory in the
/// model tests. Index `i` means the slot `i % cap`.
pub trait Slots {
    /// Entries in the ring (at least 1).
    fn cap(&self) -> u32;
    /// Loads the consumer's tail.
    fn load_tail(&self, order: Ordering) -> u64;
    /// Stores the consumer's tail.
    fn store_tail(&self, tail: u64, order: Ordering);
    /// Loads the sequence word of slot `i`.
    fn load_seq(&self, i: u64, order: Ordering) -> u32;
    /// Stores the sequence word of slot `i`.
    fn store_seq(&self, i: u64, seq: u32, order: Ordering);
    /// Writes the notice of slot `i`.
    ///
    /// # Safety
    /// Only the ring's one producer, while the slot is free: the consumer
    /// has moved the tail past the slot's previous entry.
    unsafe fn write(&self, i: u64, notice: &[u8; NOTICE_LEN]);
    /// Reads the notice of slot `i`.
    ///
    /// # Safety
    /// Only the ring's one consumer, after it saw the slot's sequence
    /// published and before it moves the tail past it.
    unsafe fn read(&self, i: u64) -> [u8; NOTICE_LEN];
}

/// A ring's slots in a (shared) mapping.
#[derive(Debug)]
pub struct Mapped {
    base: *mut u8,
    cap: u32,
    /// `cap - 1` when `cap` is a power of two (a mask, not a division, on
    /// every poll); else 0.
    mask: u64,
}

// SAFETY: a view of shared memory; entries are written only by the one
// producer and the tail only by the one consumer (the SPSC contract the
// transport keeps: one link end per side), through atomics for the fields
// that publish.
unsafe impl Send for Mapped {}

impl Mapped {
    #[inline(always)]
    fn slot(&self, i: u64) -> *mut u8 {
        let at = if self.mask != 0 {
            i & self.mask
        } else {
            i % u64::from(self.cap)
        };
        // SAFETY: the index is reduced modulo `cap` (the mask is `cap - 1`
        // for a power of two), so the slot lies in the mapped entry array
        // (`Ring::new`'s contract).
        unsafe { self.base.add(RING_HEADER + at as usize * ENTRY_LEN) }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: `base` is aligned and mapped (`Ring::new`'s contract).
        unsafe { &*self.base.cast::<AtomicU64>() }
    }

    fn seq(&self, i: u64) -> &AtomicU32 {
        // SAFETY: inside the slot (see `slot`), 4-byte aligned (slots are
        // 32-byte aligned, the field is at 24).
        unsafe { &*self.slot(i).add(SEQ_OFF).cast::<AtomicU32>() }
    }
}

impl Slots for Mapped {
    #[inline(always)]
    fn cap(&self) -> u32 {
        self.cap
    }
    #[inline(always)]
    fn load_tail(&self, order: Ordering) -> u64 {
        self.tail().load(order)
    }
    #[inline(always)]
    fn store_tail(&self, tail: u64, order: Ordering) {
        self.tail().store(tail, order)
    }
    #[inline(always)]
    fn load_seq(&self, i: u64, order: Ordering) -> u32 {
        self.seq(i).load(order)
    }
    #[inline(always)]
    fn store_seq(&self, i: u64, seq: u32, order: Ordering) {
        self.seq(i).store(seq, order)
    }
    #[inline(always)]
    unsafe fn write(&self, i: u64, notice: &[u8; NOTICE_LEN]) {
        // SAFETY: the slot is in the mapping (see `slot`) and the caller
        // holds it (`write`'s contract).
        unsafe { std::ptr::copy_nonoverlapping(notice.as_ptr(), self.slot(i), NOTICE_LEN) }
    }
    #[inline(always)]
    unsafe fn read(&self, i: u64) -> [u8; NOTICE_LEN] {
        let mut b = [0u8; NOTICE_LEN];
        // SAFETY: the slot is in the mapping (see `slot`) and the caller
        // holds it (`read`'s contract).
        unsafe { std::ptr::copy_nonoverlapping(self.slot(i), b.as_mut_ptr(), NOTICE_LEN) };
        b
    }
}

/// One end of a ring. The producer's position is its own (one producer
/// per ring, for the life of the link).
#[derive(Debug)]
pub struct Ring<S: Slots = Mapped> {
    slots: S,
    head: u64,
    cached_tail: u64,
}

impl Ring {
    /// Where entry `i` lives (for cache hints).
    pub(crate) fn entry_addr(&self, i: u64) -> usize {
        self.slots.slot(i) as usize
    }

    /// The index of the next entry `push` writes.
    pub(crate) fn head(&self) -> u64 {
        self.head
    }

    /// A ring of `cap` entries at `base`.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and point at [`ring_bytes`]`(cap)`
    /// bytes of (shared) memory that stay mapped as long as the ring is
    /// used, zeroed when the ring was first created.
    pub unsafe fn new(base: *mut u8, cap: u32) -> Ring {
        let cap = cap.max(1);
        Ring::over(Mapped {
            base,
            cap,
            mask: if cap.is_power_of_two() {
                u64::from(cap) - 1
            } else {
                0
            },
        })
    }
}

impl Ring {
    /// Producer: writes an encoded notice into the next entry *without*
    /// publishing it, and moves past it; `None` if the ring is full. The
    /// entry is published when the returned sequence value is stored at
    /// the returned address (`Release`, or a device write ordered after the
    /// notice's bytes: the cuda backend has its copy stream store it once
    /// the copy has landed). Entries are read in order, so a later entry
    /// published first waits for this one.
    pub fn reserve(&mut self, notice: &[u8; NOTICE_LEN]) -> Option<(usize, u32)> {
        if !self.has_room() {
            return None;
        }
        let h = self.head;
        // SAFETY: as in `push`: the one producer, on a slot the consumer is
        // done with.
        unsafe { self.slots.write(h, notice) };
        // The notice's bytes before whatever later publishes the sequence.
        crate::sync::fence(Ordering::Release);
        self.head = h.wrapping_add(1);
        let seq = self.slots.seq(h) as *const AtomicU32 as usize;
        Some((seq, (h as u32).wrapping_add(1)))
    }

    /// The ring's bytes in this process: (address, length).
    pub fn span(&self) -> (usize, usize) {
        (self.slots.base as usize, ring_bytes(self.slots.cap))
    }
}

impl<S: Slots> Ring<S> {
    /// One end of the ring in `slots`.
    pub fn over(slots: S) -> Ring<S> {
        Ring {
            slots,
            head: 0,
            cached_tail: 0,
        }
    }

    /// Producer: whether a `push` now would find room (reads the consumer's
    /// tail only when the cached copy says full).
    #[inline]
    pub fn has_room(&mut self) -> bool {
        let cap = u64::from(self.slots.cap());
        if self.head.wrapping_sub(self.cached_tail) >= cap {
            self.cached_tail = self.slots.load_tail(Ordering::Acquire);
        }
        self.head.wrapping_sub(self.cached_tail) < cap
    }

    /// Producer: appends an encoded notice; `false` if the ring is full.
    #[inline]
    pub fn push(&mut self, notice: &[u8; NOTICE_LEN]) -> bool {
        let cap = u64::from(self.slots.cap());
        if self.head.wrapping_sub(self.cached_tail) >= cap {
            self.cached_tail = self.slots.load_tail(Ordering::Acquire);
            if self.head.wrapping_sub(self.cached_tail) >= cap {
                return false;
            }
        }
        let h = self.head;
        // SAFETY: we are the one producer and, until its sequence says
        // otherwise, the consumer does not read the slot (the tail check
        // above: the consumer is done with its previous entry).
        unsafe { self.slots.write(h, notice) };
        // Release: pairs with the consumer's acquire load of the sequence,
        // so the notice bytes are visible once the sequence is.
        self.slots
            .store_seq(h, (h as u32).wrapping_add(1), Ordering::Release);
        self.head = h.wrapping_add(1);
        true
    }

    /// Consumer: takes the oldest encoded notice.
    #[inline]
    pub fn pop(&self) -> Option<[u8; NOTICE_LEN]> {
        let t = self.slots.load_tail(Ordering::Relaxed);
        // Acquire: pairs with `push`'s release store of the sequence.
        if self.slots.load_seq(t, Ordering::Acquire) != (t as u32).wrapping_add(1) {
            return None;
        }
        // SAFETY: we are the one consumer; the sequence load (acquire) saw
        // the entry published and made its bytes visible.
        let b = unsafe { self.slots.read(t) };
        self.slots.store_tail(t.wrapping_add(1), Ordering::Release);
        Some(b)
    }

    /// Whether the consumer has anything to take.
    pub fn is_empty(&self) -> bool {
        let t = self.slots.load_tail(Ordering::Relaxed);
        self.slots.load_seq(t, Ordering::Acquire) != (t as u32).wrapping_add(1)
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
        // A power of two (indexed by mask) and not (by division).
        for cap in [4u32, 3] {
            let m = Mapping::anonymous(ring_bytes(cap)).unwrap();
            // SAFETY: fresh zeroed anonymous mapping of the right size; one
            // producer view and one consumer view.
            let (mut p, c) = unsafe { (Ring::new(m.ptr(), cap), Ring::new(m.ptr(), cap)) };
            assert_eq!(c.pop(), None);
            for round in 0..3u64 {
                for i in 0..u64::from(cap) {
                    assert!(p.push(&notice(round * 10 + i).encode()));
                }
                assert!(!p.push(&Notice::CLOSE.encode()), "full at {cap}");
                for i in 0..u64::from(cap) {
                    assert_eq!(c.pop(), Some(notice(round * 10 + i).encode()));
                }
                assert!(c.is_empty());
            }
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

/// A ring's slots in loom-modelled memory: `crate::sync` atomics for the
/// words and loom cells for the notices, so that loom checks both the
/// orderings and that no notice is read while it is written.
#[cfg(test)]
#[cfg(loom)]
pub(crate) mod model {
    use super::*;
    use crate::sync::{AtomicU32, AtomicU64, UnsafeCell};
    use loom::sync::Arc;

    struct Memory {
        tail: AtomicU64,
        seq: Box<[AtomicU32]>,
        notice: Box<[UnsafeCell<[u8; NOTICE_LEN]>]>,
    }

    // SAFETY: the cells are what the ring's SPSC protocol hands between
    // its two ends; loom tracks every access to them and fails the model
    // on any that the protocol does not order.
    unsafe impl Sync for Memory {}

    /// Both ends hold a clone.
    #[derive(Clone)]
    pub(crate) struct ModelSlots(Arc<Memory>);

    impl ModelSlots {
        pub(crate) fn new(cap: u32) -> ModelSlots {
            ModelSlots(Arc::new(Memory {
                tail: AtomicU64::new(0),
                seq: (0..cap).map(|_| AtomicU32::new(0)).collect(),
                notice: (0..cap).map(|_| UnsafeCell::new([0; NOTICE_LEN])).collect(),
            }))
        }

        fn slot(&self, i: u64) -> usize {
            (i % u64::from(self.cap())) as usize
        }
    }

    impl Slots for ModelSlots {
        fn cap(&self) -> u32 {
            self.0.seq.len() as u32
        }
        fn load_tail(&self, order: Ordering) -> u64 {
            self.0.tail.load(order)
        }
        fn store_tail(&self, tail: u64, order: Ordering) {
            self.0.tail.store(tail, order)
        }
        fn load_seq(&self, i: u64, order: Ordering) -> u32 {
            self.0.seq[self.slot(i)].load(order)
        }
        fn store_seq(&self, i: u64, seq: u32, order: Ordering) {
            self.0.seq[self.slot(i)].store(seq, order)
        }
        unsafe fn write(&self, i: u64, notice: &[u8; NOTICE_LEN]) {
            // SAFETY: the caller holds the slot (`write`'s contract); loom
            // checks that it does.
            self.0.notice[self.slot(i)].with_mut(|p| unsafe { *p = *notice })
        }
        unsafe fn read(&self, i: u64) -> [u8; NOTICE_LEN] {
            // SAFETY: as for `write`.
            self.0.notice[self.slot(i)].with(|p| unsafe { *p })
        }
    }
}

/// Model checking: `scripts/loom` runs these under every interleaving and
/// every value a load may see (within a bound on preemptions).
#[cfg(test)]
#[cfg(loom)]
mod loom_tests {
    use super::model::ModelSlots;
    use super::*;
    use crate::transport::notice::Notice;

    fn notice(i: u32) -> Notice {
        Notice {
            region: i,
            offset: u64::from(i) << 32 | 0xabc,
            len: 100 + i,
            imm: Some(!i),
            close: i == 2,
        }
    }

    /// Three notices through a ring of two while the consumer pops: each
    /// arrives exactly once, in order, intact. A sequence store that is not
    /// release (or a load that is not acquire) lets the consumer read a
    /// notice loom has not seen written; a tail that does not pair lets the
    /// producer overwrite one still being read; loom fails on either.
    #[test]
    fn ring_delivers_each_notice_once_in_order() {
        loom::model(|| {
            let slots = ModelSlots::new(2);
            let mut producer = Ring::over(slots.clone());
            let consumer = Ring::over(slots);
            let t = loom::thread::spawn(move || {
                for i in 0..3 {
                    while !producer.push(&notice(i).encode()) {
                        loom::thread::yield_now();
                    }
                }
            });
            for i in 0..3 {
                let b = loop {
                    match consumer.pop() {
                        Some(b) => break b,
                        None => loom::thread::yield_now(),
                    }
                };
                assert_eq!(Notice::decode(&b), Ok(notice(i)));
            }
            t.join().unwrap();
            assert!(consumer.is_empty());
        });
    }
}
