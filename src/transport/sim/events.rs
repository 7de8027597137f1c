//! The network's event queue in virtual time: a write's landing and its
//! `Sent` scheduled with the link's faults, delivered in order (bytes read
//! from the sender when the write leaves), and links killed.

use super::*;

/// The bytes of a write: still in the sender's memory, or read out.
#[derive(Debug)]
pub(super) enum Data {
    Source(Vec<(Arc<Region>, u64, u64)>),
    Bytes(Arc<Vec<u8>>),
}

impl Data {
    pub(super) fn read(&mut self) -> Arc<Vec<u8>> {
        if let Data::Source(parts) = self {
            let total: u64 = parts.iter().map(|p| p.2).sum();
            let mut bytes = vec![0u8; total as usize];
            let mut at = 0usize;
            for (r, off, len) in parts.iter() {
                let len = *len as usize;
                // Bounds were checked when the write was posted.
                let _ = r.copy_out(*off as usize, &mut bytes[at..at + len]);
                at += len;
            }
            *self = Data::Bytes(Arc::new(bytes));
        }
        match self {
            Data::Bytes(b) => b.clone(),
            Data::Source(_) => Arc::new(Vec::new()),
        }
    }
}

#[derive(Debug)]
pub(super) enum Event {
    Land {
        to_ep: usize,
        to_link: LinkId,
        region: u32,
        offset: u64,
        data: Data,
        imm: Option<u32>,
        /// Land with the last byte's low bit flipped.
        corrupt: bool,
    },
    Sent {
        ep: usize,
        link: LinkId,
        token: u64,
        /// The landing events of this write still pending, to read out.
        writes: Vec<(u64, u64)>,
    },
}

impl Net {
    pub(super) fn rand(&mut self) -> u64 {
        // xorshift64*: small, fast, deterministic.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn schedule(&mut self, at: u64, ev: Event) -> (u64, u64) {
        self.order += 1;
        self.pending.insert((at, self.order), ev);
        (at, self.order)
    }

    pub(super) fn deliver(&mut self, ev: Event) {
        match ev {
            Event::Sent {
                ep,
                link,
                token,
                writes,
            } => {
                for k in writes {
                    if let Some(Event::Land { data, .. }) = self.pending.get_mut(&k) {
                        data.read();
                    }
                }
                let e = &mut self.endpoints[ep];
                e.links[link].in_flight = e.links[link].in_flight.saturating_sub(1);
                if !e.links[link].down {
                    self.stats.sent += 1;
                    e.inbox.push_back(Completion::Sent { token });
                }
            }
            Event::Land {
                to_ep,
                to_link,
                region,
                offset,
                mut data,
                imm,
                corrupt,
            } => {
                if self.endpoints[to_ep].links[to_link].down {
                    // Not read: the sender may have reused its memory.
                    self.stats.dropped += 1;
                    return;
                }
                let mut bytes = data.read();
                if corrupt {
                    if let Some(b) = Arc::make_mut(&mut bytes).last_mut() {
                        *b ^= 1;
                        self.stats.corrupted += 1;
                    }
                }
                let ep = &mut self.endpoints[to_ep];
                let result = match ep.regions.get(region as usize) {
                    Some(r) if ep.access.get(region as usize) == Some(&Access::RemoteWrite) => {
                        r.write_gather(offset, &[&bytes])
                    }
                    _ => Err(format!(
                        "write to region {region}, which peers may not write"
                    )),
                };
                match result {
                    Ok(()) => {
                        self.stats.delivered += 1;
                        if let Some(imm) = imm {
                            ep.inbox.push_back(Completion::Arrival {
                                link: to_link,
                                imm,
                                len: bytes.len() as u32,
                            });
                        }
                    }
                    Err(reason) => {
                        ep.inbox.push_back(Completion::LinkError {
                            link: to_link,
                            reason,
                        });
                        self.kill(to_ep, to_link, "peer wrote out of bounds");
                    }
                }
            }
        }
    }

    pub(super) fn kill(&mut self, ep: usize, link: LinkId, reason: &str) {
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
        let ends = [(ep, link), (peer_ep, peer_link)];
        self.pending.retain(|_, ev| match ev {
            Event::Land { to_ep, to_link, .. } => !ends.contains(&(*to_ep, *to_link)),
            Event::Sent { ep, link, .. } => !ends.contains(&(*ep, *link)),
        });
        self.stats.dropped += (before - self.pending.len()) as u64;
    }

    pub(super) fn step(&mut self) -> bool {
        let Some((&key, _)) = self.pending.iter().next() else {
            return false;
        };
        if let Some(ev) = self.pending.remove(&key) {
            self.now = self.now.max(key.0);
            self.deliver(ev);
        }
        true
    }

    pub(super) fn link_pair(&mut self, a: usize, b: usize) -> (LinkId, LinkId) {
        if let Some(&la) = self.endpoints[a].by_peer.get(&b) {
            return (la, self.endpoints[a].links[la].peer_link);
        }
        let la = self.endpoints[a].links.len();
        let lb = self.endpoints[b].links.len() + usize::from(a == b);
        self.endpoints[a].links.push(LinkEnd {
            peer_ep: b,
            peer_link: lb,
            faults: Faults::default(),
            down: false,
            in_flight: 0,
            last_land: 0,
        });
        self.endpoints[b].links.push(LinkEnd {
            peer_ep: a,
            peer_link: la,
            faults: Faults::default(),
            down: false,
            in_flight: 0,
            last_land: 0,
        });
        self.endpoints[a].by_peer.insert(b, la);
        self.endpoints[b].by_peer.insert(a, lb);
        (la, lb)
    }
}
