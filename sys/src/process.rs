//! Whether a peer process still runs: a one-off check by signal 0, and a
//! [`PidWatch`] that holds a pidfd so a recycled pid cannot fool it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Whether process `pid` exists (signal 0; a zombie counts as existing).
/// Pids that cannot name a process (0, above `i32::MAX`) are not alive.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p == 0 {
        return false;
    }
    // SAFETY: signal 0 checks for existence and sends nothing.
    let r = unsafe { libc::kill(p, 0) };
    // EPERM: it exists, but is not ours to signal.
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Watches one peer process: through a pidfd where the kernel has them
/// (immune to pid reuse, and a process that exited counts as gone even
/// before its parent reaps it), else by signal 0 each time.
#[derive(Debug)]
pub struct PidWatch {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl PidWatch {
    /// Starts watching `pid`. A pid that does not exist (now) is watched
    /// by signal 0, which reports it gone.
    pub fn new(pid: u32) -> PidWatch {
        let pidfd = libc::pid_t::try_from(pid)
            .ok()
            .filter(|&p| p > 0)
            .and_then(|p| {
                // SAFETY: pidfd_open takes a pid and flags and returns a
                // new descriptor or -1.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
                libc::c_int::try_from(fd).ok().filter(|&fd| fd >= 0)
            })
            // SAFETY: the descriptor was just returned to us and nothing
            // else owns it.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        PidWatch { pid, pidfd }
    }

    /// The process watched.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is still running.
    pub fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let r = unsafe { libc::poll(&mut p, 1, 0) };
                // Readable means the process exited.
                !(r > 0 && p.revents & libc::POLLIN != 0)
            }
            None => pid_alive(self.pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// Above any `pid_max` (at most 2^22) yet a valid `pid_t`.
    const NO_SUCH_PID: u32 = 0x7fff_fff0;

    #[test]
    fn pid_alive_of_self_and_of_impossible_pids() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(NO_SUCH_PID));
        assert!(!pid_alive(i32::MAX as u32 + 1));
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn watch_of_self_and_of_no_process() {
        let me = PidWatch::new(std::process::id());
        assert!(me.pidfd.is_some(), "this kernel has pidfd_open");
        assert!(me.alive());
        assert!(!PidWatch::new(NO_SUCH_PID).alive());
        assert!(!PidWatch::new(0).alive());
        assert!(!PidWatch::new(u32::MAX).alive());
    }

    #[test]
    fn watch_sees_a_child_exit_before_it_is_reaped() {
        let mut child = Command::new("sh")
            .args(["-c", "read line"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let w = PidWatch::new(child.id());
        assert_eq!(w.pid(), child.id());
        assert!(w.alive());
        // Let it end, then wait (bounded) for the watch to see it: the
        // child is a zombie until `wait`, which signal 0 still counts.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.alive() {
            assert!(Instant::now() < deadline, "exit not seen");
            std::thread::yield_now();
        }
        assert!(pid_alive(child.id()), "a zombie still exists");
        assert!(child.wait().unwrap().success());
        assert!(!w.alive());
    }
}
