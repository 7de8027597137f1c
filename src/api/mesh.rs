//! Joining a mesh: regions, rendezvous, links, barrier.

use std::net::TcpListener;
use std::sync::Arc;

use super::attention::AttentionRank;
use super::config::{MeshConfig, TransportKind};
use super::ffn::FfnRank;
use super::layout::Layout;
use super::StageSpec;
use crate::bootstrap::client::Connecting;
use crate::bootstrap::link;
use crate::bootstrap::rendezvous::{Scheduler, SchedulerConfig};
use crate::engine::{Engine, Receive, Support};
use crate::error::{Error, Peer, Result};
use crate::proto::bootstrap::BOOTSTRAP_VERSION;
use crate::proto::{Message, RegionKey, Role};
use crate::transport::mux::MuxTransport;
use crate::transport::shm::ShmTransport;
use crate::transport::sim::SimNetwork;
use crate::transport::tcp::TcpTransport;
use crate::transport::{AnyTransport, Region, Transport};

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
    pub fn attention_with_memory(&self, spec: StageSpec, memory: Vec<u8>) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Caller(Region::from_vec(memory)))
    }

    /// Joins as an attention rank whose output slots live in `region`
    /// (caller memory of any origin, e.g. from C).
    pub fn attention_with_region(&self, spec: StageSpec, region: Region) -> Result<AttentionRank> {
        self.join_attention(spec, Memory::Caller(region))
    }

    /// Bytes of caller memory an attention rank needs for `spec`.
    pub fn attention_memory_len(&self, spec: StageSpec) -> Result<usize> {
        let l = Layout::new(spec, self.cfg.attention, self.cfg.ffn)?;
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
        let l = Layout::new(spec, self.cfg.attention, self.cfg.ffn)?;
        l.in_region_len()
            .ok_or_else(|| Error::config("input region overflows"))
    }

    fn check_role(&self, want: Role) -> Result<()> {
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

    /// Everything but the role-specific wrapper: regions, rendezvous,
    /// links (shm to same-host peers, tcp to the rest), barrier.
    fn join_as(&self, role: Role, spec: StageSpec, memory: Memory) -> Result<Joined> {
        let cfg = &self.cfg;
        let layout = Layout::new(spec, cfg.attention, cfg.ffn)?;
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
        let peer_len = peer_len.ok_or_else(|| Error::config("region size overflows"))? as u64;
        // A pinned rank owns its core: its shared-memory waits spin without
        // yielding. Tcp keeps the yielding policy: its reader threads run on
        // the same core (they inherit the pin) and must get it.
        let poll = match cfg.cpu {
            Some(cpu) => {
                crate::transport::shm::sys::pin_to_cpu(cpu)
                    .map_err(|e| Error::io(format!("AFMESH_CPU={cpu}: pin"), e))?;
                cfg.poll.pinned()
            }
            None => cfg.poll,
        };

        // Shared memory is offered when allowed and the region is ours to
        // place in the segment.
        let caller = matches!(memory, Memory::Caller(_));
        let shm = match (cfg.transport, caller) {
            (TransportKind::Tcp, _) => None,
            (TransportKind::Shm, true) => {
                return Err(Error::Unsupported(
                    "AFMESH_TRANSPORT=shm needs library-allocated buffers: peers cannot reach caller memory through shared memory".into(),
                ))
            }
            (TransportKind::Auto, true) => {
                tracing::info!("caller memory: links will use tcp (shared memory needs library-allocated buffers)");
                None
            }
            (kind, false) => match ShmTransport::create(&cfg.job, peer_count, my_len, poll, cfg.io_timeout) {
                Ok(t) => Some(t),
                Err(e) if kind == TransportKind::Auto => {
                    tracing::warn!("shared memory unavailable, links will use tcp: {e}");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let region = match (&shm, memory) {
            (Some(s), _) => s.region()?,
            (None, m) => region_for(m, my_len, "registered slots")?,
        };
        let shm_name = shm
            .as_ref()
            .map(|s| s.segment_name().to_string())
            .unwrap_or_default();
        let mut mux = MuxTransport::new(TcpTransport::new(cfg.poll, cfg.io_timeout), shm);
        let key = mux.register(region.clone())?;

        let scheduler = if cfg.embed_scheduler {
            let s = Scheduler::bind(
                &cfg.scheduler,
                SchedulerConfig {
                    attention: Some(cfg.attention),
                    ffn: Some(cfg.ffn),
                    job: Some(cfg.job.clone()),
                    join_timeout: cfg.setup_timeout,
                    ..SchedulerConfig::default()
                },
            )?;
            Some(s.spawn()?)
        } else {
            None
        };
        let conn = Connecting::connect(&cfg.scheduler, cfg.setup_timeout)?;
        let (listener, link_addr) = if role == Role::Ffn {
            let ip = conn.local_ip()?;
            let l = TcpListener::bind((ip, 0))
                .map_err(|e| Error::io(format!("bind link listener on {ip}"), e))?;
            let a = l
                .local_addr()
                .map_err(|e| Error::io("link listener address", e))?;
            (Some(l), a.to_string())
        } else {
            (None, String::new())
        };
        let hello = Message::Hello {
            version: BOOTSTRAP_VERSION,
            job: cfg.job.clone(),
            role,
            preferred_rank: cfg.rank,
            m: cfg.attention,
            n: cfg.ffn,
            geometry: spec,
            host_id: cfg.host_id.clone(),
            link_addr,
            shm: shm_name.clone(),
            regions: vec![key],
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

        // Choose each link's transport; both ends decide the same way from
        // the same address book.
        let me = |r: u32| match role {
            Role::Attention => Peer::Attention(r),
            Role::Ffn => Peer::Ffn(r),
        };
        let them = |r: u32| match peer_role {
            Role::Attention => Peer::Attention(r),
            Role::Ffn => Peer::Ffn(r),
        };
        let mut via_shm = Vec::with_capacity(peers.len());
        for e in &peers {
            let why_not = if shm_name.is_empty() {
                Some("this rank offers no shared memory".to_string())
            } else if e.shm.is_empty() {
                Some(format!("{} offers no shared memory", them(e.rank)))
            } else if e.host_id != cfg.host_id {
                Some(format!(
                    "{} is on host {:?}, this rank on {:?}",
                    them(e.rank),
                    e.host_id,
                    cfg.host_id
                ))
            } else {
                None
            };
            match &why_not {
                None => tracing::info!(
                    "link {} -> {}: shm (same host {:?})",
                    me(rank),
                    them(e.rank),
                    e.host_id
                ),
                Some(why) if cfg.transport == TransportKind::Shm => {
                    return Err(Error::config(format!(
                        "AFMESH_TRANSPORT=shm, but link {} -> {} cannot use shared memory: {why}",
                        me(rank),
                        them(e.rank)
                    )))
                }
                Some(why) => tracing::info!("link {} -> {}: tcp ({why})", me(rank), them(e.rank)),
            }
            via_shm.push(why_not.is_none());
        }

        let mut links = vec![usize::MAX; peers.len()];
        let tcp_peers: Vec<_> = peers
            .iter()
            .zip(&via_shm)
            .filter(|(_, s)| !**s)
            .map(|(e, _)| e.clone())
            .collect();
        match role {
            Role::Attention => {
                let streams =
                    link::connect_all(&tcp_peers, session.epoch, rank, cfg.setup_timeout)?;
                for (e, s) in tcp_peers.iter().zip(streams) {
                    links[e.rank as usize] = mux.add_tcp(s, them(e.rank).to_string())?;
                }
            }
            Role::Ffn => {
                let expected: Vec<u32> = tcp_peers.iter().map(|e| e.rank).collect();
                let l = listener
                    .as_ref()
                    .ok_or_else(|| Error::config("FFN rank has no link listener"))?;
                for (r, s) in link::accept_all(l, &expected, session.epoch, cfg.setup_timeout)? {
                    links[r as usize] = mux.add_tcp(s, them(r).to_string())?;
                }
            }
        }
        for (e, _) in peers.iter().zip(&via_shm).filter(|(_, s)| **s) {
            links[e.rank as usize] = mux.add_shm(&e.shm, rank, e.rank, them(e.rank).to_string())?;
        }
        let mut table = Vec::with_capacity(peers.len());
        for e in &peers {
            let key = peer_key(e.regions.first(), peer_len, them(e.rank))?;
            table.push((them(e.rank), links[e.rank as usize], key));
        }
        session.barrier(cfg.setup_timeout)?;
        // Every peer has mapped our segment: its name can go.
        mux.unlink_shm();
        tracing::info!(rank, transport = mux.name(), "{role} rank joined");
        let recv = Receive {
            region,
            slot: match role {
                Role::Attention => layout.out_slot,
                Role::Ffn => layout.in_slot,
            },
        };
        // Messages are built in library memory of their own (with posted
        // writes, registered for local reads only).
        let send = layout.send_slots(role)?;
        let mut engine = Engine::new(
            AnyTransport::Mux(Box::new(mux)),
            table,
            spec,
            recv,
            send,
            Support::new(session, scheduler),
        );
        engine.set_send_timeout(cfg.io_timeout);
        Ok(Joined {
            engine,
            layout,
            rank,
        })
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

/// Builds a whole M×N mesh on a simulated network, in this process: the
/// harness for protocol tests. Ranks are returned by rank.
pub fn sim_mesh(
    net: &SimNetwork,
    m: u32,
    n: u32,
    spec: StageSpec,
) -> Result<(Vec<AttentionRank>, Vec<FfnRank>)> {
    let layout = Layout::new(spec, m, n)?;
    let mut a_t: Vec<_> = (0..m).map(|_| net.endpoint()).collect();
    let mut f_t: Vec<_> = (0..n).map(|_| net.endpoint()).collect();
    let a_regions: Vec<Arc<Region>> = (0..m)
        .map(|_| Region::alloc(layout.out_region_len().unwrap_or(0)).map(Arc::new))
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::config)?;
    let f_regions: Vec<Arc<Region>> = (0..n)
        .map(|_| Region::alloc(layout.in_region_len().unwrap_or(0)).map(Arc::new))
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::config)?;
    let a_keys: Vec<RegionKey> = a_t
        .iter_mut()
        .zip(&a_regions)
        .map(|(t, r)| t.register(r.clone()))
        .collect::<Result<_>>()?;
    let f_keys: Vec<RegionKey> = f_t
        .iter_mut()
        .zip(&f_regions)
        .map(|(t, r)| t.register(r.clone()))
        .collect::<Result<_>>()?;
    let mut a_peers: Vec<Vec<_>> = vec![Vec::new(); m as usize];
    let mut f_peers: Vec<Vec<_>> = vec![Vec::new(); n as usize];
    for i in 0..m as usize {
        for j in 0..n as usize {
            let (la, lf) = net.connect(&a_t[i], &f_t[j]);
            a_peers[i].push((Peer::Ffn(j as u32), la, f_keys[j]));
            f_peers[j].push((Peer::Attention(i as u32), lf, a_keys[i]));
        }
    }
    let attn = a_t
        .into_iter()
        .zip(a_peers)
        .zip(a_regions)
        .enumerate()
        .map(|(i, ((t, p), r))| {
            let recv = Receive {
                region: r,
                slot: layout.out_slot,
            };
            let send = layout.send_slots(Role::Attention)?;
            let engine = Engine::new(t.into(), p, spec, recv, send, Support::default());
            Ok(AttentionRank::new(engine, layout, i as u32))
        })
        .collect::<Result<_>>()?;
    let ffn = f_t
        .into_iter()
        .zip(f_peers)
        .zip(f_regions)
        .enumerate()
        .map(|(j, ((t, p), r))| {
            let recv = Receive {
                region: r,
                slot: layout.in_slot,
            };
            let send = layout.send_slots(Role::Ffn)?;
            let engine = Engine::new(t.into(), p, spec, recv, send, Support::default());
            Ok(FfnRank::new(engine, layout, j as u32))
        })
        .collect::<Result<_>>()?;
    Ok((attn, ffn))
}
