//! A single-producer, single-consumer ring of write notices in shared
//! memory: the producer's head and the consumer's tail each own a cache
//! line, entries follow. The producer publishes an entry by storing the
//! head (release); the consumer takes it by loading the head (acquire) and
//! storing the tail. Nothing else is shared, so neither side ever waits on
//! the other's cache line except to read the index it needs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of the ring header (head line + tail line).
pub const RING_HEADER: usize = 128;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 32;

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

/// A view of one ring inside a mapping.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    base: *mut u8,
    cap: u32,
}

// SAFETY: the ring is a view of shared memory; the head is only stored by
// the one producer and the tail by the one consumer (the SPSC contract the
// transport keeps: one link end per side), both through atomics.
unsafe impl Send for Ring {}

/// What `pop` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pop {
    /// An entry.
    Entry(Entry),
    /// Nothing new.
    Empty,
    /// The indices are impossible: the producer corrupted the ring.
    Corrupt,
}

impl Ring {
    /// A ring of `cap` entries at `base`.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and point at [`ring_bytes`]`(cap)`
    /// bytes of (shared) memory that stay mapped as long as the ring is
    /// used, zeroed when the ring was first created.
    pub unsafe fn new(base: *mut u8, cap: u32) -> Ring {
        Ring { base, cap }
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: `base` is aligned and mapped (`new`'s contract).
        unsafe { &*self.base.cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: `base + 64` is aligned and mapped (`new`'s contract).
        unsafe { &*self.base.add(64).cast::<AtomicU64>() }
    }

    fn slot(&self, i: u64) -> *mut u8 {
        // SAFETY: the index is reduced modulo `cap`, so the slot lies in the
        // mapped entry array.
        unsafe {
            self.base
                .add(RING_HEADER + (i % u64::from(self.cap)) as usize * ENTRY_LEN)
        }
    }

    /// Producer: appends `e`; `false` if the ring is full.
    pub fn push(&self, e: Entry) -> bool {
        let h = self.head().load(Ordering::Relaxed);
        let t = self.tail().load(Ordering::Acquire);
        if h.wrapping_sub(t) >= u64::from(self.cap) {
            return false;
        }
        let mut b = [0u8; ENTRY_LEN];
        b[0..4].copy_from_slice(&e.region.to_le_bytes());
        b[4..8].copy_from_slice(&e.len.to_le_bytes());
        b[8..16].copy_from_slice(&e.offset.to_le_bytes());
        b[16..20].copy_from_slice(&e.imm.to_le_bytes());
        b[20..24].copy_from_slice(&e.flags.to_le_bytes());
        // SAFETY: the slot is in the mapping and, until the head moves past
        // it, owned by the producer (the consumer reads only below head).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.slot(h), ENTRY_LEN) };
        // SeqCst (not just Release) so that the consumer's "sleeping" flag,
        // read after this store, cannot be seen stale (see `Doorbell`).
        self.head().store(h.wrapping_add(1), Ordering::SeqCst);
        true
    }

    /// Consumer: takes the oldest entry.
    pub fn pop(&self) -> Pop {
        let t = self.tail().load(Ordering::Relaxed);
        let h = self.head().load(Ordering::SeqCst);
        if h == t {
            return Pop::Empty;
        }
        if h.wrapping_sub(t) > u64::from(self.cap) {
            return Pop::Corrupt;
        }
        let mut b = [0u8; ENTRY_LEN];
        // SAFETY: the slot is in the mapping; the acquire load of the head
        // made the producer's entry bytes visible.
        unsafe { std::ptr::copy_nonoverlapping(self.slot(t), b.as_mut_ptr(), ENTRY_LEN) };
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
        self.head().load(Ordering::SeqCst) == self.tail().load(Ordering::Relaxed)
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
        // SAFETY: fresh zeroed anonymous mapping of the right size.
        let r = unsafe { Ring::new(m.ptr(), 4) };
        assert_eq!(r.pop(), Pop::Empty);
        for i in 0..4 {
            assert!(r.push(Entry {
                imm: i,
                ..Entry::default()
            }));
        }
        assert!(!r.push(Entry::default()), "full");
        for i in 0..4 {
            assert_eq!(
                r.pop(),
                Pop::Entry(Entry {
                    imm: i,
                    ..Entry::default()
                })
            );
        }
        assert!(r.is_empty());
        r.head().store(100, Ordering::SeqCst);
        assert_eq!(r.pop(), Pop::Corrupt);
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
                let r = unsafe { Ring::new(m.ptr(), 64) };
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
                Pop::Corrupt => panic!("corrupt at {next}"),
            }
        }
        prod.join().unwrap();
        assert_eq!(r.pop(), Pop::Empty);
    }
}
