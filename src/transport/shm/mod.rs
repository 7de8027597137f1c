//! Shared memory: ranks on one host exchange through each other's memory.
//!
//! Each rank owns a [`Segment`] in `/dev/shm`: a control page, one incoming
//! single-producer/single-consumer [`ring`] per peer, and its registered
//! region. A write copies the payload once, straight into the receiver's
//! region through the sender's mapping of it, then publishes its
//! [`Notice`](super::notice::Notice) in a 32-byte entry of the receiver's
//! ring for this link. The receiver polls its rings; every notice's offset and length is
//! checked against its region before it counts. A parked receiver sleeps on
//! a process-shared futex (its doorbell) that producers ring only when it
//! is parked, so the fast path has no syscall.
//!
//! Only library-allocated regions can be shared this way (they live in the
//! segment). Caller memory is not reachable by peers without
//! cross-memory attach, which many containers forbid; a region outside the
//! segment is refused with an error that says to use library-allocated
//! buffers or tcp.
//!
//! Peer death: each link watches its peer's process (pidfd). A peer that
//! exits, even by SIGKILL, is reported as `LinkDown` within about a
//! millisecond of polling, after whatever it wrote before dying.
//!
//! [`Region`] is also here: registered memory is memory that peers write,
//! the one place in the crate where bytes are shared without Rust's borrow
//! rules.

mod region;
pub mod ring;
pub mod segment;
pub mod sys;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use region::Region;
use segment::Bell;
pub use segment::{Doorbell, Segment};

use super::notice::Notice;
use super::{Completion, LinkId, PollPolicy, RegionKey, Transport};
use crate::error::{Error, Result};
use ring::Ring;

/// How often a waiting rank checks that its peers' processes are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(1);
/// Longest single futex sleep, so liveness is checked while parked too.
const MAX_PARK: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct ShmLink {
    peer: Segment,
    out: Ring,
    inbound: Ring,
    watch: sys::PidWatch,
    label: String,
    down: bool,
}

/// The shared-memory backend.
#[derive(Debug)]
pub struct ShmTransport {
    own: Segment,
    job: String,
    links: Vec<ShmLink>,
    policy: PollPolicy,
    io_timeout: Duration,
    next_liveness: Instant,
    external_seen: u32,
}

impl ShmTransport {
    /// Creates this rank's segment: `rings` incoming rings (one per peer
    /// rank of the other role) and a region of `region_len` bytes.
    pub fn create(
        job: &str,
        rings: u32,
        region_len: usize,
        policy: PollPolicy,
        io_timeout: Duration,
    ) -> Result<ShmTransport> {
        let own = Segment::create(job, rings, region_len)
            .map_err(|e| Error::io("create shared-memory segment", e))?;
        Ok(ShmTransport {
            own,
            job: job.to_string(),
            links: Vec::new(),
            policy,
            io_timeout,
            next_liveness: Instant::now(),
            external_seen: 0,
        })
    }

    /// The segment's region, as registered memory.
    pub fn region(&self) -> Result<Arc<Region>> {
        let (off, len) = self.own.region_range();
        Region::from_mapping(self.own.mapping(), off, len)
            .map(Arc::new)
            .map_err(Error::config)
    }

    /// The name peers open.
    pub fn segment_name(&self) -> &str {
        self.own.name()
    }

    /// Rings this rank's own doorbell (for other backends' threads, so one
    /// wait covers every link).
    pub fn doorbell(&self) -> Doorbell {
        self.own.doorbell_handle()
    }

    /// Maps peer segment `name` and links to it: our writes go to its ring
    /// `my_index`, its writes come on our ring `peer_index`.
    pub fn add_link(
        &mut self,
        name: &str,
        my_index: u32,
        peer_index: u32,
        label: impl Into<String>,
    ) -> Result<LinkId> {
        let label = label.into();
        let peer = Segment::open(name, &self.job)
            .map_err(|e| Error::config(format!("shm link to {label}: {e}")))?;
        let out = peer.ring(my_index).ok_or_else(|| {
            Error::config(format!("shm link to {label}: it has no ring {my_index}"))
        })?;
        let inbound = self.own.ring(peer_index).ok_or_else(|| {
            Error::config(format!("shm link to {label}: we have no ring {peer_index}"))
        })?;
        let watch = sys::PidWatch::new(peer.pid());
        self.links.push(ShmLink {
            peer,
            out,
            inbound,
            watch,
            label,
            down: false,
        });
        Ok(self.links.len() - 1)
    }

    /// Removes our segment's name: call once every peer has mapped it.
    pub fn unlink(&self) {
        self.own.unlink();
    }

    fn drain(&mut self, out: &mut Vec<Completion>) {
        let (_, region_len) = self.own.region_range();
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
                        break;
                    }
                    Ok(n) => {
                        let fits = n
                            .offset
                            .checked_add(u64::from(n.len))
                            .is_some_and(|end| end <= region_len as u64);
                        if n.region != 0 || !fits {
                            l.down = true;
                            out.push(Completion::LinkError {
                                link,
                                reason: format!(
                                    "{}: notice for region {} offset {} length {} outside region of {region_len} bytes",
                                    l.label, n.region, n.offset, n.len
                                ),
                            });
                            break;
                        }
                        if let Some(imm) = n.imm {
                            out.push(Completion::Arrival { link, imm });
                        }
                    }
                }
            }
        }
    }

    /// Whether another backend of this rank posted something since we
    /// last looked (so the caller should poll it).
    fn external_changed(&mut self) -> bool {
        let now = self.own.bell().external();
        if now != self.external_seen {
            self.external_seen = now;
            return true;
        }
        false
    }

    fn check_liveness(&mut self, out: &mut Vec<Completion>) {
        let now = Instant::now();
        if now < self.next_liveness {
            return;
        }
        self.next_liveness = now + LIVENESS_EVERY;
        let dead: Vec<usize> = (0..self.links.len())
            .filter(|&i| !self.links[i].down && !self.links[i].watch.alive())
            .collect();
        if dead.is_empty() {
            return;
        }
        // Whatever a dead peer wrote before it died still counts.
        self.drain(out);
        for link in dead {
            let l = &mut self.links[link];
            if !l.down {
                l.down = true;
                // A peer that died before the mesh formed left its name
                // behind; the survivors remove it.
                let _ = sys::unlink(l.peer.name());
                out.push(Completion::LinkDown {
                    link,
                    reason: format!("{} (process {}) exited", l.label, l.peer.pid()),
                });
            }
        }
    }
}

impl Transport for ShmTransport {
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey> {
        if !region.is_in(&self.own.mapping()) {
            return Err(Error::Unsupported(
                "shm: this region is caller memory, which peers cannot reach; use library-allocated buffers, or AFMESH_TRANSPORT=tcp".into(),
            ));
        }
        Ok(RegionKey {
            id: 0,
            rkey: 0,
            addr: 0,
            len: region.len() as u64,
        })
    }

    #[inline]
    fn write(
        &mut self,
        link: LinkId,
        src: &[&[u8]],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<()> {
        let io_timeout = self.io_timeout;
        let l = self
            .links
            .get_mut(link)
            .ok_or_else(|| Error::config(format!("shm: no link {link}")))?;
        if l.down {
            return Err(Error::io(
                format!("write to {}", l.label),
                io::Error::new(io::ErrorKind::NotConnected, "link is down"),
            ));
        }
        let total: u64 = src.iter().map(|s| s.len() as u64).sum();
        let len = u32::try_from(total).map_err(|_| {
            Error::Unsupported(format!("shm: one write of {total} bytes exceeds 4 GiB"))
        })?;
        super::check_remote(remote, offset, total, &l.label)?;
        l.peer
            .write_region(offset, src)
            .map_err(|e| Error::BufferSize {
                what: format!("{} region: {e}", l.label),
                need: offset.saturating_add(total) as usize,
                got: l.peer.region_range().1,
            })?;
        let notice = Notice {
            region: remote.id,
            offset,
            len,
            imm,
            close: false,
        }
        .encode();
        if !l.out.push(&notice) {
            // Full: the consumer is behind. Wait, bounded, and give up if
            // it dies.
            let deadline = Instant::now() + io_timeout;
            loop {
                l.peer.ring_doorbell();
                std::thread::yield_now();
                if l.out.push(&notice) {
                    break;
                }
                if !l.watch.alive() {
                    l.down = true;
                    return Err(Error::io(
                        format!("write to {}", l.label),
                        io::Error::new(io::ErrorKind::BrokenPipe, "peer process exited"),
                    ));
                }
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        op: "shm ring space",
                        peer: l.label.clone(),
                        after: io_timeout,
                    });
                }
            }
        }
        l.peer.ring_doorbell();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        let start = out.len();
        self.drain(out);
        if out.len() > start {
            return Ok(());
        }
        self.check_liveness(out);
        if out.len() > start || timeout.is_zero() || self.external_changed() {
            return Ok(());
        }
        let begin = Instant::now();
        let deadline = begin + timeout;
        let spin_until = begin + self.policy.spin_for(timeout);
        let mut spins = 0u32;
        loop {
            let now = Instant::now();
            if now >= spin_until {
                break;
            }
            self.policy.relax(spins, now - begin);
            spins = spins.wrapping_add(1);
            if self.links.iter().any(|l| !l.down && !l.inbound.is_empty()) {
                self.drain(out);
                if out.len() > start {
                    return Ok(());
                }
            }
            if spins % 64 == 0 && self.external_changed() {
                return Ok(());
            }
            if spins % 1024 == 0 {
                self.check_liveness(out);
                if out.len() > start {
                    return Ok(());
                }
            }
        }
        // Park on the doorbell (the protocol is in `segment`).
        let map = self.own.mapping();
        let bell = Bell::of(&map);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            // Another backend's traffic (tcp readers count it) means
            // return, so the caller looks there.
            let mut external = false;
            let found = bell.park(
                || {
                    self.drain(out);
                    external = self.external_changed();
                    out.len() > start || external
                },
                |word, seen| sys::futex_wait(word, seen, (deadline - now).min(MAX_PARK)),
            );
            if !found {
                self.check_liveness(out);
            }
            if out.len() > start || external {
                return Ok(());
            }
        }
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

    fn name(&self) -> &'static str {
        "shm"
    }

    fn copies(&self, _link: LinkId) -> bool {
        true
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn pair(job: &str) -> (ShmTransport, ShmTransport, Arc<Region>, RegionKey) {
        let mut a =
            ShmTransport::create(job, 1, 4096, PollPolicy::default(), Duration::from_secs(1))
                .unwrap();
        let mut b =
            ShmTransport::create(job, 1, 4096, PollPolicy::default(), Duration::from_secs(1))
                .unwrap();
        let rb = b.region().unwrap();
        let kb = b.register(rb.clone()).unwrap();
        let na = a.segment_name().to_string();
        let nb = b.segment_name().to_string();
        a.add_link(&nb, 0, 0, "b").unwrap();
        b.add_link(&na, 0, 0, "a").unwrap();
        (a, b, rb, kb)
    }

    fn wait(t: &mut ShmTransport) -> Vec<Completion> {
        let mut out = Vec::new();
        let d = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < d {
            t.poll(&mut out, Duration::from_millis(50)).unwrap();
        }
        out
    }

    #[test]
    fn write_lands_then_arrives() {
        let (mut a, mut b, rb, kb) = pair("shm-unit-1");
        a.write(0, &[b"abc", b"def"], &kb, 10, Some(99)).unwrap();
        assert_eq!(wait(&mut b), vec![Completion::Arrival { link: 0, imm: 99 }]);
        assert_eq!(rb.slice(10, 6).unwrap(), b"abcdef");
        assert!(matches!(
            a.write(0, &[&[0; 8]], &kb, 4090, None),
            Err(Error::BufferSize { .. })
        ));
        drop(a);
        assert_eq!(wait(&mut b), vec![Completion::LinkClosed { link: 0 }]);
    }

    #[test]
    fn parked_receiver_is_woken() {
        let (mut a, mut b, _rb, kb) = pair("shm-unit-2");
        let t = std::thread::spawn(move || {
            let mut out = Vec::new();
            b.poll(&mut out, Duration::from_secs(5)).unwrap();
            out
        });
        // Write only once the receiver has parked (its sleeping flag, seen
        // through our mapping of its segment).
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.links[0].peer.sleeping().load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "receiver never parked");
            std::thread::yield_now();
        }
        a.write(0, &[b"x"], &kb, 0, Some(5)).unwrap();
        assert_eq!(
            t.join().unwrap(),
            vec![Completion::Arrival { link: 0, imm: 5 }]
        );
    }

    #[test]
    fn bad_notice_is_a_link_error() {
        let (mut a, mut b, _rb, _kb) = pair("shm-unit-3");
        // A notice pointing past the region, as a broken peer would post.
        assert!(a.links[0].out.push(
            &Notice {
                region: 0,
                len: 16,
                offset: 4090,
                imm: Some(1),
                close: false,
            }
            .encode()
        ));
        assert!(matches!(wait(&mut b)[0], Completion::LinkError { .. }));
    }

    #[test]
    fn notice_with_unknown_flags_is_a_link_error() {
        let (mut a, mut b, _rb, _kb) = pair("shm-unit-5");
        let mut bad = Notice::CLOSE.encode();
        bad[0] |= 0x80;
        assert!(a.links[0].out.push(&bad));
        match &wait(&mut b)[..] {
            [Completion::LinkError { reason, .. }] => {
                assert!(reason.contains("unknown bits"), "{reason}")
            }
            other => panic!("want one link error, got {other:?}"),
        }
    }

    #[test]
    fn caller_memory_is_refused() {
        let mut a = ShmTransport::create(
            "shm-unit-4",
            1,
            4096,
            PollPolicy::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        let e = a
            .register(Arc::new(Region::alloc(64).unwrap()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("library-allocated"), "{e}");
    }
}
