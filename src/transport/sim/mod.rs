//! The simulated network: every rank of an M×N mesh in one process, with
//! virtual time and injectable faults — per-link delay and jitter (which
//! reorders writes), drops, duplicates, a late or early `Sent`, a small send
//! window, and link death.
//!
//! It is deterministic: the same seed and the same calls give the same
//! deliveries in the same order. A posted write is an event at its landing
//! time; its `Sent` is another event, by default at the same time right
//! after the landing (a NIC's acknowledgement), or `sent_delay_ns` after the
//! post when that is set (so `Sent` can come before or after the peer's
//! `Arrival`). Like a NIC, the network reads the source bytes when the
//! write leaves — at its `Sent` or its landing, whichever comes first — so a
//! sender that reuses memory before `Sent` corrupts what lands, and the
//! tests see it. In *auto* mode, progress delivers everything pending
//! first, for tests that run ranks on threads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    blob, Access, Caps, Completion, Connected, LinkId, LocalKey, LocalSlice, PeerSpec, Region,
    RegionKey, Registration, Transport, Wake,
};
use crate::error::{Error, Result};

mod events;
mod faults;
use events::{Data, Event};
pub use faults::Faults;

#[derive(Debug)]
struct LinkEnd {
    peer_ep: usize,
    peer_link: LinkId,
    faults: Faults,
    down: bool,
    in_flight: usize,
    /// When the latest write posted on this end lands (ordered networks
    /// land none before it).
    last_land: u64,
}

#[derive(Debug, Default)]
struct Endpoint {
    regions: Vec<Arc<Region>>,
    access: Vec<Access>,
    links: Vec<LinkEnd>,
    inbox: VecDeque<Completion>,
    /// Link id at this end per peer endpoint.
    by_peer: HashMap<usize, LinkId>,
}

/// What the network did, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Writes that landed.
    pub delivered: u64,
    /// Writes lost to a drop fault or a dead link.
    pub dropped: u64,
    /// Extra copies scheduled by the duplicate fault.
    pub duplicated: u64,
    /// Writes that landed with a bit flipped by the corrupt fault.
    pub corrupted: u64,
    /// `Sent` completions reported.
    pub sent: u64,
    /// `prepare_write` hints given (the slot a rank will write next).
    pub hints: u64,
    /// Hints that a later write on the same link, to the same region and
    /// offset, used.
    pub hints_used: u64,
}

#[derive(Debug)]
struct Net {
    now: u64,
    rng: u64,
    order: u64,
    auto: bool,
    window: usize,
    /// Regions labelled as CUDA memory are moved too (host memory standing
    /// in for a GPU's, to test the memory-kind plumbing without one).
    device_stand_in: bool,
    /// Writes on one link land in the order they were posted (jitter
    /// delays them, never reorders them), and `caps` says so.
    ordered: bool,
    endpoints: Vec<Endpoint>,
    pending: BTreeMap<(u64, u64), Event>,
    stats: SimStats,
    /// Hints not yet used: (endpoint, link, region, offset).
    hinted: Vec<(usize, LinkId, u32, u64)>,
}

/// The network all simulated endpoints share.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    net: Arc<Mutex<Net>>,
}

/// Posted writes per link a sim endpoint accepts before backpressure.
pub const SIM_WINDOW: usize = 64;

impl SimNetwork {
    /// A network with this random seed.
    pub fn new(seed: u64) -> SimNetwork {
        SimNetwork {
            net: Arc::new(Mutex::new(Net {
                now: 0,
                rng: seed | 1,
                order: 0,
                auto: false,
                window: SIM_WINDOW,
                device_stand_in: false,
                ordered: false,
                endpoints: Vec::new(),
                pending: BTreeMap::new(),
                stats: SimStats::default(),
                hinted: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        // A panic while holding the lock only happens in a failing test;
        // the state is still consistent enough to report from.
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// In auto mode every `progress` first delivers all pending events.
    pub fn set_auto(&self, auto: bool) {
        self.lock().auto = auto;
    }

    /// Sets the send window of every link (writes posted, not yet `Sent`).
    pub fn set_window(&self, window: usize) {
        self.lock().window = window.max(1);
    }

    /// Lets every endpoint register regions labelled as CUDA memory (made
    /// with `Region::host_standing_in_for`: host memory standing in for a
    /// GPU's), so the memory-kind plumbing runs without a GPU.
    pub fn set_device_stand_in(&self, on: bool) {
        self.lock().device_stand_in = on;
    }

    /// Makes every link deliver its writes in the order they were posted
    /// (as tcp, shm and one RC queue pair do): jitter still delays a
    /// write, but never past a later one; `caps().ordered` says so. Drops
    /// and duplicates still apply where set.
    pub fn set_ordered(&self, on: bool) {
        self.lock().ordered = on;
    }

    /// A new endpoint (one rank's transport).
    pub fn endpoint(&self) -> SimTransport {
        let mut n = self.lock();
        n.endpoints.push(Endpoint::default());
        SimTransport {
            net: self.clone(),
            ep: n.endpoints.len() - 1,
        }
    }

    /// Links two endpoints (or returns their link); the link id at each end.
    pub fn connect(&self, a: &SimTransport, b: &SimTransport) -> (LinkId, LinkId) {
        self.lock().link_pair(a.ep, b.ep)
    }

    /// Sets the faults of writes leaving endpoint `ep` on `link`.
    pub fn set_faults(&self, ep: usize, link: LinkId, faults: Faults) {
        let mut n = self.lock();
        if let Some(end) = n.endpoints.get_mut(ep).and_then(|e| e.links.get_mut(link)) {
            end.faults = faults;
        }
    }

    /// Sets the same faults on every link of every endpoint.
    pub fn set_faults_everywhere(&self, faults: Faults) {
        let mut n = self.lock();
        for e in &mut n.endpoints {
            for l in &mut e.links {
                l.faults = faults;
            }
        }
    }

    /// Kills a link: both ends see `LinkDown`, writes in flight are lost.
    pub fn kill_link(&self, ep: usize, link: LinkId) {
        let mut n = self.lock();
        if n.endpoints.get(ep).is_some_and(|e| link < e.links.len()) {
            n.kill(ep, link, "link killed");
        }
    }

    /// Kills every link of endpoint `ep` (the rank "dies").
    pub fn kill_endpoint(&self, ep: usize) {
        let mut n = self.lock();
        let links = n.endpoints.get(ep).map_or(0, |e| e.links.len());
        for l in 0..links {
            n.kill(ep, l, "peer died");
        }
    }

    /// Re-delivers the bytes and imm of a write as if the network replayed
    /// it: `data` lands in `region` of endpoint `ep` at `offset`, announced on
    /// `link`.
    pub fn inject(
        &self,
        ep: usize,
        link: LinkId,
        region: u32,
        offset: u64,
        data: Vec<u8>,
        imm: Option<u32>,
    ) {
        let mut n = self.lock();
        let at = n.now;
        n.schedule(
            at,
            Event::Land {
                to_ep: ep,
                to_link: link,
                region,
                offset,
                data: Data::Bytes(Arc::new(data)),
                imm,
                corrupt: false,
            },
        );
    }

    /// Delivers the earliest pending event. `false` if none was pending.
    pub fn step(&self) -> bool {
        self.lock().step()
    }

    /// Delivers everything pending.
    pub fn deliver_all(&self) -> usize {
        let mut n = self.lock();
        let mut k = 0;
        while n.step() {
            k += 1;
        }
        k
    }

    /// Events (landings and `Sent`s) posted and not yet delivered.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Virtual time, ns.
    pub fn now(&self) -> u64 {
        self.lock().now
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }
}

/// One endpoint of a [`SimNetwork`].
#[derive(Debug)]
pub struct SimTransport {
    net: SimNetwork,
    ep: usize,
}

impl SimTransport {
    /// This endpoint's index in its network.
    pub fn endpoint_id(&self) -> usize {
        self.ep
    }
}

fn link_error(link: LinkId, what: &str) -> Error {
    Error::io(
        format!("sim write on link {link}"),
        io::Error::new(io::ErrorKind::BrokenPipe, what.to_string()),
    )
}

const MAGIC: &str = "afmesh-sim-1";

impl Transport for SimTransport {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn caps(&self) -> Caps {
        let n = self.net.lock();
        Caps {
            host: true,
            cuda: n.device_stand_in,
            ordered: n.ordered,
            max_message: u64::from(u32::MAX),
            window: n.window,
            copies: true,
            header_mirror: false,
        }
    }

    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
        let mut n = self.net.lock();
        let e = &mut n.endpoints[self.ep];
        e.regions.push(region.clone());
        e.access.push(access);
        let id = (e.regions.len() - 1) as u32;
        Ok(Registration {
            local: LocalKey(id),
            remote: RegionKey {
                id,
                rkey: 0,
                addr: 0,
                len: region.len() as u64,
            },
        })
    }

    fn endpoint(&self) -> Vec<u8> {
        let n = self.net.lock();
        let e = &n.endpoints[self.ep];
        let keys: Vec<RegionKey> = e
            .regions
            .iter()
            .enumerate()
            .filter(|(i, _)| e.access[*i] == Access::RemoteWrite)
            .map(|(i, r)| RegionKey {
                id: i as u32,
                rkey: 0,
                addr: 0,
                len: r.len() as u64,
            })
            .collect();
        let mut w = blob::writer(MAGIC);
        w.u64(Arc::as_ptr(&self.net.net) as u64);
        w.u32(self.ep as u32);
        blob::put_keys(&mut w, &keys);
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
        let net = r.u64("sim network").map_err(|e| e.0)?;
        if net != Arc::as_ptr(&self.net.net) as u64 {
            return Err("another simulated network".into());
        }
        Ok(())
    }

    fn connect(&mut self, peers: &[PeerSpec], _timeout: Duration) -> Result<Vec<Connected>> {
        let mut out = Vec::with_capacity(peers.len());
        for p in peers {
            let bad = |e: crate::proto::DecodeError| Error::BadFrame {
                peer: p.label.clone(),
                reason: format!("sim endpoint: {}", e.0),
            };
            self.reaches(&p.blob)
                .map_err(|e| Error::config(format!("{}: {e}", p.label)))?;
            let mut r = blob::reader(&p.blob, MAGIC).map_err(bad)?;
            r.u64("sim network").map_err(bad)?;
            let peer_ep = r.u32("sim endpoint").map_err(bad)? as usize;
            let remote = blob::get_keys(&mut r).map_err(bad)?;
            let mut n = self.net.lock();
            if peer_ep >= n.endpoints.len() {
                return Err(Error::config(format!(
                    "{}: no sim endpoint {peer_ep}",
                    p.label
                )));
            }
            let (link, _) = n.link_pair(self.ep, peer_ep);
            out.push(Connected { link, remote });
        }
        Ok(out)
    }

    /// Recorded, to check that the engine names the slot its next write
    /// to that peer goes to ([`SimStats::hints_used`]).
    fn prepare_write(&mut self, link: LinkId, remote: &RegionKey, offset: u64, len: u64) {
        let _ = len;
        let mut n = self.net.lock();
        n.stats.hints += 1;
        let hint = (self.ep, link, remote.id, offset);
        if !n.hinted.contains(&hint) {
            n.hinted.push(hint);
        }
    }

    fn post_write(
        &mut self,
        link: LinkId,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        let mut n = self.net.lock();
        let window = n.window;
        let (peer_ep, peer_link, faults) = match n.endpoints[self.ep].links.get(link) {
            None => return Err(link_error(link, "no such link")),
            Some(l) if l.down => return Err(link_error(link, "link is down")),
            Some(l) if l.in_flight >= window => {
                return Err(Error::Backpressure {
                    peer: format!("sim link {link}"),
                    window,
                })
            }
            Some(l) => (l.peer_ep, l.peer_link, l.faults),
        };
        let mut parts = Vec::with_capacity(src.len());
        for s in src {
            let r = n.endpoints[self.ep]
                .regions
                .get(s.key.0 as usize)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("local key {} is not registered", s.key.0))
                })?;
            r.check(s.offset, s.len).map_err(|e| Error::BufferSize {
                what: format!("local region {}: {e}", s.key.0),
                need: s.offset.saturating_add(s.len) as usize,
                got: r.len(),
            })?;
            parts.push((r.clone(), s.offset, s.len));
        }
        n.endpoints[self.ep].links[link].in_flight += 1;
        let hint = (self.ep, link, remote.id, offset);
        if let Some(i) = n.hinted.iter().position(|h| *h == hint) {
            n.hinted.swap_remove(i);
            n.stats.hints_used += 1;
        }
        let mut lands = Vec::new();
        let dropped = faults.drop_per_million > 0
            && n.rand() % 1_000_000 < u64::from(faults.drop_per_million);
        let copies = if dropped {
            n.stats.dropped += 1;
            0
        } else if faults.duplicate_per_million > 0
            && n.rand() % 1_000_000 < u64::from(faults.duplicate_per_million)
        {
            n.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut last = n.now;
        for _ in 0..copies {
            let jitter = if faults.jitter_ns > 0 {
                n.rand() % (faults.jitter_ns + 1)
            } else {
                0
            };
            let mut at = n.now + faults.delay_ns + jitter;
            if n.ordered {
                let ep = self.ep;
                let end = &mut n.endpoints[ep].links[link];
                at = at.max(end.last_land);
                end.last_land = at;
            }
            last = last.max(at);
            let corrupt = faults.corrupt_per_million > 0
                && n.rand() % 1_000_000 < u64::from(faults.corrupt_per_million);
            let k = n.schedule(
                at,
                Event::Land {
                    to_ep: peer_ep,
                    to_link: peer_link,
                    region: remote.id,
                    offset,
                    data: Data::Source(parts.clone()),
                    imm,
                    corrupt,
                },
            );
            lands.push(k);
        }
        let sent_at = match faults.sent_delay_ns {
            Some(d) => n.now + d,
            None => last,
        };
        n.schedule(
            sent_at,
            Event::Sent {
                ep: self.ep,
                link,
                token,
                writes: lands,
            },
        );
        Ok(())
    }

    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let mut n = self.net.lock();
        if n.auto {
            while n.step() {}
        }
        out.extend(n.endpoints[self.ep].inbox.drain(..));
        Ok(())
    }

    fn wake(&self) -> Wake {
        Wake::Own
    }

    fn park(&mut self, _timeout: Duration) {
        // Other threads drive the other ranks; let them run.
        std::thread::yield_now();
    }

    fn close(&mut self) {
        let mut n = self.net.lock();
        let links = n.endpoints[self.ep].links.len();
        for l in 0..links {
            let (pe, pl, down) = {
                let end = &mut n.endpoints[self.ep].links[l];
                let was = end.down;
                end.down = true;
                (end.peer_ep, end.peer_link, was)
            };
            let peer = &mut n.endpoints[pe].links[pl];
            if !down && !peer.down {
                peer.down = true;
                n.endpoints[pe]
                    .inbox
                    .push_back(Completion::LinkClosed { link: pl });
            }
        }
    }

    fn links(&self) -> usize {
        self.net.lock().endpoints[self.ep].links.len()
    }

    fn abort(&mut self, link: LinkId) {
        let mut n = self.net.lock();
        let me = self.ep;
        let Some(end) = n.endpoints[me].links.get_mut(link) else {
            return;
        };
        end.down = true;
        let (pe, pl) = (end.peer_ep, end.peer_link);
        // Writes from this end that have not left are forgotten (their
        // source is never read), and so are their Sents.
        let before = n.pending.len();
        n.pending.retain(|_, ev| match ev {
            Event::Land { to_ep, to_link, .. } => (*to_ep, *to_link) != (pe, pl),
            Event::Sent { ep, link: l, .. } => (*ep, *l) != (me, link),
        });
        n.stats.dropped += (before - n.pending.len()) as u64;
        let peer = &mut n.endpoints[pe].links[pl];
        if !peer.down {
            peer.down = true;
            n.endpoints[pe].inbox.push_back(Completion::LinkDown {
                link: pl,
                reason: "the peer gave the link up".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests;
