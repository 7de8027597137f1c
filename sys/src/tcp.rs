//! What the kernel knows about a tcp connection's peer: whether it still
//! acknowledges what we sent.

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// A tcp connection's acknowledgement state (from `TCP_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpAcks {
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Since the last acknowledgement of any kind arrived (data,
    /// keepalive or zero-window probe answers all count).
    pub since_ack: Duration,
}

/// The acknowledgement state of the tcp socket `fd`.
pub fn tcp_acks(fd: BorrowedFd<'_>) -> io::Result<TcpAcks> {
    // SAFETY: all-zero is a valid `tcp_info` (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and `len` says so; the
    // kernel writes at most `len` bytes and updates it.
    crate::syscall!(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })?;
    Ok(TcpAcks {
        unacked: info.tcpi_unacked,
        since_ack: Duration::from_millis(u64::from(info.tcpi_last_ack_recv)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn a_live_peer_acknowledges_what_it_got() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let s = tcp_acks(a.as_fd()).unwrap();
        assert_eq!(s.unacked, 0);
        assert!(s.since_ack < Duration::from_secs(5), "{s:?}");
    }
}
