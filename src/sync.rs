//! Atomics from one place, so that loom can model them.
//!
//! Normally these are `std`'s. Built with `RUSTFLAGS="--cfg loom"` (see
//! `scripts/loom`), they are loom's, and the `#[cfg(loom)]` tests run the
//! lock-free code over them under loom's model checker.
//!
//! Words in memory that other processes map (the shm rings and doorbells)
//! cannot be modelled: a loom atomic is a handle into loom's model, not a
//! word in memory. Those are [`shared`] atomics, `std`'s in every build,
//! and the code that runs over both kinds is generic: over [`Word32`]
//! here, or over the ring's `Slots`.
//!
//! Loom judges `fence(SeqCst)` exactly but models `SeqCst` loads and
//! stores only as acquire/release (its README says so), so where two
//! threads each store and then load the other's word (a store-buffering or
//! Dekker pattern, like the doorbell), the order comes from a `SeqCst`
//! fence on each side, never from `SeqCst` accesses.

// Not every build uses every name (production keeps all its atomics in
// shared memory so far); crossbeam's shim allows the same.
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering},
};

/// Atomics over memory shared with other processes: always `std`'s.
pub(crate) mod shared {
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64};
}

/// What the lock-free shm code does with a 32-bit word, whichever atomics
/// hold it: a [`shared`] word in production, a loom word in the model
/// tests.
pub(crate) trait Word32 {
    /// As `AtomicU32::load`.
    fn load(&self, order: Ordering) -> u32;
    /// As `AtomicU32::store`.
    fn store(&self, value: u32, order: Ordering);
    /// As `AtomicU32::fetch_add`.
    fn fetch_add(&self, value: u32, order: Ordering) -> u32;
}

macro_rules! word32 {
    ($t:ty) => {
        impl Word32 for $t {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u32 {
                <$t>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, value: u32, order: Ordering) {
                <$t>::store(self, value, order)
            }
            #[inline(always)]
            fn fetch_add(&self, value: u32, order: Ordering) -> u32 {
                <$t>::fetch_add(self, value, order)
            }
        }
    };
}

word32!(shared::AtomicU32);
#[cfg(loom)]
word32!(AtomicU32);
