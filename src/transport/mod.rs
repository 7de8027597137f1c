//! Transports: one contract, several backends.
//!
//! Every backend offers RDMA's one-sided model, the software ones by
//! emulating it:
//!
//! * [`Transport::register`] makes a local [`Region`] writable by peers and
//!   returns the [`RegionKey`] that peers target. All regions are registered
//!   before the first link comes up; registration is never on the
//!   per-message path.
//! * [`Transport::write`] copies the concatenation of a gather list into a
//!   peer's region at an offset. With an imm, the peer's [`Transport::poll`]
//!   later yields exactly one [`Completion::Arrival`] carrying it, after all
//!   bytes of that write are visible. `write` returns when the source
//!   buffers may be reused.
//! * Delivery may be unordered between writes. Callers count arrivals; they
//!   never rely on order.
//! * The receiver checks every offset and length against the target region
//!   before a byte lands. A bad write is an error on that link
//!   ([`Completion::LinkError`]), never memory corruption.
//! * A link whose peer is gone yields one [`Completion::LinkDown`] (or
//!   [`Completion::LinkClosed`] when the peer called [`Transport::close`]);
//!   writes on it then fail.
//!
//! Backends: [`sim`] (in-process, deterministic, with fault injection),
//! [`tcp`], [`shm`] (same host), and [`mux`], which gives one rank shm
//! links to same-host peers and tcp links to the rest. Verbs comes later.

pub mod mux;
pub mod poll;
pub mod shm;
pub mod sim;
pub mod slots;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

pub use crate::proto::RegionKey;
pub use poll::PollPolicy;
pub use shm::Region;

use crate::error::Result;

/// The sender-side check every backend makes before a write: the target
/// range lies inside the peer's registered region (the receiver checks
/// again; this one reports a local mistake as what it is).
pub(crate) fn check_remote(remote: &RegionKey, offset: u64, total: u64, peer: &str) -> Result<()> {
    if offset.checked_add(total).is_none_or(|end| end > remote.len) {
        return Err(crate::error::Error::BufferSize {
            what: format!("remote region {} of {peer} at offset {offset}", remote.id),
            need: offset.saturating_add(total) as usize,
            got: remote.len as usize,
        });
    }
    Ok(())
}

/// Index of a link within one transport.
pub type LinkId = usize;

/// Something `poll` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// A peer's write with an imm landed; its bytes are visible.
    Arrival {
        /// Link it came on.
        link: LinkId,
        /// The immediate value.
        imm: u32,
    },
    /// The link is down (peer exited, connection reset, killed).
    LinkDown {
        /// Which link.
        link: LinkId,
        /// What the backend saw.
        reason: String,
    },
    /// The peer closed the link in order (it is shutting down).
    LinkClosed {
        /// Which link.
        link: LinkId,
    },
    /// The peer broke the contract (bad frame, out-of-bounds write); the
    /// link is closed.
    LinkError {
        /// Which link.
        link: LinkId,
        /// What was wrong.
        reason: String,
    },
}

/// The transport contract (see the module docs).
pub trait Transport {
    /// Makes `region` writable by peers.
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey>;
    /// One-sided write of `src` (concatenated) to `remote` at `offset`.
    fn write(
        &mut self,
        link: LinkId,
        src: &[&[u8]],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<()>;
    /// Appends what has happened to `out`, waiting up to `timeout` for the
    /// first event (zero: do not wait).
    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()>;
    /// Tells every peer that this end is leaving in order, and stops
    /// writing. Best effort and bounded: a dead peer is skipped.
    fn close(&mut self);
    /// Number of links.
    fn links(&self) -> usize;
    /// Short name for logs (`"tcp"`, `"sim"`).
    fn name(&self) -> &'static str;
    /// Whether a write on `link` is a copy made by this process (shm, sim)
    /// rather than bytes handed to the kernel or a NIC (tcp, verbs).
    fn copies(&self, _link: LinkId) -> bool {
        false
    }
}

/// The backends, enum-dispatched so the hot path has no virtual calls and
/// the API types need no type parameter.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyTransport {
    /// In-process simulation.
    Sim(sim::SimTransport),
    /// TCP sockets.
    Tcp(tcp::TcpTransport),
    /// Shared memory.
    Shm(shm::ShmTransport),
    /// Shared memory to same-host peers, tcp to the rest. Boxed: it holds
    /// both backends, and ranks hold exactly one transport.
    Mux(Box<mux::MuxTransport>),
}

macro_rules! each {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTransport::Sim($t) => $e,
            AnyTransport::Tcp($t) => $e,
            AnyTransport::Shm($t) => $e,
            AnyTransport::Mux($t) => $e,
        }
    };
}

impl Transport for AnyTransport {
    fn register(&mut self, region: Arc<Region>) -> Result<RegionKey> {
        each!(self, t => t.register(region))
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
        each!(self, t => t.write(link, src, remote, offset, imm))
    }
    #[inline]
    fn poll(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<()> {
        each!(self, t => t.poll(out, timeout))
    }
    fn close(&mut self) {
        each!(self, t => t.close())
    }
    fn links(&self) -> usize {
        each!(self, t => t.links())
    }
    fn name(&self) -> &'static str {
        each!(self, t => t.name())
    }
    fn copies(&self, link: LinkId) -> bool {
        each!(self, t => t.copies(link))
    }
}

impl From<sim::SimTransport> for AnyTransport {
    fn from(t: sim::SimTransport) -> Self {
        AnyTransport::Sim(t)
    }
}

impl From<tcp::TcpTransport> for AnyTransport {
    fn from(t: tcp::TcpTransport) -> Self {
        AnyTransport::Tcp(t)
    }
}
