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
