//! Sending: messages leave from send slots, one write each, and a slot is
//! filled again only once every send from it completed.
//!
//! This is the seam to the transport. [`Engine::post`] is the only place a
//! message is handed to the transport, and [`Engine::on_sent`] the only
//! place a send is known complete. Each post gets a token naming (send
//! slot, peer) and a generation; `on_sent` releases exactly the post it
//! names, so a late or repeated completion never releases a slot refilled
//! since. A lost peer's pending sends are released when it is marked lost.
//!
//! The transport reports `Sent { token }` later (shm at once, tcp when the
//! kernel took the last byte, a NIC when its completion is polled),
//! possibly after the peer already answered; the slot stays refused until
//! then. A full send window is waited out here, bounded by the send
//! timeout, while completions are still taken.

use std::time::{Duration, Instant};

use super::{Engine, Sink};
use crate::error::{Error, Result};
use crate::proto::header::checksum;
use crate::proto::{Header, Imm, HEADER_LEN};
use crate::transport::slots::SlotRef;
use crate::transport::{Completion, LocalSlice};

/// One post of a write on a link, as [`Engine::post_once`] makes it.
struct Post {
    link: crate::transport::LinkId,
    head: u64,
    src: [LocalSlice; 1],
    key: crate::proto::RegionKey,
    to: u64,
    imm: Option<u32>,
    token: u64,
}

/// One write of a message: `len` bytes at `at` of the send region to
/// offset `to` of the peer's region.
#[derive(Clone, Copy)]
struct Write {
    at: u64,
    len: u64,
    to: u64,
}

impl Engine {
    /// Send slot `slot`, to build a message in; refused while a send from
    /// it is pending.
    pub(crate) fn fill(&mut self, slot: usize) -> Result<&mut [u8]> {
        self.send.fill(slot)
    }

    /// Writes `header` at the start of send slot `slot`, whose payload is
    /// already in place, and returns its first `len` bytes as a message.
    /// With checksums on, the header carries the CRC32C of those bytes
    /// (host send memory only: the CPU does not read device slots).
    pub(crate) fn seal(&mut self, slot: usize, mut header: Header, len: usize) -> Result<SlotRef> {
        if self.checksum {
            if self.send_kind() != crate::transport::MemoryKind::Host {
                return Err(Error::Unsupported(
                    "AFMESH_CHECKSUM: device memory is not checksummed (the CPU never reads it); turn it off for device ranks".into(),
                ));
            }
            let buf = self.send.fill(slot)?;
            if buf.len() < len.max(HEADER_LEN) {
                return Err(Error::BufferSize {
                    what: format!("message of {len} bytes with its header in send slot {slot}"),
                    need: len.max(HEADER_LEN),
                    got: buf.len(),
                });
            }
            header.checksum = Some(0);
            let raw = header.encode();
            let crc = checksum(&raw, |c| {
                Ok(crc32c::crc32c_append(c, &buf[HEADER_LEN..len]))
            })
            .map_err(Error::invalid)?;
            header.checksum = Some(crc);
        }
        if self.send_kind() == crate::transport::MemoryKind::Host {
            // Host slots: the header is encoded straight into the slot.
            let buf = self.send.fill(slot)?;
            let Some(head) = buf.get_mut(..HEADER_LEN) else {
                return Err(Error::BufferSize {
                    what: format!("header in send slot {slot}"),
                    need: HEADER_LEN,
                    got: buf.len(),
                });
            };
            head.copy_from_slice(&header.encode());
        } else {
            self.write_head(slot, 0, &header.encode())?;
        }
        self.send.message(slot, len)
    }

    /// Writes `bytes` of a message's prefix (header, side block) at `at`
    /// of send slot `slot`: into the pinned shadow only where no peer
    /// reads the prefix from the device ([`Engine::set_prefix`]), else as
    /// [`Engine::write_slot`].
    pub(crate) fn write_head(&mut self, slot: usize, at: usize, bytes: &[u8]) -> Result<()> {
        if self.prefix_host_only && at.saturating_add(bytes.len()) <= self.prefix {
            self.send.write_shadow(slot, at, bytes)
        } else {
            self.send.write(slot, at, bytes)
        }
    }

    /// Whether messages carry a checksum ([`Engine::seal`] computes it).
    pub(crate) fn checksums(&self) -> bool {
        self.checksum
    }

    /// Copies `bytes` to offset `at` of send slot `slot` (host or device
    /// memory).
    pub(crate) fn write_slot(&mut self, slot: usize, at: usize, bytes: &[u8]) -> Result<()> {
        self.send.write(slot, at, bytes)
    }

    /// The address of `len` bytes at `at` of send slot `slot`.
    pub(crate) fn slot_addr(&mut self, slot: usize, at: usize, len: usize) -> Result<u64> {
        self.send.addr(slot, at, len)
    }

    /// The stream slot fills are enqueued on (null: the default stream).
    pub(crate) fn fill_stream(&self) -> crate::cuda::CuStream {
        self.send.region().fill_stream()
    }

    /// What memory the send slots are.
    pub(crate) fn send_kind(&self) -> crate::transport::MemoryKind {
        self.send.region().kind()
    }

    /// The first `len` bytes of send slot `slot`, as a message.
    pub(crate) fn message(&self, slot: usize, len: usize) -> Result<SlotRef> {
        self.send.message(slot, len)
    }

    /// Waits (pumping, so arrivals are still counted) until every send from
    /// slot `slot` completed, up to the send timeout.
    pub(crate) fn reclaim<S: Sink>(&mut self, slot: usize, sink: &mut S) -> Result<()> {
        if self.send.is_free(slot) {
            return Ok(());
        }
        let timeout = self.send_timeout;
        match self.wait(sink, timeout, |e, _| Ok(e.send.is_free(slot).then_some(())))? {
            Some(()) => Ok(()),
            None => Err(Error::Timeout {
                op: "send completion",
                peer: self.names(self.pending_peers(slot)),
                after: timeout,
            }),
        }
    }

    /// Counts `bytes` that the library copied into a send slot for peer
    /// `peer` (the copying `dispatch` and `respond`; zero-copy fills count
    /// nothing).
    pub(crate) fn count_copied(&mut self, peer: usize, bytes: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.stats.copied_bytes += bytes as u64;
        }
    }

    /// Posts message `msg` to peer `peer` at `remote_offset` of its region,
    /// announced by `imm`: one write. The slot is refused to `fill` until
    /// the send completes ([`Engine::on_sent`]).
    pub(crate) fn post(
        &mut self,
        peer: usize,
        msg: SlotRef,
        remote_offset: u64,
        imm: Imm,
    ) -> Result<()> {
        let whole = [Write {
            at: msg.offset as u64,
            len: msg.len as u64,
            to: remote_offset,
        }];
        self.post_writes(peer, msg, &whole, imm)
    }

    /// Posts message `msg` to peer `peer` in two writes on its link (the
    /// matrix layout): the bytes from `rows_at` on (the rows) to
    /// `rows_to`, with no imm, then the first `rows_at` bytes (header and
    /// side area) to `head_to`, announced by `imm`. The link must deliver
    /// in order ([`crate::transport::Caps::ordered`]), so the arrival means
    /// both landed. No rows: only the second write. The slot is refused to
    /// `fill` until both sends complete.
    pub(crate) fn post_split(
        &mut self,
        peer: usize,
        msg: SlotRef,
        rows_at: usize,
        rows_to: u64,
        head_to: u64,
        imm: Imm,
    ) -> Result<()> {
        if rows_at > msg.len {
            return Err(Error::invalid(format!(
                "message of {} bytes split at {rows_at}",
                msg.len
            )));
        }
        let rows = Write {
            at: (msg.offset + rows_at) as u64,
            len: (msg.len - rows_at) as u64,
            to: rows_to,
        };
        let head = Write {
            at: msg.offset as u64,
            len: rows_at as u64,
            to: head_to,
        };
        if rows.len == 0 {
            self.post_writes(peer, msg, &[head], imm)
        } else {
            self.post_writes(peer, msg, &[rows, head], imm)
        }
    }

    /// Posts `writes` from `msg`'s slot to peer `peer` in order, the last
    /// one announced by `imm`; all under one token, so the post completes
    /// once each has reported `Sent`.
    fn post_writes(&mut self, peer: usize, msg: SlotRef, writes: &[Write], imm: Imm) -> Result<()> {
        if self.peers[peer].stats.lost.is_some() {
            return Err(self.lost_error(peer));
        }
        let index = msg.slot * self.peers.len() + peer;
        match self.outstanding.get(index) {
            Some(None) => {}
            Some(Some(_)) => {
                return Err(Error::invalid(format!(
                    "send slot {} is already posted to {}",
                    msg.slot, self.peers[peer].peer
                )))
            }
            None => return Err(Error::invalid(format!("no send slot {}", msg.slot))),
        }
        self.generation = self.generation.wrapping_add(1);
        let token = (u64::from(self.generation) << 32) | index as u64;
        let p = &self.peers[peer];
        let (link, key) = (p.link, p.key);
        // Set on the first full window, so the fast path reads no clock.
        let mut deadline = None;
        let mut posted = 0u8;
        let mut result = Ok(());
        for (i, w) in writes.iter().enumerate() {
            let src = [LocalSlice {
                key: self.send_key,
                offset: w.at,
                len: w.len,
            }];
            let last = i + 1 == writes.len();
            let announce = last.then(|| imm.encode());
            // The prefix (header and side area, at the start of the
            // message's last write) to a mirrored peer goes to its host
            // mirror only.
            let head = if last && self.peers[peer].mirrored {
                (self.prefix as u64).min(w.len)
            } else {
                0
            };
            let post = Post {
                link,
                head,
                src,
                key,
                to: w.to,
                imm: announce,
                token,
            };
            let r = match self.post_once(&post) {
                Err(full @ Error::Backpressure { .. }) => {
                    self.post_when_room(&post, &mut deadline, full)
                }
                other => other,
            };
            match r {
                Ok(()) => posted += 1,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if posted > 0 {
            // Even when a later write failed: the earlier ones will
            // report `Sent`, and the slot stays refused until they do.
            self.outstanding[index] = Some((self.generation, posted));
            self.send.posted(msg.slot, 1);
        }
        match result {
            Ok(()) => {
                let p = &mut self.peers[peer];
                let (s, copies) = (&mut p.stats, p.copies);
                s.sent += 1;
                s.sent_bytes += msg.len as u64;
                if copies {
                    s.copied_bytes += msg.len as u64;
                }
                Ok(())
            }
            Err(
                e @ (Error::BufferSize { .. }
                | Error::Unsupported(_)
                | Error::Config(_)
                | Error::InvalidArgument(_)),
            ) => Err(e),
            Err(e) => {
                self.mark_lost(peer, e.to_string(), false);
                Err(self.lost_error(peer))
            }
        }
    }

    /// One attempt at `post`.
    #[inline(always)]
    fn post_once(&mut self, p: &Post) -> Result<()> {
        if p.head > 0 {
            self.transport
                .post_write_mirrored(p.link, p.head, &p.src, &p.key, p.to, p.imm, p.token)
        } else {
            self.transport
                .post_write(p.link, &p.src, &p.key, p.to, p.imm, p.token)
        }
    }

    /// `post` again while the link's send window is full, making progress
    /// in between (completions free it; arrivals wait in the backlog for
    /// the next pump), until `deadline` (set here on the message's first
    /// full window: one send timeout bounds the whole message); then
    /// `full`, the last backpressure error. Out of line: the clock is read
    /// only once a window is full.
    #[cold]
    #[inline(never)]
    fn post_when_room(
        &mut self,
        p: &Post,
        deadline: &mut Option<Instant>,
        mut full: Error,
    ) -> Result<()> {
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.send_timeout);
        loop {
            if Instant::now() >= deadline {
                return Err(full);
            }
            let mut out = Vec::new();
            let r = self.transport.poll(&mut out, Duration::from_millis(1));
            // Taken even when the poll failed: a lost Sent would keep its
            // slot busy, a lost arrival its stage.
            for c in out {
                match c {
                    // An earlier write of this very message: counted by
                    // the next pump, once `outstanding` records it.
                    Completion::Sent { token } if token != p.token => self.on_sent(token),
                    other => self.backlog.push(other),
                }
            }
            r?;
            match self.post_once(p) {
                Err(e @ Error::Backpressure { .. }) => full = e,
                other => return other,
            }
        }
    }

    /// The send posted with `token` completed: its slot may be reused once
    /// its other sends completed too. Unknown or stale tokens are ignored.
    pub(crate) fn on_sent(&mut self, token: u64) {
        let index = (token & 0xffff_ffff) as usize;
        let generation = (token >> 32) as u32;
        if let Some(o) = self.outstanding.get_mut(index) {
            match *o {
                Some((g, 1)) if g == generation => {
                    *o = None;
                    self.send.sent(index / self.peers.len());
                }
                Some((g, left)) if g == generation => *o = Some((g, left - 1)),
                _ => {}
            }
        }
    }

    /// Peer `peer` is lost: its pending sends will not complete.
    pub(super) fn release_sends_to(&mut self, peer: usize) {
        let n = self.peers.len();
        for slot in 0..self.send.count() {
            if let Some(o) = self.outstanding.get_mut(slot * n + peer) {
                if o.take().is_some() {
                    self.send.sent(slot);
                }
            }
        }
    }

    /// Peers with a send from `slot` pending.
    fn pending_peers(&self, slot: usize) -> Vec<usize> {
        let n = self.peers.len();
        (0..n)
            .filter(|&p| matches!(self.outstanding.get(slot * n + p), Some(Some(_))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::super::{Engine, Places, Receive, Sink, Support};
    use crate::error::{Error, Peer};
    use crate::proto::{Accepted, AttentionStages, Geometry, Imm, Kind};
    use crate::transport::sim::{SimNetwork, SimTransport};
    use crate::transport::slots::SendSlots;
    use crate::transport::{Access, Backend, Mux, PeerSpec, PollPolicy, Region, Transport};

    const G: Geometry = Geometry {
        stages: 2,
        max_tokens: 1,
        row_bytes: 64,
        out_row_bytes: 64,
        side_bytes: 0,
    };

    struct Counts(AttentionStages);

    impl Sink for Counts {
        type Counter = AttentionStages;
        fn counter(&mut self) -> &mut AttentionStages {
            &mut self.0
        }
        fn accepted(&mut self, _: usize, _: &Accepted, _: u64) -> Option<u64> {
            None
        }
    }

    /// An engine with two 128-byte send slots and one peer, F0, whose
    /// region is returned.
    fn engine(net: &SimNetwork) -> (Engine, SimTransport, Arc<Region>) {
        let mut a = Mux::new(vec![Backend::Sim(net.endpoint())], PollPolicy::default());
        let mut f = net.endpoint();
        let theirs = Arc::new(Region::alloc(256).unwrap());
        f.register(&theirs, Access::RemoteWrite).unwrap();
        let recv = Receive {
            region: Arc::new(Region::alloc(256).unwrap()),
            places: Places {
                stage_stride: 128,
                peer_stride: 128,
                rows: None,
            },
        };
        a.register(&recv.region, Access::RemoteWrite).unwrap();
        let send = SendSlots::new(Region::alloc(256).unwrap(), 128, 2).unwrap();
        let send_key = a.register(send.region(), Access::Local).unwrap();
        let peer = PeerSpec {
            label: "F0".into(),
            blob: f.endpoint(),
            initiator: true,
            peer_rank: 0,
            my_rank: 0,
            epoch: 1,
        };
        let up = a.connect(0, &[peer], Duration::ZERO).unwrap();
        let e = Engine::new(
            a,
            vec![(Peer::Ffn(0), up[0].link, up[0].remote[0])],
            G,
            recv,
            send,
            send_key,
            Support::default(),
        );
        (e, f, theirs)
    }

    /// Marks slot `slot` posted to peer 0 with generation `g` and no
    /// completion yet, as a posted-write transport leaves it.
    fn in_flight(e: &mut Engine, slot: usize, g: u32) -> u64 {
        e.outstanding[slot] = Some((g, 1));
        e.send.posted(slot, 1);
        (u64::from(g) << 32) | slot as u64
    }

    #[test]
    fn a_message_is_the_slot_prefix_in_one_write() {
        let net = SimNetwork::new(1);
        let (mut e, _f, theirs) = engine(&net);
        e.fill(1).unwrap()[..5].copy_from_slice(b"hello");
        let msg = e.message(1, 5).unwrap();
        e.post(0, msg, 100, Imm::new(Kind::Dispatch, 1, 0)).unwrap();
        // Posted, not yet sent: the slot is refused.
        assert!(matches!(e.fill(1), Err(Error::InvalidArgument(_))));
        assert_eq!(net.deliver_all(), 2, "the landing, then the Sent");
        assert_eq!(theirs.slice(100, 5).unwrap(), b"hello");
        let s = &e.stats().peers[0].1;
        assert_eq!((s.sent, s.sent_bytes), (1, 5));
        let mut sink = Counts(AttentionStages::new(2, 1));
        e.pump(Duration::ZERO, &mut sink).unwrap();
        assert!(e.send.is_free(1));
        assert!(e.fill(1).is_ok());
    }

    /// Posts slot 1, "headrows", to F0 split after 4 bytes: the rows to
    /// offset 200, then the head to offset 10.
    fn post_headrows_split(e: &mut Engine) {
        e.fill(1).unwrap()[..8].copy_from_slice(b"headrows");
        let msg = e.message(1, 8).unwrap();
        e.post_split(0, msg, 4, 200, 10, Imm::new(Kind::Dispatch, 1, 0))
            .unwrap();
    }

    #[test]
    fn a_split_message_is_two_writes_and_frees_its_slot_after_both() {
        let net = SimNetwork::new(5);
        let (mut e, _f, theirs) = engine(&net);
        post_headrows_split(&mut e);
        let mut sink = Counts(AttentionStages::new(2, 1));
        // The rows' write and its Sent: the slot is still refused.
        assert!(net.step() && net.step());
        e.pump(Duration::ZERO, &mut sink).unwrap();
        assert_eq!(theirs.slice(200, 4).unwrap(), b"rows");
        assert!(!e.send.is_free(1));
        assert_eq!(net.deliver_all(), 2, "the head's landing, then its Sent");
        assert_eq!(theirs.slice(10, 4).unwrap(), b"head");
        e.pump(Duration::ZERO, &mut sink).unwrap();
        assert!(e.send.is_free(1));
        let s = &e.stats().peers[0].1;
        assert_eq!((s.sent, s.sent_bytes), (1, 8));
        // No rows: one write.
        let msg = e.message(1, 4).unwrap();
        e.post_split(0, msg, 4, 200, 10, Imm::new(Kind::Dispatch, 1, 1))
            .unwrap();
        assert_eq!(net.deliver_all(), 2);
    }

    #[test]
    fn a_slot_is_refused_until_its_own_send_completes() {
        let net = SimNetwork::new(2);
        let (mut e, _f, _) = engine(&net);
        let token = in_flight(&mut e, 0, 7);
        assert!(matches!(e.fill(0), Err(Error::InvalidArgument(_))));
        let msg = e.message(0, 64).unwrap();
        assert!(
            e.post(0, msg, 0, Imm::new(Kind::Dispatch, 0, 0)).is_err(),
            "a slot is posted to a peer once at a time"
        );
        e.on_sent(token ^ (1 << 32)); // another generation: not this post
        e.on_sent(token + 1); // another slot
        assert!(!e.send.is_free(0));
        e.on_sent(token);
        assert!(e.send.is_free(0));
        e.on_sent(token); // repeated: ignored
        assert_eq!(e.send.pending(0), 0);
        assert!(e.fill(0).is_ok());
    }

    #[test]
    fn a_lost_peer_releases_its_sends() {
        let net = SimNetwork::new(3);
        let (mut e, _f, _) = engine(&net);
        in_flight(&mut e, 1, 3);
        net.kill_link(0, 0);
        let mut sink = Counts(AttentionStages::new(2, 1));
        e.pump(Duration::ZERO, &mut sink).unwrap();
        assert!(e.lost(0).is_some());
        assert!(e.send.is_free(1));
        let msg = e.message(1, 8).unwrap();
        assert!(matches!(
            e.post(0, msg, 0, Imm::new(Kind::Dispatch, 1, 0)),
            Err(Error::PeerLost {
                peer: Peer::Ffn(0),
                ..
            })
        ));
    }

    #[test]
    fn reclaim_waits_for_the_completion_and_times_out_naming_the_peer() {
        let net = SimNetwork::new(4);
        let (mut e, _f, _) = engine(&net);
        let mut sink = Counts(AttentionStages::new(2, 1));
        e.reclaim(0, &mut sink).unwrap();
        in_flight(&mut e, 0, 1);
        e.set_send_timeout(Duration::from_millis(5));
        match e.reclaim(0, &mut sink) {
            Err(Error::Timeout {
                op: "send completion",
                peer,
                ..
            }) => assert_eq!(peer, "F0"),
            other => panic!("expected Timeout, got {other:?}"),
        }
    }

    #[test]
    fn a_split_post_that_meets_a_full_window_still_frees_its_slot() {
        // The rows leave; the head finds the window full. The rows' Sent,
        // taken while waiting for room, must not be lost before the post
        // is recorded (it was: the slot stayed refused for good).
        let net = SimNetwork::new(5);
        net.set_auto(true);
        net.set_window(1);
        let (mut e, _f, theirs) = engine(&net);
        post_headrows_split(&mut e);
        let mut sink = Counts(AttentionStages::new(2, 1));
        for _ in 0..10 {
            e.pump(Duration::ZERO, &mut sink).unwrap();
        }
        assert_eq!(theirs.slice(200, 4).unwrap(), b"rows");
        assert_eq!(theirs.slice(10, 4).unwrap(), b"head");
        assert!(e.send.is_free(1), "slot 1 refused: {:?}", e.outstanding);
    }

    #[test]
    fn a_window_that_stays_full_loses_the_peer_after_the_send_timeout() {
        let net = SimNetwork::new(6);
        net.set_window(1);
        let (mut e, _f, _) = engine(&net);
        let timeout = Duration::from_millis(20);
        e.set_send_timeout(timeout);
        let msg = e.message(0, 8).unwrap();
        e.post(0, msg, 0, Imm::new(Kind::Dispatch, 0, 0)).unwrap();
        let msg = e.message(1, 8).unwrap();
        let t = std::time::Instant::now();
        match e.post(0, msg, 128, Imm::new(Kind::Dispatch, 1, 0)) {
            Err(Error::PeerLost { peer, reason }) => {
                assert_eq!(peer, Peer::Ffn(0));
                assert!(reason.contains("full"), "{reason}");
            }
            other => panic!("expected PeerLost, got {other:?}"),
        }
        assert!(t.elapsed() >= timeout);
    }

    #[test]
    fn a_slot_too_small_for_a_header_is_refused_by_size() {
        let net = SimNetwork::new(7);
        let (mut e, _f, _) = engine(&net);
        e.send = SendSlots::new(Region::alloc(256).unwrap(), 32, 2).unwrap();
        let h = crate::proto::Header {
            kind: Kind::Dispatch,
            stage: 0,
            sequence: 0,
            sender: 0,
            tokens: 0,
            row_bytes: 64,
            side_len: 0,
            post_ns: 0,
            land_ns: 0,
            process_ns: 0,
            respond_ns: 0,
            checksum: None,
        };
        for checksum in [false, true] {
            e.checksum = checksum;
            match e.seal(0, h, 16) {
                Err(Error::BufferSize {
                    need: 64, got: 32, ..
                }) => {}
                other => panic!("checksum {checksum}: expected BufferSize, got {other:?}"),
            }
        }
    }
}
