//! Waking a rank's blocked wait from another thread.
//!
//! A rank is driven from one thread (`&mut self`), so nothing else can
//! reach it while it waits. An [`Interrupter`] is the one thing that can: a
//! shared flag that the engine's wait loop reads between pumps, which park
//! at most [`MAX_PARK`](crate::transport::mux::MAX_PARK) at a time, so a
//! wait sees it within a few milliseconds.

use std::sync::Arc;

use crate::sync::{AtomicBool, Ordering};

/// Wakes a wait on the rank it came from (`AttentionRank::interrupter`,
/// `FfnRank::interrupter`), from any thread.
///
/// [`interrupt`](Interrupter::interrupt) makes the rank's blocked wait
/// (`get_batch`, `wait_combine*`, `wait_all`, a dispatch waiting for its
/// slot) return [`Error::Interrupted`](crate::Error::Interrupted) within a
/// few milliseconds. If no wait is blocked, the next wait that would block
/// returns it instead; a wait whose answer is already there returns the
/// answer and leaves the interrupt pending. One wait consumes one
/// interrupt, and the rank stays usable.
#[derive(Debug, Clone)]
pub struct Interrupter {
    flag: Arc<AtomicBool>,
}

impl Interrupter {
    pub(crate) fn new() -> Interrupter {
        Interrupter {
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Wakes the rank's blocked wait, or the next one that would block.
    pub fn interrupt(&self) {
        // Release pairs with the acquire in `take`: whatever this thread
        // wrote before interrupting is visible to the woken waiter.
        self.flag.store(true, Ordering::Release);
    }

    /// Whether an interrupt is pending. Cheap: the wait loop asks after
    /// every pump.
    pub(crate) fn pending(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Whether an interrupt is pending, and clears it.
    pub(crate) fn take(&self) -> bool {
        // Acquire pairs with the release in `interrupt`.
        self.flag.swap(false, Ordering::Acquire)
    }
}
