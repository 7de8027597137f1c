//! The simulated network: every rank of an M×N mesh in one process, with
//! virtual time and injectable faults — per-link delay and jitter (which
//! reorders writes), drops, duplicates, and link death.
//!
//! It is deterministic: the same seed and the same calls give the same
//! deliveries in the same order. Writes are copied when posted and land
//! (bytes first, then the arrival) when the network is stepped, so a test
//! can interleave ranks and deliveries exactly as it likes. In *auto* mode,
//! `poll` delivers everything pending first, for tests that run ranks on
//! threads.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Completion, LinkId, Region, RegionKey, Transport};
use crate::error::{Error, Result};

/// Faults applied to writes leaving one end of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fixed delay, virtual nanoseconds.
    pub delay_ns: u64,
    /// Extra random delay in `[0, jitter_ns]`; writes overtake each other.
    pub jitter_ns: u64,
    /// Chance per million that a write is lost.
    pub drop_per_million: u32,
    /// Chance per million that a write is delivered twice.
    pub duplicate_per_million: u32,
}

#[derive(Debug)]
struct LinkEnd {
    peer_ep: usize,
    peer_link: LinkId,
    faults: Faults,
    down: bool,
}

#[derive(Debug, Default)]
struct Endpoint {
    regions: Vec<Arc<Region>>,
    links: Vec<LinkEnd>,
    inbox: VecDeque<Completion>,
}

#[derive(Debug)]
struct Event {
    to_ep: usize,
    to_link: LinkId,
    region: u32,
    offset: u64,
    data: Arc<Vec<u8>>,
    imm: Option<u32>,
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
}

#[derive(Debug)]
struct Net {
    now: u64,
    rng: u64,
    order: u64,
    auto: bool,
    endpoints: Vec<Endpoint>,
    pending: BTreeMap<(u64, u64), Event>,
    stats: SimStats,
}

impl Net {
    fn rand(&mut self) -> u64 {
        // xorshift64*: small, fast, deterministic.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.order += 1;
        self.pending.insert((at, self.order), ev);
    }

    fn deliver(&mut self, ev: Event) {
        let ep = &mut self.endpoints[ev.to_ep];
        if ep.links[ev.to_link].down {
            self.stats.dropped += 1;
            return;
        }
        let result = match ep.regions.get(ev.region as usize) {
            None => Err(format!("write to unknown region {}", ev.region)),
            Some(r) => r.write_gather(ev.offset, &[&ev.data]),
        };
        match result {
            Ok(()) => {
                self.stats.delivered += 1;
                if let Some(imm) = ev.imm {
                    ep.inbox.push_back(Completion::Arrival {
                        link: ev.to_link,
                        imm,
                    });
                }
            }
            Err(reason) => {
                ep.inbox.push_back(Completion::LinkError {
                    link: ev.to_link,
                    reason,
                });
                self.kill(ev.to_ep, ev.to_link, "peer wrote out of bounds");
            }
        }
    }

    fn kill(&mut self, ep: usize, link: LinkId, reason: &str) {
        let (peer_ep, peer_link) = {
            let end = &mut self.endpoints[ep].links[link];
            (end.peer_ep, end.peer_link)
        };
        for (e, l) in [(ep, link), (peer_ep, peer_link)] {
            let end = &mut self.endpoints[e].links[l];
            if !end.down {
                end.down = true;
                self.endpoints[e].inbox.push_back(Completion::LinkDown {
                    link: l,
                    reason: reason.to_string(),
                });
            }
        }
        let before = self.pending.len();
        self.pending.retain(|_, ev| {
            !((ev.to_ep, ev.to_link) == (ep, link)
                || (ev.to_ep, ev.to_link) == (peer_ep, peer_link))
        });
        self.stats.dropped += (before - self.pending.len()) as u64;
    }

    fn step(&mut self) -> bool {
        let Some((&key, _)) = self.pending.iter().next() else {
            return false;
        };
        if let Some(ev) = self.pending.remove(&key) {
            self.now = self.now.max(key.0);
            self.deliver(ev);
        }
        true
    }
}

/// The network all simulated endpoints share.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    net: Arc<Mutex<Net>>,
}

impl SimNetwork {
    /// A network with this random seed.
    pub fn new(seed: u64) -> SimNetwork {
        SimNetwork {
            net: Arc::new(Mutex::new(Net {
                now: 0,
                rng: seed | 1,
                order: 0,
                auto: false,
                endpoints: Vec::new(),
                pending: BTreeMap::new(),
                stats: SimStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        // A panic while holding the lock only happens in a failing test;
        // the state is still consistent enough to report from.
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// In auto mode every `poll` first delivers all pending writes.
    pub fn set_auto(&self, auto: bool) {
        self.lock().auto = auto;
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

    /// Links two endpoints; returns the link id at each end.
    pub fn connect(&self, a: &SimTransport, b: &SimTransport) -> (LinkId, LinkId) {
        let mut n = self.lock();
        let la = n.endpoints[a.ep].links.len();
        let lb = n.endpoints[b.ep].links.len() + usize::from(a.ep == b.ep);
        n.endpoints[a.ep].links.push(LinkEnd {
            peer_ep: b.ep,
            peer_link: lb,
            faults: Faults::default(),
            down: false,
        });
        n.endpoints[b.ep].links.push(LinkEnd {
            peer_ep: a.ep,
            peer_link: la,
            faults: Faults::default(),
            down: false,
        });
        (la, lb)
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
            Event {
                to_ep: ep,
                to_link: link,
                region,
                offset,
                data: Arc::new(data),
                imm,
            },
        );
    }

    /// Delivers the earliest pending write. `false` if none was pending.
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

    /// Writes posted and not yet delivered.
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

impl Transport for SimTransport {
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey> {
        let mut n = self.net.lock();
        let e = &mut n.endpoints[self.ep];
        e.regions.push(region.clone());
        Ok(RegionKey {
            id: (e.regions.len() - 1) as u32,
            rkey: 0,
            addr: 0,
            len: region.len() as u64,
        })
    }

    fn write(
        &mut self,
        link: LinkId,
        src: &[&[u8]],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<()> {
        let mut n = self.net.lock();
        let (peer_ep, peer_link, faults) = match n.endpoints[self.ep].links.get(link) {
            None => return Err(link_error(link, "no such link")),
            Some(l) if l.down => return Err(link_error(link, "link is down")),
            Some(l) => (l.peer_ep, l.peer_link, l.faults),
        };
        let mut data = Vec::with_capacity(src.iter().map(|s| s.len()).sum());
        for s in src {
            data.extend_from_slice(s);
        }
        let data = Arc::new(data);
        if faults.drop_per_million > 0 && n.rand() % 1_000_000 < u64::from(faults.drop_per_million)
        {
            n.stats.dropped += 1;
            return Ok(());
        }
        let copies = if faults.duplicate_per_million > 0
            && n.rand() % 1_000_000 < u64::from(faults.duplicate_per_million)
        {
            n.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if faults.jitter_ns > 0 {
                n.rand() % (faults.jitter_ns + 1)
            } else {
                0
            };
            let at = n.now + faults.delay_ns + jitter;
            n.schedule(
                at,
                Event {
                    to_ep: peer_ep,
                    to_link: peer_link,
                    region: remote.id,
                    offset,
                    data: data.clone(),
                    imm,
                },
            );
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        let mut n = self.net.lock();
        if n.auto {
            while n.step() {}
        }
        let inbox = &mut n.endpoints[self.ep].inbox;
        let empty = inbox.is_empty();
        out.extend(inbox.drain(..));
        drop(n);
        if empty && !timeout.is_zero() {
            // Other threads drive the other ranks; let them run.
            std::thread::yield_now();
        }
        Ok(())
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

    fn name(&self) -> &'static str {
        "sim"
    }

    fn copies(&self, _link: LinkId) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        seed: u64,
    ) -> (
        SimNetwork,
        SimTransport,
        SimTransport,
        Arc<Region>,
        RegionKey,
    ) {
        let net = SimNetwork::new(seed);
        let a = net.endpoint();
        let mut b = net.endpoint();
        net.connect(&a, &b);
        let r = Arc::new(Region::alloc(64).unwrap());
        let k = b.register(r.clone()).unwrap();
        (net, a, b, r, k)
    }

    #[test]
    fn write_lands_on_step_then_arrives() {
        let (net, mut a, mut b, r, k) = pair(1);
        a.write(0, &[b"he", b"llo"], &k, 3, Some(42)).unwrap();
        let mut out = Vec::new();
        b.poll(&mut out, Duration::ZERO).unwrap();
        assert!(out.is_empty(), "nothing lands before the network steps");
        assert!(net.step());
        b.poll(&mut out, Duration::ZERO).unwrap();
        assert_eq!(out, vec![Completion::Arrival { link: 0, imm: 42 }]);
        assert_eq!(r.slice(3, 5).unwrap(), b"hello");
    }

    #[test]
    fn out_of_bounds_is_a_link_error() {
        let (net, mut a, mut b, _r, k) = pair(2);
        a.write(0, &[&[0; 8]], &k, 60, Some(1)).unwrap();
        net.deliver_all();
        let mut out = Vec::new();
        b.poll(&mut out, Duration::ZERO).unwrap();
        assert!(matches!(out[0], Completion::LinkError { .. }), "{out:?}");
        assert!(
            a.write(0, &[&[0; 1]], &k, 0, None).is_err(),
            "link is closed after"
        );
    }

    #[test]
    fn jitter_reorders_deterministically() {
        let order = |seed| {
            let (net, mut a, mut b, _r, k) = pair(seed);
            net.set_faults(
                a.endpoint_id(),
                0,
                Faults {
                    jitter_ns: 1000,
                    ..Faults::default()
                },
            );
            for i in 0..20 {
                a.write(0, &[&[0]], &k, 0, Some(i)).unwrap();
            }
            net.deliver_all();
            let mut out = Vec::new();
            b.poll(&mut out, Duration::ZERO).unwrap();
            out.iter()
                .map(|c| match c {
                    Completion::Arrival { imm, .. } => *imm,
                    _ => u32::MAX,
                })
                .collect::<Vec<_>>()
        };
        let o = order(7);
        assert_eq!(o, order(7));
        assert_eq!(o.len(), 20);
        assert_ne!(o, (0..20).collect::<Vec<_>>(), "jitter reorders");
    }

    #[test]
    fn kill_reports_down_on_both_ends() {
        let (net, mut a, mut b, _r, k) = pair(3);
        a.write(0, &[&[0]], &k, 0, Some(1)).unwrap();
        net.kill_link(0, 0);
        assert_eq!(net.pending(), 0);
        let mut out = Vec::new();
        a.poll(&mut out, Duration::ZERO).unwrap();
        b.poll(&mut out, Duration::ZERO).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| matches!(c, Completion::LinkDown { .. })));
        assert_eq!(net.stats().dropped, 1);
    }
}
