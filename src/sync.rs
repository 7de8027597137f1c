//! Atomics from one place, so that loom can model them.
//!
//! Normally these are `std`'s. Built with `RUSTFLAGS="--cfg loom"` (see
//! `scripts/loom`), they are loom's, and the `#[cfg(loom)]` tests run the
//! lock-free code over them under loom's model checker.
//!
//! Words in memory that other processes map (the shm rings and doorbells)
//! cannot be modelled: a loom atomic is a handle into loom's model, not a
//! word in memory. Those are [`shared`] atomics, `std`'s in every build,
//! and the code that runs over both kinds is generic (the ring over its
//! `Slots`).

// Not every build uses every name (production uses no modelled atomics
// of its own yet); crossbeam's shim allows the same.
#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::{
    cell::UnsafeCell,
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
};

/// Atomics over memory shared with other processes: always `std`'s.
pub(crate) mod shared {
    pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64};
}
