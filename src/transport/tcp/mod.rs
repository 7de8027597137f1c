//! TCP: one connection per link, `TCP_NODELAY`.
//!
//! A write is one frame — a 32-byte [`frame`] header naming the target
//! region, offset, length and imm, then the payload — sent with vectored
//! writes straight from the caller's buffers. On the receiving side a reader
//! thread per link checks the target against the registered region and reads
//! the payload straight into it (no staging copy), then posts the arrival on
//! a channel that `poll` drains. A peer that exits closes its sockets, so the
//! reader sees EOF or a reset and reports `LinkDown` at once.

pub mod frame;

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::notice::Notice;
use super::shm::Doorbell;
use super::{Completion, LinkId, PollPolicy, Region, RegionKey, Transport};
use crate::error::{Error, Result};
use frame::FRAME_LEN;

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    peer: String,
    down: bool,
    reader: Option<JoinHandle<()>>,
}

/// The tcp backend.
#[derive(Debug)]
pub struct TcpTransport {
    regions: Vec<Arc<Region>>,
    frozen: Option<Arc<[Arc<Region>]>>,
    links: Vec<Link>,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    policy: PollPolicy,
    io_timeout: Duration,
    doorbell: Option<Doorbell>,
}

impl TcpTransport {
    /// A transport with no links. `io_timeout` bounds every blocking socket
    /// write.
    pub fn new(policy: PollPolicy, io_timeout: Duration) -> TcpTransport {
        let (tx, rx) = crossbeam_channel::unbounded();
        TcpTransport {
            regions: Vec::new(),
            frozen: None,
            links: Vec::new(),
            tx,
            rx,
            policy,
            io_timeout,
            doorbell: None,
        }
    }

    /// Also rings `bell` whenever a reader thread posts a completion, so a
    /// rank parked on its shared-memory doorbell sees tcp traffic too. Set
    /// before adding links.
    pub fn set_doorbell(&mut self, bell: Doorbell) {
        self.doorbell = Some(bell);
    }

    /// Adopts a connected stream as a new link (the handshake is done by the
    /// caller). Regions registered after the first link are refused.
    pub fn add_link(&mut self, stream: TcpStream, peer: impl Into<String>) -> Result<LinkId> {
        let peer = peer.into();
        let io_err = |op: &str, e| Error::io(format!("{op} on link to {peer}"), e);
        stream
            .set_nodelay(true)
            .map_err(|e| io_err("set TCP_NODELAY", e))?;
        stream
            .set_read_timeout(None)
            .map_err(|e| io_err("clear read timeout", e))?;
        stream
            .set_write_timeout(Some(self.io_timeout))
            .map_err(|e| io_err("set write timeout", e))?;
        let read_half = stream.try_clone().map_err(|e| io_err("clone socket", e))?;
        let regions = self
            .frozen
            .get_or_insert_with(|| self.regions.clone().into())
            .clone();
        let link = self.links.len();
        let tx = self.tx.clone();
        let name = peer.clone();
        let bell = self.doorbell.clone();
        let reader = std::thread::Builder::new()
            .name(format!("afmesh-tcp-rx-{link}"))
            .spawn(move || read_loop(read_half, link, regions, Post { tx, bell }, name))
            .map_err(|e| io_err("spawn reader thread", e))?;
        self.links.push(Link {
            stream,
            peer,
            down: false,
            reader: Some(reader),
        });
        Ok(link)
    }
}

/// Where a reader thread posts: the channel, then the doorbell if any.
struct Post {
    tx: Sender<Completion>,
    bell: Option<Doorbell>,
}

impl Post {
    fn send(&self, c: Completion) -> Result<(), ()> {
        let r = self.tx.send(c).map_err(|_| ());
        if let Some(b) = &self.bell {
            b.ring();
        }
        r
    }
}

fn read_loop(mut s: TcpStream, link: LinkId, regions: Arc<[Arc<Region>]>, tx: Post, peer: String) {
    let down = |reason: String| Completion::LinkDown { link, reason };
    loop {
        let mut hb = [0u8; FRAME_LEN];
        match read_full(&mut s, &mut hb) {
            Ok(true) => {}
            Ok(false) => {
                let _ = tx.send(down(format!("connection to {peer} closed")));
                return;
            }
            Err(e) => {
                let _ = tx.send(down(format!("connection to {peer}: {e}")));
                return;
            }
        }
        let h = match frame::decode(&hb) {
            Ok(h) => h,
            Err(e) => {
                let _ = tx.send(Completion::LinkError {
                    link,
                    reason: format!("bad frame from {peer}: {e}"),
                });
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
        };
        if h.close {
            let _ = tx.send(Completion::LinkClosed { link });
            return;
        }
        let landed = match regions.get(h.region as usize) {
            None => Ok(Err(format!("write to unknown region {}", h.region))),
            Some(r) => r.read_from(h.offset, u64::from(h.len), &mut s),
        };
        match landed {
            Ok(Ok(())) => {
                if let Some(imm) = h.imm {
                    if tx.send(Completion::Arrival { link, imm }).is_err() {
                        return; // transport dropped
                    }
                }
            }
            Ok(Err(reason)) => {
                let _ = tx.send(Completion::LinkError {
                    link,
                    reason: format!("from {peer}: {reason}"),
                });
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            Err(e) => {
                let _ = tx.send(down(format!("connection to {peer} broke mid-message: {e}")));
                return;
            }
        }
    }
}

/// Fills `buf`; `Ok(false)` on a clean EOF before the first byte.
fn read_full(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn write_all_vectored(s: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Most slices in one gather list (header + payload parts).
const MAX_GATHER: usize = 8;

impl Transport for TcpTransport {
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey> {
        if self.frozen.is_some() {
            return Err(Error::Unsupported(
                "tcp: regions must be registered before the first link".into(),
            ));
        }
        self.regions.push(region.clone());
        Ok(RegionKey {
            id: (self.regions.len() - 1) as u32,
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
        let total: u64 = src.iter().map(|s| s.len() as u64).sum();
        let l = self
            .links
            .get_mut(link)
            .ok_or_else(|| Error::config(format!("tcp: no link {link}")))?;
        if l.down {
            return Err(Error::io(
                format!("write to {}", l.peer),
                io::Error::new(io::ErrorKind::NotConnected, "link is down"),
            ));
        }
        let len = u32::try_from(total).map_err(|_| {
            Error::Unsupported(format!("tcp: one write of {total} bytes exceeds 4 GiB"))
        })?;
        // The sender checks too, so a local mistake is reported here rather
        // than as the peer closing the link.
        super::check_remote(remote, offset, total, &l.peer)?;
        if src.len() + 1 > MAX_GATHER {
            return Err(Error::Unsupported(format!(
                "tcp: gather list of {} > {}",
                src.len(),
                MAX_GATHER - 1
            )));
        }
        let fh = frame::encode(&Notice {
            region: remote.id,
            offset,
            len,
            imm,
            close: false,
        });
        let mut iov: [IoSlice<'_>; MAX_GATHER] = [IoSlice::new(&[]); MAX_GATHER];
        iov[0] = IoSlice::new(&fh);
        for (i, s) in src.iter().enumerate() {
            iov[i + 1] = IoSlice::new(s);
        }
        match write_all_vectored(&mut l.stream, &mut iov[..src.len() + 1]) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                l.down = true;
                let _ = l.stream.shutdown(Shutdown::Both);
                Err(Error::Timeout {
                    op: "tcp write",
                    peer: l.peer.clone(),
                    after: self.io_timeout,
                })
            }
            Err(e) => {
                l.down = true;
                Err(Error::io(format!("write to {}", l.peer), e))
            }
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let spin = self.policy.spin_for(timeout);
        let mut first = None;
        let mut spins = 0u32;
        loop {
            match self.rx.try_recv() {
                Ok(c) => {
                    first = Some(c);
                    break;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            if start.elapsed() >= spin {
                break;
            }
            self.policy.relax(spins, start.elapsed());
            spins = spins.wrapping_add(1);
        }
        if first.is_none() && !timeout.is_zero() {
            let left = timeout.saturating_sub(start.elapsed());
            if !left.is_zero() {
                match self.rx.recv_timeout(left) {
                    Ok(c) => first = Some(c),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
                }
            }
        }
        if let Some(c) = first {
            self.mark(&c);
            out.push(c);
            while let Ok(c) = self.rx.try_recv() {
                self.mark(&c);
                out.push(c);
            }
        }
        Ok(())
    }

    fn close(&mut self) {
        let bye = frame::encode(&Notice::CLOSE);
        for l in &mut self.links {
            if !l.down {
                let _ = l.stream.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = l.stream.write_all(&bye);
                let _ = l.stream.shutdown(Shutdown::Write);
                l.down = true;
            }
        }
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

impl TcpTransport {
    fn mark(&mut self, c: &Completion) {
        if let Completion::LinkDown { link, .. }
        | Completion::LinkError { link, .. }
        | Completion::LinkClosed { link } = c
        {
            if let Some(l) = self.links.get_mut(*link) {
                l.down = true;
            }
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Peers hear that we leave in order; then shutting the sockets down
        // wakes every reader with EOF, so the joins below cannot hang.
        self.close();
        for l in &self.links {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
        for l in &mut self.links {
            if let Some(h) = l.reader.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpTransport, TcpTransport, Arc<Region>, RegionKey) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut a = TcpTransport::new(PollPolicy::default(), Duration::from_secs(5));
        let mut b = TcpTransport::new(PollPolicy::default(), Duration::from_secs(5));
        let r = Arc::new(Region::alloc(1 << 20).unwrap());
        let k = b.register(r.clone()).unwrap();
        a.add_link(c, "b").unwrap();
        b.add_link(s, "a").unwrap();
        (a, b, r, k)
    }

    fn wait(t: &mut TcpTransport) -> Completion {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < deadline {
            t.poll(&mut out, Duration::from_millis(100)).unwrap();
        }
        out.remove(0)
    }

    #[test]
    fn write_with_imm_lands() {
        let (mut a, mut b, r, k) = pair();
        let big = vec![0xabu8; 300_000];
        a.write(0, &[b"head", &big], &k, 100, Some(7)).unwrap();
        assert_eq!(wait(&mut b), Completion::Arrival { link: 0, imm: 7 });
        assert_eq!(r.slice(100, 4).unwrap(), b"head");
        assert!(r.slice(104, big.len()).unwrap().iter().all(|&x| x == 0xab));
    }

    #[test]
    fn sender_checks_bounds() {
        let (mut a, _b, _r, k) = pair();
        let e = a.write(0, &[&[0; 16]], &k, k.len - 8, Some(1)).unwrap_err();
        assert!(matches!(e, Error::BufferSize { .. }), "{e}");
    }

    #[test]
    fn receiver_checks_bounds_and_closes() {
        let (mut a, mut b, _r, k) = pair();
        // Lie about the region length to get past the sender's check.
        let lying = RegionKey { len: u64::MAX, ..k };
        a.write(0, &[&[0; 16]], &lying, k.len - 8, Some(1)).unwrap();
        assert!(matches!(wait(&mut b), Completion::LinkError { .. }));
        assert!(matches!(wait(&mut a), Completion::LinkDown { .. }));
    }

    #[test]
    fn peer_drop_is_an_orderly_close() {
        let (a, mut b, _r, _k) = pair();
        drop(a);
        assert_eq!(wait(&mut b), Completion::LinkClosed { link: 0 });
    }

    #[test]
    fn abrupt_peer_end_is_link_down() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut b = TcpTransport::new(PollPolicy::default(), Duration::from_secs(5));
        b.add_link(s, "a").unwrap();
        drop(c);
        assert!(matches!(wait(&mut b), Completion::LinkDown { .. }));
    }
}
