//! The rendezvous's front door: accepting connections and greeting them
//! (the token handshake) off the main loop, so a silent stranger never
//! holds up a rank.

use super::*;
use crate::bootstrap::clock::wall_ns;
use crate::proto::bootstrap::MAX_CLOCK_PROBES;

pub(super) fn accept_loop(
    listener: TcpListener,
    tx: Sender<Event>,
    stop: Arc<AtomicBool>,
    token: Option<Token>,
    hello_timeout: Duration,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("scheduler accept: {e}");
                continue;
            }
        };
        let tx = tx.clone();
        let token = token.clone();
        std::thread::spawn(move || {
            let _ = tx.send(greet(stream, token.as_ref(), hello_timeout));
        });
    }
}

/// Authenticates a new connection and reads its hello.
fn greet(mut stream: TcpStream, token: Option<&Token>, timeout: Duration) -> Event {
    let Ok(from) = stream.peer_addr() else {
        return Event::Dropped;
    };
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + timeout;
    let name = from.to_string();
    match auth::accept(&mut stream, token, timeout, "the scheduler", &name) {
        Ok(()) => {}
        Err(Error::Auth(why)) => {
            tracing::warn!(%from, "auth failed from {from}: {why}");
            return Event::AuthFailed;
        }
        Err(e) => {
            tracing::warn!(%from, "dropping connection: {e}");
            return Event::Dropped;
        }
    }
    // A tracing rank first asks the time a few times (its clock offset
    // against this server's); each probe is answered at once.
    let mut probes = 0;
    let first = loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match recv(&mut stream, left, &name) {
            Ok(Message::ClockProbe { sent_ns }) if probes < MAX_CLOCK_PROBES => {
                probes += 1;
                let received_ns = wall_ns();
                let echo = Message::ClockEcho {
                    probe_ns: sent_ns,
                    received_ns,
                    sent_ns: wall_ns(),
                };
                if let Err(e) = send(&mut stream, &echo, left, &name) {
                    tracing::warn!(%from, "dropping connection: {e}");
                    return Event::Dropped;
                }
            }
            other => break other,
        }
    };
    match first {
        Ok(Message::Hello {
            job,
            group,
            groups,
            role,
            preferred_rank,
            m,
            n,
            geometry,
            layout,
            host_id,
            endpoints,
            ..
        }) => Event::Hello(Box::new(Joiner {
            stream,
            from,
            ask: Ask {
                job,
                group,
                groups,
                role,
                preferred_rank,
                m,
                n,
                geometry,
                layout,
                host_id,
                endpoints,
            },
        })),
        Ok(Message::AuthRefused { reason }) => {
            tracing::warn!(%from, "auth failed from {from}: the rank refused the scheduler: {reason}");
            Event::AuthFailed
        }
        Ok(other) => {
            tracing::warn!(%from, "dropping connection: expected hello, got {}", other.kind());
            Event::Dropped
        }
        Err(e) => {
            tracing::warn!(%from, "dropping connection: {e}");
            Event::Dropped
        }
    }
}
