//! One rank's links over several backends: shared memory to peers on the
//! same host, tcp to the rest. Link ids are the mux's own, in the order
//! links were added. A wait parks on the shared-memory doorbell, which the
//! tcp reader threads ring too, so one wait covers every link.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::shm::ShmTransport;
use super::tcp::TcpTransport;
use super::{Completion, LinkId, Region, RegionKey, Transport};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
enum Route {
    Tcp(LinkId),
    Shm(LinkId),
}

/// tcp plus (optionally) shm.
#[derive(Debug)]
pub struct MuxTransport {
    tcp: TcpTransport,
    shm: Option<ShmTransport>,
    routes: Vec<Route>,
    from_tcp: Vec<LinkId>,
    from_shm: Vec<LinkId>,
    tmp: Vec<Completion>,
}

impl MuxTransport {
    /// Combines the backends; tcp traffic will ring the shm doorbell.
    pub fn new(mut tcp: TcpTransport, shm: Option<ShmTransport>) -> MuxTransport {
        if let Some(s) = &shm {
            tcp.set_doorbell(s.doorbell());
        }
        MuxTransport {
            tcp,
            shm,
            routes: Vec::new(),
            from_tcp: Vec::new(),
            from_shm: Vec::new(),
            tmp: Vec::with_capacity(64),
        }
    }

    /// The shm backend, if any.
    pub fn shm(&self) -> Option<&ShmTransport> {
        self.shm.as_ref()
    }

    /// Adds a tcp link.
    pub fn add_tcp(&mut self, stream: TcpStream, label: impl Into<String>) -> Result<LinkId> {
        let id = self.tcp.add_link(stream, label)?;
        self.from_tcp.push(self.routes.len());
        debug_assert_eq!(id + 1, self.from_tcp.len());
        self.routes.push(Route::Tcp(id));
        Ok(self.routes.len() - 1)
    }

    /// Adds a shared-memory link to the peer segment `name`.
    pub fn add_shm(
        &mut self,
        name: &str,
        my_index: u32,
        peer_index: u32,
        label: impl Into<String>,
    ) -> Result<LinkId> {
        let shm = self
            .shm
            .as_mut()
            .ok_or_else(|| Error::config("no shared-memory segment on this rank"))?;
        let id = shm.add_link(name, my_index, peer_index, label)?;
        self.from_shm.push(self.routes.len());
        debug_assert_eq!(id + 1, self.from_shm.len());
        self.routes.push(Route::Shm(id));
        Ok(self.routes.len() - 1)
    }

    /// Removes the shm segment's name once every peer has mapped it.
    pub fn unlink_shm(&self) {
        if let Some(s) = &self.shm {
            s.unlink();
        }
    }

    fn remap(map: &[LinkId], c: Completion) -> Completion {
        let m = |l: LinkId| map.get(l).copied().unwrap_or(usize::MAX);
        match c {
            Completion::Arrival { link, imm } => Completion::Arrival { link: m(link), imm },
            Completion::LinkDown { link, reason } => Completion::LinkDown {
                link: m(link),
                reason,
            },
            Completion::LinkClosed { link } => Completion::LinkClosed { link: m(link) },
            Completion::LinkError { link, reason } => Completion::LinkError {
                link: m(link),
                reason,
            },
        }
    }

    fn poll_tcp(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        self.tmp.clear();
        self.tcp.poll(&mut self.tmp, timeout)?;
        out.extend(self.tmp.drain(..).map(|c| Self::remap(&self.from_tcp, c)));
        Ok(())
    }

    fn poll_shm(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        if let Some(s) = &mut self.shm {
            self.tmp.clear();
            s.poll(&mut self.tmp, timeout)?;
            out.extend(self.tmp.drain(..).map(|c| Self::remap(&self.from_shm, c)));
        }
        Ok(())
    }
}

impl Transport for MuxTransport {
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey> {
        if let Some(s) = &mut self.shm {
            s.register(region.clone())?;
        }
        self.tcp.register(region)
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
        match self.routes.get(link) {
            Some(Route::Shm(l)) => match &mut self.shm {
                Some(s) => s.write(*l, src, remote, offset, imm),
                None => Err(Error::config("shm route without shm backend")),
            },
            Some(Route::Tcp(l)) => self.tcp.write(*l, src, remote, offset, imm),
            None => Err(Error::config(format!("no link {link}"))),
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        let tcp = !self.from_tcp.is_empty();
        let shm = !self.from_shm.is_empty();
        match (tcp, shm) {
            (true, false) => self.poll_tcp(out, timeout),
            (false, true) => self.poll_shm(out, timeout),
            (false, false) => {
                if !timeout.is_zero() {
                    std::thread::sleep(timeout.min(Duration::from_millis(1)));
                }
                Ok(())
            }
            (true, true) => {
                let start = out.len();
                self.poll_tcp(out, Duration::ZERO)?;
                let wait = if out.len() > start {
                    Duration::ZERO
                } else {
                    timeout
                };
                self.poll_shm(out, wait)?;
                self.poll_tcp(out, Duration::ZERO)
            }
        }
    }

    fn close(&mut self) {
        self.tcp.close();
        if let Some(s) = &mut self.shm {
            s.close();
        }
    }

    fn links(&self) -> usize {
        self.routes.len()
    }

    fn copies(&self, link: LinkId) -> bool {
        matches!(self.routes.get(link), Some(Route::Shm(_)))
    }

    fn name(&self) -> &'static str {
        match (self.from_tcp.is_empty(), self.from_shm.is_empty()) {
            (false, true) => "tcp",
            (true, false) => "shm",
            (false, false) => "tcp+shm",
            (true, true) => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::PollPolicy;
    use std::net::TcpListener;
    use std::time::Instant;

    /// A rank with one shm link and one tcp link, parked in `poll`, must
    /// wake for tcp traffic (regression: it slept until its deadline).
    #[test]
    fn parked_on_shm_wakes_for_tcp() {
        let t = Duration::from_secs(2);
        for policy in [
            PollPolicy::Block,
            PollPolicy::default(),
            PollPolicy::SpinThenPark {
                spin: Duration::from_millis(2),
                yield_cpu: true,
            },
        ] {
            let mut me = MuxTransport::new(
                TcpTransport::new(policy, t),
                Some(ShmTransport::create("mux-unit", 1, 4096, policy, t).unwrap()),
            );
            let region = me.shm().unwrap().region().unwrap();
            let key = me.register(region).unwrap();
            let mut shm_peer = ShmTransport::create("mux-unit", 1, 4096, policy, t).unwrap();
            let my_name = me.shm().unwrap().segment_name().to_string();
            shm_peer.add_link(&my_name, 0, 0, "me").unwrap();
            let peer_name = shm_peer.segment_name().to_string();
            me.add_shm(&peer_name, 0, 0, "shm peer").unwrap();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            me.add_tcp(s, "tcp peer").unwrap();
            let mut tcp_peer = TcpTransport::new(policy, t);
            tcp_peer.add_link(c, "me").unwrap();
            for round in 0..20u32 {
                let waiter = std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let start = Instant::now();
                    while out.is_empty() && start.elapsed() < Duration::from_secs(2) {
                        me.poll(&mut out, Duration::from_secs(2)).unwrap();
                    }
                    (me, out, start.elapsed())
                });
                // Vary the moment the tcp write lands: before, during and
                // after the waiter starts parking.
                std::thread::sleep(Duration::from_micros(u64::from(round % 5) * 700));
                tcp_peer.write(0, &[b"x"], &key, 0, Some(round)).unwrap();
                let (back, out, took) = waiter.join().unwrap();
                me = back;
                assert_eq!(
                    out,
                    vec![Completion::Arrival {
                        link: 1,
                        imm: round
                    }],
                    "{policy:?} round {round}"
                );
                assert!(
                    took < Duration::from_millis(500),
                    "{policy:?} round {round}: woke after {took:?}"
                );
            }
        }
    }
}
