//! Shared memory: ranks on one host exchange through each other's memory.
//!
//! Each rank owns a [`Segment`] in `/dev/shm`: a control page, one incoming
//! single-producer/single-consumer [`ring`] per peer, and its receive
//! region. A posted write copies the payload once, from the sender's
//! registered memory straight into the receiver's region through the
//! sender's mapping of it, then publishes a notice (region, offset, length,
//! imm) on the receiver's ring for this link; the write is `Sent` at once
//! (the copy is done). The receiver's progress drains its rings and checks
//! every notice's offset and length against its region before it counts. A
//! parked receiver sleeps on a process-shared futex (its doorbell) that
//! producers ring only when it is parked, so the fast path has no syscall.
//! Three cache hints (`cache.rs`) shorten what crosses cores: the sender
//! demotes the lines it wrote to the shared cache, the receiver prefetches
//! a message's first lines as soon as its notice is seen, and
//! `prepare_write` takes the first lines of the sender's next message for
//! writing once the peer is done reading them.
//!
//! Caller memory: a receive region outside the segment (the caller's own
//! buffers) is written with cross-memory attach ([`cma`]): the kernel copies
//! once, from the sender's memory straight into the receiver's, then the
//! notice follows on the ring as usual.
//!
//! Endpoint blob: host id, segment name, owner pid, the owner's identity
//! nonce (random) and its address, and a key per registered region (in the
//! segment, or caller memory by address).
//!
//! Reachability is what the two ranks share, not what they are called: a
//! peer is reached if its segment opens here by name and carries the nonce
//! its blob names (containers on one node may share `/dev/shm` under
//! different host names, or share a host name but not `/dev/shm`). The
//! host id is a hint for messages only. Caller memory is reached only in a
//! process we may attach to and whose pid names it from here (not another
//! pid namespace): the probe reads the owner's nonce through cross-memory
//! attach and compares it with the one in its segment. Otherwise the mux
//! picks the next backend and logs why.
//!
//! Peer death: each link watches its peer. Where the probe above verified
//! that the peer's pid names it from here, through a pidfd (one `poll`);
//! otherwise (another pid namespace, or no right to attach) through the
//! lock the owner holds on its segment ([`segment`]'s docs; one `fcntl`),
//! which the kernel drops when the owner dies, wherever it runs. A peer
//! that exits, even by SIGKILL, is reported as `LinkDown` within about a
//! millisecond of progress, after whatever it wrote before dying.

pub(crate) mod cache;
pub mod cma;
mod device_notice;
mod liveness;
pub mod ring;
pub mod segment;
pub mod sys;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use super::Region;
pub use segment::{Doorbell, Segment};

use super::notice::Notice;
use super::{
    blob, check_post, Access, Caps, Completion, Connected, LinkId, LocalRegions, LocalSlice,
    MemoryKind, PeerSpec, RegionKey, Registration, Transport, Wake,
};
use crate::error::{Error, Result};
use liveness::{watch, Watch};
use ring::Ring;

const MAGIC: &str = "afmesh-shm-3";
/// `RegionKey::rkey` of a region in the owner's segment.
const IN_SEGMENT: u32 = 0;
/// `RegionKey::rkey` of caller memory, reached by cross-memory attach.
const BY_ADDRESS: u32 = 1;

/// Where a peer's region is, from here.
#[derive(Debug)]
enum Target {
    /// Through our mapping of its segment.
    Mapped(Region),
    /// In its process, at this address (cross-memory attach).
    Address { pid: u32, addr: u64, len: u64 },
}

/// A peer's endpoint, decoded.
struct PeerEndpoint {
    host: String,
    segment: String,
    pid: u32,
    nonce: u64,
    nonce_addr: u64,
    keys: Vec<RegionKey>,
}

fn decode(b: &[u8]) -> std::result::Result<PeerEndpoint, String> {
    let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
    let e = |x: crate::proto::DecodeError| x.0;
    Ok(PeerEndpoint {
        host: r.str("host id").map_err(e)?,
        segment: r.str("segment").map_err(e)?,
        pid: r.u32("pid").map_err(e)?,
        nonce: r.u64("nonce").map_err(e)?,
        nonce_addr: r.u64("nonce address").map_err(e)?,
        keys: blob::get_keys(&mut r).map_err(e)?,
    })
}

#[derive(Debug)]
struct ShmLink {
    peer: Segment,
    /// The peer's regions, by key id (`None`: not a region it publishes).
    targets: Vec<Option<Target>>,
    out: Ring,
    inbound: Ring,
    watch: Watch,
    label: String,
    down: bool,
}

/// The shared-memory backend.
#[derive(Debug)]
pub struct ShmTransport {
    own: Segment,
    job: String,
    host_id: String,
    local: LocalRegions,
    /// Whether registered region `i` is the segment's receive region.
    in_segment: Vec<bool>,
    /// Identity nonce: here, and in the segment's control page.
    nonce: Box<u64>,
    links: Vec<ShmLink>,
    sent: VecDeque<u64>,
    next_liveness: Instant,
    /// Progress calls that found nothing since the clock was last read.
    idle: u32,
    /// Check liveness at the next progress whatever the counters say: the
    /// rank parked (set by `wake`), or a peer just left (its leaving may
    /// follow another's death, which should be seen in the same pass).
    sweep: std::cell::Cell<bool>,
}

impl ShmTransport {
    /// Creates this rank's segment on host `host_id`: `rings` incoming
    /// rings (one per peer rank of the other role) and a receive region of
    /// `region_len` bytes.
    pub fn create(job: &str, host_id: &str, rings: u32, region_len: usize) -> Result<ShmTransport> {
        let nonce = Box::new(identity_nonce());
        let own = Segment::create(job, rings, region_len, *nonce)
            .map_err(|e| Error::io("create shared-memory segment", e))?;
        Ok(ShmTransport {
            own,
            job: job.to_string(),
            host_id: host_id.to_string(),
            local: LocalRegions::default(),
            in_segment: Vec::new(),
            nonce,
            links: Vec::new(),
            sent: VecDeque::new(),
            next_liveness: Instant::now(),
            idle: 0,
            sweep: std::cell::Cell::new(false),
        })
    }

    /// The segment's receive region, as registered memory.
    pub fn region(&self) -> Result<Arc<Region>> {
        if self.own.region_range().1 == 0 {
            return Err(Error::config("this shared segment holds no receive region"));
        }
        let (off, len) = self.own.region_range();
        Region::from_mapping(self.own.mapping(), off, len)
            .map(Arc::new)
            .map_err(Error::config)
    }

    /// The name peers open.
    pub fn segment_name(&self) -> &str {
        self.own.name()
    }

    /// This rank's doorbell.
    pub fn doorbell(&self) -> Doorbell {
        self.own.doorbell_handle()
    }

    /// Removes our segment's name: call once every peer has mapped it.
    pub fn unlink(&self) {
        self.own.unlink();
    }

    /// Publishes `notice` on link `link`'s ring without moving any bytes:
    /// for a backend that moved them itself (cuda) and uses this one for
    /// notices, doorbells and liveness. `Ok(false)`: the ring is full, post
    /// it again later.
    pub(crate) fn push_notice(&mut self, link: LinkId, notice: &Notice) -> Result<bool> {
        let l = self
            .links
            .get_mut(link)
            .ok_or_else(|| Error::InvalidArgument(format!("no link {link}")))?;
        if l.down {
            return Err(Error::io(
                format!("notice to {}", l.label),
                std::io::Error::new(std::io::ErrorKind::NotConnected, "link is down"),
            ));
        }
        let pushed = l.out.push(&notice.encode());
        l.peer.ring_doorbell();
        Ok(pushed)
    }

    /// Copies `bytes` to `offset` of link `link`'s peer region `region`
    /// through our mapping of its segment, without a notice. `Ok(false)`:
    /// the peer has no such region in its segment.
    pub(crate) fn write_target(
        &mut self,
        link: LinkId,
        region: u32,
        offset: u64,
        bytes: &[u8],
    ) -> Result<bool> {
        let l = self
            .links
            .get(link)
            .ok_or_else(|| Error::InvalidArgument(format!("no link {link}")))?;
        match l.targets.get(region as usize).and_then(Option::as_ref) {
            Some(Target::Mapped(t)) => {
                t.write_gather(offset, &[bytes])
                    .map(|()| true)
                    .map_err(|e| Error::BufferSize {
                        what: format!("{} region {region}: {e}", l.label),
                        need: offset as usize + bytes.len(),
                        got: t.len(),
                    })
            }
            _ => Ok(false),
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        let regions = &self.local;
        for (link, l) in self.links.iter_mut().enumerate() {
            if l.down {
                continue;
            }
            while let Some(b) = l.inbound.pop() {
                match Notice::decode(&b) {
                    Err(e) => {
                        l.down = true;
                        out.push(Completion::LinkError {
                            link,
                            reason: format!("{}: bad notice: {e}", l.label),
                        });
                        break;
                    }
                    Ok(n) if n.close => {
                        l.down = true;
                        out.push(Completion::LinkClosed { link });
                        self.sweep.set(true);
                        break;
                    }
                    Ok(n) => {
                        let target = regions.target(n.region);
                        let region_len = target.map(|r| r.len());
                        let fits = region_len.is_some_and(|rl| {
                            n.offset
                                .checked_add(u64::from(n.len))
                                .is_some_and(|end| end <= rl as u64)
                        });
                        let region_len = region_len.unwrap_or(0);
                        if !fits {
                            l.down = true;
                            out.push(Completion::LinkError {
                                link,
                                reason: format!(
                                    "{}: notice for region {} offset {} length {} outside that region ({region_len} bytes)",
                                    l.label, n.region, n.offset, n.len
                                ),
                            });
                            break;
                        }
                        if let Some(imm) = n.imm {
                            // The engine reads the header next and the
                            // caller the side block and rows: ask for
                            // their lines together, now.
                            if let Some(r) = target.filter(|r| r.kind() == MemoryKind::Host) {
                                cache::prefetch(
                                    r.addr() as usize + n.offset as usize,
                                    n.len as usize,
                                );
                            }
                            out.push(Completion::Arrival {
                                link,
                                imm,
                                len: n.len,
                            });
                        }
                    }
                }
            }
        }
    }
}

impl super::Open for ShmTransport {
    fn open(s: &super::Setup<'_>) -> Result<ShmTransport> {
        ShmTransport::create(s.job, s.host_id, s.peers, s.recv_len)
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn receive_region(&self) -> Option<Arc<Region>> {
        self.region().ok()
    }

    fn caps(&self) -> Caps {
        Caps {
            host: true,
            cuda: false,
            ordered: true,
            max_message: u64::from(u32::MAX),
            window: segment::RING_CAP as usize,
            copies: true,
            header_mirror: false,
        }
    }

    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
        let (off, len) = self.own.region_range();
        let map = self.own.mapping();
        let in_segment = region.is_in(&map)
            && region.addr() == map.ptr() as u64 + off as u64
            && region.len() == len;
        self.in_segment.push(in_segment);
        if access == Access::RemoteWrite && !in_segment {
            cma::allow_attach();
            cma::advise(region);
        }
        Ok(self.local.register(region, access))
    }

    fn endpoint(&self) -> Vec<u8> {
        let mut w = blob::writer(MAGIC);
        w.str(&self.host_id);
        w.str(self.own.name());
        w.u32(self.own.pid());
        w.u64(*self.nonce);
        w.u64(&*self.nonce as *const u64 as u64);
        let keys: Vec<RegionKey> = self
            .local
            .targets()
            .map(|(i, r)| {
                let inside = self.in_segment[i as usize];
                RegionKey {
                    id: i,
                    rkey: if inside { IN_SEGMENT } else { BY_ADDRESS },
                    addr: if inside { 0 } else { r.addr() },
                    len: r.len() as u64,
                }
            })
            .collect();
        blob::put_keys(&mut w, &keys);
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let p = decode(b)?;
        // What we share: its segment, by name, with its nonce in it.
        let elsewhere = || {
            if p.host == self.host_id {
                String::new()
            } else {
                format!(
                    " (it says it is on host {:?}, this rank on {:?})",
                    p.host, self.host_id
                )
            }
        };
        let seg = Segment::open(&p.segment, &self.job)
            .map_err(|e| format!("its segment is not in this /dev/shm: {e}{}", elsewhere()))?;
        if seg.nonce() != p.nonce {
            return Err(format!(
                "segment {} here is not the one it published (another /dev/shm of the same name){}",
                p.segment,
                elsewhere()
            ));
        }
        if p.host != self.host_id {
            tracing::info!(
                "shm: peer on host {:?} shares /dev/shm with this rank on {:?}",
                p.host,
                self.host_id
            );
        }
        if p.keys.iter().any(|k| k.rkey == BY_ADDRESS) {
            // Its receive memory is caller memory: we must be able to
            // attach to the right process. Its segment says which nonce
            // that process holds; read it through the pid it gave.
            match cma::read_u64(p.pid, p.nonce_addr) {
                // A rank of this very process: a cross-memory write could
                // land in its memory after it dropped it (the close reaches
                // us only on our next pass), i.e. in our own freed heap.
                Ok(v) if v == seg.nonce() && p.pid == std::process::id() => {
                    return Err(
                        "its receive memory is caller memory of a rank in this same process, which cross-memory writes must not reach (the rank may free it first); give ranks of one process library memory, or use tcp".into(),
                    )
                }
                Ok(v) if v == seg.nonce() => {}
                Ok(_) => {
                    return Err(format!(
                        "process {} is not the one that published the segment (another pid namespace?), so its caller memory cannot be reached",
                        p.pid
                    ))
                }
                Err(e) => return Err(cma::attach_error(p.pid, &e)),
            }
        }
        Ok(())
    }

    fn connect(&mut self, peers: &[PeerSpec], _timeout: Duration) -> Result<Vec<Connected>> {
        let mut up = Vec::with_capacity(peers.len());
        for p in peers {
            let label = p.label.clone();
            self.reaches(&p.blob)
                .map_err(|e| Error::config(format!("shm link to {label}: {e}")))?;
            let ep = decode(&p.blob).map_err(|e| Error::BadFrame {
                peer: label.clone(),
                reason: format!("shm endpoint: {e}"),
            })?;
            let peer = Segment::open(&ep.segment, &self.job)
                .map_err(|e| Error::config(format!("shm link to {label}: {e}")))?;
            let out = peer.ring(p.my_rank).ok_or_else(|| {
                Error::config(format!("shm link to {label}: it has no ring {}", p.my_rank))
            })?;
            let inbound = self.own.ring(p.peer_rank).ok_or_else(|| {
                Error::config(format!(
                    "shm link to {label}: we have no ring {}",
                    p.peer_rank
                ))
            })?;
            let mut targets: Vec<Option<Target>> = Vec::new();
            for k in &ep.keys {
                let id = k.id as usize;
                if id >= crate::proto::codec::MAX_LIST {
                    return Err(Error::BadFrame {
                        peer: label,
                        reason: format!("shm endpoint: region id {id}"),
                    });
                }
                if targets.len() <= id {
                    targets.resize_with(id + 1, || None);
                }
                targets[id] = Some(match k.rkey {
                    IN_SEGMENT => {
                        let (off, len) = peer.region_range();
                        Target::Mapped(
                            Region::from_mapping(peer.mapping(), off, len)
                                .map_err(|e| Error::config(format!("shm link to {label}: {e}")))?,
                        )
                    }
                    _ => Target::Address {
                        pid: ep.pid,
                        addr: k.addr,
                        len: k.len,
                    },
                });
            }
            let watch = watch(&ep, &peer);
            self.links.push(ShmLink {
                peer,
                targets,
                out,
                inbound,
                watch,
                label,
                down: false,
            });
            up.push(Connected {
                link: self.links.len() - 1,
                remote: ep.keys,
            });
        }
        Ok(up)
    }

    #[inline]
    fn post_write(
        &mut self,
        link: LinkId,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        let state = self.links.get(link).map(|l| (l.label.as_str(), l.down));
        let len = check_post(state, link, src, remote, offset, u64::from(u32::MAX))?;
        let l = &mut self.links[link];
        if !l.out.has_room() {
            // The consumer is far behind: nothing is copied or posted.
            return Err(ring_full(l));
        }
        let Some(target) = l.targets.get(remote.id as usize).and_then(Option::as_ref) else {
            return Err(no_region(l, remote.id));
        };
        let mut at = offset;
        for s in src {
            let (r, from, n) = self.local.resolve(s)?;
            let landed = match target {
                Target::Mapped(t) => r.copy_to(from as u64, n as u64, t, at),
                Target::Address { pid, addr, len } => {
                    if at.checked_add(n as u64).is_none_or(|end| end > *len) {
                        Err(format!(
                            "write of {n} bytes at offset {at} outside region of {len} bytes"
                        ))
                    } else {
                        match addr.checked_add(at) {
                            // SAFETY: `pid` proved at connect to be the peer's
                            // process (its identity nonce) and not this one
                            // (`reaches` refuses caller memory of a rank of this
                            // process), so the kernel writes another address
                            // space, inside the receive region the peer
                            // published (checked above); none of our memory.
                            Some(to) => unsafe { cma::write_to(*pid, to, r, from, n) }
                                .map_err(|e| format!("cross-memory write to process {pid}: {e}")),
                            None => Err(format!("region address {addr:#x} + {at} wraps")),
                        }
                    }
                }
            };
            if let Err(e) = landed {
                return Err(landing_error(l, remote, at, n, e));
            }
            at += n as u64;
        }
        let notice = Notice {
            region: remote.id,
            offset,
            len,
            imm,
            close: false,
        }
        .encode();
        if !l.out.push(&notice) {
            // Cannot happen (room was checked, one producer per ring); if it
            // did, the bytes landed unannounced and the caller posts again.
            return Err(ring_full(l));
        }
        l.peer.ring_doorbell();
        // The peer reads these lines next: hand them to the shared cache
        // rather than leave them for its misses to fetch from this core.
        if let Target::Mapped(t) = target {
            cache::demote(t.addr() as usize + offset as usize, len as usize);
        }
        cache::demote(
            l.out.entry_addr(l.out.head().wrapping_sub(1)),
            ring::ENTRY_LEN,
        );
        self.sent.push_back(token);
        Ok(())
    }

    #[inline]
    fn prepare_write(&mut self, link: LinkId, remote: &RegionKey, offset: u64, len: u64) {
        let target = self
            .links
            .get(link)
            .filter(|l| !l.down)
            .and_then(|l| l.targets.get(remote.id as usize))
            .and_then(Option::as_ref);
        if let Some(Target::Mapped(t)) = target {
            let end = offset.saturating_add(len).min(t.len() as u64);
            if offset < end {
                cache::prefetch_write(t.addr() as usize + offset as usize, (end - offset) as usize);
            }
        }
    }

    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        // Checked first: this runs on every poll of a spinning wait.
        if !self.sent.is_empty() {
            out.extend(self.sent.drain(..).map(|token| Completion::Sent { token }));
        }
        let start = out.len();
        self.drain(out);
        if self.sweep.take() {
            self.check_liveness(out, true);
        } else if out.len() == start {
            // Liveness wants the clock; a spinning rank reads it once per
            // 64 empty polls (well under the millisecond it promises).
            self.idle = self.idle.wrapping_add(1);
            if self.idle.is_multiple_of(64) {
                self.check_liveness(out, false);
            }
        }
        Ok(())
    }

    fn flat_polls(&self) -> bool {
        // A pass reads each link's ring head; the liveness look every 64
        // empty passes is a clock read and, now and then, a cheap syscall.
        true
    }

    fn wake(&self) -> Wake {
        // Asked before every park: after it, look at the peers' processes
        // (a parked rank makes too few empty polls for the counter).
        self.sweep.set(true);
        Wake::Doorbell(self.own.doorbell_handle())
    }

    fn close(&mut self) {
        for l in &mut self.links {
            if !l.down {
                l.down = true;
                let _ = l.out.push(&Notice::CLOSE.encode());
                l.peer.ring_doorbell();
            }
        }
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    fn abort(&mut self, link: LinkId) {
        // Copies are done when `post_write` returns: nothing is pending.
        if let Some(l) = self.links.get_mut(link) {
            l.down = true;
        }
    }
}

/// A full ring: the consumer is rung (it may be parked) and the post
/// refused.
#[cold]
#[inline(never)]
fn ring_full(l: &ShmLink) -> Error {
    l.peer.ring_doorbell();
    Error::Backpressure {
        peer: l.label.clone(),
        window: segment::RING_CAP as usize,
    }
}

/// A post to a region the peer did not publish.
#[cold]
#[inline(never)]
fn no_region(l: &ShmLink, id: u32) -> Error {
    Error::InvalidArgument(format!("{} has no region {id}", l.label))
}

/// A post whose bytes would not fit the peer's region where they land.
#[cold]
#[inline(never)]
fn landing_error(l: &ShmLink, remote: &RegionKey, at: u64, n: usize, e: String) -> Error {
    Error::BufferSize {
        what: format!("{} region {}: {e}", l.label, remote.id),
        need: at.saturating_add(n as u64) as usize,
        got: remote.len as usize,
    }
}

/// A value that tells this process's segment from another's: random from
/// the kernel, or else the pid, the clock and an address, mixed.
fn identity_nonce() -> u64 {
    if let Ok(v) = sys::random_u64() {
        return v;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ (&local as *const u8 as u64);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
