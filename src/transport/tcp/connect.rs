//! Bringing up tcp links between ranks: attention ranks connect to every FFN
//! rank's link listener, prove the cluster token and introduce themselves;
//! FFN ranks accept exactly the attention ranks of their epoch that prove
//! it, and drop anything else with a logged reason. Both ends give up at
//! once when the scheduler says the job failed (the [`LinkGuard`]'s watch).

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bootstrap::{auth, connect_retry_unless, recv, send, LinkGuard};
use crate::error::{Error, Result};
use crate::proto::{Message, Role};

/// Connects to each `(label, address)` in turn and handshakes as attention
/// rank `my_rank` of `epoch`, proving `guard`'s token. A peer that refuses
/// the token, or cannot prove it, is [`Error::Auth`].
pub fn connect_all(
    peers: &[(String, String)],
    epoch: u64,
    my_rank: u32,
    guard: &LinkGuard,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(peers.len());
    for (label, addr) in peers {
        let left = deadline.saturating_duration_since(Instant::now());
        let name = format!("{label} at {addr}");
        let mut s = connect_retry_unless(addr, left, "connect link", &guard.watch)?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        auth::initiate(&mut s, guard.token.as_ref(), left, &name)?;
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
            Message::LinkAck { epoch: e2 } => {
                return Err(Error::BadFrame {
                    peer: name,
                    reason: format!("link ack for epoch {e2:#x}, expected {epoch:#x}"),
                })
            }
            other => {
                return Err(Error::BadFrame {
                    peer: name,
                    reason: format!(
                        "expected link ack for epoch {epoch:#x}, got {}",
                        other.kind()
                    ),
                })
            }
        }
    }
    Ok(out)
}

/// Accepts one link from each attention rank in `expected` (of a mesh of
/// `m`), for `epoch`; returns them with their ranks. Each connection is
/// handshaken on its own thread with its own deadline, so silent or slow
/// connections never hold up a real peer; those that do not prove
/// `guard`'s token or handshake correctly are dropped with a logged reason.
pub fn accept_all(
    listener: &TcpListener,
    expected: &[u32],
    epoch: u64,
    guard: &LinkGuard,
    timeout: Duration,
) -> Result<Vec<(u32, TcpStream)>> {
    let deadline = Instant::now() + timeout;
    let mut got: HashMap<u32, TcpStream> = HashMap::new();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("link listener nonblocking", e))?;
    let (tx, rx) = crossbeam_channel::unbounded::<(u32, TcpStream, String)>();
    // Handshakes in flight; each ends by its own deadline, on a thread of
    // its own that may outlive this call (a silent connection's does).
    let busy = Arc::new(AtomicUsize::new(0));
    let wanted: Arc<[u32]> = expected.into();
    let result = (|| -> Result<()> {
        while got.len() < expected.len() {
            guard.watch.check()?;
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
            // Handshakes that finished: the first link of each rank wins.
            while let Ok((rank, mut s, name)) = rx.try_recv() {
                if got.contains_key(&rank) {
                    tracing::warn!(
                        "dropping link connection from {name}: A{rank} is already linked"
                    );
                    continue;
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                match send(&mut s, &Message::LinkAck { epoch }, left, &name) {
                    Ok(()) => {
                        got.insert(rank, s);
                    }
                    Err(e) => tracing::warn!("dropping link connection from {name}: {e}"),
                }
            }
            if got.len() == expected.len() {
                break;
            }
            let (s, from) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Nothing pending: a short sleep bounds the accept
                    // loop's CPU use while the attention ranks connect.
                    std::thread::sleep(Duration::from_millis(1).min(left));
                    continue;
                }
                Err(e) => return Err(Error::io("accept link", e)),
            };
            if busy.load(Ordering::Relaxed) >= MAX_HANDSHAKES {
                tracing::warn!(%from, "dropping link connection: {MAX_HANDSHAKES} handshakes already in flight");
                continue;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            let per_conn = left.min(HANDSHAKE_TIMEOUT);
            let (tx, done, wanted, guard) =
                (tx.clone(), busy.clone(), wanted.clone(), guard.clone());
            let spawned = std::thread::Builder::new()
                .name("afmesh-link-accept".into())
                .spawn(move || {
                    if let Some((rank, s)) = handshake(s, from, &wanted, epoch, &guard, per_conn) {
                        let _ = tx.send((rank, s, from.to_string()));
                    }
                    done.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(e) = spawned {
                busy.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(%from, "dropping link connection: no thread for its handshake: {e}");
            }
        }
        Ok(())
    })();
    result?;
    let mut v: Vec<(u32, TcpStream)> = got.into_iter().collect();
    v.sort_by_key(|(r, _)| *r);
    Ok(v)
}

/// Bound on one link connection's handshake (token proof and hello).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most link handshakes run at once; connections beyond are dropped.
const MAX_HANDSHAKES: usize = 64;

/// The accepting half of one link connection's handshake: the token, then
/// an attention rank's hello for `epoch` naming a rank in `expected`.
/// `None` (with a logged reason) for anything else.
fn handshake(
    mut s: TcpStream,
    from: std::net::SocketAddr,
    expected: &[u32],
    epoch: u64,
    guard: &LinkGuard,
    timeout: Duration,
) -> Option<(u32, TcpStream)> {
    let _ = s.set_nonblocking(false);
    let name = from.to_string();
    match auth::accept(
        &mut s,
        guard.token.as_ref(),
        timeout,
        "this FFN rank",
        &name,
    ) {
        Ok(()) => {}
        Err(Error::Auth(why)) => {
            tracing::warn!(%from, "auth failed on a link connection from {from}: {why}");
            return None;
        }
        Err(e) => {
            tracing::warn!(%from, "dropping link connection: {e}");
            return None;
        }
    }
    match recv(&mut s, timeout, &name) {
        Ok(Message::LinkHello {
            epoch: e,
            role: Role::Attention,
            rank,
        }) if e == epoch && expected.contains(&rank) => Some((rank, s)),
        Ok(Message::LinkHello {
            epoch: e,
            role,
            rank,
        }) => {
            let want: Vec<String> = expected.iter().map(|r| format!("A{r}")).collect();
            tracing::warn!(
                %from,
                "dropping link connection: {role} rank {rank} of epoch {e:#x} is not one this rank expects ({} of epoch {epoch:#x})",
                want.join(", ")
            );
            None
        }
        Ok(other) => {
            tracing::warn!(%from, "dropping link connection: unexpected {}", other.kind());
            None
        }
        Err(e) => {
            tracing::warn!(%from, "dropping link connection: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{SetupWatch, Token};
    use crate::error::Peer;
    use crate::proto::FailCause;

    const T: Duration = Duration::from_secs(10);

    fn guard(token: Option<&str>) -> LinkGuard {
        LinkGuard {
            token: token.map(|t| Token::new(t).unwrap()),
            watch: SetupWatch::default(),
        }
    }

    /// Fails `watch` as the scheduler would, after `delay`.
    fn fail_later(watch: &SetupWatch, delay: Duration) {
        let w = watch.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            w.job_failed(
                FailCause::Lost,
                Some((Role::Attention, 1)),
                "died during setup",
                delay,
            );
        });
    }

    #[test]
    fn a_failed_job_ends_the_accept_wait_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let g = guard(None);
        fail_later(&g.watch, Duration::from_millis(50));
        let t0 = Instant::now();
        let e = accept_all(&l, &[0, 1], 1, &g, T).unwrap_err();
        let took = t0.elapsed();
        assert!(
            matches!(
                e,
                Error::PeerLost {
                    peer: Peer::Attention(1),
                    ..
                }
            ),
            "{e}"
        );
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    #[test]
    fn a_failed_job_ends_the_connect_retries_at_once() {
        // A port with nobody listening: connects are refused and retried.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let g = guard(None);
        fail_later(&g.watch, Duration::from_millis(50));
        let t0 = Instant::now();
        let e = connect_all(&[("F0".into(), addr)], 1, 0, &g, T).unwrap_err();
        let took = t0.elapsed();
        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    #[test]
    fn a_link_with_the_wrong_token_is_auth_and_the_right_one_comes_up() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acceptor =
            std::thread::spawn(move || accept_all(&l, &[0], 9, &guard(Some("right")), T));
        let peers = [("F0".to_string(), addr)];
        let t0 = Instant::now();
        let e = connect_all(&peers, 9, 0, &guard(Some("wrong")), T).unwrap_err();
        assert!(matches!(e, Error::Auth(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        let e = connect_all(&peers, 9, 0, &guard(None), T).unwrap_err();
        assert!(matches!(e, Error::Auth(_)), "{e}");
        let up = connect_all(&peers, 9, 0, &guard(Some("right")), T).unwrap();
        assert_eq!(up.len(), 1);
        let got = acceptor.join().unwrap().unwrap();
        assert_eq!(got.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0]);
    }

    /// Silent connections (a stranger, a port scanner) do not hold up the
    /// real attention ranks: each handshake runs on its own.
    #[test]
    fn silent_connections_do_not_delay_real_links() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let silent: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&addr).unwrap()).collect();
        let acceptor = std::thread::spawn(move || accept_all(&l, &[0, 1], 3, &guard(Some("t")), T));
        // Let the acceptor take the silent ones first.
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let peers = [("F0".to_string(), addr)];
        let links: Vec<_> = (0..2)
            .map(|r| {
                let peers = peers.clone();
                std::thread::spawn(move || connect_all(&peers, 3, r, &guard(Some("t")), T))
            })
            .collect();
        for h in links {
            assert_eq!(h.join().unwrap().unwrap().len(), 1);
        }
        let got = acceptor.join().unwrap().unwrap();
        assert_eq!(got.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0, 1]);
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "took {took:?} with silent connections open"
        );
        drop(silent);
    }

    /// A second link claiming a rank already linked is dropped; the first
    /// stays.
    #[test]
    fn a_second_link_for_one_rank_is_dropped() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acceptor = std::thread::spawn(move || accept_all(&l, &[0, 1], 4, &guard(None), T));
        let peers = [("F0".to_string(), addr)];
        let first = connect_all(&peers, 4, 0, &guard(None), T).unwrap();
        assert_eq!(first.len(), 1);
        let e = connect_all(&peers, 4, 0, &guard(None), Duration::from_millis(500));
        assert!(e.is_err(), "a duplicate A0 gets no ack");
        connect_all(&peers, 4, 1, &guard(None), T).unwrap();
        let got = acceptor.join().unwrap().unwrap();
        assert_eq!(got.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0, 1]);
    }
}
