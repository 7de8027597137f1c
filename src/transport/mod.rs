//! Transports: one contract, several backends.
//!
//! Every backend offers RDMA's one-sided model, the software ones by
//! emulating it. The contract, which the engine relies on and nothing more:
//!
//! * **Memory.** [`Transport::register`] makes a [`Region`] (host memory now;
//!   a [`MemoryKind::Cuda`] region later, without a change here) usable by
//!   the backend and returns a [`Registration`]: a [`LocalKey`] for this
//!   rank's posted writes and a [`RegionKey`] that peers target. Registration
//!   happens at setup only, before [`Transport::endpoint`]; caller-owned
//!   host memory registers exactly like library-allocated memory.
//! * **Posted writes.** [`Transport::post_write`] takes local slices of
//!   registered memory, a peer's region key and offset, an optional imm and a
//!   caller token, and returns at once. Later this end's progress reports
//!   [`Completion::Sent`] with the token (the local bytes may be reused) and
//!   the target reports [`Completion::Arrival`] with the imm after every byte
//!   of the write is visible there. `Sent` and the peer's `Arrival` are not
//!   ordered with respect to each other. Each link has a send window
//!   ([`Caps::window`] writes posted and not yet `Sent`); a post into a full
//!   window fails at once with [`Error::Backpressure`], which is never a
//!   drop: nothing was posted, the caller makes progress and posts again.
//! * **One message, one write.** The engine puts each message's header in
//!   registered memory right before its payload and posts the whole thing as
//!   one write; backends never build or split messages. (The matrix stage
//!   layout is the one exception: a dispatch is its rows, with no imm, then
//!   its header and side block with the imm, on one link whose backend is
//!   [`Caps::ordered`].)
//! * **Unordered delivery.** Writes may land in any order unless
//!   [`Caps::ordered`] says otherwise; the engine counts arrivals.
//! * **Bounds.** Every write is checked against the target region before a
//!   byte lands (software backends check at both ends; a NIC checks the
//!   rkey). A bad write is [`Completion::LinkError`], never corruption.
//! * **Bring-up.** Each backend publishes an opaque endpoint blob (addresses,
//!   queue-pair numbers, shared-memory names, remote keys, whatever it needs)
//!   that travels through the rendezvous unread; a peer's backend decides
//!   from it whether it can reach this rank ([`Transport::reaches`]) and
//!   brings up links from it ([`Transport::connect`]).
//! * **Waiting.** A backend never blocks in [`Transport::progress`]. It
//!   exposes how a rank can sleep until it has something ([`Wake`]): a
//!   shared-memory doorbell, file descriptors, or its own park. The one
//!   spin-then-park loop, under `AFMESH_POLL`, is [`mux::Mux::poll`]; it
//!   calls [`Transport::arm`] right before it parks, for wake sources that
//!   must be armed (a completion channel).
//! * **Links end** with one [`Completion::LinkDown`] (peer gone) or
//!   [`Completion::LinkClosed`] (peer left in order); posts on them fail.
//!
//! Backends: [`sim`] (in-process, deterministic, with fault injection),
//! [`tcp`], [`shm`] (same host), [`verbs`] (RDMA), [`cuda`] (device memory, same host). [`mux`] gives a rank one link per peer,
//! each on the first backend of the preference list that reaches it.

mod counters;
pub mod cuda;
pub mod mux;
pub mod notice;
pub mod poll;
mod region;
pub mod shm;
pub mod sim;
pub mod slots;
pub mod tcp;
pub mod verbs;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub use crate::proto::RegionKey;
pub use counters::{WireCounters, MAX_RAILS};
pub use mux::Mux;
pub use poll::{Gaps, PollPolicy};
pub use region::{HugePages, Region, REGION_ALIGN};

use crate::error::{Error, Result};

/// Index of a link within one backend (or within the mux).
pub type LinkId = usize;

/// What memory a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Ordinary host memory.
    Host,
    /// Memory of CUDA device `device`.
    Cuda {
        /// Device ordinal.
        device: i32,
    },
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryKind::Host => f.write_str("host memory"),
            MemoryKind::Cuda { device } => write!(f, "CUDA device {device} memory"),
        }
    }
}

/// Who may use a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Only this rank, as the source of its posted writes: not published,
    /// and a peer's write naming it is a protocol error.
    Local,
    /// Also peers, as the target of their writes (a receive region).
    RemoteWrite,
}

/// A registered region as this rank names it in its own posted writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalKey(pub u32);

/// What registering a region gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    /// For this rank's posted writes from the region.
    pub local: LocalKey,
    /// What peers target (also carried in the endpoint blob).
    pub remote: RegionKey,
}

/// `len` bytes at `offset` of a registered local region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSlice {
    /// The region.
    pub key: LocalKey,
    /// Offset in the region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// It moves host memory.
    pub host: bool,
    /// It moves CUDA device memory.
    pub cuda: bool,
    /// Writes on one link land in the order they were posted.
    pub ordered: bool,
    /// Largest single write, bytes.
    pub max_message: u64,
    /// Writes posted and not yet `Sent`, per link.
    pub window: usize,
    /// The library itself copies the payload (shm, sim) rather than a
    /// kernel or NIC moving it (tcp, verbs).
    pub copies: bool,
    /// Each write's header also lands in the target region's host mirror
    /// (cuda): the target reads headers there instead of from the device.
    /// Writers without it (verbs into device memory) are read on the device.
    pub header_mirror: bool,
}

impl Caps {
    /// Whether regions of `kind` can be registered.
    pub fn moves(&self, kind: MemoryKind) -> bool {
        match kind {
            MemoryKind::Host => self.host,
            MemoryKind::Cuda { .. } => self.cuda,
        }
    }
}

/// Something `progress` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// A peer's write with an imm landed; its bytes are visible.
    Arrival {
        /// Link it came on.
        link: LinkId,
        /// The immediate value.
        imm: u32,
        /// Bytes the write carried (the receiver checks them against the
        /// message's header).
        len: u32,
    },
    /// A posted write left: its local memory may be reused.
    Sent {
        /// The caller's token.
        token: u64,
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

/// How a rank can sleep until a backend has something for it.
#[derive(Debug, Clone)]
pub enum Wake {
    /// Nothing to wait for (no links).
    Nothing,
    /// A shared-memory doorbell that producers ring (and that other
    /// backends' watchers may ring too).
    Doorbell(shm::Doorbell),
    /// File descriptors (sockets, completion channels): all to be watched
    /// for reading, those in `write` also for writing.
    Fds {
        /// Watched for readability.
        read: Vec<RawFd>,
        /// Also watched for writability (a send queue is waiting).
        write: Vec<RawFd>,
    },
    /// Only the backend knows: call [`Transport::park`].
    Own,
}

/// One peer to bring a link up with.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// For logs and errors (`"F1"`).
    pub label: String,
    /// The peer's endpoint blob for this backend.
    pub blob: Vec<u8>,
    /// This end starts the connection (attention ranks do).
    pub initiator: bool,
    /// The peer's rank within its role.
    pub peer_rank: u32,
    /// This rank within its role.
    pub my_rank: u32,
    /// Mesh incarnation: a link of another epoch is refused.
    pub epoch: u64,
}

/// A link that came up.
#[derive(Debug, Clone)]
pub struct Connected {
    /// Its id in the backend.
    pub link: LinkId,
    /// The peer's regions, in its registration order.
    pub remote: Vec<RegionKey>,
}

/// The transport contract (see the module docs).
pub trait Transport {
    /// Short name for logs (`"tcp"`, `"shm"`).
    fn name(&self) -> &'static str;
    /// What the backend can do.
    fn caps(&self) -> Caps;
    /// Makes `region` usable as the source of posted writes and, with
    /// [`Access::RemoteWrite`], as the target of peers' writes.
    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration>;
    /// A receive region the backend offers to host (shm: its segment's, so
    /// peers reach it by mapping), sized by [`Setup::recv_len`].
    fn receive_region(&self) -> Option<Arc<Region>> {
        None
    }
    /// This rank's endpoint blob (after every registration).
    fn endpoint(&self) -> Vec<u8>;
    /// Whether this backend can link to the peer that published `blob`;
    /// the reason when not.
    fn reaches(&self, blob: &[u8]) -> std::result::Result<(), String>;
    /// Brings up links to `peers`, all at once (an accepting backend waits
    /// for all of them), within `timeout`.
    fn connect(&mut self, peers: &[PeerSpec], timeout: Duration) -> Result<Vec<Connected>>;
    /// Posts one write of the concatenated `src` to `remote` at `offset`.
    fn post_write(
        &mut self,
        link: LinkId,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()>;
    /// Posts one write like [`Transport::post_write`] whose first `head`
    /// bytes (the message's header and side block) land only in the
    /// target region's host mirror, taken from the source's pinned host
    /// shadow; the rest of `src` lands in the target's memory at
    /// `offset + head`. The arrival announces the whole length. Only
    /// backends with [`Caps::header_mirror`]; the others refuse it.
    #[allow(clippy::too_many_arguments)]
    fn post_write_mirrored(
        &mut self,
        link: LinkId,
        head: u64,
        src: &[LocalSlice],
        remote: &RegionKey,
        offset: u64,
        imm: Option<u32>,
        token: u64,
    ) -> Result<()> {
        let _ = (link, head, src, remote, offset, imm, token);
        Err(Error::Unsupported(format!(
            "{}: no host header mirror to post into",
            self.name()
        )))
    }
    /// A hint: a write of about `len` bytes to `remote` at `offset` on
    /// `link` follows soon, and the peer no longer reads those bytes. A
    /// backend whose CPU stores land in the peer's memory (shm) asks for
    /// the lines for writing now, so that the write's stores need not wait
    /// for them; what anyone reads is unchanged. Others ignore it.
    fn prepare_write(&mut self, link: LinkId, remote: &RegionKey, offset: u64, len: u64) {
        let _ = (link, remote, offset, len);
    }
    /// Appends what has happened to `out`; never blocks.
    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()>;
    /// How to sleep until there is progress to make.
    fn wake(&self) -> Wake;
    /// Called right before the rank sleeps on [`Transport::wake`]: a
    /// backend whose wake source must be armed first (a completion
    /// channel) arms it here, not on every progress, and reports what
    /// came in the meantime (the rank then does not sleep).
    fn arm(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let _ = out;
        Ok(())
    }
    /// Sleeps up to `timeout` (only called when [`Transport::wake`] is
    /// [`Wake::Own`]).
    fn park(&mut self, timeout: Duration) {
        let _ = timeout;
    }
    /// Tells every peer that this end is leaving in order, and stops
    /// writing. Best effort and bounded: a dead peer is skipped.
    fn close(&mut self);
    /// Gives link `link` up: writes posted on it and not yet moved are
    /// forgotten, and no posted write's source is read after this returns
    /// (so the engine may reuse it). The peer sees the link end.
    fn abort(&mut self, link: LinkId);
    /// Number of links.
    fn links(&self) -> usize;
    /// What the post path did so far (backends that count).
    fn counters(&self) -> WireCounters {
        WireCounters::default()
    }
    /// Whether a progress pass that finds nothing costs about the same
    /// each time (it reads memory; no system or driver call, no bytes
    /// moved), so that a slow stretch of such passes is time the thread
    /// did not run ([`Gaps`](poll::Gaps)). Backends that say no (tcp reads
    /// sockets on the waiting thread) are not measured.
    fn flat_polls(&self) -> bool {
        false
    }
}

/// What a rank opens its backends with (each takes what it needs).
#[derive(Debug, Clone)]
pub struct Setup<'a> {
    /// Job name (shared-memory names, sanity checks).
    pub job: &'a str,
    /// This host's identity.
    pub host_id: &'a str,
    /// Peers of the other role (one incoming ring each, for shm).
    pub peers: u32,
    /// Bytes of the receive region the backend may host (0: the receive
    /// region is caller memory).
    pub recv_len: usize,
    /// The address this rank reaches the rendezvous from (where to listen).
    pub ip: std::net::IpAddr,
    /// Bound on a peer leaving our writes unread.
    pub io_timeout: Duration,
    /// Bound on a silent, unreachable link before its peer is lost.
    pub liveness: Duration,
    /// Token and setup watch for connection handshakes.
    pub guard: crate::bootstrap::LinkGuard,
}

/// Opening a backend for a rank.
pub trait Open: Sized {
    /// Opens the backend, or says why it cannot run here.
    fn open(setup: &Setup<'_>) -> Result<Self>;
}

/// Matches every variant of [`Backend`] with the same body.
macro_rules! dispatch {
    ($self:ident, [$($v:ident),*], $t:ident => $e:expr) => {
        match $self {
            $(Backend::$v($t) => $e,)*
        }
    };
}

/// Declares the backends once: the [`Backend`] enum (enum dispatch, so the
/// hot path has no virtual calls), the preference order of auto selection
/// ([`BACKENDS`]), and how each is opened. Adding a backend is a module
/// that meets [`Transport`] and [`Open`], plus one line here.
macro_rules! backends {
    ($($name:literal => $variant:ident($ty:ty): $doc:literal,)*) => {
        /// The backends.
        #[derive(Debug)]
        #[non_exhaustive]
        pub enum Backend {
            /// In-process simulation (tests; built by `sim_mesh`, never
            /// chosen by a rank).
            Sim(sim::SimTransport),
            $(#[doc = $doc] $variant($ty),)*
        }

        /// Backend names in the order auto selection prefers them.
        pub const BACKENDS: &[&str] = &[$($name),*];

        impl Backend {
            /// Opens backend `name` for a rank; `None` if there is no such
            /// backend.
            pub fn open(name: &str, setup: &Setup<'_>) -> Option<Result<Backend>> {
                match name {
                    $($name => Some(<$ty as Open>::open(setup).map(Backend::$variant)),)*
                    _ => None,
                }
            }
        }

        impl Transport for Backend {
            fn name(&self) -> &'static str {
                dispatch!(self, [Sim $(, $variant)*], t => t.name())
            }
            fn caps(&self) -> Caps {
                dispatch!(self, [Sim $(, $variant)*], t => t.caps())
            }
            fn flat_polls(&self) -> bool {
                dispatch!(self, [Sim $(, $variant)*], t => t.flat_polls())
            }
            fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
                dispatch!(self, [Sim $(, $variant)*], t => t.register(region, access))
            }
            fn receive_region(&self) -> Option<Arc<Region>> {
                dispatch!(self, [Sim $(, $variant)*], t => t.receive_region())
            }
            fn endpoint(&self) -> Vec<u8> {
                dispatch!(self, [Sim $(, $variant)*], t => t.endpoint())
            }
            fn reaches(&self, blob: &[u8]) -> std::result::Result<(), String> {
                dispatch!(self, [Sim $(, $variant)*], t => t.reaches(blob))
            }
            fn connect(&mut self, peers: &[PeerSpec], timeout: Duration) -> Result<Vec<Connected>> {
                dispatch!(self, [Sim $(, $variant)*], t => t.connect(peers, timeout))
            }
            #[inline]
            fn post_write(
                &mut self,
                link: LinkId,
                src: &[LocalSlice],
                remote: &RegionKey,
                offset: u64,
                imm: Option<u32>,
                token: u64,
            ) -> Result<()> {
                dispatch!(self, [Sim $(, $variant)*], t => t.post_write(link, src, remote, offset, imm, token))
            }
            #[inline]
            fn post_write_mirrored(
                &mut self,
                link: LinkId,
                head: u64,
                src: &[LocalSlice],
                remote: &RegionKey,
                offset: u64,
                imm: Option<u32>,
                token: u64,
            ) -> Result<()> {
                dispatch!(self, [Sim $(, $variant)*], t => t.post_write_mirrored(link, head, src, remote, offset, imm, token))
            }
            #[inline]
            fn prepare_write(&mut self, link: LinkId, remote: &RegionKey, offset: u64, len: u64) {
                dispatch!(self, [Sim $(, $variant)*], t => t.prepare_write(link, remote, offset, len))
            }
            #[inline]
            fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
                dispatch!(self, [Sim $(, $variant)*], t => t.progress(out))
            }
            fn wake(&self) -> Wake {
                dispatch!(self, [Sim $(, $variant)*], t => t.wake())
            }
            fn arm(&mut self, out: &mut Vec<Completion>) -> Result<()> {
                dispatch!(self, [Sim $(, $variant)*], t => t.arm(out))
            }
            fn park(&mut self, timeout: Duration) {
                dispatch!(self, [Sim $(, $variant)*], t => t.park(timeout))
            }
            fn close(&mut self) {
                dispatch!(self, [Sim $(, $variant)*], t => t.close())
            }
            fn abort(&mut self, link: LinkId) {
                dispatch!(self, [Sim $(, $variant)*], t => t.abort(link))
            }
            fn links(&self) -> usize {
                dispatch!(self, [Sim $(, $variant)*], t => t.links())
            }
            fn counters(&self) -> WireCounters {
                dispatch!(self, [Sim $(, $variant)*], t => t.counters())
            }
        }
    };
}

backends! {
    "cuda" => Cuda(cuda::CudaTransport): "CUDA copy engines, between device memories of one host.",
    "verbs" => Verbs(verbs::VerbsTransport): "RDMA verbs (RoCE, InfiniBand), libibverbs loaded at run time.",
    "shm" => Shm(shm::ShmTransport): "Shared memory, between ranks of one host.",
    "tcp" => Tcp(tcp::TcpTransport): "TCP sockets, anywhere.",
}

/// Local registered memory, as every backend keeps it: regions by
/// [`LocalKey`], and the checks a posted write's source passes.
#[derive(Debug, Default)]
pub(crate) struct LocalRegions {
    regions: Vec<Arc<Region>>,
    access: Vec<Access>,
}

impl LocalRegions {
    pub(crate) fn add(&mut self, region: &Arc<Region>, access: Access) -> LocalKey {
        self.regions.push(region.clone());
        self.access.push(access);
        LocalKey((self.regions.len() - 1) as u32)
    }

    /// Adds `region`; its id is both keys' (what software backends use).
    pub(crate) fn register(&mut self, region: &Arc<Region>, access: Access) -> Registration {
        let local = self.add(region, access);
        Registration {
            local,
            remote: RegionKey {
                id: local.0,
                rkey: 0,
                addr: 0,
                len: region.len() as u64,
            },
        }
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Arc<Region>> {
        self.regions.get(id as usize)
    }

    /// Region `id` if peers may write it.
    pub(crate) fn target(&self, id: u32) -> Option<&Arc<Region>> {
        match self.access.get(id as usize) {
            Some(Access::RemoteWrite) => self.regions.get(id as usize),
            _ => None,
        }
    }

    /// The regions peers may write, with their ids.
    pub(crate) fn targets(&self) -> impl Iterator<Item = (u32, &Arc<Region>)> {
        self.regions
            .iter()
            .zip(&self.access)
            .enumerate()
            .filter(|(_, (_, a))| **a == Access::RemoteWrite)
            .map(|(i, (r, _))| (i as u32, r))
    }

    /// Resolves a slice to its region, checking that it lies inside.
    pub(crate) fn resolve(&self, s: &LocalSlice) -> Result<(&Arc<Region>, usize, usize)> {
        let r = self.get(s.key.0).ok_or_else(|| {
            Error::InvalidArgument(format!("local key {} is not registered", s.key.0))
        })?;
        let (at, n) = r.check(s.offset, s.len).map_err(|e| Error::BufferSize {
            what: format!("local region {}: {e}", s.key.0),
            need: s.offset.saturating_add(s.len) as usize,
            got: r.len(),
        })?;
        Ok((r, at, n))
    }
}

/// The checks every backend makes before posting: the link exists and is
/// up, the total fits one message, and the target range lies inside the
/// peer's region (the receiver checks again; this one reports a local
/// mistake as what it is). Returns the total length.
#[inline]
pub(crate) fn check_post(
    link_state: Option<(&str, bool)>,
    link: LinkId,
    src: &[LocalSlice],
    remote: &RegionKey,
    offset: u64,
    max_message: u64,
) -> Result<u32> {
    let Some((peer, false)) = link_state else {
        return Err(post_link_error(link_state, link));
    };
    let total = src
        .iter()
        .try_fold(0u64, |a, s| a.checked_add(s.len))
        .filter(|&t| t <= max_message);
    match total {
        Some(t) if offset.checked_add(t).is_some_and(|end| end <= remote.len) => Ok(t as u32),
        _ => Err(post_size_error(peer, total, remote, offset, max_message)),
    }
}

/// Why a post to `link` (in state `link_state`) cannot go: no such link,
/// or it is down.
#[cold]
#[inline(never)]
fn post_link_error(link_state: Option<(&str, bool)>, link: LinkId) -> Error {
    match link_state {
        None => Error::InvalidArgument(format!("no link {link}")),
        Some((peer, _)) => Error::io(
            format!("write to {peer}"),
            std::io::Error::new(std::io::ErrorKind::NotConnected, "link is down"),
        ),
    }
}

/// Why a post of `total` bytes (`None`: over `max_message`) at `offset`
/// of `peer`'s region `remote` cannot go.
#[cold]
#[inline(never)]
fn post_size_error(
    peer: &str,
    total: Option<u64>,
    remote: &RegionKey,
    offset: u64,
    max_message: u64,
) -> Error {
    match total {
        None => Error::Unsupported(format!(
            "one write to {peer} larger than {max_message} bytes"
        )),
        Some(total) => Error::BufferSize {
            what: format!("remote region {} of {peer} at offset {offset}", remote.id),
            need: offset.saturating_add(total) as usize,
            got: remote.len as usize,
        },
    }
}

/// Endpoint blobs: a tiny length-prefixed field codec every backend uses.
pub(crate) mod blob {
    use crate::proto::codec::{DecodeError, Reader, Writer};
    use crate::proto::RegionKey;

    /// Starts a blob with the backend's magic.
    pub fn writer(magic: &str) -> Writer {
        let mut w = Writer::new();
        w.str(magic);
        w
    }

    /// Opens a blob, checking the magic.
    pub fn reader<'a>(b: &'a [u8], magic: &str) -> Result<Reader<'a>, DecodeError> {
        let mut r = Reader::new(b);
        let m = r.str("endpoint magic")?;
        if m != magic {
            return Err(DecodeError(format!(
                "endpoint is {m:?}, expected {magic:?}"
            )));
        }
        Ok(r)
    }

    /// Appends region keys.
    pub fn put_keys(w: &mut Writer, keys: &[RegionKey]) {
        w.u32(keys.len() as u32);
        for k in keys {
            w.u32(k.id);
            w.u32(k.rkey);
            w.u64(k.addr);
            w.u64(k.len);
        }
    }

    /// Reads region keys.
    pub fn get_keys(r: &mut Reader<'_>) -> Result<Vec<RegionKey>, DecodeError> {
        let n = r.count("region keys")?;
        (0..n)
            .map(|_| {
                Ok(RegionKey {
                    id: r.u32("key.id")?,
                    rkey: r.u32("key.rkey")?,
                    addr: r.u64("key.addr")?,
                    len: r.u64("key.len")?,
                })
            })
            .collect()
    }
}
