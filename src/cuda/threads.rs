//! The driver's own threads, kept off a pinned caller's core.
//!
//! The CUDA driver starts helper threads when it initialises and when it
//! creates a context, and a new thread inherits the CPU affinity of the
//! thread that started it. A rank pinned to one CPU (`AFMESH_CPU`) spins on
//! that core without yielding; a helper pinned there too preempts it
//! whenever it wakes. So those driver calls run with the calling thread
//! allowed the job's other CPUs instead, and its own affinity is restored
//! right after. The job's CPUs: the mask the thread had before a mesh
//! pinned it ([`before_pinning`]), else the process's main thread's mask
//! if it has more than one CPU (what `taskset`/`numactl` gave the job),
//! else every CPU the kernel lets it have.
//!
//! A mesh initialises the driver (`cuInit`) before it pins its thread, so
//! on that path only the context's creation, after the pin, needs this;
//! callers that pin their threads themselves get it for both.

use std::sync::Mutex;

/// The rank thread's CPUs before a mesh pinned it.
static BEFORE_PIN: Mutex<Option<libc::cpu_set_t>> = Mutex::new(None);

/// Remembers the calling thread's CPUs; a mesh calls it right before it
/// pins the thread to one of them.
pub(crate) fn before_pinning() {
    if let Some(set) = affinity(0) {
        if let Ok(mut g) = BEFORE_PIN.lock() {
            *g = Some(set);
        }
    }
}

/// The CPUs of thread `tid` (0: the caller).
fn affinity(tid: libc::pid_t) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then_some(set)
}

/// The CPUs a pinned thread's helpers may use: see the module docs.
fn job_cpus() -> Option<libc::cpu_set_t> {
    if let Some(set) = BEFORE_PIN.lock().ok().and_then(|g| *g) {
        return Some(set);
    }
    // SAFETY: getpid has no preconditions.
    let main = affinity(unsafe { libc::getpid() })?;
    // SAFETY: reads an initialised set.
    (unsafe { libc::CPU_COUNT(&main) } > 1).then_some(main)
}

/// Runs `f` (a driver call that may start the driver's threads) so that
/// threads it starts avoid the CPU the calling thread is pinned to; a
/// thread allowed more than one CPU runs `f` as it is (its helpers share
/// its CPUs, as the driver chose).
pub(crate) fn off_pinned_cpu<T>(f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `mine` is a cpu_set_t of `size` bytes; 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut mine) } != 0 {
        return f();
    }
    // SAFETY: reads the set initialised above.
    if unsafe { libc::CPU_COUNT(&mine) } != 1 {
        return f();
    }
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    let online = usize::try_from(online)
        .unwrap_or(0)
        .min(libc::CPU_SETSIZE as usize);
    let job = job_cpus();
    // SAFETY: the empty set, as above.
    let mut others: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for cpu in 0..online {
        // SAFETY: `cpu` is below CPU_SETSIZE, so every access stays inside
        // its set.
        unsafe {
            let in_job = job.as_ref().is_none_or(|j| libc::CPU_ISSET(cpu, j));
            if in_job && !libc::CPU_ISSET(cpu, &mine) {
                libc::CPU_SET(cpu, &mut others);
                any = true;
            }
        }
    }
    // SAFETY: `others` is a cpu_set_t of `size` bytes. The kernel keeps
    // the CPUs of it this thread may use, or refuses (none): then the
    // helpers share the caller's core, as they would have anyway.
    if !any || unsafe { libc::sched_setaffinity(0, size, &others) } != 0 {
        return f();
    }
    let out = f();
    // SAFETY: the set read above, of `size` bytes.
    if unsafe { libc::sched_setaffinity(0, size, &mine) } != 0 {
        tracing::warn!(
            "cuda: could not restore this thread's CPU affinity after starting the driver: {}",
            std::io::Error::last_os_error()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs the calling thread may run on.
    fn allowed() -> Vec<usize> {
        // SAFETY: the empty set; then a cpu_set_t of its size for this
        // thread.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    }

    fn pin(cpu: usize) {
        // SAFETY: the empty set, then `cpu` (below CPU_SETSIZE) in it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: a cpu_set_t of `size` bytes, for this thread.
        assert_eq!(unsafe { libc::sched_setaffinity(0, size, &set) }, 0);
    }

    /// A thread started inside `off_pinned_cpu` by a thread pinned to one
    /// CPU runs on every other allowed CPU, and the caller is pinned again
    /// after; an unpinned caller's threads inherit its CPUs unchanged.
    #[test]
    fn threads_started_by_a_pinned_caller_avoid_its_cpu() {
        let all = allowed();
        if all.len() < 2 {
            eprintln!("skipped: one CPU allowed here, nothing to move threads to");
            return;
        }
        let cpu = all[all.len() - 1];
        let others: Vec<usize> = all.iter().copied().filter(|&c| c != cpu).collect();
        std::thread::spawn(move || {
            pin(cpu);
            let child = off_pinned_cpu(|| std::thread::spawn(allowed).join().unwrap());
            assert_eq!(child, others, "the started thread avoids CPU {cpu}");
            assert_eq!(allowed(), vec![cpu], "the caller is pinned again");
        })
        .join()
        .unwrap();
        std::thread::spawn(move || {
            let child = off_pinned_cpu(|| std::thread::spawn(allowed).join().unwrap());
            assert_eq!(child, all, "an unpinned caller's threads keep its CPUs");
            assert_eq!(allowed(), all);
        })
        .join()
        .unwrap();
    }
}
