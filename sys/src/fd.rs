//! Waiting on file descriptors: `poll(2)` for a thread whose work arrives
//! on sockets, and a watcher thread for one that sleeps on something else
//! (a futex) but also has sockets. The watcher only calls back when a
//! descriptor becomes ready (edge-triggered epoll, so it does not spin on
//! bytes nobody has read yet); the owner reads the sockets itself.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits up to `timeout` until one of `fds` is readable (or hung up), or,
/// for those in `writable`, writable. Returns whether one is ready.
pub fn poll_ready(fds: &[RawFd], writable: &[RawFd], timeout: Duration) -> io::Result<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: if writable.contains(&fd) {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            },
            revents: 0,
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is a valid array of `p.len()` pollfds for the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

/// A thread that calls `ready` whenever one of its descriptors becomes
/// readable or writable. Stopped and joined on drop.
#[derive(Debug)]
pub struct FdWatcher {
    stop: RawFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdWatcher {
    /// Starts watching `fds`.
    pub fn start(fds: &[RawFd], ready: impl Fn() + Send + 'static) -> io::Result<FdWatcher> {
        // SAFETY: plain syscalls returning new descriptors or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: `ep` is ours.
            unsafe { libc::close(ep) };
            return Err(e);
        }
        let add = |fd: RawFd, flags: u32| -> io::Result<()> {
            let mut ev = libc::epoll_event {
                events: flags,
                u64: fd as u64,
            };
            // SAFETY: `ep` is an epoll fd, `ev` a valid event for the call.
            if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let edge = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let added = add(stop, libc::EPOLLIN as u32)
            .and_then(|_| fds.iter().try_for_each(|&fd| add(fd, edge)));
        if let Err(e) = added {
            // SAFETY: both descriptors are ours.
            unsafe {
                libc::close(ep);
                libc::close(stop);
            }
            return Err(e);
        }
        let thread = std::thread::Builder::new()
            .name("afmesh-fd-watch".into())
            .spawn(move || watch(ep, stop, ready));
        match thread {
            Ok(t) => Ok(FdWatcher {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                // SAFETY: both descriptors are ours (the thread never ran).
                unsafe {
                    libc::close(ep);
                    libc::close(stop);
                }
                Err(e)
            }
        }
    }
}

fn watch(ep: RawFd, stop: RawFd, ready: impl Fn()) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    'outer: loop {
        // SAFETY: `evs` is writable for its length; `ep` stays open until
        // this thread closes it below.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for ev in &evs[..n as usize] {
            if ev.u64 == stop as u64 {
                break 'outer;
            }
        }
        if n > 0 {
            ready();
        }
    }
    // SAFETY: the epoll fd is this thread's to close.
    unsafe { libc::close(ep) };
}

impl Drop for FdWatcher {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: `stop` is our eventfd; writing 8 bytes wakes the watcher.
        unsafe { libc::write(self.stop, (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: the watcher has exited; the eventfd is ours.
        unsafe { libc::close(self.stop) };
    }
}
