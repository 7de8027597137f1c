//! The rendezvous server (`afmesh scheduler`, or embedded in a rank).
//!
//! It admits M attention and N FFN ranks, assigns their ranks (honouring
//! an explicit rank, refusing one asked for twice), checks that they agree
//! on the job, the mesh size and the stage geometry, sends everyone the
//! address book with a fresh epoch, runs one barrier, and then waits for
//! every rank to leave.
//!
//! Setup is a transaction. Until the barrier releases, the first rank that
//! is refused (it disagrees with the job) or whose connection closes (it
//! died, or gave up) ends the attempt: every rank connected to it hears
//! `JobFailed` at once, naming the rank and why, and the server forgets
//! the attempt. Then, with [`SchedulerConfig::retry`] (a standalone
//! scheduler), it takes a fresh attempt from scratch — ranks started again
//! right away join it — and gives up only when no attempt forms within the
//! join timeout; without it (a scheduler embedded in a rank), it returns
//! the failure. A rank that arrives after the mesh formed is told so.
//!
//! Connections that are not ranks of the job — garbage, a wrong cluster
//! token — are dropped with a logged reason; the job goes on.
//!
//! A job of several instance groups ([`SchedulerConfig::groups`],
//! StepMesh's `DMLC_GROUP_SIZE`) is that many disjoint meshes: each hello
//! names its group, and each group forms, fails and retries on its own,
//! with its own epoch; the server finishes once every group's mesh has.
//!
//! A formed mesh may synchronise again: ranks send `SyncEnter` numbered
//! per set of roles, and once every rank of those roles has entered that
//! number, each hears `SyncRelease`. Such a barrier is of the rank's own
//! group, or of every instance group: then each group's loop counts its
//! own ranks in and the last group done releases them all (`span`).

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

mod accept;
mod attempt;
mod groups;
mod members;
mod span;

use super::{auth, recv, recv_by, send, Token};
use crate::error::{Error, Result};
use crate::proto::{Entry, FailCause, Geometry, Message, Role, Roles, StageLayout};
use accept::accept_loop;
use attempt::{assign_ranks, label, peer, refuse};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Instance groups, each its own mesh of `attention` + `ffn` ranks
    /// (StepMesh's `DMLC_GROUP_SIZE`; default 1).
    pub groups: u32,
    /// Attention ranks to admit; `None`: take it from the first hello.
    pub attention: Option<u32>,
    /// FFN ranks to admit; `None`: take it from the first hello.
    pub ffn: Option<u32>,
    /// Job name; `None`: take it from the first hello.
    pub job: Option<String>,
    /// How long one attempt may take to join and reach the barrier,
    /// counted from the server's start or from the last failed attempt.
    pub join_timeout: Duration,
    /// How long one connection may take to authenticate and say hello.
    pub hello_timeout: Duration,
    /// The cluster token every rank must prove; `None`: ranks are not
    /// authenticated (then bind a loopback address: binding another one
    /// logs a warning).
    pub token: Option<Token>,
    /// After a failed attempt, wait for a fresh one (`true`, the default:
    /// a standalone scheduler) or return the failure (`false`: a scheduler
    /// embedded in a rank, which fails with it).
    pub retry: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            groups: 1,
            attention: None,
            ffn: None,
            job: None,
            join_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(5),
            token: None,
            retry: true,
        }
    }
}

/// What a finished run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The mesh's epoch (of several instance groups: group 0's).
    pub epoch: u64,
    /// Instance groups, each a mesh of `attention` + `ffn` ranks.
    pub groups: u32,
    /// Attention ranks (of each group's mesh).
    pub attention: u32,
    /// FFN ranks (of each group's mesh).
    pub ffn: u32,
    /// Connections dropped for not speaking the protocol.
    pub dropped: u32,
    /// Connections refused for failing the cluster token.
    pub auth_failures: u32,
    /// Setup attempts that failed before the one that formed.
    pub failed_attempts: u32,
    /// What ranks reported before leaving ([`Message::Report`]), by role
    /// then rank; of several instance groups, ranked as StepMesh's
    /// instances, `rank × groups + group`.
    pub reports: Vec<(Role, u32, String)>,
}

/// A bound rendezvous server.
#[derive(Debug)]
pub struct Scheduler {
    listener: TcpListener,
    cfg: SchedulerConfig,
}

/// What a rank asked for in its hello.
#[derive(Debug)]
struct Ask {
    job: String,
    group: u32,
    groups: u32,
    role: Role,
    preferred_rank: Option<u32>,
    m: u32,
    n: u32,
    geometry: Geometry,
    layout: StageLayout,
    host_id: String,
    endpoints: Vec<(String, Vec<u8>)>,
}

/// An authenticated connection that said hello.
#[derive(Debug)]
struct Joiner {
    stream: TcpStream,
    from: SocketAddr,
    ask: Ask,
}

impl Joiner {
    /// How errors name it: by the rank it asked for, or by where it is.
    fn name(&self) -> String {
        let name = match self.ask.preferred_rank {
            Some(r) => label(self.ask.role, r),
            None => format!(
                "an {} rank (host {}, {})",
                self.ask.role, self.ask.host_id, self.from
            ),
        };
        if self.ask.groups > 1 {
            format!("{name} of instance group {}", self.ask.group)
        } else {
            name
        }
    }
}

/// What the server's threads report to its main loop.
enum Event {
    Hello(Box<Joiner>),
    Dropped,
    AuthFailed,
    /// A member said something.
    Said {
        id: u64,
        msg: Message,
    },
    /// A member's connection ended.
    Gone {
        id: u64,
        why: String,
    },
    /// An instance group's server finished (several groups only).
    Finished {
        group: u32,
        result: Result<Summary>,
    },
    /// Every instance group has every rank of `roles` inside all-groups
    /// barrier `seq` (several groups only; see `span`).
    ReleaseAll {
        seq: u64,
        roles: Roles,
    },
}

/// A rank admitted to the current attempt.
#[derive(Debug)]
struct Member {
    id: u64,
    joiner: Joiner,
    /// Assigned when the address book goes out.
    rank: Option<u32>,
    entered: bool,
    left: bool,
    /// What it reported before leaving, if anything.
    report: Option<String>,
    /// Running barriers entered, by role set: how many (the next one's
    /// number).
    synced: [u64; 3],
    /// The same, of barriers across every instance group.
    synced_all: [u64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Gathering,
    Barrier { epoch: u64 },
    Running { epoch: u64 },
}

/// A setup attempt: what the job is so far, and who is in it.
#[derive(Debug)]
struct Attempt {
    /// Instance groups the job has: every hello must expect as many.
    groups: u32,
    m: Option<(u32, String)>,
    n: Option<u32>,
    job: Option<(String, String)>,
    geometry: Option<(Geometry, String)>,
    layout: Option<(StageLayout, String)>,
    members: Vec<Member>,
    deadline: Instant,
    phase: Phase,
}

/// How an attempt ended early.
struct Failed {
    cause: FailCause,
    rank: Option<(Role, u32)>,
    reason: String,
}

/// A server running on its own thread.
#[derive(Debug)]
pub struct SchedulerHandle {
    addr: SocketAddr,
    thread: JoinHandle<Result<Summary>>,
}

impl SchedulerHandle {
    /// Where ranks connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Waits for the server to finish (every rank left, or setup failed).
    pub fn join(self) -> Result<Summary> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::Shutdown("scheduler thread panicked".into())))
    }
    /// Whether the server has finished.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

impl Scheduler {
    /// Binds the listening socket (`host:port`; port 0 picks one). Without
    /// a token, a listener that is not on loopback logs a warning.
    pub fn bind(addr: &str, cfg: SchedulerConfig) -> Result<Scheduler> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("bind scheduler to {addr}"), e))?;
        let s = Scheduler { listener, cfg };
        let at = s.local_addr()?;
        if s.cfg.token.is_none() && !at.ip().is_loopback() {
            tracing::warn!(
                "scheduler listening on {at} without a cluster token: anyone who reaches it can join this job or disturb it; give the scheduler and every rank a token (AFMESH_TOKEN or AFMESH_TOKEN_FILE; afmesh scheduler --token-file), or bind a loopback address"
            );
        }
        Ok(s)
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("scheduler local address", e))
    }

    /// Runs on a new thread.
    pub fn spawn(self) -> Result<SchedulerHandle> {
        let addr = self.local_addr()?;
        let thread = std::thread::Builder::new()
            .name("afmesh-scheduler".into())
            .spawn(move || self.run())
            .map_err(|e| Error::io("spawn scheduler thread", e))?;
        Ok(SchedulerHandle { addr, thread })
    }

    /// Runs until every rank of a formed mesh has left, or setup fails for
    /// good (see the module docs).
    pub fn run(self) -> Result<Summary> {
        let addr = self.local_addr()?;
        let (tx, rx) = crossbeam_channel::unbounded::<Event>();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let listener = self
                .listener
                .try_clone()
                .map_err(|e| Error::io("clone listener", e))?;
            let stop = stop.clone();
            let tx = tx.clone();
            let token = self.cfg.token.clone();
            let hello_timeout = self.cfg.hello_timeout;
            std::thread::Builder::new()
                .name("afmesh-sched-accept".into())
                .spawn(move || accept_loop(listener, tx, stop, token, hello_timeout))
                .map_err(|e| Error::io("spawn accept thread", e))?
        };
        let result = if self.cfg.groups <= 1 {
            Server::new(&self.cfg, tx.clone(), None).serve(&rx)
        } else {
            self.serve_groups(&tx, &rx)
        };
        stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&wake_addr(addr), Duration::from_secs(1));
        let _ = acceptor.join();
        // Late joiners still queued get a clear refusal.
        while let Ok(ev) = rx.try_recv() {
            if let Event::Hello(mut j) = ev {
                refuse(&mut j, "the job is over: this scheduler has finished");
            }
        }
        result
    }
}

/// The main loop's state: one mesh (one instance group's).
struct Server<'a> {
    cfg: &'a SchedulerConfig,
    tx: Sender<Event>,
    /// The instance group it serves, when the job has several.
    group: Option<u32>,
    /// What the group loops share, when the job has several groups.
    span: Option<Arc<span::Span>>,
    next_id: u64,
    dropped: u32,
    auth_failures: u32,
    failed_attempts: u32,
}

impl<'a> Server<'a> {
    fn new(cfg: &'a SchedulerConfig, tx: Sender<Event>, group: Option<u32>) -> Server<'a> {
        Server {
            cfg,
            tx,
            group,
            span: None,
            next_id: 0,
            dropped: 0,
            auth_failures: 0,
            failed_attempts: 0,
        }
    }

    /// `"instance group 1: "`, when the job has several.
    fn prefix(&self) -> String {
        self.group
            .map_or(String::new(), |g| format!("instance group {g}: "))
    }

    fn fresh(&self) -> Attempt {
        Attempt {
            groups: self.cfg.groups,
            m: self.cfg.attention.map(|m| (m, "the scheduler".to_string())),
            n: self.cfg.ffn,
            job: self
                .cfg
                .job
                .clone()
                .map(|j| (j, "the scheduler".to_string())),
            geometry: None,
            layout: None,
            members: Vec::new(),
            deadline: Instant::now() + self.cfg.join_timeout,
            phase: Phase::Gathering,
        }
    }

    fn serve(&mut self, rx: &Receiver<Event>) -> Result<Summary> {
        let mut a = self.fresh();
        loop {
            let ev = match a.phase {
                Phase::Running { .. } => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                _ => rx.recv_timeout(a.deadline.saturating_duration_since(Instant::now())),
            };
            let outcome = match ev {
                Err(_) => {
                    let (k, want) = (a.members.len(), a.size());
                    let reason = format!(
                        "the mesh did not form within {:?}: {k} of {want} ranks joined{}",
                        self.cfg.join_timeout,
                        a.missing()
                    );
                    if k > 0 {
                        self.fail(
                            &mut a,
                            Failed {
                                cause: FailCause::Timeout,
                                rank: None,
                                reason: reason.clone(),
                            },
                        );
                    }
                    return Err(Error::Timeout {
                        op: "mesh join",
                        peer: format!("{k} of {want} ranks joined{}", a.missing()),
                        after: self.cfg.join_timeout,
                    });
                }
                Ok(Event::Dropped) => {
                    self.dropped += 1;
                    continue;
                }
                Ok(Event::AuthFailed) => {
                    self.auth_failures += 1;
                    continue;
                }
                Ok(Event::Hello(j)) => self.hello(&mut a, *j),
                Ok(Event::Said { id, msg }) => self.said(&mut a, id, msg),
                Ok(Event::Gone { id, why }) => self.gone(&mut a, id, &why),
                Ok(Event::Finished { .. }) => continue,
                // An all-groups barrier is released everywhere.
                Ok(Event::ReleaseAll { seq, roles }) => {
                    self.release_all(&mut a, seq, roles);
                    continue;
                }
            };
            match outcome {
                Ok(None) => {}
                Ok(Some(epoch)) => {
                    let mut reports: Vec<(Role, u32, String)> = (0..a.members.len())
                        .filter_map(|i| {
                            let (role, r) = a.rank_of(i);
                            a.members[i].report.take().map(|t| (role, r, t))
                        })
                        .collect();
                    reports.sort_by_key(|(role, r, _)| (*role == Role::Ffn, *r));
                    return Ok(Summary {
                        reports,
                        epoch,
                        groups: 1,
                        attention: a.m.map_or(0, |x| x.0),
                        ffn: a.n.unwrap_or(0),
                        dropped: self.dropped,
                        auth_failures: self.auth_failures,
                        failed_attempts: self.failed_attempts,
                    });
                }
                Err(f) => {
                    let err = match (f.cause, f.rank) {
                        (FailCause::Lost, Some((role, r))) => Error::PeerLost {
                            peer: peer(role, r),
                            reason: f.reason.clone(),
                        },
                        _ => Error::config(format!("the job cannot form: {}", f.reason)),
                    };
                    self.fail(&mut a, f);
                    if !self.cfg.retry {
                        return Err(err);
                    }
                    tracing::info!("waiting for a fresh setup attempt");
                    a = self.fresh();
                }
            }
        }
    }

    /// Ends the attempt: every member hears why at once.
    fn fail(&mut self, a: &mut Attempt, f: Failed) {
        self.failed_attempts += 1;
        let reason = format!("{}{}", self.prefix(), f.reason);
        tracing::warn!(
            "setup attempt failed, telling {} ranks: {reason}",
            a.members.len(),
        );
        let msg = Message::JobFailed {
            cause: f.cause,
            rank: f.rank,
            reason,
        };
        for m in &mut a.members {
            let j = &mut m.joiner;
            let _ = send(
                &mut j.stream,
                &msg,
                Duration::from_secs(1),
                &j.from.to_string(),
            );
            let _ = j.stream.shutdown(Shutdown::Both);
        }
        a.members.clear();
    }

    /// A rank said hello: admit it, or refuse it (which fails the attempt
    /// while it is forming). `Ok(Some(epoch))` never comes from here.
    fn hello(&mut self, a: &mut Attempt, mut j: Joiner) -> Result<Option<u64>, Failed> {
        if let Phase::Barrier { epoch } | Phase::Running { epoch } = a.phase {
            let job = a.job.as_ref().map_or("", |x| x.0.as_str());
            let reason = format!(
                "job \"{job}\" already formed ({}, epoch {epoch:#x}): {} arrived too late",
                a.size(),
                j.name()
            );
            tracing::warn!(from = %j.from, "refusing rank: {reason}");
            refuse(&mut j, &reason);
            return Ok(None);
        }
        if let Some(problem) = a.problem(&j) {
            tracing::warn!(from = %j.from, "refusing rank: {problem}");
            refuse(&mut j, &problem);
            return Err(Failed {
                cause: FailCause::Mismatch,
                rank: j.ask.preferred_rank.map(|r| (j.ask.role, r)),
                reason: problem,
            });
        }
        let name = j.name();
        a.job
            .get_or_insert_with(|| (j.ask.job.clone(), name.clone()));
        a.m.get_or_insert_with(|| (j.ask.m, name.clone()));
        a.n.get_or_insert(j.ask.n);
        a.geometry
            .get_or_insert_with(|| (j.ask.geometry, name.clone()));
        a.layout.get_or_insert_with(|| (j.ask.layout, name.clone()));
        let id = self.next_id;
        self.next_id += 1;
        tracing::debug!(from = %j.from, role = %j.ask.role, "rank joined");
        if let Err(e) = self.watch(id, &j) {
            tracing::warn!(from = %j.from, "cannot watch the rank's connection: {e}");
            refuse(&mut j, "the scheduler cannot watch this connection");
            return Ok(None);
        }
        a.members.push(Member {
            id,
            joiner: j,
            rank: None,
            entered: false,
            left: false,
            report: None,
            synced: [0; 3],
            synced_all: [0; 3],
        });
        if a.full() {
            self.send_books(a)?;
        }
        Ok(None)
    }

    /// Every rank has joined: assign ranks and send the address book.
    fn send_books(&mut self, a: &mut Attempt) -> Result<(), Failed> {
        let (m, n) = (a.m.as_ref().map_or(0, |x| x.0), a.n.unwrap_or(0));
        let ranks = assign_ranks(&a.members, m, n);
        for (mem, r) in a.members.iter_mut().zip(&ranks) {
            mem.rank = Some(*r);
        }
        let epoch = new_epoch();
        let entries: Vec<Entry> = a
            .members
            .iter()
            .map(|mem| Entry {
                role: mem.joiner.ask.role,
                rank: mem.rank.unwrap_or(u32::MAX),
                host_id: mem.joiner.ask.host_id.clone(),
                endpoints: mem.joiner.ask.endpoints.clone(),
            })
            .collect();
        let io_to = self.cfg.hello_timeout;
        for mem in &mut a.members {
            let (role, rank) = (mem.joiner.ask.role, mem.rank.unwrap_or(u32::MAX));
            let book = Message::AddressBook {
                epoch,
                role,
                rank,
                entries: entries.clone(),
            };
            let j = &mut mem.joiner;
            if let Err(e) = send(&mut j.stream, &book, io_to, &j.from.to_string()) {
                return Err(Failed {
                    cause: FailCause::Lost,
                    rank: Some((role, rank)),
                    reason: format!("did not take its address book: {e}"),
                });
            }
        }
        tracing::debug!(epoch, m, n, "address book sent");
        a.phase = Phase::Barrier { epoch };
        Ok(())
    }
}

fn new_epoch() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

fn wake_addr(bound: SocketAddr) -> SocketAddr {
    let mut a = bound;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}
