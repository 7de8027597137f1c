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

    fn create_qp(&mut self) -> Result<Qp> {
        let lib = self.lib;
        let mut inline = self.set.inline;
        loop {
            let mut ia = ibv_qp_init_attr {
                send_cq: self.cq,
                recv_cq: self.cq,
                srq: self.srq,
                qp_type: IBV_QPT_RC,
                sq_sig_all: 0,
                ..Default::default()
            };
            ia.cap.max_send_wr = SQ_DEPTH as u32;
            ia.cap.max_send_sge = MAX_SGE as u32;
            ia.cap.max_inline_data = inline;
            // SAFETY: a live PD, CQ and SRQ; the attributes are filled.
            let qp = unsafe { (lib.ibv_create_qp)(self.pd, &mut ia) };
            if qp.is_null() {
                let e = last_errno();
                if inline > 0 {
                    // Some devices take no inline data at all.
                    inline = 0;
                    continue;
                }
                return Err(verbs_err("ibv_create_qp", "RC queue pair", e));
            }
            let mut psn = [0u8; 4];
            getrandom::fill(&mut psn)
                .map_err(|e| Error::io("random PSN", std::io::Error::other(e.to_string())))?;
            let psn = u32::from_le_bytes(psn) & 0x00ff_ffff;
            let mut a = ibv_qp_attr {
                qp_state: IBV_QPS_INIT,
                pkey_index: 0,
                port_num: self.dev.port,
                qp_access_flags: IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE,
                ..Default::default()
            };
            let mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
            // SAFETY: a live QP, filled attributes.
            let rc = unsafe { (lib.ibv_modify_qp)(qp, &mut a, mask as c_int) };
            // SAFETY: live until destroyed.
            let qpn = unsafe { (*qp).qp_num };
            let q = Qp {
                qp,
                qpn,
                psn,
                max_inline: ia.cap.max_inline_data,
                ring: vec![NO_MSG; SQ_DEPTH].into_boxed_slice(),
                head: 0,
                tail: 0,
                covered: 0,
                run: 0,
            };
            if rc != 0 {
                self.destroy_qp(&q);
                return Err(verbs_err("ibv_modify_qp", &format!("QP {qpn} to INIT"), rc));
            }
            return Ok(q);
        }
    }

    fn destroy_qp(&self, q: &Qp) {
        // SAFETY: a QP of ours, destroyed once.
        unsafe { (self.lib.ibv_destroy_qp)(q.qp) };
    }

    /// Posts one batch of receives on the shared receive queue.
    fn repost(&mut self) -> Result<()> {
        let n = RECV_BATCH;
        let base = self.recv_wrs.as_mut_ptr();
        for i in 0..n {
            let next = if i + 1 < n {
                // SAFETY: inside the array.
                unsafe { base.add(i + 1) }
            } else {
                std::ptr::null_mut()
            };
            self.recv_wrs[i] = ibv_recv_wr {
                wr_id: RECV_TAG | i as u64,
                next,
                sg_list: std::ptr::null_mut(),
                num_sge: 0,
            };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live SRQ of a live context whose ops table holds the
        // provider's post_srq_recv (the inline `ibv_post_srq_recv`); the
        // chain is valid for the call.
        let rc = unsafe {
            let ctx = (*self.srq).context;
            match (*ctx).ops.post_srq_recv {
                Some(f) => f(self.srq, base, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(verbs_err("ibv_post_srq_recv", "shared receive queue", rc));
        }
        self.srq_missing -= n;
        Ok(())
    }

    /// Moves `qp` to RTR and RTS towards the peer's QP `(qpn, psn)`.
    fn connect_qp(&self, q: &Qp, peer: &PeerEndpoint, remote: (u32, u32), who: &str) -> Result<()> {
        let lib = self.lib;
        let mut a = ibv_qp_attr {
            qp_state: IBV_QPS_RTR,
            path_mtu: self.dev.port_attr.active_mtu.min(peer.mtu),
            dest_qp_num: remote.0,
            rq_psn: remote.1,
            max_dest_rd_atomic: 1,
            min_rnr_timer: self.set.min_rnr_timer,
            ..Default::default()
        };
        a.ah_attr.port_num = self.dev.port;
        a.ah_attr.sl = self.set.sl;
        a.ah_attr.dlid = peer.lid;
        if let (true, Some(gi)) = (peer.roce || self.dev.roce(), self.dev.gid_index) {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
            a.ah_attr.grh.sgid_index = gi;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = self.set.traffic_class;
        }
        let mask = IBV_QP_STATE
            | IBV_QP_AV
            | IBV_QP_PATH_MTU
            | IBV_QP_DEST_QPN
            | IBV_QP_RQ_PSN
            | IBV_QP_MAX_DEST_RD_ATOMIC
            | IBV_QP_MIN_RNR_TIMER;
        // SAFETY: a live QP, filled attributes.
        let rc = unsafe { (lib.ibv_modify_qp)(q.qp, &mut a, mask as c_int) };
        if rc != 0 {
            return Err(verbs_err(
                "ibv_modify_qp",
                &format!("QP {} to RTR towards {who}'s QP {}", q.qpn, remote.0),
                rc,
            ));
        }
        let mut a = ibv_qp_attr {
            qp_state: IBV_QPS_RTS,
            timeout: self.set.timeout,
            retry_cnt: self.set.retry_cnt,
            rnr_retry: self.set.rnr_retry,
            sq_psn: q.psn,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = IBV_QP_STATE
            | IBV_QP_TIMEOUT
            | IBV_QP_RETRY_CNT
            | IBV_QP_RNR_RETRY
            | IBV_QP_SQ_PSN
            | IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        let rc = unsafe { (lib.ibv_modify_qp)(q.qp, &mut a, mask as c_int) };
        if rc != 0 {
            return Err(verbs_err(
                "ibv_modify_qp",
                &format!("QP {} to RTS towards {who}", q.qpn),
                rc,
            ));
        }
        Ok(())
    }

    fn parse(&self, b: &[u8]) -> std::result::Result<PeerEndpoint, String> {
        let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
        let e = |e: crate::proto::DecodeError| e.0;
        let lid = r.u32("lid").map_err(e)? as u16;
        let mut gid = [0u8; 16];
        let hi = r.u64("gid.hi").map_err(e)?;
        let lo = r.u64("gid.lo").map_err(e)?;
        gid[..8].copy_from_slice(&hi.to_be_bytes());
        gid[8..].copy_from_slice(&lo.to_be_bytes());
        let roce = r.u32("link layer").map_err(e)? == 1;
        let mtu = r.u32("mtu").map_err(e)?;
        let qps = r.u32("qps per peer").map_err(e)? as usize;
        let n = r.count("queue pairs").map_err(e)?;
        let mut qpn_psn = Vec::with_capacity(n);
        for _ in 0..n {
            qpn_psn.push((r.u32("qpn").map_err(e)?, r.u32("psn").map_err(e)?));
        }
        let keys = blob::get_keys(&mut r).map_err(e)?;
        if qps == 0 || qps > 8 {
            return Err(format!("{qps} queue pairs per peer"));
        }
        Ok(PeerEndpoint {
            lid,
            gid,
            roce,
            mtu,
            qps,
            qpn_psn,
            keys,
        })
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

    /// Posts one write on QP `qi` of link `link`. `msg` is the message slot
    /// ([`NO_MSG`] for none).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn post(
        &mut self,
        link: LinkId,
        qi: usize,
        sges: &mut [ibv_sge],
        remote: (u64, u32),
        imm: Option<u32>,
        msg: u16,
        force_signal: bool,
        may_inline: bool,
    ) -> std::result::Result<(), i32> {
        let every = self.set.signal_every;
        let l = &mut self.links[link];
        let q = &mut l.qps[qi];
        if (q.head - q.tail) as usize >= SQ_DEPTH {
            return Err(libc::ENOMEM);
        }
        let len: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
        // Few requests in flight: each is signalled (a completion costs
        // less than the flush a quiet queue would need). A deep queue: one
        // in `every`.
        let signal = force_signal || q.run + 1 >= every || q.head - q.tail < u64::from(every);
        let mut flags = 0;
        if signal {
            flags |= IBV_SEND_SIGNALED;
        }
        if may_inline && len > 0 && len <= u64::from(q.max_inline) {
            flags |= IBV_SEND_INLINE;
        }
        let pos = q.head;
        let mut wr = ibv_send_wr {
            wr_id: ((link as u64) << 40) | ((qi as u64) << 32) | (pos & 0xffff_ffff),
            next: std::ptr::null_mut(),
            sg_list: if sges.is_empty() {
                std::ptr::null_mut()
            } else {
                sges.as_mut_ptr()
            },
            num_sge: sges.len() as c_int,
            opcode: if imm.is_some() {
                IBV_WR_RDMA_WRITE_WITH_IMM
            } else {
                IBV_WR_RDMA_WRITE
            },
            send_flags: flags,
            ..Default::default()
        };
        wr.__bindgen_anon_1.imm_data = imm.unwrap_or(0).to_be();
        wr.wr.rdma = ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: remote.0,
            rkey: remote.1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live QP of a live context whose ops table holds the
        // provider's post_send (the inline `ibv_post_send`); the request and
        // its gather list are valid for the call, and the bytes they name
        // are registered and stay unchanged until the request retires.
        let rc = unsafe {
            let ctx = (*q.qp).context;
            match (*ctx).ops.post_send {
                Some(f) => f(q.qp, &mut wr, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(rc);
        }
        q.ring[(pos as usize) % SQ_DEPTH] = msg;
        q.head += 1;
        if signal {
            q.run = 0;
            q.covered = q.head;
            self.counters.signaled += 1;
        } else {
            q.run += 1;
        }
        self.counters.work_requests += 1;
        Ok(())
    }

    /// Retires QP `qi` of `link` up to and including send position `pos`.
    fn retire(&mut self, link: LinkId, qi: usize, pos32: u64, out: &mut Vec<Completion>) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        let Some(q) = l.qps.get_mut(qi) else { return };
        // The full position: the newest posted one with these low bits.
        let mut pos = (q.head & !0xffff_ffff) | pos32;
        if pos >= q.head {
            pos = pos.wrapping_sub(1 << 32);
        }
        while q.tail <= pos && q.tail < q.head {
            let m = q.ring[(q.tail as usize) % SQ_DEPTH];
            q.tail += 1;
            if m == NO_MSG {
                continue;
            }
            if let Some(msg) = l.msgs.get_mut(m as usize) {
                msg.left = msg.left.saturating_sub(1);
                if msg.left == 0 {
                    if !l.down {
                        out.push(Completion::Sent { token: msg.token });
                    }
                    l.free.push(m);
                }
            }
        }
    }

    fn on_completion(&mut self, wc: &ibv_wc, out: &mut Vec<Completion>) {
        let recv = wc.wr_id & RECV_TAG != 0;
        if recv {
            self.srq_missing += 1;
        }
        let Some(&(link, qi)) = self.by_qpn.get(&wc.qp_num) else {
            return;
        };
        if wc.status != IBV_WC_SUCCESS {
            if wc.status == IBV_WC_WR_FLUSH_ERR || self.links[link].down {
                if !recv {
                    self.retire(link, qi, wc.wr_id & 0xffff_ffff, out);
                }
                return;
            }
            let op = if recv { "receive" } else { "write" };
            let reason = format!(
                "verbs {op} with {} failed: {} (QP {}, vendor error {:#x})",
                self.links[link].peer,
                status_name(self.lib, wc.status),
                wc.qp_num,
                wc.vendor_err
            );
            if !recv {
                self.retire(link, qi, wc.wr_id & 0xffff_ffff, out);
            }
            self.mark_down(link, reason, out);
            return;
        }
        if !recv {
            self.retire(link, qi, wc.wr_id & 0xffff_ffff, out);
            return;
        }
        if wc.opcode != IBV_WC_RECV_RDMA_WITH_IMM {
            return;
        }
        // SAFETY: a write-with-imm's completion carries `imm_data`.
        let imm = u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data });
        let l = &mut self.links[link];
        if l.down {
            return;
        }
        if qi == 0 {
            if wc.byte_len == 0 {
                l.down = true;
                out.push(Completion::LinkClosed { link });
                self.fail_qps(link);
            } else {
                out.push(Completion::Arrival {
                    link,
                    imm,
                    len: wc.byte_len,
                });
            }
            return;
        }
        let parts = (l.qps.len() - 1) as u8;
        let i = match l.partial.iter().position(|p| p.parts > 0 && p.imm == imm) {
            Some(i) => i,
            None => match l.partial.iter().position(|p| p.parts == 0) {
                Some(i) => {
                    l.partial[i] = Partial {
                        imm,
                        parts: 0,
                        bytes: 0,
                    };
                    i
                }
                None => {
                    let reason = format!(
                        "{} has more than {VERBS_WINDOW} striped messages in flight",
                        l.peer
                    );
                    out.push(Completion::LinkError { link, reason });
                    l.down = true;
                    self.fail_qps(link);
                    return;
                }
            },
        };
        let p = &mut l.partial[i];
        p.parts += 1;
        p.bytes += u64::from(wc.byte_len);
        if p.parts == parts {
            let len = p.bytes.min(u64::from(u32::MAX)) as u32;
            *p = Partial::default();
            out.push(Completion::Arrival { link, imm, len });
        }
    }

    /// Polls the CQ once; returns how many completions it found.
    fn poll_once(&mut self, out: &mut Vec<Completion>) -> usize {
        // SAFETY: a live CQ of a live context whose ops table holds the
        // provider's poll_cq (the inline `ibv_poll_cq`); the array holds
        // POLL_BATCH entries.
        let n = unsafe {
            let ctx = (*self.cq).context;
            match (*ctx).ops.poll_cq {
                Some(f) => f(self.cq, POLL_BATCH as c_int, self.wcs.as_mut_ptr()),
                None => -1,
            }
        };
        if n <= 0 {
            return 0;
        }
        for i in 0..n as usize {
            let wc = self.wcs[i];
            self.on_completion(&wc, out);
        }
        n as usize
    }

    /// Takes the channel's pending events (non-blocking) and acks them in
    /// batches.
    fn take_events(&mut self) {
        loop {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: a live channel, whose fd is non-blocking.
            let rc = unsafe { (self.lib.ibv_get_cq_event)(self.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                break;
            }
            self.armed = false;
            self.unacked += 1;
        }
        if self.unacked >= 64 {
            // SAFETY: acks events taken from this CQ.
            unsafe { (self.lib.ibv_ack_cq_events)(self.cq, self.unacked) };
            self.unacked = 0;
        }
    }

    fn arm_cq(&mut self) {
        // SAFETY: a live CQ; the inline `ibv_req_notify_cq` through ops.
        let rc = unsafe {
            let ctx = (*self.cq).context;
            match (*ctx).ops.req_notify_cq {
                Some(f) => f(self.cq, 0),
                None => -1,
            }
        };
        self.armed = rc == 0;
    }

    /// When idle: flush unsignalled tails, probe links that are due.
    fn idle_work(&mut self, out: &mut Vec<Completion>) {
        let probe_every = Duration::from_millis(self.set.probe_ms);
        let now = Instant::now();
        for link in 0..self.links.len() {
            let l = &self.links[link];
            if l.down {
                continue;
            }
            let Some(at) = l.probe_at else { continue };
            let probe = now.duration_since(l.last_probe) >= probe_every;
            for qi in 0..l.qps.len() {
                let q = &self.links[link].qps[qi];
                let uncovered = q.covered < q.head;
                if uncovered || (probe && qi == 0) {
                    match self.post(link, qi, &mut [], at, None, NO_MSG, true, true) {
                        Ok(()) => self.counters.flushes += 1,
                        Err(libc::ENOMEM) => {}
                        Err(rc) => {
                            let reason = format!(
                                "verbs: ibv_post_send (probe) to {} failed: {}",
                                self.links[link].peer,
                                std::io::Error::from_raw_os_error(rc)
                            );
                            self.mark_down(link, reason, out);
                            break;
                        }
                    }
                }
            }
            if probe {
                self.links[link].last_probe = now;
            }
        }
        if now.duration_since(self.last_async) >= probe_every {
            self.last_async = now;
            self.async_events(out);
        }
    }

    /// Takes the device's asynchronous events (non-blocking): a QP's
    /// fatal or access error takes its link down, a port or device error
    /// every link.
    fn async_events(&mut self, out: &mut Vec<Completion>) {
        let (Some(get), Some(ack)) = (self.lib.ibv_get_async_event, self.lib.ibv_ack_async_event)
        else {
            return;
        };
        for _ in 0..64 {
            // SAFETY: plain data; all-zero is a valid value.
            let mut ev: ibv_async_event = unsafe { std::mem::zeroed() };
            // SAFETY: a live context whose async fd was made non-blocking.
            if unsafe { get(self.dev.ctx, &mut ev) } != 0 {
                return;
            }
            let t = ev.event_type;
            let name = match t {
                IBV_EVENT_QP_FATAL => "IBV_EVENT_QP_FATAL",
                IBV_EVENT_QP_REQ_ERR => "IBV_EVENT_QP_REQ_ERR",
                IBV_EVENT_QP_ACCESS_ERR => "IBV_EVENT_QP_ACCESS_ERR",
                IBV_EVENT_PORT_ERR => "IBV_EVENT_PORT_ERR",
                IBV_EVENT_DEVICE_FATAL => "IBV_EVENT_DEVICE_FATAL",
                _ => "",
            };
            let qp_event = matches!(
                t,
                IBV_EVENT_QP_FATAL | IBV_EVENT_QP_REQ_ERR | IBV_EVENT_QP_ACCESS_ERR
            );
            let qp = if qp_event {
                // SAFETY: QP events carry the QP.
                unsafe { ev.element.qp }
            } else {
                std::ptr::null_mut()
            };
            // SAFETY: each event taken is acked once.
            unsafe { ack(&mut ev) };
            if name.is_empty() {
                continue;
            }
            for link in 0..self.links.len() {
                let hit = !qp_event || self.links[link].qps.iter().any(|q| q.qp == qp);
                if hit {
                    let reason = format!(
                        "verbs: asynchronous event {name} on {} (link to {})",
                        self.device(),
                        self.links[link].peer
                    );
                    self.mark_down(link, reason, out);
                }
            }
        }
    }

    /// Registers `len` bytes at `offset` of dma-buf `fd` (device memory
    /// exported by its driver, e.g. by `cuda::dmabuf`) with
    /// `ibv_reg_dmabuf_mr`, addressed by peers as `iova`, writable by them
    /// if `access` says so; returns its (lkey, rkey). The registration is
    /// released with the transport. An error names the verb and errno.
    /// (`Transport::register` of a CUDA region does this itself.)
    ///
    /// # Safety
    /// `fd` is a dma-buf of at least `offset + len` bytes, open for the
    /// call (the MR holds its own reference to the buffer afterwards).
    pub unsafe fn register_dmabuf(
        &mut self,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<(u32, u32)> {
        // SAFETY: the caller's contract.
        let mr = unsafe { self.reg_dmabuf_mr(fd, offset, len, iova, access) }?;
        self.loose.push(mr);
        // SAFETY: a live MR.
        Ok(unsafe { ((*mr).lkey, (*mr).rkey) })
    }

    /// `ibv_reg_dmabuf_mr`; the caller owns the MR.
    ///
    /// # Safety
    /// As [`VerbsTransport::register_dmabuf`].
    unsafe fn reg_dmabuf_mr(
        &mut self,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<*mut ibv_mr> {
        let Some(f) = self.lib.ibv_reg_dmabuf_mr else {
            return Err(Error::Unsupported(format!(
                "verbs: {} has no ibv_reg_dmabuf_mr (rdma-core 34 or newer needed for device memory)",
                self.lib.from
            )));
        };
        let remote = if access == Access::RemoteWrite {
            IBV_ACCESS_REMOTE_WRITE
        } else {
            0
        };
        let flags = (IBV_ACCESS_LOCAL_WRITE | remote) as c_int;
        // SAFETY: a live PD; the fd and range are the caller's contract.
        let mr = unsafe { f(self.pd, offset, len, iova, fd, flags) };
        if mr.is_null() {
            return Err(verbs_err(
                "ibv_reg_dmabuf_mr",
                &format!("dma-buf fd {fd}, {len} bytes at offset {offset}"),
                last_errno(),
            ));
        }
        Ok(mr)
    }

    /// `ibv_reg_mr` of `len` bytes at `addr` (relaxed ordering asked for,
    /// the plain call if the provider refuses it); the errno on failure.
    fn reg_mr(
        &self,
        addr: u64,
        len: usize,
        access: Access,
    ) -> std::result::Result<*mut ibv_mr, i32> {
        let lib = self.lib;
        let remote = if access == Access::RemoteWrite {
            IBV_ACCESS_REMOTE_WRITE
        } else {
            0
        };
        let base = (IBV_ACCESS_LOCAL_WRITE | remote) as c_int;
        let p = addr as *mut c_void;
        // Relaxed ordering is optional: a provider that does not know it
        // must ignore it; one that refuses it gets the plain call.
        let relaxed = base | IBV_ACCESS_RELAXED_ORDERING as c_int;
        // SAFETY: the caller's region is valid for `len` bytes for as long
        // as the MR lives (the `Mr` keeps an `Arc` of it).
        let mut mr = unsafe {
            match lib.ibv_reg_mr_iova2 {
                Some(f) => f(self.pd, p, len, addr, relaxed as u32),
                None => (lib.ibv_reg_mr)(self.pd, p, len, relaxed),
            }
        };
        if mr.is_null() {
            // SAFETY: as above.
            mr = unsafe { (lib.ibv_reg_mr)(self.pd, p, len, base) };
        }
        if mr.is_null() {
            Err(last_errno())
        } else {
            Ok(mr)
        }
    }

    /// Registers CUDA device memory for GPUDirect RDMA: the allocation
    /// exported as a dma-buf (`cuMemGetHandleForAddressRange`) and
    /// registered by `ibv_reg_dmabuf_mr`; where either refuses, `ibv_reg_mr`
    /// on the device pointer (which works with nvidia-peermem loaded).
    /// Without CUDA the error is CUDA's.
    fn reg_device(&mut self, region: &Region, device: i32, access: Access) -> Result<*mut ibv_mr> {
        let addr = region.addr();
        let len = region.len().max(1);
        let what = format!("{len} bytes of CUDA device {device} memory at {addr:#x}");
        if let Err(e) = crate::cuda::driver() {
            return Err(Error::Unsupported(format!(
                "verbs: cannot register {what} for GPUDirect RDMA: {e}"
            )));
        }
        let dmabuf = match crate::cuda::dmabuf(addr, len) {
            Ok(buf) => {
                use std::os::fd::AsRawFd;
                // SAFETY: `buf.fd` is the dma-buf of the whole allocation
                // (`buf.len` bytes) holding `[addr, addr + len)`, open
                // until `buf` drops after the call.
                match unsafe {
                    self.reg_dmabuf_mr(buf.fd.as_raw_fd(), buf.offset, len, addr, access)
                } {
                    Ok(mr) => return Ok(mr),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        match self.reg_mr(addr, len, access) {
            Ok(mr) => {
                tracing::info!(
                    "verbs: {what} registered by ibv_reg_mr on the device pointer (nvidia-peermem); dma-buf refused: {dmabuf}"
                );
                Ok(mr)
            }
            Err(errno) => Err(Error::Unsupported(format!(
                "verbs: cannot register {what} for GPUDirect RDMA: dma-buf: {dmabuf}; ibv_reg_mr on the device pointer (nvidia-peermem): {}",
                std::io::Error::from_raw_os_error(errno)
            ))),
        }
    }

    /// Waits (spin, then 20 µs sleeps, at most [`FILL_TIMEOUT`]) until the
    /// fills enqueued so far on `region`'s fill stream are done.
    fn wait_fills(&mut self, region: &Region) -> Result<()> {
        let fill = region.fill_stream();
        let MemoryKind::Cuda { device } = region.kind() else {
            return Ok(());
        };
        if fill.is_null() {
            return Ok(());
        }
        if self.fill_event.is_none() {
            self.fill_event = Some(crate::cuda::Event::new(
                &crate::cuda::Device::get(device)?,
                false,
            )?);
        }
        let Some(e) = &self.fill_event else {
            return Ok(());
        };
        // SAFETY: the region's own live stream, of `device`.
        unsafe { e.record_raw(fill) }?;
        let start = Instant::now();
        let mut spins = 0u32;
        while !e.done()? {
            if spins < 256 {
                spins += 1;
                std::hint::spin_loop();
            } else if start.elapsed() > FILL_TIMEOUT {
                return Err(Error::Timeout {
                    op: "verbs: CUDA fills of a send slot",
                    peer: format!("CUDA device {device}"),
                    after: start.elapsed(),
                });
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
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
            ordered: false,
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
        let mut up = Vec::with_capacity(peers.len());
        for p in peers {
            let bad = |reason: String| Error::BadFrame {
                peer: p.label.clone(),
                reason: format!("verbs endpoint: {reason}"),
            };
            let ep = self.parse(&p.blob).map_err(bad)?;
            self.reaches(&p.blob)
                .map_err(|e| Error::config(format!("verbs: {} is unreachable: {e}", p.label)))?;
            let n = self.set.qps.min(ep.qps);
            let mine = self
                .spare
                .get_mut(p.peer_rank as usize)
                .map(std::mem::take)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "verbs: no queue pairs for {} (peer rank {})",
                        p.label, p.peer_rank
                    ))
                })?;
            let theirs_at = p.my_rank as usize * ep.qps;
            let theirs = match ep.qpn_psn.get(theirs_at..theirs_at + n) {
                Some(t) => t.to_vec(),
                None => {
                    // Ours were taken for this peer: do not leak them.
                    for q in &mine {
                        self.destroy_qp(q);
                    }
                    return Err(bad(format!("no queue pairs for rank {}", p.my_rank)));
                }
            };
            let (use_now, extra): (Vec<Qp>, Vec<Qp>) = {
                let mut v = mine;
                let rest = v.split_off(n);
                (v, rest)
            };
            for q in &extra {
                self.destroy_qp(q);
            }
            for (q, r) in use_now.iter().zip(&theirs) {
                if let Err(e) = self.connect_qp(q, &ep, *r, &p.label) {
                    for q in &use_now {
                        self.destroy_qp(q);
                    }
                    return Err(e);
                }
            }
            let link = self.links.len();
            for (i, q) in use_now.iter().enumerate() {
                self.by_qpn.insert(q.qpn, (link, i));
            }
            let probe_at = ep.keys.first().map(|k| (k.addr, k.rkey));
            self.links.push(Link {
                peer: p.label.clone(),
                qps: use_now,
                down: false,
                msgs: vec![Msg::default(); VERBS_WINDOW].into_boxed_slice(),
                free: (0..VERBS_WINDOW as u16).rev().collect(),
                partial: vec![Partial::default(); VERBS_WINDOW],
                probe_at,
                last_probe: Instant::now(),
            });
            up.push(Connected {
                link,
                remote: ep.keys,
            });
            tracing::debug!(
                "verbs: link to {} over {} ({} QPs)",
                p.label,
                self.device(),
                n
            );
        }
        self.connected = true;
        Ok(up)
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
        let max = self.caps().max_message;
        let state = self.links.get(link).map(|l| (l.peer.as_str(), l.down));
        let total = u64::from(check_post(state, link, src, remote, offset, max)?);
        if src.len() > MAX_SGE {
            return Err(Error::Unsupported(format!(
                "verbs: gather list of {} > {MAX_SGE}",
                src.len()
            )));
        }
        let mut sg = [ibv_sge::default(); MAX_SGE];
        let mut device = false;
        for (i, s) in src.iter().enumerate() {
            let m = self.mrs.get(s.key.0 as usize).ok_or_else(|| {
                Error::InvalidArgument(format!("local key {} is not registered", s.key.0))
            })?;
            m.region
                .check(s.offset, s.len)
                .map_err(|e| Error::BufferSize {
                    what: format!("local region {}: {e}", s.key.0),
                    need: s.offset.saturating_add(s.len) as usize,
                    got: m.region.len(),
                })?;
            device |= m.region.on_device();
            sg[i] = ibv_sge {
                addr: m.addr + s.offset,
                length: s.len as u32,
                lkey: m.lkey,
            };
        }
        if device {
            // GPUDirect: the NIC reads device memory, so the slot's fills
            // (enqueued on its region's fill stream) must be done first,
            // and the CPU must not copy it inline.
            let r = src
                .iter()
                .filter_map(|s| self.mrs.get(s.key.0 as usize))
                .find(|m| m.region.on_device())
                .map(|m| m.region.clone());
            if let Some(r) = r {
                self.wait_fills(&r)?;
            }
        }
        let l = &mut self.links[link];
        let Some(slot) = l.free.pop() else {
            return Err(Error::Backpressure {
                peer: l.peer.clone(),
                window: VERBS_WINDOW,
            });
        };
        let nq = l.qps.len();
        let stripes = if nq > 1 && total >= self.set.stripe_min {
            nq - 1
        } else {
            1
        };
        l.msgs[slot as usize] = Msg {
            token,
            left: stripes as u8,
        };
        let dst = remote.addr + offset;
        let r = if stripes == 1 {
            self.post(
                link,
                0,
                &mut sg[..src.len()],
                (dst, remote.rkey),
                imm,
                slot,
                false,
                !device,
            )
            .map(|_| 1)
        } else {
            // Equal stripes of whole cache lines, the last one shorter.
            let each = total.div_ceil(stripes as u64).next_multiple_of(64);
            let mut posted = 0;
            let mut res = Ok(0);
            for k in 0..stripes {
                // (A tiny AFMESH_IB_STRIPE_MIN can leave the last stripes
                // empty: they still carry the imm, so the count holds.)
                let from = (k as u64 * each).min(total);
                let to = (from + each).min(total);
                let mut part = [ibv_sge::default(); MAX_SGE];
                let n = stripe(&sg[..src.len()], from, to, &mut part);
                match self.post(
                    link,
                    1 + k,
                    &mut part[..n],
                    (dst + from, remote.rkey),
                    Some(imm.unwrap_or(0)),
                    slot,
                    false,
                    !device,
                ) {
                    Ok(()) => posted += 1,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            res.map(|_| posted)
        };
        match r {
            Ok(_) => {
                self.counters.messages += 1;
                Ok(())
            }
            Err(rc) => {
                let l = &mut self.links[link];
                let peer = l.peer.clone();
                if rc == libc::ENOMEM {
                    // Nothing was posted when the first stripe's queue was
                    // full; a later stripe's full queue cannot happen (a
                    // link's queues fill together) but is handled alike.
                    l.free.push(slot);
                    return Err(Error::Backpressure {
                        peer,
                        window: VERBS_WINDOW,
                    });
                }
                let reason = format!(
                    "verbs: ibv_post_send to {peer} failed: {}",
                    std::io::Error::from_raw_os_error(rc)
                );
                let mut out = std::mem::take(&mut self.backlog);
                self.mark_down(link, reason, &mut out);
                self.backlog = out;
                Err(Error::io(
                    format!("write to {peer}"),
                    std::io::Error::from_raw_os_error(rc),
                ))
            }
        }
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
