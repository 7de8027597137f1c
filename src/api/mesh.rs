//! Joining a mesh: regions, rendezvous, links, barrier.

use std::sync::Arc;
use std::time::Duration;

use super::attention::AttentionRank;
use super::config::{MeshConfig, TransportKind};
use super::ffn::FfnRank;
use super::layout::Layout;
use super::StageSpec;
use crate::bootstrap::client::Connecting;
use crate::bootstrap::rendezvous::{Scheduler, SchedulerConfig};
use crate::bootstrap::{ClockOffset, LinkGuard};
use crate::engine::{Engine, Receive, Support};
use crate::error::{Error, Peer, Result};
use crate::metrics::Metrics;
use crate::proto::bootstrap::BOOTSTRAP_VERSION;
use crate::proto::{Message, RegionKey, Role, StageLayout};
use crate::trace::{RankMeta, Recorder, TraceConfig};
use crate::transport::sim::SimNetwork;
use crate::transport::slots::SendSlots;
use crate::transport::{
    Access, Backend, LinkId, LocalKey, MemoryKind, Mux, PeerSpec, Region, Setup, Transport,
    BACKENDS,
};

mod sim;
#[cfg(test)]
pub(crate) use sim::sim_mesh_with;
pub use sim::{sim_mesh, sim_mesh_in, sim_mesh_with_checksums, sim_mesh_with_layout};

/// Joining as a rank when the configuration names this process the
/// scheduler.
fn scheduler_not_rank() -> Error {
    Error::config(
        "this process is configured as the scheduler (AFMESH_ROLE or DMLC_ROLE = scheduler): run the rendezvous server (MeshConfig::bind_scheduler, afmesh_scheduler_new_from_env, `afmesh scheduler`), not a rank",
    )
}

/// A rank of either role, as [`Mesh::join`] returns it.
#[derive(Debug)]
pub enum Rank {
    /// An attention rank.
    Attention(AttentionRank),
    /// An FFN rank.
    Ffn(FfnRank),
}

/// A mesh to join: its configuration.
#[derive(Debug, Clone)]
pub struct Mesh {
    cfg: MeshConfig,
}

enum Memory {
    Library,
    Caller(Region),
    /// Library-allocated on this CUDA device.
    Device(i32),
}

impl Memory {
    fn kind(&self) -> MemoryKind {
        match self {
            Memory::Library => MemoryKind::Host,
            Memory::Caller(r) => r.kind(),
            Memory::Device(device) => MemoryKind::Cuda { device: *device },
        }
    }
}

impl Mesh {
    /// A mesh configured from code.
    pub fn new(cfg: MeshConfig) -> Mesh {
        Mesh { cfg }
    }

    /// A mesh configured from the environment (`AFMESH_*`, `DMLC_*`).
    pub fn from_env() -> Result<Mesh> {
        Ok(Mesh {
            cfg: MeshConfig::from_env()?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Joins in the configured role.
    pub fn join(&self, spec: StageSpec) -> Result<Rank> {
        match self.cfg.role {
            Some(Role::Attention) => self.attention(spec).map(Rank::Attention),
            Some(Role::Ffn) => self.ffn(spec).map(Rank::Ffn),
            None if self.cfg.is_scheduler => Err(scheduler_not_rank()),
            None => Err(Error::config(
                "no role configured: set AFMESH_ROLE (or DMLC_ROLE)",
            )),
        }
    }

    /// Joins as an attention rank, with library-allocated output slots.
    pub fn attention(&self, spec: StageSpec) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Library)
    }

    /// Joins as an attention rank whose output slots live in `memory`
    /// (caller memory, at least `S × N × slot` bytes; see
    /// [`Mesh::attention_memory_len`]).
    ///
    /// Caller memory moves at shared-memory speed between ranks of one host
    /// too: peers write it with cross-memory attach (one kernel copy), which
    /// needs ptrace permission between the ranks (same user, no stricter
    /// Yama or container policy); without it those links use tcp, logged.
    /// Any alignment works, and slots inside keep the buffer's alignment.
    /// For full speed over shm, start it on a huge-page boundary with a
    /// length that is a multiple of [`Region::huge_page_size`] (2 MiB on
    /// x86-64; [`Region::from_vec_part`] places it so from safe code, then
    /// [`Mesh::attention_with_region`]): the library puts it on transparent
    /// huge pages at setup, and a cross-memory write runs at memcpy speed
    /// there, ~1.5× slower on 4 KiB pages (the kernel pins each one per
    /// write).
    pub fn attention_with_memory(&self, spec: StageSpec, memory: Vec<u8>) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Caller(Region::from_vec(memory)))
    }

    /// Joins as an attention rank whose output slots live in `region`
    /// (caller memory of any origin, e.g. from C).
    pub fn attention_with_region(&self, spec: StageSpec, region: Region) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Caller(region))
    }

    /// Joins as an attention rank whose stage buffers (output slots and
    /// send slots) the library allocates on CUDA device `device`. Its links
    /// run over the `cuda` backend (GPUs of one host); see
    /// [`AttentionRank::dispatch_device`]. A caller's device buffer joins
    /// through [`Mesh::attention_with_region`] with
    /// [`Region::from_device_ptr`].
    pub fn attention_on_device(&self, spec: StageSpec, device: i32) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Device(device))
    }

    /// Joins as an FFN rank whose stage buffers are on CUDA device
    /// `device` (see [`Mesh::attention_on_device`]).
    pub fn ffn_on_device(&self, spec: StageSpec, device: i32) -> Result<FfnRank> {
        self.join_ffn(spec, Memory::Device(device))
    }

    /// Bytes of caller memory an attention rank needs for `spec`.
    pub fn attention_memory_len(&self, spec: StageSpec) -> Result<usize> {
        let l = Layout::new(spec, self.cfg.attention, self.cfg.ffn, self.cfg.layout)?;
        l.out_region_len()
            .ok_or_else(|| Error::config("output region overflows"))
    }

    /// Joins as an FFN rank, with library-allocated input slots.
    pub fn ffn(&self, spec: StageSpec) -> Result<FfnRank> {
        self.join_ffn(spec, Memory::Library)
    }

    /// Joins as an FFN rank whose input slots live in `memory` (see
    /// [`Mesh::ffn_memory_len`]).
    pub fn ffn_with_memory(&self, spec: StageSpec, memory: Vec<u8>) -> Result<FfnRank> {
        self.join_ffn(spec, Memory::Caller(Region::from_vec(memory)))
    }

    /// Joins as an FFN rank whose input slots live in `region`.
    pub fn ffn_with_region(&self, spec: StageSpec, region: Region) -> Result<FfnRank> {
        self.join_ffn(spec, Memory::Caller(region))
    }

    /// Bytes of caller memory an FFN rank needs for `spec`.
    pub fn ffn_memory_len(&self, spec: StageSpec) -> Result<usize> {
        let l = Layout::new(spec, self.cfg.attention, self.cfg.ffn, self.cfg.layout)?;
        l.in_region_len()
            .ok_or_else(|| Error::config("input region overflows"))
    }

    fn check_role(&self, want: Role) -> Result<()> {
        if self.cfg.is_scheduler {
            return Err(scheduler_not_rank());
        }
        match self.cfg.role {
            Some(r) if r != want => Err(Error::config(format!(
                "configured role is {r}, but joining as {want}"
            ))),
            _ => Ok(()),
        }
    }

    fn join_attention(&self, spec: StageSpec, memory: Memory) -> Result<AttentionRank> {
        self.check_role(Role::Attention)?;
        let j = self.join_as(Role::Attention, spec, memory)?;
        Ok(AttentionRank::new(j.engine, j.layout, j.rank))
    }

    fn join_ffn(&self, spec: StageSpec, memory: Memory) -> Result<FfnRank> {
        self.check_role(Role::Ffn)?;
        let j = self.join_as(Role::Ffn, spec, memory)?;
        Ok(FfnRank::new(j.engine, j.layout, j.rank))
    }

    /// Everything but the role-specific wrapper: backends, regions,
    /// rendezvous, links (each on the first backend that reaches the peer),
    /// barrier.
    fn join_as(&self, role: Role, spec: StageSpec, memory: Memory) -> Result<Joined> {
        let cfg = &self.cfg;
        let layout = Layout::new(spec, cfg.attention, cfg.ffn, cfg.layout)?;
        let (my_len, peer_len, peer_role, peer_count) = match role {
            Role::Attention => (
                layout.out_region_len(),
                layout.in_region_len(),
                Role::Ffn,
                cfg.ffn,
            ),
            Role::Ffn => (
                layout.in_region_len(),
                layout.out_region_len(),
                Role::Attention,
                cfg.attention,
            ),
        };
        let my_len = my_len.ok_or_else(|| Error::config("region size overflows"))?;
        if cfg.checksum && memory.kind() != MemoryKind::Host {
            return Err(Error::config(format!(
                "AFMESH_CHECKSUM=1 with {} stage memory: checksums are computed by the CPU, which never reads device memory; turn them off for device ranks",
                memory.kind()
            )));
        }
        if let Memory::Device(_) = memory {
            // Before the rendezvous: a rank that cannot hold its buffers
            // should not make the others wait for it.
            crate::cuda::driver()?;
        }
        let peer_len = peer_len.ok_or_else(|| Error::config("region size overflows"))? as u64;
        // A pinned rank owns its core: its waits spin without yielding.
        let poll = match cfg.cpu {
            Some(cpu) => {
                crate::cuda::threads::before_pinning();
                crate::transport::shm::sys::pin_to_cpu(cpu)
                    .map_err(|e| Error::io(format!("AFMESH_CPU={cpu}: pin"), e))?;
                cfg.poll.pinned()
            }
            None => cfg.poll,
        };

        let scheduler = if cfg.embed_scheduler {
            let s = Scheduler::bind(
                &cfg.scheduler,
                SchedulerConfig {
                    groups: cfg.group_size,
                    attention: Some(cfg.attention),
                    ffn: Some(cfg.ffn),
                    job: Some(cfg.job.clone()),
                    join_timeout: cfg.setup_timeout,
                    token: cfg.token.clone(),
                    // It lives in this rank: when the job fails, so do both.
                    retry: false,
                    ..SchedulerConfig::default()
                },
            )?;
            Some(s.spawn()?)
        } else {
            None
        };
        // AFMESH_TRACE: its directory is made before joining, and the
        // rank's clock offset is estimated against the scheduler's.
        let trace = TraceConfig::from_env()?;
        // AFMESH_METRICS: bound before joining, served once joined.
        let metrics = Metrics::address_from_env()?
            .map(|a| Metrics::bind(&a))
            .transpose()?;
        if let Some(t) = &trace {
            t.prepare()?;
        }
        let mut conn = Connecting::connect(&cfg.scheduler, cfg.token.as_ref(), cfg.setup_timeout)?;
        let clock = match &trace {
            Some(_) => conn.clock(CLOCK_PROBES, cfg.io_timeout)?,
            None => ClockOffset::default(),
        };

        // The backends this rank offers, most preferred first: those that
        // move its kind of memory.
        let kind = memory.kind();
        let caller = !matches!(memory, Memory::Library);
        let mut backends = Vec::new();
        let mut hosted = None;
        let want = |name: &str| match cfg.transport {
            TransportKind::Auto => true,
            TransportKind::Tcp => name == "tcp",
            TransportKind::Shm => name == "shm",
            TransportKind::Verbs => name == "verbs",
            TransportKind::Cuda => name == "cuda",
        };
        // Caller memory stays where it is (shm peers reach it by
        // cross-memory attach); else a backend may host the receive region.
        let setup = Setup {
            job: &cfg.job,
            host_id: &cfg.host_id,
            peers: peer_count,
            recv_len: if caller { 0 } else { my_len },
            ip: conn.local_ip()?,
            io_timeout: cfg.io_timeout,
            liveness: cfg.liveness,
            guard: LinkGuard {
                token: cfg.token.clone(),
                watch: conn.watch(),
            },
        };
        for name in BACKENDS.iter().filter(|n| want(n)) {
            // The cuda backend is for device memory only: a host rank does
            // not start CUDA.
            if *name == "cuda" && kind == MemoryKind::Host {
                continue;
            }
            match Backend::open(name, &setup) {
                Some(Ok(b)) if !b.caps().moves(kind) => {
                    tracing::debug!("transport {name} does not move {kind}: not offered");
                }
                Some(Ok(b)) => {
                    if hosted.is_none() && !caller {
                        hosted = b.receive_region();
                    }
                    backends.push(b);
                }
                Some(Err(e)) if cfg.transport == TransportKind::Auto => {
                    tracing::warn!(
                        "transport {name} unavailable here, links will use the others: {e}"
                    );
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        let mut mux = Mux::new(backends, poll);
        let region = match (hosted, memory) {
            (Some(r), _) => r,
            (None, m) => region_for(m, my_len, "registered slots")?,
        };
        mux.register(&region, Access::RemoteWrite)?;
        // Messages are built in send slots of their own, registered for
        // this rank's posted writes.
        let send = layout.send_slots_in(role, kind)?;
        let send_key = mux.register(send.region(), Access::Local)?;

        let hello = Message::Hello {
            version: BOOTSTRAP_VERSION,
            job: cfg.job.clone(),
            group: cfg.group,
            groups: cfg.group_size,
            role,
            preferred_rank: cfg.rank,
            m: cfg.attention,
            n: cfg.ffn,
            geometry: spec,
            layout: cfg.layout,
            host_id: cfg.host_id.clone(),
            endpoints: mux.endpoints(),
        };
        let mut session = conn.join(hello, cfg.io_timeout, cfg.setup_timeout)?;
        let rank = session.rank;
        let peers = session.peers(peer_role);
        if peers.len() != peer_count as usize {
            return Err(Error::BadFrame {
                peer: "scheduler".into(),
                reason: format!(
                    "address book lists {} {peer_role} ranks, expected {peer_count}",
                    peers.len()
                ),
            });
        }

        // The address book must list each peer rank exactly once.
        let mut seen = vec![false; peer_count as usize];
        for e in &peers {
            match seen.get_mut(e.rank as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(Error::BadFrame {
                        peer: "scheduler".into(),
                        reason: format!(
                        "address book lists {peer_role} rank {} twice or out of 0..{peer_count}",
                        e.rank
                    ),
                    })
                }
            }
        }

        // Choose each link's backend; both ends decide the same way from the
        // same address book.
        let me = peer_of(role, rank);
        let mut by_backend: Vec<Vec<(u32, PeerSpec)>> = vec![Vec::new(); mux.backends().len()];
        for e in &peers {
            let them = peer_of(peer_role, e.rank);
            match mux.choose_why(&e.endpoints) {
                Ok((b, _)) if !in_order(cfg.layout, &mux.backends()[b].caps()) => {
                    return Err(unordered(me, them, mux.backends()[b].name()));
                }
                Ok((b, passed)) => {
                    tracing::info!(
                        "link {me} -> {them}: {} (host {:?}){}{}",
                        mux.backends()[b].name(),
                        e.host_id,
                        if passed.is_empty() {
                            ""
                        } else {
                            "; passed over "
                        },
                        passed
                    );
                    let blob = e
                        .endpoints
                        .iter()
                        .find(|(n, _)| n == mux.backends()[b].name())
                        .map(|(_, blob)| blob.clone())
                        .unwrap_or_default();
                    by_backend[b].push((
                        e.rank,
                        PeerSpec {
                            label: them.to_string(),
                            blob,
                            initiator: role == Role::Attention,
                            peer_rank: e.rank,
                            my_rank: rank,
                            epoch: session.epoch,
                        },
                    ));
                }
                Err(why) => {
                    let which = match cfg.transport {
                        TransportKind::Auto => "no transport".to_string(),
                        t => format!(
                            "the configured transport (AFMESH_TRANSPORT={t} or MeshConfig::transport)"
                        ),
                    };
                    return Err(Error::config(format!(
                        "{which} reaches link {me} -> {them} (host {:?}): {why}",
                        e.host_id
                    )));
                }
            }
        }
        let mut table: Vec<Option<(Peer, LinkId, RegionKey)>> = vec![None; peers.len()];
        for (b, list) in by_backend.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let specs: Vec<PeerSpec> = list.iter().map(|(_, p)| p.clone()).collect();
            let up = mux.connect(b, &specs, cfg.setup_timeout)?;
            for ((r, _), c) in list.iter().zip(up) {
                let them = peer_of(peer_role, *r);
                let key = peer_key(c.remote.first(), peer_len, them)?;
                table[*r as usize] = Some((them, c.link, key));
            }
        }
        let table: Vec<(Peer, LinkId, RegionKey)> = table
            .into_iter()
            .enumerate()
            .map(|(r, t)| {
                t.ok_or_else(|| Error::config(format!("no link to {peer_role} rank {r}")))
            })
            .collect::<Result<_>>()?;
        session.barrier(cfg.setup_timeout)?;
        // Every peer has mapped our segment: its name can go.
        for b in mux.backends() {
            match b {
                Backend::Shm(s) => s.unlink(),
                Backend::Cuda(c) => c.unlink(),
                _ => {}
            }
        }
        tracing::info!(rank, transport = %mux.name(), "{role} rank joined");
        let recv = Receive {
            region,
            places: match role {
                Role::Attention => layout.out_receive(),
                Role::Ffn => layout.in_receive(),
            },
        };
        let mut engine = Engine::new(
            mux,
            table,
            spec,
            recv,
            send,
            send_key,
            Support::new(session, scheduler),
        );
        engine.set_send_timeout(cfg.io_timeout);
        engine.set_checksum(cfg.checksum);
        if cfg.checksum {
            tracing::info!("CRC32C checksums on every message (AFMESH_CHECKSUM)");
        }
        if let Some(m) = metrics {
            engine.set_metrics(m, me)?;
        }
        if let Some(t) = &trace {
            engine.set_tracer(Recorder::create(
                t,
                &RankMeta {
                    me,
                    peers: peer_count,
                    job: cfg.job.clone(),
                    host_id: cfg.host_id.clone(),
                    clock,
                },
            )?);
        }
        Ok(Joined {
            engine,
            layout,
            rank,
        })
    }
}

/// Whether a backend with `caps` can carry `layout`: the matrix layout's
/// two writes per message need a link that delivers them in order.
fn in_order(layout: StageLayout, caps: &crate::transport::Caps) -> bool {
    layout == StageLayout::Slots || caps.ordered
}

fn unordered(me: Peer, them: Peer, backend: &str) -> Error {
    let why = match backend {
        "verbs" => " (it stripes a link's writes over several queue pairs: AFMESH_QPS=1 keeps them on one, in order)",
        _ => "",
    };
    Error::config(format!(
        "the matrix stage layout (AFMESH_LAYOUT=matrix or MeshConfig::layout) needs links that deliver writes in order, and link {me} -> {them} runs over {backend}, which does not{why}; use the slots layout or another transport"
    ))
}

/// Clock probes a tracing rank sends the scheduler at join.
const CLOCK_PROBES: u32 = 8;

fn peer_of(role: Role, rank: u32) -> Peer {
    match role {
        Role::Attention => Peer::Attention(rank),
        Role::Ffn => Peer::Ffn(rank),
    }
}

struct Joined {
    engine: Engine,
    layout: Layout,
    rank: u32,
}

fn region_for(memory: Memory, need: usize, what: &str) -> Result<Arc<Region>> {
    match memory {
        Memory::Library => Region::alloc(need).map(Arc::new).map_err(Error::config),
        Memory::Device(device) => Region::alloc_device(device, need).map(Arc::new),
        Memory::Caller(r) if r.len() < need => Err(Error::BufferSize {
            what: format!("caller memory for {what}"),
            need,
            got: r.len(),
        }),
        Memory::Caller(r) => Ok(Arc::new(r)),
    }
}

fn peer_key(key: Option<&RegionKey>, need: u64, peer: Peer) -> Result<RegionKey> {
    match key {
        Some(k) if k.len >= need => Ok(*k),
        Some(k) => Err(Error::BufferSize {
            what: format!("{peer}'s registered region"),
            need: need as usize,
            got: k.len as usize,
        }),
        None => Err(Error::config(format!("{peer} registered no region"))),
    }
}
