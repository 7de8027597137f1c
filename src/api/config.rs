//! Mesh configuration, from code or from the environment.
//!
//! `AFMESH_*` names come first; the StepMesh/ps-lite names (`DMLC_*`,
//! `STEPMESH_GPU`) are accepted with StepMesh's meaning so its launch
//! scripts work unchanged. A bad or missing variable is an error that
//! names it.
//!
//! # StepMesh's names
//!
//! A StepMesh "node" runs `DMLC_GROUP_SIZE` processes (default 1), one per
//! GPU, and `DMLC_NUM_WORKER` / `DMLC_NUM_SERVER` count nodes, not
//! processes. `fserver.init()` starts a process as instance rank
//! `R = DMLC_GROUP_SIZE × DMLC_NODE_RANK + STEPMESH_GPU + DMLC_RANK_OFFSET`
//! (each default 0), and instance `g` of a worker node talks only to
//! instance `g` of each server node (ps-lite's `GroupServerRankToInstanceID(s,
//! g) = s × DMLC_GROUP_SIZE + g`; fserver's server count is
//! `DMLC_NUM_SERVER`). So a StepMesh job is `DMLC_GROUP_SIZE` disjoint
//! meshes under one scheduler, and here, where no `AFMESH_*` name is set:
//!
//! * the process joins instance group `g = R mod DMLC_GROUP_SIZE`
//!   ([`MeshConfig::group`]; `DMLC_INSTANCE_ID`, when set, must agree), as
//!   rank `R / DMLC_GROUP_SIZE` (its node's rank), when any of
//!   `DMLC_NODE_RANK`, `STEPMESH_GPU`, `DMLC_RANK_OFFSET` is set (else
//!   the scheduler picks the rank, and a group size above 1 is an error:
//!   the group would be unknown);
//! * its mesh is M = `DMLC_NUM_WORKER`, N = `DMLC_NUM_SERVER`;
//! * `DMLC_ROLE=scheduler` names the process that runs the rendezvous
//!   server ([`MeshConfig::is_scheduler`]); it listens on
//!   `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`, where the ranks connect, and
//!   forms every group's mesh.
//!
//! `AFMESH_NUM_ATTENTION`, `AFMESH_NUM_FFN` and `AFMESH_RANK` keep their
//! meaning, the size of the mesh this process joins and its rank in it,
//! and win over the `DMLC_*` names.

use std::time::Duration;

use crate::bootstrap::{Scheduler, SchedulerConfig, Token};
use crate::error::{Error, Result};
use crate::proto::{Role, StageLayout};
use crate::transport::PollPolicy;

/// Which transport links use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// Per link: cuda between device memories of one host, else verbs
    /// when both ends have an active RDMA port that reaches the other, else
    /// shm between ranks of one host, else tcp.
    Auto,
    /// TCP sockets.
    Tcp,
    /// Shared memory (every link must be same-host).
    Shm,
    /// RDMA verbs (every link must reach the peer's port).
    Verbs,
    /// CUDA copy engines (device memory, every link on one host).
    Cuda,
}

impl TransportKind {
    /// Parses `auto`, `tcp`, `shm`, `verbs` or `cuda`.
    pub fn parse(s: &str) -> Result<TransportKind> {
        match s {
            "auto" => Ok(TransportKind::Auto),
            "tcp" => Ok(TransportKind::Tcp),
            "shm" => Ok(TransportKind::Shm),
            "verbs" => Ok(TransportKind::Verbs),
            "cuda" => Ok(TransportKind::Cuda),
            _ => Err(Error::config(format!(
                "transport {s:?}: expected auto, tcp, shm, verbs or cuda"
            ))),
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Shm => "shm",
            TransportKind::Verbs => "verbs",
            TransportKind::Cuda => "cuda",
        })
    }
}

/// How a rank joins its mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The role, when it comes from configuration (`AFMESH_ROLE` or
    /// `DMLC_ROLE`); `Mesh::join` needs it, `Mesh::attention`/`ffn` check it.
    pub role: Option<Role>,
    /// The configuration names this process the rendezvous server
    /// (`AFMESH_ROLE` or `DMLC_ROLE` = `scheduler`, as StepMesh launch
    /// scripts start it); then `role` is `None` and the process runs the
    /// server ([`MeshConfig::bind_scheduler`]) instead of joining.
    pub is_scheduler: bool,
    /// Processes per StepMesh node (`DMLC_GROUP_SIZE`, default 1): the
    /// number of instance groups, each its own mesh, the job forms.
    pub group_size: u32,
    /// This process's instance group, below `group_size` (StepMesh's
    /// instance index: `R mod DMLC_GROUP_SIZE`): the mesh it joins.
    pub group: u32,
    /// Rendezvous server, `host:port`.
    pub scheduler: String,
    /// Attention ranks (M).
    pub attention: u32,
    /// FFN ranks (N).
    pub ffn: u32,
    /// Preferred rank within the role.
    pub rank: Option<u32>,
    /// Job name: ranks of another job are refused.
    pub job: String,
    /// Host identity (ranks with the same one share a host).
    pub host_id: String,
    /// Transport for links.
    pub transport: TransportKind,
    /// How waits wait.
    pub poll: PollPolicy,
    /// Bound on joining: connecting, the address book, links, the barrier.
    pub setup_timeout: Duration,
    /// Bound on any one blocking socket write.
    pub io_timeout: Duration,
    /// How long a link may stay silent and unreachable before its peer is
    /// declared lost (`AFMESH_LIVENESS_MS`; tcp: keepalive probes and
    /// `TCP_USER_TIMEOUT`, whole seconds for the probes, so bounds under
    /// 2 s are met to within a second).
    pub liveness: Duration,
    /// Every message carries a CRC32C of its bytes, checked on arrival; a
    /// mismatch is `BadFrame` naming the peer (`AFMESH_CHECKSUM=1`; off by
    /// default). Every rank of a job must agree.
    pub checksum: bool,
    /// Where dispatches land on FFN ranks (`AFMESH_LAYOUT`: `slots`, the
    /// default, or `matrix`: every stage's rows one `[M × max_tokens,
    /// row_bytes]` matrix, [`crate::Batch::matrix`]). Every rank of a job
    /// must agree; `matrix` needs links that deliver in order (tcp, shm,
    /// cuda, verbs with `AFMESH_QPS=1`).
    pub layout: StageLayout,
    /// Run the rendezvous server inside this rank, at `scheduler`.
    pub embed_scheduler: bool,
    /// Pin the joining thread (the one that will drive the rank) to this CPU.
    pub cpu: Option<usize>,
    /// The cluster token this rank proves to the scheduler and to its
    /// peers (`AFMESH_TOKEN`, or `AFMESH_TOKEN_FILE`); `None`: no
    /// authentication, and a scheduler that has a token refuses the rank.
    pub token: Option<Token>,
}

impl MeshConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(scheduler: impl Into<String>, attention: u32, ffn: u32) -> MeshConfig {
        MeshConfig {
            role: None,
            is_scheduler: false,
            group_size: 1,
            group: 0,
            scheduler: scheduler.into(),
            attention,
            ffn,
            rank: None,
            job: "afmesh".into(),
            host_id: default_host_id(),
            transport: TransportKind::Auto,
            poll: PollPolicy::default(),
            setup_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10),
            liveness: Duration::from_secs(5),
            checksum: false,
            layout: StageLayout::Slots,
            embed_scheduler: false,
            cpu: None,
            token: None,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<MeshConfig> {
        MeshConfig::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<MeshConfig> {
        let pick = |a: &str, b: &str| {
            get(a)
                .map(|v| (a.to_string(), v))
                .or_else(|| get(b).map(|v| (b.to_string(), v)))
        };
        let num = |(k, v): (String, String)| parse_u32(&k, &v);
        let scheduler = address(&get)?.ok_or_else(|| {
            Error::config("AFMESH_SCHEDULER (or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT) is not set")
        })?;
        let group_size = group_size(&get)?;
        let need = |c: Option<u32>, a: &str, b: &str| {
            c.ok_or_else(|| Error::config(format!("{a} (or {b}) is not set")))
        };
        let (attention, ffn) = counts(&get)?;
        let attention = need(attention, "AFMESH_NUM_ATTENTION", "DMLC_NUM_WORKER")?;
        let ffn = need(ffn, "AFMESH_NUM_FFN", "DMLC_NUM_SERVER")?;
        let mut c = MeshConfig::new(scheduler, attention, ffn);
        c.group_size = group_size;
        if let Some((k, v)) = pick("AFMESH_ROLE", "DMLC_ROLE") {
            match v.trim() {
                "attention" | "worker" => c.role = Some(Role::Attention),
                "ffn" | "server" => c.role = Some(Role::Ffn),
                "scheduler" => c.is_scheduler = true,
                _ => {
                    return Err(Error::config(format!(
                        "{k}={v:?}: expected attention|ffn|scheduler (or worker|server)"
                    )))
                }
            }
        }
        let place = rank(&get, group_size)?;
        if let Some(p) = &place {
            c.group = p.group;
        } else if group_size > 1 && c.role.is_some() {
            return Err(Error::config(format!(
                "DMLC_GROUP_SIZE={group_size}: set STEPMESH_GPU (or DMLC_NODE_RANK, DMLC_RANK_OFFSET) to place this process in one of the {group_size} instance groups"
            )));
        }
        let own = opt_u32(&get, "AFMESH_RANK")?.map(|r| (r, "AFMESH_RANK".to_string()));
        if let Some((r, why)) = own.or(place.map(|p| (p.rank, p.why))) {
            let count = match c.role {
                Some(Role::Attention) => c.attention,
                Some(Role::Ffn) => c.ffn,
                None => u32::MAX,
            };
            if r >= count {
                return Err(Error::config(format!(
                    "rank {r} ({why}) is not below the {count} {} ranks of the mesh",
                    c.role.map_or(String::new(), |r| r.to_string())
                )));
            }
            c.rank = Some(r);
        }
        if let Some(j) = get("AFMESH_JOB") {
            c.job = j;
        }
        if let Some(h) = get("AFMESH_HOST_ID") {
            c.host_id = h;
        }
        if let Some(t) = get("AFMESH_TRANSPORT") {
            c.transport = TransportKind::parse(t.trim())
                .map_err(|e| Error::config(format!("AFMESH_TRANSPORT: {e}")))?;
        }
        if let Some(p) = get("AFMESH_POLL") {
            c.poll = PollPolicy::parse(&p)?;
        }
        // A zero bound would fail every wait at once: refused, named.
        let millis = |(k, v): (String, String)| match num((k.clone(), v.clone()))? {
            0 => Err(Error::config(format!(
                "{k}={v:?}: a timeout must be at least 1 ms"
            ))),
            ms => Ok(Duration::from_millis(u64::from(ms))),
        };
        if let Some(kv) = pick("AFMESH_SETUP_TIMEOUT_MS", "AFMESH_SETUP_TIMEOUT_MS") {
            c.setup_timeout = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_IO_TIMEOUT_MS", "AFMESH_IO_TIMEOUT_MS") {
            c.io_timeout = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_LIVENESS_MS", "AFMESH_LIVENESS_MS") {
            c.liveness = millis(kv)?;
        }
        if let Some(kv) = pick("AFMESH_CPU", "AFMESH_CPU") {
            c.cpu = Some(num(kv)? as usize);
        }
        c.token = token_from(&get)?;
        if let Some(v) = get("AFMESH_CHECKSUM") {
            c.checksum = match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(Error::config(format!(
                        "AFMESH_CHECKSUM={v:?}: expected 0 or 1"
                    )))
                }
            };
        }
        if let Some(v) = get("AFMESH_LAYOUT") {
            c.layout = StageLayout::parse(v.trim())
                .map_err(|e| Error::config(format!("AFMESH_LAYOUT={v:?}: {e}")))?;
        }
        if let Some(v) = get("AFMESH_EMBED_SCHEDULER") {
            c.embed_scheduler = match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" | "" => false,
                _ => {
                    return Err(Error::config(format!(
                        "AFMESH_EMBED_SCHEDULER={v:?}: expected 0 or 1"
                    )))
                }
            };
        }
        Ok(c)
    }
}

impl MeshConfig {
    /// The rendezvous server for this mesh: its counts, job and token.
    /// A standalone server (`retry`: a failed setup attempt waits for a
    /// fresh one), as `afmesh scheduler` runs it.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            groups: self.group_size,
            attention: Some(self.attention),
            ffn: Some(self.ffn),
            job: Some(self.job.clone()),
            token: self.token.clone(),
            ..SchedulerConfig::default()
        }
    }

    /// Binds the rendezvous server at `scheduler`, where the ranks
    /// connect: what a process whose configuration [`is_scheduler`]
    /// runs (`.run()` serves until the mesh finishes; `.spawn()` on a
    /// thread).
    ///
    /// [`is_scheduler`]: MeshConfig::is_scheduler
    pub fn bind_scheduler(&self) -> Result<Scheduler> {
        Scheduler::bind(&self.scheduler, self.scheduler_config())
    }

    /// What the process environment says about a standalone rendezvous
    /// server, each part optional (see [`MeshConfig::scheduler_from_lookup`]).
    pub fn scheduler_from_env() -> Result<SchedulerEnv> {
        MeshConfig::scheduler_from_lookup(|k| std::env::var(k).ok())
    }

    /// What `get` says about a standalone rendezvous server: where to
    /// listen (`AFMESH_SCHEDULER`, or `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`),
    /// the counts and instance groups (as for ranks), `AFMESH_JOB` and
    /// the token. Unset parts are `None`; a set but bad one is an error.
    pub fn scheduler_from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<SchedulerEnv> {
        let groups = group_size(&get)?;
        let (attention, ffn) = counts(&get)?;
        Ok(SchedulerEnv {
            groups,
            addr: address(&get)?,
            attention,
            ffn,
            job: get("AFMESH_JOB"),
            token: token_from(&get)?,
        })
    }
}

/// A standalone rendezvous server as the environment describes it.
#[derive(Debug, Clone)]
pub struct SchedulerEnv {
    /// Where to listen: `AFMESH_SCHEDULER`, or
    /// `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`.
    pub addr: Option<String>,
    /// Instance groups, each its own mesh (`DMLC_GROUP_SIZE`, default 1).
    pub groups: u32,
    /// Attention ranks of each mesh (`AFMESH_NUM_ATTENTION`, or
    /// `DMLC_NUM_WORKER`).
    pub attention: Option<u32>,
    /// FFN ranks of each mesh (`AFMESH_NUM_FFN`, or `DMLC_NUM_SERVER`).
    pub ffn: Option<u32>,
    /// `AFMESH_JOB`.
    pub job: Option<String>,
    /// `AFMESH_TOKEN` or `AFMESH_TOKEN_FILE`.
    pub token: Option<Token>,
}

impl MeshConfig {
    /// The cluster token from `AFMESH_TOKEN` or `AFMESH_TOKEN_FILE` (what
    /// [`MeshConfig::from_env`] reads; the scheduler reads the same).
    pub fn token_from_env() -> Result<Option<Token>> {
        token_from(&|k: &str| std::env::var(k).ok())
    }
}

fn token_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Token>> {
    Ok(match (get("AFMESH_TOKEN"), get("AFMESH_TOKEN_FILE")) {
        (Some(_), Some(_)) => {
            return Err(Error::config(
                "AFMESH_TOKEN and AFMESH_TOKEN_FILE are both set: set one",
            ))
        }
        (Some(t), None) => {
            Some(Token::new(t).map_err(|e| Error::config(format!("AFMESH_TOKEN: {e}")))?)
        }
        (None, Some(f)) => Some(
            Token::from_file(&f).map_err(|e| Error::config(format!("AFMESH_TOKEN_FILE: {e}")))?,
        ),
        (None, None) => None,
    })
}

/// A non-negative integer variable, or an error naming it.
fn parse_u32(k: &str, v: &str) -> Result<u32> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| Error::config(format!("{k}={v:?} is not a non-negative integer")))
}

/// A variable read as a number, if set.
fn opt_u32(get: &dyn Fn(&str) -> Option<String>, k: &str) -> Result<Option<u32>> {
    get(k).map(|v| parse_u32(k, &v)).transpose()
}

/// The rendezvous address: `AFMESH_SCHEDULER`, else
/// `DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT` (both needed), else `None`.
fn address(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>> {
    if let Some(s) = get("AFMESH_SCHEDULER") {
        return Ok(Some(s.trim().to_string()));
    }
    let port = opt_u32(get, "DMLC_PS_ROOT_PORT")?;
    match (get("DMLC_PS_ROOT_URI"), port) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::config(
            "DMLC_PS_ROOT_URI is set but DMLC_PS_ROOT_PORT is not",
        )),
        (None, Some(_)) => Err(Error::config(
            "DMLC_PS_ROOT_PORT is set but DMLC_PS_ROOT_URI is not",
        )),
        (Some(host), Some(port)) => {
            let host = host.trim();
            if port > u32::from(u16::MAX) {
                return Err(Error::config(format!(
                    "DMLC_PS_ROOT_PORT={port} is not a TCP port"
                )));
            }
            // An IPv6 literal needs brackets before the port.
            Ok(Some(if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }))
        }
    }
}

/// `DMLC_GROUP_SIZE`: processes per StepMesh node, at least 1.
fn group_size(get: &dyn Fn(&str) -> Option<String>) -> Result<u32> {
    match opt_u32(get, "DMLC_GROUP_SIZE")? {
        None => Ok(1),
        Some(0) => Err(Error::config(
            "DMLC_GROUP_SIZE=0: a group has at least 1 process",
        )),
        Some(g) => Ok(g),
    }
}

/// M and N of the mesh, where set: `AFMESH_NUM_*`, else StepMesh's node
/// counts (one instance of each node per group's mesh).
fn counts(get: &dyn Fn(&str) -> Option<String>) -> Result<(Option<u32>, Option<u32>)> {
    let one = |ours: &str, theirs: &str| -> Result<Option<u32>> {
        Ok(match opt_u32(get, ours)? {
            Some(n) => Some(n),
            None => opt_u32(get, theirs)?,
        })
    };
    Ok((
        one("AFMESH_NUM_ATTENTION", "DMLC_NUM_WORKER")?,
        one("AFMESH_NUM_FFN", "DMLC_NUM_SERVER")?,
    ))
}

/// Where StepMesh's names place a process.
struct Place {
    /// Its instance group.
    group: u32,
    /// Its rank in that group's mesh.
    rank: u32,
    /// How it was computed, for errors.
    why: String,
}

/// StepMesh's instance rank `R = DMLC_GROUP_SIZE × DMLC_NODE_RANK +
/// STEPMESH_GPU + DMLC_RANK_OFFSET`, when any of the three is set, as
/// group `R mod DMLC_GROUP_SIZE` and rank `R / DMLC_GROUP_SIZE`; else
/// `None`. `DMLC_INSTANCE_ID`, when set, must name the same group.
fn rank(get: &dyn Fn(&str) -> Option<String>, group: u32) -> Result<Option<Place>> {
    let node = opt_u32(get, "DMLC_NODE_RANK")?;
    let gpu = opt_u32(get, "STEPMESH_GPU")?;
    let offset = opt_u32(get, "DMLC_RANK_OFFSET")?;
    if node.is_none() && gpu.is_none() && offset.is_none() {
        return Ok(None);
    }
    let (node, gpu, offset) = (node.unwrap_or(0), gpu.unwrap_or(0), offset.unwrap_or(0));
    let terms = format!(
        "DMLC_GROUP_SIZE {group} × DMLC_NODE_RANK {node} + STEPMESH_GPU {gpu} + DMLC_RANK_OFFSET {offset}"
    );
    let r = group
        .checked_mul(node)
        .and_then(|r| r.checked_add(gpu))
        .and_then(|r| r.checked_add(offset))
        .ok_or_else(|| Error::config(format!("rank {terms} overflows")))?;
    let (g, rank) = (r % group, r / group);
    if let Some(id) = opt_u32(get, "DMLC_INSTANCE_ID")? {
        if id != g {
            return Err(Error::config(format!(
                "DMLC_INSTANCE_ID={id}, but the instance rank {r} ({terms}) is in instance group {g}"
            )));
        }
    }
    let why = if group == 1 {
        terms
    } else {
        format!("instance rank {r} = {terms}: group {g}, rank {r} / {group}")
    };
    Ok(Some(Place {
        group: g,
        rank,
        why,
    }))
}

fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests;
