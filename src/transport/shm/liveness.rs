//! Peer death: how each link watches its peer (a pidfd where the nonce
//! probe showed that the peer's pid names it from here, else the lock on
//! its segment), and the periodic check that turns a dead peer into
//! `LinkDown` after whatever it wrote before dying.

use super::*;

/// How often progress checks that the peers' processes are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(1);

/// How a link sees its peer die.
#[derive(Debug)]
pub(super) enum Watch {
    /// Its pid names it from here (the nonce probe said so): a pidfd.
    Process(sys::PidWatch),
    /// Anything else: the lock it holds on its segment.
    Lock,
}

impl ShmLink {
    fn alive(&self) -> bool {
        match &self.watch {
            Watch::Process(w) => w.alive(),
            Watch::Lock => self.peer.owner_alive(),
        }
    }

    fn death(&self) -> String {
        match &self.watch {
            Watch::Process(_) => format!("{} (process {}) exited", self.label, self.peer.pid()),
            Watch::Lock => format!(
                "{} (process {} of its pid namespace) exited: the lock on its segment was released",
                self.label,
                self.peer.pid()
            ),
        }
    }
}

impl ShmTransport {
    pub(super) fn check_liveness(&mut self, out: &mut Vec<Completion>, force: bool) {
        let now = Instant::now();
        if now < self.next_liveness && !force {
            return;
        }
        self.next_liveness = now + LIVENESS_EVERY;
        if self.links.iter().all(|l| l.down || l.alive()) {
            return;
        }
        // Whatever a dead peer wrote before it died still counts.
        self.drain(out);
        for (link, l) in self.links.iter_mut().enumerate() {
            if !l.down && !l.alive() {
                l.down = true;
                // A peer that died before the mesh formed left its name
                // behind; the survivors remove it.
                let _ = sys::unlink(l.peer.name());
                out.push(Completion::LinkDown {
                    link,
                    reason: l.death(),
                });
            }
        }
    }
}

/// How to see `peer` die: by pidfd if its pid names it from here, which
/// the nonce probe tells (the pidfd is opened first, so the process it
/// holds is the one the probe then reads); else by its segment's lock.
pub(super) fn watch(ep: &PeerEndpoint, peer: &Segment) -> Watch {
    let w = sys::PidWatch::new(ep.pid);
    match cma::read_u64(ep.pid, ep.nonce_addr) {
        Ok(v) if v == peer.nonce() && w.alive() => Watch::Process(w),
        _ => Watch::Lock,
    }
}
