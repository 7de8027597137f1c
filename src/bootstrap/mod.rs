//! Bootstrap: the rendezvous server, the client ranks use to join it, and
//! the handshake that brings up a link between two ranks.
//!
//! Every step has a bounded timeout. A connection that sends something that
//! does not decode, or fails to prove the cluster token ([`auth`]), is
//! dropped with a logged reason; the mesh still forms. Setup is a
//! transaction: when the job cannot form (a rank refused or dead), every
//! rank hears it at once and the scheduler forgets the attempt.

pub mod auth;
pub mod client;
pub mod clock;
pub mod rendezvous;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::Message;

pub use auth::Token;
pub use client::{Entered, Session, SetupWatch};
pub use clock::ClockOffset;
pub use rendezvous::{Scheduler, SchedulerConfig};

/// What bringing up a link needs besides addresses: the cluster token to
/// prove (see [`auth`]) and the watch that ends the wait early when the
/// scheduler says the job failed.
#[derive(Debug, Clone, Default)]
pub struct LinkGuard {
    /// The cluster token; `None`: links are not authenticated.
    pub token: Option<Token>,
    /// The rank's setup watch.
    pub watch: SetupWatch,
}

/// Sends one bootstrap message with a write timeout.
pub(crate) fn send(s: &mut TcpStream, m: &Message, timeout: Duration, to: &str) -> Result<()> {
    s.set_write_timeout(Some(timeout))
        .map_err(|e| Error::io(format!("set write timeout to {to}"), e))?;
    s.write_all(&m.encode()).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout {
            op: "bootstrap send",
            peer: to.to_string(),
            after: timeout,
        },
        _ => Error::io(format!("send to {to}"), e),
    })
}

/// Receives one bootstrap message, waiting at most `timeout`.
pub(crate) fn recv(s: &mut TcpStream, timeout: Duration, from: &str) -> Result<Message> {
    recv_by(s, Some(Instant::now() + timeout), from)
}

/// Receives one bootstrap message, waiting until `deadline` or, without
/// one, until a message or the end of the connection.
pub(crate) fn recv_by(s: &mut TcpStream, deadline: Option<Instant>, from: &str) -> Result<Message> {
    let mut prefix = [0u8; 4];
    read_exact_by(s, &mut prefix, deadline, from)?;
    let n = Message::frame_len(prefix).map_err(|e| Error::BadFrame {
        peer: from.to_string(),
        reason: e.0,
    })?;
    let mut body = vec![0u8; n];
    read_exact_by(s, &mut body, deadline, from)?;
    Message::decode(&body).map_err(|e| Error::BadFrame {
        peer: from.to_string(),
        reason: e.0,
    })
}

fn read_exact_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    from: &str,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(Error::Timeout {
                op: "bootstrap receive",
                peer: from.to_string(),
                after: Duration::ZERO,
            });
        }
        s.set_read_timeout(left)
            .map_err(|e| Error::io(format!("set read timeout from {from}"), e))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::io(
                    format!("receive from {from}"),
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout {
                    op: "bootstrap receive",
                    peer: from.to_string(),
                    after: left.unwrap_or_default(),
                })
            }
            Err(e) => return Err(Error::io(format!("receive from {from}"), e)),
        }
    }
    Ok(())
}

/// Resolves `addr` (host:port).
pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::config(format!("address {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::config(format!("address {addr:?} resolves to nothing")))
}

/// Connects to `addr`, retrying until `timeout` (the other side may start
/// later than we do).
pub(crate) fn connect_retry(
    addr: &str,
    timeout: Duration,
    what: &'static str,
) -> Result<TcpStream> {
    connect_retry_unless(addr, timeout, what, &SetupWatch::default())
}

/// [`connect_retry`], giving up early when `watch` reports the job failed.
pub(crate) fn connect_retry_unless(
    addr: &str,
    timeout: Duration,
    what: &'static str,
    watch: &SetupWatch,
) -> Result<TcpStream> {
    let sa = resolve(addr)?;
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(5);
    loop {
        watch.check()?;
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &sa,
            left.max(Duration::from_millis(1))
                .min(Duration::from_secs(2)),
        ) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => {
                if Instant::now() + backoff >= deadline {
                    return Err(Error::Timeout {
                        op: what,
                        peer: format!("{addr} (last error: {e})"),
                        after: timeout,
                    });
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}
