//! The rendezvous server (`afmesh scheduler`, or embedded in a rank).
//!
//! It admits M attention and N FFN ranks, assigns their ranks (honouring a
//! free preferred rank), checks that they agree on the job, the mesh size
//! and the stage geometry, sends everyone the address book with a fresh
//! epoch, runs one barrier, and then waits for every rank to leave.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{recv, send};
use crate::error::{Error, Result};
use crate::proto::{Entry, Geometry, Message, Role};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Attention ranks to admit; `None`: take it from the first hello.
    pub attention: Option<u32>,
    /// FFN ranks to admit; `None`: take it from the first hello.
    pub ffn: Option<u32>,
    /// Job name; `None`: take it from the first hello.
    pub job: Option<String>,
    /// How long the whole mesh may take to join and reach the barrier.
    pub join_timeout: Duration,
    /// How long one connection may take to say hello.
    pub hello_timeout: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            attention: None,
            ffn: None,
            job: None,
            join_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// What a finished run saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The mesh's epoch.
    pub epoch: u64,
    /// Attention ranks.
    pub attention: u32,
    /// FFN ranks.
    pub ffn: u32,
    /// Connections dropped for not speaking the protocol.
    pub dropped: u32,
}

/// A bound rendezvous server.
#[derive(Debug)]
pub struct Scheduler {
    listener: TcpListener,
    cfg: SchedulerConfig,
}

struct Joiner {
    stream: TcpStream,
    from: SocketAddr,
    hello: Message,
}

enum Accepted {
    Hello(Box<Joiner>),
    Dropped,
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
    /// Binds the listening socket (`host:port`; port 0 picks one).
    pub fn bind(addr: &str, cfg: SchedulerConfig) -> Result<Scheduler> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("bind scheduler to {addr}"), e))?;
        Ok(Scheduler { listener, cfg })
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

    /// Runs until every admitted rank has left (or setup fails).
    pub fn run(self) -> Result<Summary> {
        let addr = self.local_addr()?;
        let (tx, rx) = crossbeam_channel::unbounded::<Accepted>();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let listener = self
                .listener
                .try_clone()
                .map_err(|e| Error::io("clone listener", e))?;
            let stop = stop.clone();
            let hello_timeout = self.cfg.hello_timeout;
            std::thread::Builder::new()
                .name("afmesh-sched-accept".into())
                .spawn(move || accept_loop(listener, tx, stop, hello_timeout))
                .map_err(|e| Error::io("spawn accept thread", e))?
        };
        let result = self.form(&rx);
        stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&wake_addr(addr), Duration::from_secs(1));
        let _ = acceptor.join();
        // Late joiners still queued get a clear refusal.
        while let Ok(Accepted::Hello(mut j)) = rx.try_recv() {
            let _ = send(
                &mut j.stream,
                &Message::Refused {
                    reason: "mesh already formed".into(),
                },
                Duration::from_secs(1),
                &j.from.to_string(),
            );
        }
        result
    }

    fn form(&self, rx: &Receiver<Accepted>) -> Result<Summary> {
        let deadline = Instant::now() + self.cfg.join_timeout;
        let mut m = self.cfg.attention;
        let mut n = self.cfg.ffn;
        let mut job = self.cfg.job.clone();
        let mut geometry: Option<Geometry> = None;
        let mut joined: Vec<Joiner> = Vec::new();
        let mut dropped = 0u32;
        loop {
            if let (Some(m), Some(n)) = (m, n) {
                let a = joined
                    .iter()
                    .filter(|j| role_of(&j.hello) == Some(Role::Attention))
                    .count();
                if a == m as usize && joined.len() == (m + n) as usize {
                    break;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let acc = match rx.recv_timeout(left) {
                Ok(a) => a,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let want = format!("{}A+{}F", m.unwrap_or(0), n.unwrap_or(0));
                    for j in &mut joined {
                        refuse(j, "mesh did not form in time");
                    }
                    return Err(Error::Timeout {
                        op: "mesh join",
                        peer: format!("{} of {want} ranks joined", joined.len()),
                        after: self.cfg.join_timeout,
                    });
                }
            };
            let mut j = match acc {
                Accepted::Dropped => {
                    dropped += 1;
                    continue;
                }
                Accepted::Hello(j) => *j,
            };
            let Message::Hello {
                job: hjob,
                role,
                m: hm,
                n: hn,
                geometry: hg,
                ..
            } = &j.hello
            else {
                continue;
            };
            let problem = if job.as_deref().is_some_and(|x| x != hjob) {
                Some(format!(
                    "job {hjob:?} is not this mesh's job {:?}",
                    job.as_deref().unwrap_or("")
                ))
            } else if m.is_some_and(|x| x != *hm) || n.is_some_and(|x| x != *hn) {
                Some(format!(
                    "rank expects {hm}A+{hn}F, mesh is {}A+{}F",
                    m.unwrap_or(*hm),
                    n.unwrap_or(*hn)
                ))
            } else if geometry.is_some_and(|g| g != *hg) {
                Some(format!(
                    "stage geometry {hg:?} differs from the mesh's {:?}",
                    geometry
                ))
            } else if *hm == 0 || *hn == 0 {
                Some("a mesh needs at least one attention and one FFN rank".into())
            } else {
                let count = joined
                    .iter()
                    .filter(|x| role_of(&x.hello) == Some(*role))
                    .count() as u32;
                let cap = if *role == Role::Attention { *hm } else { *hn };
                (count >= cap).then(|| format!("all {cap} {role} ranks have already joined"))
            };
            if let Some(p) = problem {
                tracing::warn!(from = %j.from, "refusing rank: {p}");
                refuse(&mut j, &p);
                continue;
            }
            job.get_or_insert_with(|| hjob.clone());
            m.get_or_insert(*hm);
            n.get_or_insert(*hn);
            geometry.get_or_insert(*hg);
            tracing::debug!(from = %j.from, %role, "rank joined");
            joined.push(j);
        }
        let (m, n) = (m.unwrap_or(0), n.unwrap_or(0));
        let ranks = assign_ranks(&joined, m, n);
        let epoch = new_epoch();
        let entries: Vec<Entry> = joined
            .iter()
            .zip(&ranks)
            .filter_map(|(j, &rank)| match &j.hello {
                Message::Hello {
                    role,
                    host_id,
                    endpoints,
                    ..
                } => Some(Entry {
                    role: *role,
                    rank,
                    host_id: host_id.clone(),
                    endpoints: endpoints.clone(),
                }),
                _ => None,
            })
            .collect();
        let io_to = self.cfg.hello_timeout;
        for (j, &rank) in joined.iter_mut().zip(&ranks) {
            let role = role_of(&j.hello).unwrap_or(Role::Attention);
            let book = Message::AddressBook {
                epoch,
                role,
                rank,
                entries: entries.clone(),
            };
            send(&mut j.stream, &book, io_to, &j.from.to_string())?;
        }
        // Barrier.
        for j in &mut joined {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            match recv(&mut j.stream, left, &j.from.to_string())? {
                Message::BarrierEnter { epoch: e } if e == epoch => {}
                other => {
                    return Err(Error::BadFrame {
                        peer: j.from.to_string(),
                        reason: format!("expected barrier for epoch {epoch}, got {other:?}"),
                    })
                }
            }
        }
        for j in &mut joined {
            send(
                &mut j.stream,
                &Message::BarrierRelease { epoch },
                io_to,
                &j.from.to_string(),
            )?;
        }
        tracing::info!(epoch, m, n, "mesh formed");
        // Wait for every rank to leave (Bye or EOF), each on its own thread.
        let waiters: Vec<_> = joined
            .into_iter()
            .map(|mut j| {
                std::thread::spawn(move || {
                    let from = j.from.to_string();
                    loop {
                        match recv(&mut j.stream, Duration::from_secs(3600), &from) {
                            Ok(Message::Bye) => return,
                            Ok(other) => {
                                tracing::warn!(%from, "unexpected after barrier: {other:?}")
                            }
                            Err(Error::Timeout { .. }) => continue,
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        for w in waiters {
            let _ = w.join();
        }
        Ok(Summary {
            epoch,
            attention: m,
            ffn: n,
            dropped,
        })
    }
}

fn role_of(m: &Message) -> Option<Role> {
    match m {
        Message::Hello { role, .. } => Some(*role),
        _ => None,
    }
}

fn refuse(j: &mut Joiner, reason: &str) {
    let _ = send(
        &mut j.stream,
        &Message::Refused {
            reason: reason.to_string(),
        },
        Duration::from_secs(1),
        &j.from.to_string(),
    );
}

/// Ranks in join order: a free preferred rank first, then the lowest free.
fn assign_ranks(joined: &[Joiner], m: u32, n: u32) -> Vec<u32> {
    let mut ranks = vec![u32::MAX; joined.len()];
    for role in [Role::Attention, Role::Ffn] {
        let cap = if role == Role::Attention { m } else { n } as usize;
        let mut taken = vec![false; cap];
        let mine: Vec<usize> = (0..joined.len())
            .filter(|&i| role_of(&joined[i].hello) == Some(role))
            .collect();
        for &i in &mine {
            if let Message::Hello {
                preferred_rank: Some(p),
                ..
            } = &joined[i].hello
            {
                if (*p as usize) < cap && !taken[*p as usize] {
                    taken[*p as usize] = true;
                    ranks[i] = *p;
                }
            }
        }
        for &i in &mine {
            if ranks[i] == u32::MAX {
                if let Some(free) = taken.iter().position(|t| !t) {
                    taken[free] = true;
                    ranks[i] = free as u32;
                }
            }
        }
    }
    ranks
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

fn accept_loop(
    listener: TcpListener,
    tx: Sender<Accepted>,
    stop: Arc<AtomicBool>,
    hello_timeout: Duration,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("scheduler accept: {e}");
                continue;
            }
        };
        let tx = tx.clone();
        std::thread::spawn(move || {
            let from = match stream.peer_addr() {
                Ok(a) => a,
                Err(_) => return,
            };
            let _ = stream.set_nodelay(true);
            match recv(&mut stream, hello_timeout, &from.to_string()) {
                Ok(hello @ Message::Hello { .. }) => {
                    let _ = tx.send(Accepted::Hello(Box::new(Joiner {
                        stream,
                        from,
                        hello,
                    })));
                }
                Ok(other) => {
                    tracing::warn!(%from, "dropping connection: expected hello, got {other:?}");
                    let _ = tx.send(Accepted::Dropped);
                }
                Err(e) => {
                    tracing::warn!(%from, "dropping connection: {e}");
                    let _ = tx.send(Accepted::Dropped);
                }
            }
        });
    }
}
