//! A rank's side of the rendezvous.
//!
//! Once the address book has arrived, a reader thread owns the receiving
//! half of the scheduler connection, so that a `JobFailed` (a rank refused
//! or dead) reaches the rank while it is busy bringing up links: the
//! [`SetupWatch`] carries it to every wait of the setup.

use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{auth, connect_retry, recv, recv_by, send, ClockOffset, Token};
use crate::error::{Error, Peer, Result};
use crate::proto::{Entry, FailCause, Message, Role, Roles, Scope};

/// Why the scheduler says this setup attempt is over.
#[derive(Debug, Clone)]
enum Failure {
    /// `JobFailed`, as received.
    Job {
        cause: FailCause,
        rank: Option<(Role, u32)>,
        reason: String,
        waited: Duration,
    },
    /// The scheduler connection ended during setup.
    Closed { why: String },
}

impl Failure {
    fn to_error(&self) -> Error {
        match self {
            Failure::Job {
                cause,
                rank,
                reason,
                waited,
            } => job_failed(*cause, *rank, reason, *waited),
            Failure::Closed { why } => Error::PeerLost {
                peer: Peer::Scheduler,
                reason: format!("the scheduler connection ended during setup: {why}"),
            },
        }
    }
}

/// The error a rank returns for `JobFailed`.
fn job_failed(
    cause: FailCause,
    rank: Option<(Role, u32)>,
    reason: &str,
    waited: Duration,
) -> Error {
    match (cause, rank) {
        (FailCause::Lost, Some((role, r))) => Error::PeerLost {
            peer: match role {
                Role::Attention => Peer::Attention(r),
                Role::Ffn => Peer::Ffn(r),
            },
            reason: format!("{reason}; the job cannot form"),
        },
        (FailCause::Timeout, _) => Error::Timeout {
            op: "mesh join",
            peer: format!("the scheduler: {reason}"),
            after: waited,
        },
        _ => Error::config(format!("the job cannot form: {reason}")),
    }
}

/// Whether the scheduler has called off this rank's setup attempt. Cheap
/// to clone and to check; the waits of link bring-up check it so that a
/// failed job ends them at once instead of at their timeout.
#[derive(Debug, Clone, Default)]
pub struct SetupWatch(Arc<Mutex<Option<Failure>>>);

impl SetupWatch {
    /// `Err` once the scheduler has said the job cannot form (or its
    /// connection ended) — the error the rank should return.
    pub fn check(&self) -> Result<()> {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(f) => Err(f.to_error()),
        }
    }

    /// Records a `JobFailed` from the scheduler (received `waited` after
    /// the rank connected).
    pub(crate) fn job_failed(
        &self,
        cause: FailCause,
        rank: Option<(Role, u32)>,
        reason: &str,
        waited: Duration,
    ) {
        self.set(Failure::Job {
            cause,
            rank,
            reason: reason.to_string(),
            waited,
        });
    }

    fn set(&self, f: Failure) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
    }
}

/// What the reader thread hands over.
enum Inbound {
    Message(Message),
    Closed,
}

/// A rank's connection to the rendezvous server, from hello to bye.
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    server: String,
    io_timeout: Duration,
    /// The mesh's epoch.
    pub epoch: u64,
    /// This rank's role.
    pub role: Role,
    /// This rank's rank.
    pub rank: u32,
    /// Every rank of the mesh.
    pub entries: Vec<Entry>,
    inbox: Receiver<Inbound>,
    watch: SetupWatch,
    said_bye: bool,
    /// Instance groups of the job (from the hello).
    groups: u32,
    /// Running barriers passed, by scope ([`Scope::index`]) then role set
    /// (attention, ffn, both).
    synced: [[u64; 3]; 2],
    /// The running barrier entered and not released yet.
    pending: Option<(Roles, Scope)>,
}

/// A running barrier this rank has entered (from
/// [`Session::sync_enter`]).
#[derive(Debug, Clone)]
pub struct Entered {
    seq: u64,
    roles: Roles,
    scope: Scope,
    /// The role set's index in `Session::synced`.
    k: usize,
    /// Names the barrier in errors.
    what: String,
    /// The scheduler's address, for errors.
    server: String,
}

impl Entered {
    /// The error of a barrier not released within `after`.
    pub fn timed_out(&self, after: Duration) -> Error {
        Error::Timeout {
            op: "barrier",
            peer: format!("scheduler {}: {} not released", self.server, self.what),
            after,
        }
    }
}

/// A connection to the server on which the hello has not been sent yet:
/// the rank first learns its own address as the server sees it, so it can
/// bind its link listener there.
#[derive(Debug)]
pub struct Connecting {
    stream: TcpStream,
    server: String,
    since: Instant,
    watch: SetupWatch,
}

impl Connecting {
    /// Connects to the server, retrying until `timeout`, and proves
    /// `token` (a wrong or missing token is [`Error::Auth`]).
    pub fn connect(server: &str, token: Option<&Token>, timeout: Duration) -> Result<Connecting> {
        let since = Instant::now();
        let mut stream = connect_retry(server, timeout, "connect to scheduler")?;
        let left = timeout
            .saturating_sub(since.elapsed())
            .max(Duration::from_millis(100));
        let name = format!("scheduler {server}");
        auth::initiate(&mut stream, token, left, &name)?;
        Ok(Connecting {
            stream,
            server: server.to_string(),
            since,
            watch: SetupWatch::default(),
        })
    }

    /// The local IP this connection uses: the address peers on the same
    /// network can reach us at.
    pub fn local_ip(&self) -> Result<IpAddr> {
        self.stream
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| Error::io("local address of scheduler connection", e))
    }

    /// Estimates this rank's clock offset against the server's from
    /// `rounds` probes (see [`clock`](super::clock)); before [`join`](Self::join).
    pub fn clock(&mut self, rounds: u32, timeout: Duration) -> Result<ClockOffset> {
        super::clock::probe(&mut self.stream, rounds, timeout, &self.server)
    }

    /// The watch that will report a failed job during this rank's setup.
    pub fn watch(&self) -> SetupWatch {
        self.watch.clone()
    }

    /// Sends the hello and waits (up to `timeout`) for the address book.
    pub fn join(
        mut self,
        hello: Message,
        io_timeout: Duration,
        timeout: Duration,
    ) -> Result<Session> {
        let groups = match &hello {
            Message::Hello { groups, .. } => *groups,
            _ => 1,
        };
        send(&mut self.stream, &hello, io_timeout, &self.server)?;
        let (epoch, role, rank, entries) = match recv(&mut self.stream, timeout, &self.server)? {
            Message::AddressBook {
                epoch,
                role,
                rank,
                entries,
            } => (epoch, role, rank, entries),
            Message::Refused { reason } => {
                return Err(Error::config(format!(
                    "scheduler {} refused this rank: {reason}",
                    self.server
                )))
            }
            Message::JobFailed {
                cause,
                rank,
                reason,
            } => return Err(job_failed(cause, rank, &reason, self.since.elapsed())),
            other => {
                return Err(Error::BadFrame {
                    peer: self.server,
                    reason: format!("expected the address book, got {}", other.kind()),
                })
            }
        };
        let inbox = self.spawn_reader()?;
        Ok(Session {
            stream: self.stream,
            server: self.server,
            io_timeout,
            epoch,
            role,
            rank,
            entries,
            inbox,
            watch: self.watch,
            said_bye: false,
            groups,
            synced: [[0; 3]; 2],
            pending: None,
        })
    }

    /// Hands the receiving half to a thread: every message goes to the
    /// inbox, and a failure of the job also to the watch.
    fn spawn_reader(&self) -> Result<Receiver<Inbound>> {
        let mut rs = self
            .stream
            .try_clone()
            .map_err(|e| Error::io("clone scheduler connection", e))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let watch = self.watch.clone();
        let server = self.server.clone();
        let since = self.since;
        std::thread::Builder::new()
            .name("afmesh-session".into())
            .spawn(move || loop {
                match recv_by(&mut rs, None, &server) {
                    Ok(Message::JobFailed {
                        cause,
                        rank,
                        reason,
                    }) => {
                        watch.job_failed(cause, rank, &reason, since.elapsed());
                        let _ = tx.send(Inbound::Message(Message::JobFailed {
                            cause,
                            rank,
                            reason,
                        }));
                    }
                    Ok(m) => {
                        if tx.send(Inbound::Message(m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        watch.set(Failure::Closed { why: e.to_string() });
                        let _ = tx.send(Inbound::Closed);
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("spawn scheduler session thread", e))?;
        Ok(rx)
    }
}

impl Session {
    /// Waits (up to `timeout`) until every rank of the mesh reaches the
    /// barrier. A job that failed meanwhile is its error.
    pub fn barrier(&mut self, timeout: Duration) -> Result<()> {
        self.watch.check()?;
        send(
            &mut self.stream,
            &Message::BarrierEnter { epoch: self.epoch },
            self.io_timeout,
            &self.server,
        )?;
        match self.inbox.recv_timeout(timeout) {
            Ok(Inbound::Message(Message::BarrierRelease { epoch })) if epoch == self.epoch => {
                Ok(())
            }
            Ok(Inbound::Message(Message::JobFailed { .. }))
            | Ok(Inbound::Closed)
            | Err(RecvTimeoutError::Disconnected) => {
                Err(self.watch.check().err().unwrap_or_else(|| Error::PeerLost {
                    peer: Peer::Scheduler,
                    reason: "the scheduler connection ended during setup".into(),
                }))
            }
            Ok(Inbound::Message(other)) => Err(Error::BadFrame {
                peer: self.server.clone(),
                reason: format!("expected barrier release, got {}", other.kind()),
            }),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                op: "barrier",
                peer: format!("scheduler {}", self.server),
                after: timeout,
            }),
        }
    }

    /// A barrier of the running mesh: waits (up to `timeout`) until every
    /// rank of `roles` has entered it, this one included — of this rank's
    /// instance group ([`Scope::Group`]) or of every group
    /// ([`Scope::AllGroups`]; in a job of one group the same as `Group`).
    /// After a timeout the rank is still inside: calling again with the
    /// same `roles` and scope goes on waiting for the same barrier (other
    /// barriers are refused until it is released). A rank that left or
    /// died holds the barrier until the timeout.
    pub fn sync(&mut self, roles: Roles, scope: Scope, timeout: Duration) -> Result<()> {
        let entered = self.sync_enter(roles, scope)?;
        let deadline = Instant::now().checked_add(timeout);
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if self.sync_released(&entered, left)? {
            return Ok(());
        }
        Err(entered.timed_out(timeout))
    }

    /// Enters the running barrier of `roles` and `scope` (see
    /// [`sync`](Self::sync)), or goes on with the one this rank is still
    /// inside; returns at once. [`sync_released`](Self::sync_released)
    /// then says when it is released, so a rank can keep its links moving
    /// while it waits.
    pub fn sync_enter(&mut self, roles: Roles, scope: Scope) -> Result<Entered> {
        if !roles.has(self.role) {
            return Err(Error::invalid(format!(
                "barrier of {roles} ranks: this is an {} rank",
                self.role
            )));
        }
        // One group: every group is this one, and the two scopes meet.
        let scope = if self.groups <= 1 {
            Scope::Group
        } else {
            scope
        };
        let k = match (roles.attention, roles.ffn) {
            (true, false) => 0,
            (false, true) => 1,
            _ => 2,
        };
        let seq = self.synced[scope.index()][k];
        let what = match scope {
            Scope::Group => format!("barrier {seq} of {roles} ranks"),
            Scope::AllGroups => format!("barrier {seq} of {roles} ranks of every instance group"),
        };
        match self.pending {
            Some(p) if p == (roles, scope) => {}
            Some((r, sc)) => {
                let inside = match sc {
                    Scope::Group => format!("{r} ranks"),
                    Scope::AllGroups => format!("{r} ranks of every instance group"),
                };
                return Err(Error::invalid(format!(
                    "{what}: this rank is still inside a barrier of {inside}; wait for that one first"
                )));
            }
            None => {
                send(
                    &mut self.stream,
                    &Message::SyncEnter { seq, roles, scope },
                    self.io_timeout,
                    &self.server,
                )?;
                self.pending = Some((roles, scope));
            }
        }
        Ok(Entered {
            seq,
            roles,
            scope,
            k,
            what,
            server: self.server.clone(),
        })
    }

    /// Waits up to `wait` (zero: only looks) for the release of the
    /// barrier `entered`: `Ok(true)` once released (the rank is out),
    /// `Ok(false)` while it is not (the rank is still inside).
    pub fn sync_released(&mut self, entered: &Entered, wait: Duration) -> Result<bool> {
        let got = if wait.is_zero() {
            match self.inbox.try_recv() {
                Ok(m) => Ok(m),
                Err(crossbeam_channel::TryRecvError::Empty) => Err(RecvTimeoutError::Timeout),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    Err(RecvTimeoutError::Disconnected)
                }
            }
        } else {
            self.inbox.recv_timeout(wait)
        };
        match got {
            Ok(Inbound::Message(Message::SyncRelease {
                seq: s,
                roles: r,
                scope: sc,
            })) if s == entered.seq && r == entered.roles && sc == entered.scope => {
                self.pending = None;
                self.synced[entered.scope.index()][entered.k] += 1;
                Ok(true)
            }
            Ok(Inbound::Message(other)) => Err(Error::BadFrame {
                peer: self.server.clone(),
                reason: format!(
                    "expected the release of {}, got {}",
                    entered.what,
                    other.kind()
                ),
            }),
            Ok(Inbound::Closed) | Err(RecvTimeoutError::Disconnected) => Err(Error::PeerLost {
                peer: Peer::Scheduler,
                reason: "the scheduler connection ended during a barrier".into(),
            }),
            Err(RecvTimeoutError::Timeout) => Ok(false),
        }
    }

    /// The watch over this setup attempt.
    pub fn watch(&self) -> SetupWatch {
        self.watch.clone()
    }

    /// Entries of one role, indexed by rank.
    pub fn peers(&self, role: Role) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.role == role)
            .cloned()
            .collect();
        v.sort_by_key(|e| e.rank);
        v
    }

    /// Hands the server this rank's results for its job summary (before
    /// leaving). Bounded by a short write timeout.
    pub fn report(&mut self, text: &str) -> Result<()> {
        if text.len() > crate::proto::codec::MAX_BLOB {
            return Err(Error::invalid(format!(
                "report of {} bytes exceeds {} bytes",
                text.len(),
                crate::proto::codec::MAX_BLOB
            )));
        }
        send(
            &mut self.stream,
            &Message::Report { text: text.into() },
            Duration::from_secs(2),
            &self.server,
        )
    }

    /// Tells the server we are leaving in order.
    pub fn bye(&mut self) {
        if !self.said_bye {
            self.said_bye = true;
            let _ = send(
                &mut self.stream,
                &Message::Bye,
                Duration::from_millis(500),
                &self.server,
            );
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.bye();
        // Ends the reader thread's wait.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Geometry;
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(10);

    fn hello() -> Message {
        Message::Hello {
            version: crate::proto::bootstrap::BOOTSTRAP_VERSION,
            job: "j".into(),
            group: 0,
            groups: 1,
            role: Role::Attention,
            preferred_rank: Some(0),
            m: 1,
            n: 2,
            geometry: Geometry {
                stages: 1,
                max_tokens: 1,
                row_bytes: 1,
                out_row_bytes: 1,
                side_bytes: 0,
            },
            layout: crate::proto::StageLayout::Slots,
            host_id: "h".into(),
            endpoints: Vec::new(),
        }
    }

    /// A scheduler that sends the address book, then `after` it.
    fn scheduler(after: Message) -> (String, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            auth::accept(&mut s, None, T, "the scheduler", "rank").unwrap();
            assert!(matches!(
                recv(&mut s, T, "rank").unwrap(),
                Message::Hello { .. }
            ));
            let book = Message::AddressBook {
                epoch: 7,
                role: Role::Attention,
                rank: 0,
                entries: Vec::new(),
            };
            send(&mut s, &book, T, "rank").unwrap();
            send(&mut s, &after, T, "rank").unwrap();
            // Hold the connection until the rank hangs up.
            let _ = recv(&mut s, T, "rank");
        });
        (addr, t)
    }

    #[test]
    fn job_failed_after_the_book_reaches_the_watch_and_the_barrier() {
        let (addr, sched) = scheduler(Message::JobFailed {
            cause: FailCause::Lost,
            rank: Some((Role::Ffn, 1)),
            reason: "died during setup".into(),
        });
        let conn = Connecting::connect(&addr, None, T).unwrap();
        let watch = conn.watch();
        let mut session = conn.join(hello(), T, T).unwrap();
        let t0 = Instant::now();
        while watch.check().is_ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "the watch never fired"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        match watch.check() {
            Err(Error::PeerLost { peer, reason }) => {
                assert_eq!(peer, Peer::Ffn(1));
                assert!(reason.contains("died during setup"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let e = session.barrier(T).unwrap_err();
        assert!(
            matches!(
                e,
                Error::PeerLost {
                    peer: Peer::Ffn(1),
                    ..
                }
            ),
            "{e}"
        );
        drop(session);
        sched.join().unwrap();
    }

    #[test]
    fn a_mismatch_is_a_config_error_naming_the_reason() {
        let (addr, sched) = scheduler(Message::JobFailed {
            cause: FailCause::Mismatch,
            rank: Some((Role::Attention, 1)),
            reason: "A1 asked for max_tokens 64, the job has 128 (set by F0)".into(),
        });
        let conn = Connecting::connect(&addr, None, T).unwrap();
        let mut session = conn.join(hello(), T, T).unwrap();
        match session.barrier(T) {
            Err(Error::Config(m)) => assert!(m.contains("A1 asked for max_tokens 64"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(session);
        sched.join().unwrap();
    }
}
