//! TCP: one connection per link, `TCP_NODELAY`, driven on the caller's
//! thread.
//!
//! A write is one frame — a 32-byte [`frame`] header naming the target
//! region, offset, length and imm, then the payload — sent with one
//! non-blocking vectored `sendmsg` straight from the sender's registered
//! memory. What the socket does not take at once waits in the link's queue
//! (bounded by the send window) and goes out on later progress; a write is
//! `Sent` when its last byte is in the kernel. Receiving is the reverse, on
//! the thread that makes progress (no reader threads, no hand-off), with
//! one `read` per frame where the stream allows ([`rx`]): a small frame
//! comes in whole into the link's inbox and its body is copied out; a
//! larger body is read straight into the region. Every header is checked
//! against the registered region before a byte of its body lands. A rank
//! that waits sleeps in `poll(2)` on its sockets (or on its doorbell, rung
//! by a socket watcher, when it also has shm links). A peer that exits
//! closes its sockets: EOF or a reset is `LinkDown`. A queue that makes no
//! progress for the I/O timeout means a peer that stopped reading:
//! `LinkDown` too.

pub mod connect;
pub mod frame;
mod rx;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::notice::Notice;
use super::{
    blob, check_post, Access, Caps, Completion, Connected, LinkId, LocalRegions, LocalSlice,
    PeerSpec, Region, RegionKey, Registration, Transport, Wake,
};
use crate::error::{Error, Result};
use frame::FRAME_LEN;

/// Writes posted and not yet in the kernel, per link.
pub const TCP_WINDOW: usize = 64;
/// Most slices in one write (frame header + sources).
const MAX_GATHER: usize = 8;
const MAGIC: &str = "afmesh-tcp-1";

/// A write waiting for socket space.
#[derive(Debug)]
struct Pending {
    frame: [u8; FRAME_LEN],
    parts: Vec<(Arc<Region>, usize, usize)>,
    total: usize,
    written: usize,
    token: u64,
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    peer: String,
    down: bool,
    rx: rx::Rx,
    tx: VecDeque<Pending>,
    /// When the head of `tx` last moved.
    tx_moved: Instant,
}

/// The tcp backend.
#[derive(Debug)]
pub struct TcpTransport {
    local: LocalRegions,
    listener: Option<TcpListener>,
    listen_addr: String,
    links: Vec<Link>,
    io_timeout: Duration,
    liveness: Duration,
    /// When links were last checked for stalled acknowledgements.
    acks_checked: Instant,
    sent: Vec<u64>,
    guard: crate::bootstrap::LinkGuard,
}

impl TcpTransport {
    /// A transport with no links, accepting on `ip` (any free port).
    /// `io_timeout` bounds how long a peer may leave our writes unread.
    pub fn new(ip: IpAddr, io_timeout: Duration) -> Result<TcpTransport> {
        let l = TcpListener::bind((ip, 0))
            .map_err(|e| Error::io(format!("bind link listener on {ip}"), e))?;
        let a = l
            .local_addr()
            .map_err(|e| Error::io("link listener address", e))?;
        Ok(TcpTransport {
            local: LocalRegions::default(),
            listener: Some(l),
            listen_addr: a.to_string(),
            links: Vec::new(),
            io_timeout,
            liveness: DEFAULT_LIVENESS,
            acks_checked: Instant::now(),
            sent: Vec::new(),
            guard: Default::default(),
        })
    }

    /// Links prove `guard`'s cluster token and give up when its watch says
    /// the job failed.
    pub fn with_guard(mut self, guard: crate::bootstrap::LinkGuard) -> TcpTransport {
        self.guard = guard;
        self
    }

    /// A link that stays unreachable for `liveness` is down: keepalive
    /// probes find a silent one, `TCP_USER_TIMEOUT` ends one whose data
    /// goes unacknowledged (applies to links added after this call).
    pub fn with_liveness(mut self, liveness: Duration) -> TcpTransport {
        self.liveness = liveness;
        self
    }

    /// Adopts a connected stream as a new link (the handshake is done).
    pub fn add_link(&mut self, stream: TcpStream, peer: impl Into<String>) -> Result<LinkId> {
        let peer = peer.into();
        let io_err = |op: &str, e| Error::io(format!("{op} on link to {peer}"), e);
        stream
            .set_nodelay(true)
            .map_err(|e| io_err("set TCP_NODELAY", e))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| io_err("set non-blocking", e))?;
        keep_alive(&stream, self.liveness).map_err(|e| io_err("set keepalive", e))?;
        self.links.push(Link {
            stream,
            peer,
            down: false,
            rx: rx::Rx::default(),
            tx: VecDeque::new(),
            tx_moved: Instant::now(),
        });
        Ok(self.links.len() - 1)
    }
}

/// Most often the links' acknowledgements are looked at.
const ACK_CHECK_MIN: Duration = Duration::from_millis(50);

/// The liveness bound when a rank sets none (`MeshConfig::liveness`).
const DEFAULT_LIVENESS: Duration = Duration::from_secs(5);

/// Makes the kernel probe an idle link every fifth of `liveness`
/// (keepalive counts whole seconds, so at least every second) and end it
/// when about `liveness` of probes go unanswered; the error then surfaces
/// in `progress` as `LinkDown`. A link with data in flight is not probed:
/// `progress` watches its acknowledgements instead ([`stalled`]).
/// `TCP_USER_TIMEOUT` is deliberately not used: Linux also ends a
/// connection whose peer advertises a zero window that long, and a live
/// peer busy computing (not reading) does exactly that.
fn keep_alive(stream: &TcpStream, liveness: Duration) -> io::Result<()> {
    let probe = (liveness / 5).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe)
        .with_retries(
            (((liveness.as_millis() / probe.as_millis()) as u32).saturating_sub(1)).max(1),
        );
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// Why link `l` is dead, if its peer has acknowledged nothing for longer
/// than `liveness` while our data waits for it. A live peer's kernel
/// acknowledges even when the peer does not read (zero-window probes,
/// keepalives), so this never fires on a busy peer; a cut link or a dead
/// host stops all acknowledgements.
fn stalled(l: &Link, liveness: Duration) -> Option<String> {
    use std::os::fd::AsFd;
    match afmesh_sys::tcp_acks(l.stream.as_fd()) {
        Ok(a) if a.since_ack > liveness && a.unacked > 0 => Some(format!(
            "{} acknowledged nothing for {:?} with {} segments in flight (liveness bound {liveness:?}, AFMESH_LIVENESS_MS)",
            l.peer, a.since_ack, a.unacked
        )),
        // Nothing could even be sent (the route is gone) and the probes
        // for it go unanswered: a busy peer's kernel answers each probe,
        // which resets the count.
        Ok(a) if a.since_ack > liveness && a.notsent > 0 && a.probes >= 2 => Some(format!(
            "{} answered none of {} probes in {:?} with {} bytes unsent (liveness bound {liveness:?}, AFMESH_LIVENESS_MS)",
            l.peer, a.probes, a.since_ack, a.notsent
        )),
        _ => None,
    }
}

/// One `sendmsg(2)` of `iov`, without `SIGPIPE` when the peer is gone
/// (a host program that does not ignore it would die of the peer's exit).
fn send(stream: &TcpStream, iov: &[IoSlice<'_>]) -> io::Result<usize> {
    socket2::SockRef::from(stream).send_vectored_with_flags(iov, libc::MSG_NOSIGNAL)
}

/// Writes as much of the queue as the socket takes. `Ok(true)` when the
/// queue moved.
fn flush(l: &mut Link, sent: &mut Vec<u64>) -> io::Result<bool> {
    let mut moved = false;
    while let Some(p) = l.tx.front_mut() {
        let mut iov: [IoSlice<'_>; MAX_GATHER] = [IoSlice::new(&[]); MAX_GATHER];
        let mut n = 0;
        let mut skip = p.written;
        let frame: &[u8] = &p.frame;
        let views = std::iter::once(Some(frame)).chain(
            p.parts
                .iter()
                // The engine keeps a posted slot unchanged until `Sent`, and
                // nothing else writes this rank's send memory.
                .map(|(r, off, len)| r.slice(*off, *len).ok()),
        );
        for v in views {
            let v = v.unwrap_or(&[]);
            if skip >= v.len() {
                skip -= v.len();
                continue;
            }
            iov[n] = IoSlice::new(&v[skip..]);
            skip = 0;
            n += 1;
        }
        match send(&l.stream, &iov[..n]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket took no bytes",
                ))
            }
            Ok(k) => {
                moved = true;
                p.written += k;
                if p.written == p.total {
                    sent.push(p.token);
                    l.tx.pop_front();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if moved {
        l.tx_moved = Instant::now();
    }
    Ok(moved)
}

impl super::Open for TcpTransport {
    fn open(s: &super::Setup<'_>) -> Result<TcpTransport> {
        Ok(TcpTransport::new(s.ip, s.io_timeout)?
            .with_guard(s.guard.clone())
            .with_liveness(s.liveness))
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn caps(&self) -> Caps {
        Caps {
            host: true,
            cuda: false,
            ordered: true,
            max_message: u64::from(u32::MAX),
            window: TCP_WINDOW,
            copies: false,
            header_mirror: false,
        }
    }

    fn counters(&self) -> super::WireCounters {
        super::WireCounters {
            received_copied_bytes: self.links.iter().map(|l| l.rx.copied).sum(),
            ..Default::default()
        }
    }

    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
        if !self.links.is_empty() {
            return Err(Error::Unsupported(
                "tcp: regions must be registered before the first link".into(),
            ));
        }
        Ok(self.local.register(region, access))
    }

    fn endpoint(&self) -> Vec<u8> {
        let keys: Vec<RegionKey> = self
            .local
            .targets()
            .map(|(i, r)| RegionKey {
                id: i,
                rkey: 0,
                addr: 0,
                len: r.len() as u64,
            })
            .collect();
        let mut w = blob::writer(MAGIC);
        w.str(&self.listen_addr);
        blob::put_keys(&mut w, &keys);
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
        r.str("listen address").map_err(|e| e.0)?;
        Ok(())
    }

    fn connect(&mut self, peers: &[PeerSpec], timeout: Duration) -> Result<Vec<Connected>> {
        let mut addrs = Vec::with_capacity(peers.len());
        let mut keys = Vec::with_capacity(peers.len());
        for p in peers {
            let bad = |e: crate::proto::DecodeError| Error::BadFrame {
                peer: p.label.clone(),
                reason: format!("tcp endpoint: {}", e.0),
            };
            let mut r = blob::reader(&p.blob, MAGIC).map_err(bad)?;
            addrs.push((p.label.clone(), r.str("listen address").map_err(bad)?));
            keys.push(blob::get_keys(&mut r).map_err(bad)?);
        }
        let (initiators, acceptors): (Vec<usize>, Vec<usize>) =
            (0..peers.len()).partition(|&i| peers[i].initiator);
        let mut links = vec![usize::MAX; peers.len()];
        if !initiators.is_empty() {
            let Some(p0) = peers.first() else {
                return Ok(Vec::new());
            };
            let to: Vec<(String, String)> = initiators.iter().map(|&i| addrs[i].clone()).collect();
            let streams = connect::connect_all(&to, p0.epoch, p0.my_rank, &self.guard, timeout)?;
            for (&i, s) in initiators.iter().zip(streams) {
                links[i] = self.add_link(s, peers[i].label.clone())?;
            }
        }
        if !acceptors.is_empty() {
            let expected: Vec<u32> = acceptors.iter().map(|&i| peers[i].peer_rank).collect();
            let l = self
                .listener
                .as_ref()
                .ok_or_else(|| Error::config("tcp: the link listener is closed"))?;
            let epoch = peers[acceptors[0]].epoch;
            for (rank, s) in connect::accept_all(l, &expected, epoch, &self.guard, timeout)? {
                if let Some(&i) = acceptors.iter().find(|&&i| peers[i].peer_rank == rank) {
                    links[i] = self.add_link(s, peers[i].label.clone())?;
                }
            }
        }
        Ok(links
            .into_iter()
            .zip(keys)
            .map(|(link, remote)| Connected { link, remote })
            .collect())
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
        let state = self.links.get(link).map(|l| (l.peer.as_str(), l.down));
        let len = check_post(state, link, src, remote, offset, u64::from(u32::MAX))?;
        if src.len() + 1 > MAX_GATHER {
            return Err(Error::Unsupported(format!(
                "tcp: gather list of {} > {}",
                src.len(),
                MAX_GATHER - 1
            )));
        }
        let l = &mut self.links[link];
        if l.tx.len() >= TCP_WINDOW {
            return Err(Error::Backpressure {
                peer: l.peer.clone(),
                window: TCP_WINDOW,
            });
        }
        let frame = frame::encode(&Notice {
            region: remote.id,
            offset,
            len,
            imm,
            close: false,
        });
        let total = FRAME_LEN + len as usize;
        let mut written = 0;
        if l.tx.is_empty() {
            // Straight from the sender's memory with one system call: most
            // writes leave whole here, with nothing queued or allocated.
            let mut iov: [IoSlice<'_>; MAX_GATHER] = [IoSlice::new(&[]); MAX_GATHER];
            iov[0] = IoSlice::new(&frame);
            for (v, s) in iov[1..].iter_mut().zip(src) {
                let (r, at, n) = self.local.resolve(s)?;
                // The engine keeps a posted slot unchanged until `Sent`,
                // and nothing else writes this rank's send memory.
                *v = IoSlice::new(r.slice(at, n).map_err(Error::Unsupported)?);
            }
            match send(&l.stream, &iov[..=src.len()]) {
                Ok(k) if k == total => {
                    self.sent.push(token);
                    return Ok(());
                }
                Ok(k) => written = k,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    l.down = true;
                    let _ = l.stream.shutdown(Shutdown::Both);
                    return Err(Error::io(format!("write to {}", l.peer), e));
                }
            }
            l.tx_moved = Instant::now();
        }
        // The socket is full: the rest waits for progress, holding the
        // source regions.
        let mut parts = Vec::with_capacity(src.len());
        for s in src {
            let (r, at, n) = self.local.resolve(s)?;
            parts.push((r.clone(), at, n));
        }
        l.tx.push_back(Pending {
            frame,
            parts,
            total,
            written,
            token,
        });
        Ok(())
    }

    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        // Writes that went out whole when posted come first.
        out.extend(self.sent.drain(..).map(|token| Completion::Sent { token }));
        let regions = &self.local;
        // Acknowledgements are looked at a few times per liveness bound.
        let check_acks = self.acks_checked.elapsed() >= (self.liveness / 8).max(ACK_CHECK_MIN);
        if check_acks {
            self.acks_checked = Instant::now();
        }
        for (link, l) in self.links.iter_mut().enumerate() {
            if l.down {
                continue;
            }
            let mut end = None;
            if check_acks {
                end = stalled(l, self.liveness).map(|reason| Completion::LinkDown { link, reason });
            }
            if end.is_none() && !l.tx.is_empty() {
                match flush(l, &mut self.sent) {
                    Ok(_) if !l.tx.is_empty() && l.tx_moved.elapsed() > self.io_timeout => {
                        end = Some(Completion::LinkDown {
                            link,
                            reason: format!(
                                "{} read none of our bytes for {:?}",
                                l.peer, self.io_timeout
                            ),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        end = Some(Completion::LinkDown {
                            link,
                            reason: format!("write to {}: {e}", l.peer),
                        })
                    }
                }
            }
            if end.is_none() {
                if let rx::Pass::End(c) = l.rx.pass(&mut l.stream, &l.peer, link, regions, out) {
                    end = Some(c);
                }
            }
            if let Some(c) = end {
                // The peer learns at once (EOF) rather than after its own
                // timeout, and nothing queued is sent any more.
                l.down = true;
                l.tx.clear();
                let _ = l.stream.shutdown(Shutdown::Both);
                out.push(c);
            }
        }
        out.extend(self.sent.drain(..).map(|token| Completion::Sent { token }));
        Ok(())
    }

    fn wake(&self) -> Wake {
        let up = self.links.iter().filter(|l| !l.down);
        let read: Vec<_> = up.clone().map(|l| l.stream.as_raw_fd()).collect();
        let write: Vec<_> = up
            .filter(|l| !l.tx.is_empty())
            .map(|l| l.stream.as_raw_fd())
            .collect();
        if read.is_empty() {
            Wake::Nothing
        } else {
            Wake::Fds { read, write }
        }
    }

    fn close(&mut self) {
        let bye = frame::encode(&Notice::CLOSE);
        let deadline = Instant::now() + Duration::from_millis(200);
        for l in &mut self.links {
            if l.down {
                continue;
            }
            l.down = true;
            // What is queued goes first, then the goodbye, within a bound.
            let _ = l.stream.set_nonblocking(false);
            let _ = l.stream.set_write_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let mut ok = true;
            while ok && !l.tx.is_empty() {
                let _ = l.stream.set_nonblocking(true);
                ok = flush(l, &mut self.sent).is_ok() && Instant::now() < deadline;
                if !l.tx.is_empty() {
                    std::thread::yield_now();
                }
            }
            if !l.tx.is_empty() {
                // A frame is cut: a goodbye now would land inside it. The
                // peer sees the connection end instead.
                l.tx.clear();
                let _ = l.stream.shutdown(Shutdown::Both);
                continue;
            }
            let _ = l.stream.set_nonblocking(false);
            // Blocking, under the write timeout set above.
            let mut rest: &[u8] = &bye;
            while !rest.is_empty() {
                match send(&l.stream, &[IoSlice::new(rest)]) {
                    Ok(k) if k > 0 => rest = &rest[k..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    _ => break,
                }
            }
            let _ = l.stream.shutdown(Shutdown::Write);
        }
        self.listener = None;
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    fn abort(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(link) {
            l.down = true;
            l.tx.clear();
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Peers hear that we leave in order.
        self.close();
    }
}

#[cfg(test)]
mod tests;
