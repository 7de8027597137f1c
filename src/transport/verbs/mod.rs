//! verbs: RDMA write-with-immediate on RC queue pairs, through libibverbs
//! loaded at run time ([`library`]).
//!
//! * **Setup.** [`Open`] opens the device and port ([`device`]), a
//!   protection domain, one completion queue on a completion channel, one
//!   shared receive queue for the rank, and `AFMESH_QPS` RC queue pairs
//!   for each peer of the other role (in INIT). Regions are registered with
//!   `ibv_reg_mr` (relaxed ordering asked for; a provider that refuses the
//!   optional flag gets the plain call). The endpoint blob carries the
//!   port's LID, GID and MTU, every QPN with its random initial PSN, and the
//!   remote keys and addresses of the receive regions; `connect` moves each
//!   peer's QPs to RTR and RTS from the peer's blob. No handshake is needed:
//!   the rendezvous barrier that follows `connect` keeps writes off QPs
//!   that are not ready, and RNR retries cover the rest.
//! * **A message** is one `IBV_WR_RDMA_WRITE_WITH_IMM` straight from
//!   registered memory (inline under the QP's `max_inline_data`). With more
//!   than one QP per link, messages below `AFMESH_IB_STRIPE_MIN` go on QP 0
//!   and larger ones are split in equal stripes over QPs 1..n, each stripe a
//!   write-with-imm of the same imm: the target counts stripes per imm and
//!   reports one arrival, with the summed length, when all n−1 landed (an
//!   imm is unique among a link's messages in flight). Which QP an imm
//!   arrives on thus says how many parts its message has.
//! * **Signalling.** While a QP has fewer than `AFMESH_IB_SIGNAL_EVERY`
//!   (k) requests in flight each is signalled; deeper, one in k is, and
//!   its completion retires every earlier one of its QP. When the CQ is
//!   idle and a QP's newest requests are unsignalled, a zero-length
//!   signalled write flushes them, so `Sent` never waits for traffic that
//!   may not come. The same zero-length write, every
//!   `AFMESH_IB_PROBE_MS`, is the liveness probe: a peer that died leaves
//!   it unacknowledged, and the retry-exceeded completion takes the link
//!   down.
//! * **Arrivals** consume receives of the shared receive queue, reposted
//!   in batches; the CQ is polled in batches; a rank that waits parks on
//!   the completion channel's fd, armed only right before it parks
//!   ([`Transport::arm`]), so a spinning rank costs its peers no event
//!   wake-ups.
//! * **Errors.** An error completion or a QP's fatal async event takes
//!   that link down, once, with the verbs status named; flushed requests
//!   are drained, never retried. Other links go on.
//! * **Leaving.** `close` posts a zero-length write-with-imm on QP 0 of
//!   each link, which the peer reports as `LinkClosed` (a message is never
//!   empty: it carries its header).
//!
//! Nothing on the post path allocates, registers or copies payload;
//! [`WireCounters`] (in rank stats) count what it does.

pub mod device;
pub mod library;
pub mod plain;
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    missing_debug_implementations,
    clippy::undocumented_unsafe_blocks,
    clippy::all
)]
pub mod sys;

mod completions;
mod memory;
mod qp;
mod send;

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    blob, check_post, Access, Caps, Completion, Connected, LinkId, LocalKey, LocalSlice,
    MemoryKind, Open, PeerSpec, Region, RegionKey, Registration, Setup, Transport, Wake,
    WireCounters,
};
use crate::error::{Error, Result};
use device::{Device, Settings, Wanted};
use library::Verbs;
use sys::*;

const MAGIC: &str = "afmesh-verbs-1";
/// Messages posted and not yet `Sent`, per link.
pub const VERBS_WINDOW: usize = 64;
/// Send queue depth of each QP: the window, probes and flushes.
const SQ_DEPTH: usize = 256;
/// Most source slices of one write.
const MAX_SGE: usize = 4;
/// Receives reposted at once.
const RECV_BATCH: usize = 32;
/// Completions polled at once.
const POLL_BATCH: usize = 32;
/// Marks receive work requests' ids.
const RECV_TAG: u64 = 1 << 63;
/// A send-queue entry that belongs to no message (probe, flush, goodbye).
const NO_MSG: u16 = u16::MAX;

/// A verbs call's failure, naming the call and what it was for.
/// How long a post waits for a device send slot's fills.
const FILL_TIMEOUT: Duration = Duration::from_secs(5);

fn verbs_err(call: &str, what: &str, errno: i32) -> Error {
    Error::io(
        format!("verbs: {call} ({what})"),
        std::io::Error::from_raw_os_error(errno),
    )
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The verbs name of a completion status, with the library's text.
fn status_name(lib: &Verbs, s: u32) -> String {
    let name = match s {
        IBV_WC_LOC_LEN_ERR => "IBV_WC_LOC_LEN_ERR",
        IBV_WC_LOC_QP_OP_ERR => "IBV_WC_LOC_QP_OP_ERR",
        IBV_WC_LOC_PROT_ERR => "IBV_WC_LOC_PROT_ERR",
        IBV_WC_WR_FLUSH_ERR => "IBV_WC_WR_FLUSH_ERR",
        IBV_WC_BAD_RESP_ERR => "IBV_WC_BAD_RESP_ERR",
        IBV_WC_LOC_ACCESS_ERR => "IBV_WC_LOC_ACCESS_ERR",
        IBV_WC_REM_INV_REQ_ERR => "IBV_WC_REM_INV_REQ_ERR",
        IBV_WC_REM_ACCESS_ERR => "IBV_WC_REM_ACCESS_ERR",
        IBV_WC_REM_OP_ERR => "IBV_WC_REM_OP_ERR",
        IBV_WC_RETRY_EXC_ERR => "IBV_WC_RETRY_EXC_ERR",
        IBV_WC_RNR_RETRY_EXC_ERR => "IBV_WC_RNR_RETRY_EXC_ERR",
        IBV_WC_REM_ABORT_ERR => "IBV_WC_REM_ABORT_ERR",
        IBV_WC_FATAL_ERR => "IBV_WC_FATAL_ERR",
        IBV_WC_RESP_TIMEOUT_ERR => "IBV_WC_RESP_TIMEOUT_ERR",
        IBV_WC_GENERAL_ERR => "IBV_WC_GENERAL_ERR",
        _ => "IBV_WC status",
    };
    // SAFETY: returns a static NUL-terminated string for any status.
    let text = unsafe { CStr::from_ptr((lib.ibv_wc_status_str)(s)) }.to_string_lossy();
    format!("{name} ({s}: {text})")
}

/// The gather list of bytes `from..to` of the message `sg` gathers, into
/// `out`; returns its length.
fn stripe(sg: &[ibv_sge], from: u64, to: u64, out: &mut [ibv_sge; MAX_SGE]) -> usize {
    let mut n = 0;
    let mut at = 0u64;
    for s in sg {
        let (a, b) = (at, at + u64::from(s.length));
        at = b;
        let (lo, hi) = (a.max(from), b.min(to));
        if lo < hi && n < MAX_SGE {
            out[n] = ibv_sge {
                addr: s.addr + (lo - a),
                length: (hi - lo) as u32,
                lkey: s.lkey,
            };
            n += 1;
        }
    }
    n
}

/// One queue pair of a link.
#[derive(Debug)]
struct Qp {
    qp: *mut ibv_qp,
    qpn: u32,
    psn: u32,
    max_inline: u32,
    /// Message slot of each send-queue entry ([`NO_MSG`] for none).
    ring: Box<[u16]>,
    /// Work requests posted, and retired.
    head: u64,
    tail: u64,
    /// Posted (count) up to and including the newest signalled one.
    covered: u64,
    /// Unsignalled since the last signalled.
    run: u32,
}

/// Bound on waiting for an aborted link's posted work to flush.
const ABORT_DRAIN: Duration = Duration::from_millis(200);

/// A message in flight: its token and stripes not yet completed.
#[derive(Debug, Clone, Copy, Default)]
struct Msg {
    token: u64,
    left: u8,
}

/// A striped message partly landed here.
#[derive(Debug, Clone, Copy, Default)]
struct Partial {
    imm: u32,
    parts: u8,
    bytes: u64,
}

#[derive(Debug)]
struct Link {
    peer: String,
    qps: Vec<Qp>,
    down: bool,
    msgs: Box<[Msg]>,
    free: Vec<u16>,
    partial: Vec<Partial>,
    /// A region of the peer's to aim probes at (address, rkey).
    probe_at: Option<(u64, u32)>,
    last_probe: Instant,
}

/// A registered region.
#[derive(Debug)]
struct Mr {
    mr: *mut ibv_mr,
    region: Arc<Region>,
    access: Access,
    lkey: u32,
    addr: u64,
}

/// What one peer's blob says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerEndpoint {
    lid: u16,
    gid: [u8; 16],
    roce: bool,
    mtu: u32,
    /// QPN and PSN per (peer of ours, QP), peer-major: `qps` per peer.
    qps: usize,
    qpn_psn: Vec<(u32, u32)>,
    keys: Vec<RegionKey>,
}

/// The verbs backend.
pub struct VerbsTransport {
    lib: &'static Verbs,
    dev: Box<Device>,
    set: Settings,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    srq: *mut ibv_srq,
    srq_depth: usize,
    /// Receives consumed and not yet reposted.
    srq_missing: usize,
    recv_wrs: Box<[ibv_recv_wr]>,
    /// This rank's QPs for each peer rank of the other role, in INIT.
    spare: Vec<Vec<Qp>>,
    links: Vec<Link>,
    by_qpn: HashMap<u32, (LinkId, usize)>,
    mrs: Vec<Mr>,
    wcs: Box<[ibv_wc]>,
    armed: bool,
    unacked: u32,
    connected: bool,
    counters: WireCounters,
    idle_polls: u32,
    /// Completions found outside `progress` (a failed post).
    backlog: Vec<Completion>,
    /// When asynchronous events were last read.
    last_async: Instant,
    /// Recorded on a device send region's fill stream before a post, so
    /// the NIC reads the slot only after its fills (GPUDirect).
    fill_event: Option<crate::cuda::Event>,
    /// Registrations made by [`VerbsTransport::register_dmabuf`].
    loose: Vec<*mut ibv_mr>,
}

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("device", &self.device())
            .field("links", &self.links.len())
            .field("counters", &self.counters)
            .finish()
    }
}

// SAFETY: the raw pointers are verbs objects owned by this value alone;
// libibverbs objects may be used from any thread, one at a time, which
// `&mut self` on every call guarantees.
unsafe impl Send for VerbsTransport {}

impl VerbsTransport {
    /// Opens the device `AFMESH_IB_DEVICE` (etc.) names, for `peers` peers.
    pub fn new(peers: u32) -> Result<VerbsTransport> {
        let lib = library::verbs().map_err(|e| Error::Unsupported(format!("verbs: {e}")))?;
        let set = Settings::from_env()?;
        let wanted = Wanted::from_env()?;
        let dev = Box::new(Device::open(
            lib,
            &wanted,
            std::env::var("AFMESH_IB_GID_INDEX").ok(),
        )?);
        tracing::debug!(
            "verbs: {}:{} ({}, gid index {:?}, {:.0} Gb/s) through {}",
            dev.name,
            dev.port,
            dev.link_layer(),
            dev.gid_index,
            dev.port_gbps(),
            lib.from
        );
        let mut t = VerbsTransport {
            lib,
            dev,
            set,
            pd: std::ptr::null_mut(),
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            srq: std::ptr::null_mut(),
            srq_depth: 0,
            srq_missing: 0,
            recv_wrs: vec![ibv_recv_wr::default(); RECV_BATCH].into_boxed_slice(),
            spare: Vec::new(),
            links: Vec::new(),
            by_qpn: HashMap::new(),
            mrs: Vec::new(),
            wcs: vec![ibv_wc::default(); POLL_BATCH].into_boxed_slice(),
            armed: false,
            unacked: 0,
            connected: false,
            counters: WireCounters::default(),
            idle_polls: 0,
            backlog: Vec::new(),
            last_async: Instant::now(),
            fill_event: None,
            loose: Vec::new(),
        };
        // Dropping `t` on an error below releases what was made.
        t.make(peers as usize)?;
        Ok(t)
    }

    fn make(&mut self, peers: usize) -> Result<()> {
        let lib = self.lib;
        let ctx = self.dev.ctx;
        let what = format!("{}:{}", self.dev.name, self.dev.port);
        // SAFETY: a live context.
        self.pd = unsafe { (lib.ibv_alloc_pd)(ctx) };
        if self.pd.is_null() {
            return Err(verbs_err("ibv_alloc_pd", &what, last_errno()));
        }
        // SAFETY: as above.
        self.channel = unsafe { (lib.ibv_create_comp_channel)(ctx) };
        if self.channel.is_null() {
            return Err(verbs_err("ibv_create_comp_channel", &what, last_errno()));
        }
        // SAFETY: the channel's fd is ours to set non-blocking.
        unsafe {
            let fd = (*self.channel).fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        // SAFETY: the context's async fd is ours to set non-blocking
        // (verbs.h documents this for polling it).
        unsafe {
            let fd = (*ctx).async_fd;
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let a = &self.dev.attr;
        let qps = peers * self.set.qps;
        self.srq_depth = (RECV_BATCH * 8)
            .max(VERBS_WINDOW * peers * 2)
            .min(a.max_srq_wr.max(RECV_BATCH as i32) as usize);
        let cqe = (qps * SQ_DEPTH + self.srq_depth).clamp(64, a.max_cqe.max(64) as usize);
        // SAFETY: a live context and channel.
        self.cq = unsafe {
            (lib.ibv_create_cq)(ctx, cqe as c_int, std::ptr::null_mut(), self.channel, 0)
        };
        if self.cq.is_null() {
            return Err(verbs_err(
                "ibv_create_cq",
                &format!("{what}, {cqe} entries"),
                last_errno(),
            ));
        }
        let mut sa = ibv_srq_init_attr::default();
        sa.attr.max_wr = self.srq_depth as u32;
        sa.attr.max_sge = 1;
        // SAFETY: a live PD and a filled attribute struct.
        self.srq = unsafe { (lib.ibv_create_srq)(self.pd, &mut sa) };
        if self.srq.is_null() {
            return Err(verbs_err(
                "ibv_create_srq",
                &format!("{what}, {} receives", self.srq_depth),
                last_errno(),
            ));
        }
        self.srq_missing = self.srq_depth;
        while self.srq_missing >= RECV_BATCH {
            self.repost()?;
        }
        for _ in 0..peers {
            let mut list = Vec::with_capacity(self.set.qps);
            for _ in 0..self.set.qps {
                list.push(self.create_qp()?);
            }
            self.spare.push(list);
        }
        Ok(())
    }

    fn mark_down(&mut self, link: LinkId, reason: String, out: &mut Vec<Completion>) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        if l.down {
            return;
        }
        l.down = true;
        out.push(Completion::LinkDown { link, reason });
        self.fail_qps(link);
    }

    /// Moves a link's QPs to the error state: nothing posted on them is
    /// read any more, and the rest flushes.
    fn fail_qps(&mut self, link: LinkId) {
        let lib = self.lib;
        if let Some(l) = self.links.get(link) {
            for q in &l.qps {
                let mut a = ibv_qp_attr {
                    qp_state: IBV_QPS_ERR,
                    ..Default::default()
                };
                // SAFETY: a live QP.
                unsafe { (lib.ibv_modify_qp)(q.qp, &mut a, IBV_QP_STATE as c_int) };
            }
        }
    }

    /// The device and port in use (`mlx5_0:1`), for logs and the bench.
    pub fn device(&self) -> String {
        format!("{}:{}", self.dev.name, self.dev.port)
    }

    /// The port's line rate, Gb/s (0 when unknown).
    pub fn port_gbps(&self) -> f64 {
        self.dev.port_gbps()
    }
}

impl Open for VerbsTransport {
    fn open(setup: &Setup<'_>) -> Result<Self> {
        VerbsTransport::new(setup.peers)
    }
}

impl Transport for VerbsTransport {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn caps(&self) -> Caps {
        Caps {
            host: true,
            // GPUDirect RDMA: registration says whether this host can.
            cuda: true,
            // One queue pair per link (AFMESH_QPS=1): RC delivers its
            // writes in order. More: large writes are striped over them.
            ordered: self.set.qps == 1,
            max_message: u64::from(self.dev.port_attr.max_msg_sz),
            window: VERBS_WINDOW,
            copies: false,
            header_mirror: false,
        }
    }

    fn register(&mut self, region: &Arc<Region>, access: Access) -> Result<Registration> {
        if self.connected {
            if access == Access::RemoteWrite {
                return Err(Error::Unsupported(
                    "verbs: receive regions must be registered before the first link".into(),
                ));
            }
            self.counters.registrations_after_setup += 1;
        }
        let addr = region.addr();
        let mr = match region.kind() {
            MemoryKind::Cuda { device } => self.reg_device(region, device, access)?,
            MemoryKind::Host => {
                self.reg_mr(addr, region.len().max(1), access)
                    .map_err(|errno| {
                        verbs_err(
                            "ibv_reg_mr",
                            &format!("{} bytes of {}", region.len(), region.kind()),
                            errno,
                        )
                    })?
            }
        };
        // SAFETY: a live MR.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        let id = self.mrs.len() as u32;
        self.mrs.push(Mr {
            mr,
            region: region.clone(),
            access,
            lkey,
            addr,
        });
        Ok(Registration {
            local: LocalKey(id),
            remote: RegionKey {
                id,
                rkey,
                addr,
                len: region.len() as u64,
            },
        })
    }

    fn endpoint(&self) -> Vec<u8> {
        let mut w = blob::writer(MAGIC);
        w.u32(u32::from(self.dev.port_attr.lid));
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&self.dev.gid[..8]);
        lo.copy_from_slice(&self.dev.gid[8..]);
        w.u64(u64::from_be_bytes(hi));
        w.u64(u64::from_be_bytes(lo));
        w.u32(u32::from(self.dev.roce()));
        w.u32(self.dev.port_attr.active_mtu);
        w.u32(self.set.qps as u32);
        let all: Vec<&Qp> = self.spare.iter().flatten().collect();
        w.u32(all.len() as u32);
        for q in all {
            w.u32(q.qpn);
            w.u32(q.psn);
        }
        let keys: Vec<RegionKey> = self
            .mrs
            .iter()
            .enumerate()
            .filter(|(_, m)| m.access == Access::RemoteWrite)
            .map(|(i, m)| RegionKey {
                id: i as u32,
                // SAFETY: a live MR.
                rkey: unsafe { (*m.mr).rkey },
                addr: m.addr,
                len: m.region.len() as u64,
            })
            .collect();
        blob::put_keys(&mut w, &keys);
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let p = self.parse(b)?;
        if p.roce != self.dev.roce() {
            return Err(format!(
                "the peer's port is {} and ours {}",
                if p.roce { "RoCE" } else { "InfiniBand" },
                self.dev.link_layer()
            ));
        }
        if p.roce {
            if p.gid == [0; 16] || self.dev.gid_index.is_none() {
                return Err("no RoCE GID on one of the ends".into());
            }
        } else if p.lid == 0 {
            return Err("the peer's InfiniBand port has no LID".into());
        } else if p.gid[..8] != self.dev.gid[..8] {
            return Err("the peer is on another InfiniBand subnet (GID prefix differs)".into());
        }
        Ok(())
    }

    fn connect(&mut self, peers: &[PeerSpec], _timeout: Duration) -> Result<Vec<Connected>> {
        self.connect_peers(peers)
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
        self.post_message(link, src, remote, offset, imm, token)
    }

    fn progress(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        out.append(&mut self.backlog);
        let mut found = 0;
        loop {
            let n = self.poll_once(out);
            found += n;
            if n < POLL_BATCH {
                break;
            }
        }
        if self.armed && found > 0 {
            // The completion raised the armed CQ's event: take it, so the
            // channel's fd does not stay readable.
            self.take_events();
        }
        while self.srq_missing >= RECV_BATCH {
            self.repost()?;
        }
        if found == 0 {
            self.idle_polls = self.idle_polls.wrapping_add(1);
            // The clock and the probes only when idle, and not on every
            // idle spin.
            if self.idle_polls.is_multiple_of(16) {
                self.idle_work(out);
            }
        }
        Ok(())
    }

    fn arm(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        out.append(&mut self.backlog);
        if self.armed {
            self.take_events();
        }
        if !self.armed {
            self.arm_cq();
        }
        // A completion that came before the arming raised no event: look
        // once more.
        self.poll_once(out);
        Ok(())
    }

    fn wake(&self) -> Wake {
        if self.links.iter().all(|l| l.down) {
            return Wake::Nothing;
        }
        // SAFETY: a live channel.
        let fd = unsafe { (*self.channel).fd };
        Wake::Fds {
            read: vec![fd],
            write: Vec::new(),
        }
    }

    fn close(&mut self) {
        let mut out = Vec::new();
        for link in 0..self.links.len() {
            if self.links[link].down {
                continue;
            }
            let Some(at) = self.links[link].probe_at else {
                continue;
            };
            let _ = self.post(link, 0, &mut [], at, Some(0), NO_MSG, true, true);
        }
        // The goodbyes leave when their completions come (bounded).
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline
            && self
                .links
                .iter()
                .any(|l| !l.down && l.qps.iter().any(|q| q.tail < q.head))
        {
            self.poll_once(&mut out);
            std::thread::yield_now();
        }
        for link in 0..self.links.len() {
            if !self.links[link].down {
                self.links[link].down = true;
                self.fail_qps(link);
            }
        }
    }

    fn abort(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(link) {
            l.down = true;
            self.fail_qps(link);
        }
        // The caller hands this link's send slots back next: the NIC must
        // be done with them. Every work request still posted flushes (an
        // error completion for each, signalled or not); reap until they
        // have, completions kept for the next progress, bounded.
        let deadline = Instant::now() + ABORT_DRAIN;
        let drained = |t: &VerbsTransport| {
            t.links
                .get(link)
                .is_none_or(|l| l.qps.iter().all(|q| q.tail >= q.head))
        };
        let mut out = std::mem::take(&mut self.backlog);
        while !drained(self) && Instant::now() < deadline {
            if self.poll_once(&mut out) == 0 {
                std::thread::yield_now();
            }
        }
        self.backlog = out;
        if !drained(self) {
            tracing::warn!(
                "verbs: work to {} not flushed within {ABORT_DRAIN:?} of the abort",
                self.links[link].peer
            );
        }
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    fn counters(&self) -> WireCounters {
        self.counters
    }
}

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        let lib = self.lib;
        // SAFETY: every object below was made by this value and is
        // destroyed once, QPs before the SRQ and CQ they use, the CQ's
        // events acked before it goes, MRs and everything else before the
        // PD, the context last.
        unsafe {
            for l in &self.links {
                for q in &l.qps {
                    (lib.ibv_destroy_qp)(q.qp);
                }
            }
            for q in self.spare.iter().flatten() {
                (lib.ibv_destroy_qp)(q.qp);
            }
            if !self.srq.is_null() {
                (lib.ibv_destroy_srq)(self.srq);
            }
            if !self.cq.is_null() {
                if self.armed {
                    self.take_events();
                }
                if self.unacked > 0 {
                    (lib.ibv_ack_cq_events)(self.cq, self.unacked);
                }
                (lib.ibv_destroy_cq)(self.cq);
            }
            if !self.channel.is_null() {
                (lib.ibv_destroy_comp_channel)(self.channel);
            }
            for m in &self.mrs {
                (lib.ibv_dereg_mr)(m.mr);
            }
            for &mr in &self.loose {
                (lib.ibv_dereg_mr)(mr);
            }
            if !self.pd.is_null() {
                (lib.ibv_dealloc_pd)(self.pd);
            }
            (lib.ibv_close_device)(self.dev.ctx);
        }
    }
}

#[cfg(test)]
mod tests;
