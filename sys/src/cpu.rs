//! Pinning threads to CPUs, and reading the CPU's timestamp counter.

use std::io;

/// The CPU's timestamp counter (`rdtsc`), where the architecture has one
/// (x86-64); `None` elsewhere. Whether its ticks are steady and agree
/// between CPUs is the caller's question (the kernel's clocksource says).
#[inline(always)]
pub fn timestamp_counter() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `rdtsc` reads a counter; every x86-64 CPU has it, and it
        // touches no memory.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} out of range"),
        ));
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET stays
    // inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of
    // `set`, which is that long.
    crate::syscall!(unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    })
    .map(|_| ())
}

/// The CPUs the calling thread may run on (what `taskset`, `numactl` or a
/// cgroup's cpuset left it), in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid out-parameter.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of` bytes of `set`.
    crate::syscall!(unsafe {
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
    })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// How many times the calling thread has been preempted (involuntary
/// context switches, `getrusage(RUSAGE_THREAD)`): another runnable task
/// took its CPU while it still wanted it.
pub fn preemptions() -> io::Result<u64> {
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`, which lives for the
    // call.
    crate::syscall!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) })?;
    Ok(u64::try_from(ru.ru_nivcsw).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_the_calling_thread_only() {
        let before = allowed_cpus().unwrap();
        let cpu = *before.last().unwrap();
        let inside = std::thread::spawn(move || {
            pin_to_cpu(cpu).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, vec![cpu]);
        assert_eq!(
            allowed_cpus().unwrap(),
            before,
            "other threads keep their set"
        );
    }

    #[test]
    fn out_of_range_cpu_is_refused() {
        let e = pin_to_cpu(libc::CPU_SETSIZE as usize).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
