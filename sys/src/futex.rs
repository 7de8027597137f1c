//! Process-shared futexes: sleeping on a 32-bit word of shared memory
//! until another thread or process changes it and wakes the sleepers.
//!
//! Both calls leave out `FUTEX_PRIVATE_FLAG`, so the kernel keys the word
//! by the page it lives on, not by this process's address: a waiter and a
//! waker may map the word at different addresses, in different processes.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`.
///
/// Returns at once if the word already differs, when woken by
/// [`futex_wake`], when the timeout ends, or spuriously (a signal): the
/// caller looks at the word again in every case, so no cause is reported.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        // Longer than ~292 billion years is the same as forever.
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call
    // and FUTEX_WAIT only reads it; `ts` outlives the call. Every failure
    // (EAGAIN, EINTR, ETIMEDOUT) means "go and look", so none is reported.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Wakes every thread, of any process, sleeping in [`futex_wait`] on the
/// word `word` is (wherever the sleeper maps it).
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access
    // it (the kernel only uses its address as the key).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_times_out_while_the_word_is_unchanged() {
        let word = AtomicU32::new(0);
        let t = Instant::now();
        futex_wait(&word, 0, Duration::from_millis(50));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn wait_returns_at_once_if_the_word_differs() {
        let word = AtomicU32::new(1);
        let t = Instant::now();
        futex_wait(&word, 0, Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    /// Whether thread `tid` of this process is blocked in `futex` on the
    /// word at `addr`.
    fn in_futex(tid: u32, addr: *const AtomicU32) -> bool {
        let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) else {
            return false;
        };
        let mut f = s.split(' ');
        f.next() == Some(&libc::SYS_futex.to_string())
            && f.next() == Some(&format!("{:#x}", addr as usize))
    }

    /// A waiter on one mapping of a file is woken through another mapping
    /// of it, at another address, without the word changing: the wake-up
    /// alone ends the wait, and the futex is keyed by the shared page.
    #[test]
    fn wake_through_another_mapping_ends_the_wait() {
        let name = format!("afmesh-sys-test.futex.{}", std::process::id());
        let a = Arc::new(Mapping::create(&name, 4096).unwrap());
        let b = Mapping::open(&name).unwrap();
        crate::unlink(&name).unwrap();
        let tid = Arc::new(AtomicU32::new(0));
        let (a2, tid2) = (a.clone(), tid.clone());
        let waiter = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid2.store(unsafe { libc::gettid() } as u32, Ordering::Release);
            let t = Instant::now();
            futex_wait(a2.at::<AtomicU32>(64), 0, Duration::from_secs(30));
            t.elapsed()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let word: *const AtomicU32 = a.at::<AtomicU32>(64);
        while !in_futex(tid.load(Ordering::Acquire), word) {
            assert!(Instant::now() < deadline, "waiter never slept");
            std::thread::yield_now();
        }
        futex_wake(b.at::<AtomicU32>(64));
        let slept = waiter.join().unwrap();
        assert!(slept < Duration::from_secs(10), "not woken: {slept:?}");
        assert_eq!(a.at::<AtomicU32>(64).load(Ordering::Relaxed), 0);
    }
}
