//! Shared memory for the emulated fabric: named mappings in `/dev/shm`,
//! futexes and peer checks (from `afmesh-sys`, which afmesh's shared-memory
//! transport uses too), and process-shared spin locks that survive a
//! holder's death.

use std::sync::atomic::{AtomicU32, Ordering};

pub use afmesh_sys::{futex_wait, futex_wake, pid_alive, unlink, AtomicOnly, Mapping};

pub fn my_pid() -> u32 {
    std::process::id()
}

/// A process-shared spin lock in shared memory. The word holds the
/// holder's pid, so a lock left by a dead process is taken over.
pub struct SpinGuard<'a> {
    word: &'a AtomicU32,
}

pub fn lock(word: &AtomicU32) -> SpinGuard<'_> {
    let me = my_pid();
    let mut spins = 0u32;
    loop {
        let cur = word.load(Ordering::Relaxed);
        if cur == 0
            && word
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return SpinGuard { word };
        }
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        }
        if spins.is_multiple_of(4096) && cur != 0 && cur != me && !pid_alive(cur) {
            // The holder died inside its critical section: take over.
            if word
                .compare_exchange(cur, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SpinGuard { word };
            }
        }
        std::hint::spin_loop();
    }
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.word.store(0, Ordering::Release);
    }
}
