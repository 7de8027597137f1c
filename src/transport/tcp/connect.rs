//! Bringing up tcp links between ranks: attention ranks connect to every FFN
//! rank's link listener and introduce themselves; FFN ranks accept exactly
//! the attention ranks of their epoch and drop anything else.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::bootstrap::{connect_retry, recv, send};
use crate::error::{Error, Result};
use crate::proto::{Message, Role};

/// Connects to each `(label, address)` in turn and handshakes as attention
/// rank `my_rank` of `epoch`.
pub fn connect_all(
    peers: &[(String, String)],
    epoch: u64,
    my_rank: u32,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(peers.len());
    for (label, addr) in peers {
        let left = deadline.saturating_duration_since(Instant::now());
        let name = format!("{label} at {addr}");
        let mut s = connect_retry(addr, left, "connect link")?;
        send(
            &mut s,
            &Message::LinkHello {
                epoch,
                role: Role::Attention,
                rank: my_rank,
            },
            left.max(Duration::from_millis(1)),
            &name,
        )?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match recv(&mut s, left, &name)? {
            Message::LinkAck { epoch: e2 } if e2 == epoch => out.push(s),
            other => {
                return Err(Error::BadFrame {
                    peer: name,
                    reason: format!("expected link ack for epoch {epoch}, got {other:?}"),
                })
            }
        }
    }
    Ok(out)
}

/// Accepts one link from each attention rank in `expected` (of a mesh of
/// `m`), for `epoch`; returns them with their ranks. Connections that do
/// not handshake correctly are dropped with a logged reason.
pub fn accept_all(
    listener: &TcpListener,
    expected: &[u32],
    epoch: u64,
    timeout: Duration,
) -> Result<Vec<(u32, TcpStream)>> {
    let deadline = Instant::now() + timeout;
    let mut got: HashMap<u32, TcpStream> = HashMap::new();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("link listener nonblocking", e))?;
    while got.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let missing: Vec<String> = expected
                .iter()
                .filter(|r| !got.contains_key(r))
                .map(|r| format!("A{r}"))
                .collect();
            return Err(Error::Timeout {
                op: "accept links",
                peer: missing.join(","),
                after: timeout,
            });
        }
        let (mut s, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Nothing pending: a short sleep bounds the accept loop's
                // CPU use while the attention ranks connect.
                std::thread::sleep(Duration::from_millis(1).min(left));
                continue;
            }
            Err(e) => return Err(Error::io("accept link", e)),
        };
        let _ = s.set_nonblocking(false);
        let name = from.to_string();
        let per_conn = left.min(Duration::from_secs(5));
        match recv(&mut s, per_conn, &name) {
            Ok(Message::LinkHello {
                epoch: e,
                role: Role::Attention,
                rank,
            }) if e == epoch && expected.contains(&rank) && !got.contains_key(&rank) => {
                send(&mut s, &Message::LinkAck { epoch }, per_conn, &name)?;
                got.insert(rank, s);
            }
            Ok(other) => tracing::warn!(%from, "dropping link connection: unexpected {other:?}"),
            Err(e) => tracing::warn!(%from, "dropping link connection: {e}"),
        }
    }
    let mut v: Vec<(u32, TcpStream)> = got.into_iter().collect();
    v.sort_by_key(|(r, _)| *r);
    Ok(v)
}
