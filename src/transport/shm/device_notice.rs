//! What the cuda backend needs of its inner shm transport to let the GPU
//! announce arrivals itself: a notice written into the peer's ring at post
//! time but published later (by a stream memory operation that stores the
//! entry's sequence word once the copy has landed), the ring's span (to
//! register it with the driver), and the peer's doorbell (the GPU cannot
//! wake a futex; the host rings it once it sees the copy complete).

use super::ShmTransport;
use crate::error::{Error, Result};
use crate::transport::notice::Notice;
use crate::transport::LinkId;

impl ShmTransport {
    fn live_link(&mut self, link: LinkId) -> Result<&mut super::ShmLink> {
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
        Ok(l)
    }

    /// Writes `notice` into link `link`'s ring without publishing it (see
    /// [`super::ring::Ring::reserve`]): `Ok(Some((address, value)))` — the
    /// entry is published when `value` is stored at `address` (in our
    /// mapping of the peer's segment); `Ok(None)`: the ring is full.
    pub(crate) fn reserve_notice(
        &mut self,
        link: LinkId,
        notice: &Notice,
    ) -> Result<Option<(usize, u32)>> {
        let l = self.live_link(link)?;
        Ok(l.out.reserve(&notice.encode()))
    }

    /// Link `link`'s outgoing ring in our mapping of the peer's segment:
    /// (address, length).
    pub(crate) fn out_ring_span(&self, link: LinkId) -> Option<(usize, usize)> {
        self.links.get(link).map(|l| l.out.span())
    }

    /// Wakes link `link`'s peer if it is parked on its doorbell (after
    /// something was published on its ring by other means).
    pub(crate) fn ring_peer(&self, link: LinkId) {
        if let Some(l) = self.links.get(link) {
            if !l.down {
                l.peer.ring_doorbell();
            }
        }
    }

    /// Whether a notice waits on one of our incoming rings.
    pub(crate) fn has_inbound(&self) -> bool {
        self.links.iter().any(|l| !l.down && !l.inbound.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::{ring_bytes, Ring};
    use super::super::sys::Mapping;
    use crate::transport::notice::Notice;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn notice(i: u32) -> Notice {
        Notice {
            region: 0,
            offset: u64::from(i) * 64,
            len: i,
            imm: Some(i),
            close: false,
        }
    }

    /// Stores what the GPU would: the entry's sequence word, by address.
    fn publish(at: usize, value: u32) {
        // SAFETY: `at` is a reserved entry's 4-byte aligned sequence word
        // in the live mapping (what `reserve` returned).
        unsafe { &*(at as *const AtomicU32) }.store(value, Ordering::Release);
    }

    /// A reserved entry stays invisible until its sequence word is stored;
    /// entries are taken in ring order whatever order they are published
    /// in; a reserved entry counts against the room; and reserved and
    /// pushed entries mix on one ring.
    #[test]
    fn reserved_entries_appear_when_published_in_ring_order() {
        let m = Mapping::anonymous(ring_bytes(4)).unwrap();
        // SAFETY: fresh zeroed anonymous mapping of the right size; one
        // producer view and one consumer view.
        let (mut p, c) = unsafe { (Ring::new(m.ptr(), 4), Ring::new(m.ptr(), 4)) };
        let (base, len) = p.span();
        assert_eq!((base, len), (m.ptr() as usize, ring_bytes(4)));
        for lap in 0..3u32 {
            let a = p.reserve(&notice(lap * 10 + 1).encode()).unwrap();
            let b = p.reserve(&notice(lap * 10 + 2).encode()).unwrap();
            assert!(a.0 >= base && a.0 + 4 <= base + len && a.0 % 4 == 0);
            assert!(c.is_empty() && c.pop().is_none(), "nothing published yet");
            // The later entry first: still nothing, the ring is in order.
            publish(b.0, b.1);
            assert_eq!(c.pop(), None);
            publish(a.0, a.1);
            assert_eq!(c.pop(), Some(notice(lap * 10 + 1).encode()));
            assert_eq!(c.pop(), Some(notice(lap * 10 + 2).encode()));
            // A plain push after reservations.
            assert!(p.push(&notice(lap * 10 + 3).encode()));
            assert_eq!(c.pop(), Some(notice(lap * 10 + 3).encode()));
            assert_eq!(c.pop(), None);
        }
        // Full: four reserved, none taken.
        let r: Vec<_> = (0..4)
            .map(|i| p.reserve(&notice(i).encode()).unwrap())
            .collect();
        assert!(p.reserve(&notice(9).encode()).is_none(), "full");
        for (at, v) in r {
            publish(at, v);
        }
        for i in 0..4 {
            assert_eq!(c.pop(), Some(notice(i).encode()));
        }
    }
}
