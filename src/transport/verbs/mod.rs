//! verbs: RDMA write-with-immediate on RC queue pairs, through libibverbs
//! loaded at run time ([`library`]).
//!
//! * **Setup.** [`Open`] opens every device and port `AFMESH_IB_DEVICE`
//!   lists ([`device`]), each a *rail*: its own context, protection
//!   domain, completion queue on a completion channel, and shared receive
//!   queue, and, for each peer of the other role, `AFMESH_QPS` RC queue
//!   pairs on each rail (in INIT). Regions are registered with `ibv_reg_mr`
//!   on every rail (relaxed ordering asked for; a provider that refuses the
//!   optional flag gets the plain call). The endpoint blob carries, per
//!   rail, the port's LID, GID and MTU and the remote keys of the receive
//!   regions (an rkey is valid on its own NIC only), then every QPN with
//!   its random initial PSN. `connect` puts each link on one rail pair,
//!   round-robin by the sum of the two ranks (so rail i meets rail i when
//!   both ends have as many; see [`VerbsTransport::pick_rails`]), moves
//!   that rail's QPs to RTR and RTS from the peer's blob and destroys the
//!   other rails' spares for that peer. No handshake is needed: the
//!   rendezvous barrier that follows `connect` keeps writes off QPs that
//!   are not ready, and RNR retries cover the rest.
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
//! * **Arrivals** consume receives of the rail's shared receive queue,
//!   reposted in batches; each rail's CQ is polled in batches; a rank that
//!   waits parks on every rail's completion channel fd in one wait, each
//!   CQ armed only right before it parks ([`Transport::arm`]), so a
//!   spinning rank costs its peers no event wake-ups.
//! * **Errors.** An error completion or a QP's fatal async event takes
//!   that link down, once, with the verbs status named; flushed requests
//!   are drained, never retried. Other links go on.
//! * **Leaving.** `close` posts a zero-length write-with-imm on QP 0 of
//!   each link, which the peer reports as `LinkClosed` (a message is never
//!   empty: it carries its header).
//!
//! Nothing on the post path allocates, registers or copies payload;
//! [`WireCounters`] (in rank stats) count what it does, messages and
//! bytes per rail included.

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
mod rail;
mod send;
mod teardown;

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
use rail::Rail;
use sys::*;

const MAGIC: &str = "afmesh-verbs-2";
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
    /// The rail (our NIC) all its QPs are on.
    rail: usize,
    qps: Vec<Qp>,
    down: bool,
    msgs: Box<[Msg]>,
    free: Vec<u16>,
    partial: Vec<Partial>,
    /// A region of the peer's to aim probes at (address, rkey).
    probe_at: Option<(u64, u32)>,
    last_probe: Instant,
}

/// A registered region: one memory region on each rail.
#[derive(Debug)]
struct Mr {
    /// Per rail: the MR and its local key.
    on: Vec<(*mut ibv_mr, u32)>,
    region: Arc<Region>,
    access: Access,
    addr: u64,
}

/// What one peer's blob says about one of its rails.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RailEndpoint {
    lid: u16,
    gid: [u8; 16],
    roce: bool,
    mtu: u32,
    /// Its receive regions' keys on this rail (an rkey is valid on its
    /// own NIC only).
    keys: Vec<RegionKey>,
}

/// What one peer's blob says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerEndpoint {
    rails: Vec<RailEndpoint>,
    /// QPN and PSN per (peer of ours, rail, QP), peer-major, then rail:
    /// `qps` per peer and rail.
    qps: usize,
    qpn_psn: Vec<(u32, u32)>,
}

impl PeerEndpoint {
    /// The peer's QPs for our rank `rank` on its rail `rail`.
    fn qps_for(&self, rank: usize, rail: usize) -> Option<&[(u32, u32)]> {
        let at = (rank * self.rails.len() + rail) * self.qps;
        self.qpn_psn.get(at..at + self.qps)
    }
}

/// The verbs backend.
pub struct VerbsTransport {
    lib: &'static Verbs,
    /// The NICs, in `AFMESH_IB_DEVICE` order (at least one).
    rails: Vec<Rail>,
    set: Settings,
    recv_wrs: Box<[ibv_recv_wr]>,
    /// This rank's QPs for each peer rank of the other role, on each
    /// rail (`[peer][rail]`), in INIT. `connect` keeps one rail's.
    spare: Vec<Vec<Vec<Qp>>>,
    links: Vec<Link>,
    mrs: Vec<Mr>,
    wcs: Box<[ibv_wc]>,
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
            .field("devices", &self.device())
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
    /// Opens the devices `AFMESH_IB_DEVICE` (etc.) names, one rail each,
    /// for `peers` peers.
    pub fn new(peers: u32) -> Result<VerbsTransport> {
        let lib = library::verbs().map_err(|e| Error::Unsupported(format!("verbs: {e}")))?;
        let set = Settings::from_env()?;
        let wanted = Wanted::from_env()?;
        let devs = Device::open_all(lib, &wanted, std::env::var("AFMESH_IB_GID_INDEX").ok())?;
        for dev in &devs {
            tracing::debug!(
                "verbs: {}:{} ({}, gid index {:?}, {:.0} Gb/s) through {}",
                dev.name,
                dev.port,
                dev.link_layer(),
                dev.gid_index,
                dev.port_gbps(),
                lib.from
            );
        }
        let mut t = VerbsTransport {
            lib,
            rails: devs.into_iter().map(Rail::new).collect(),
            set,
            recv_wrs: vec![ibv_recv_wr::default(); RECV_BATCH].into_boxed_slice(),
            spare: Vec::new(),
            links: Vec::new(),
            mrs: Vec::new(),
            wcs: vec![ibv_wc::default(); POLL_BATCH].into_boxed_slice(),
            connected: false,
            counters: WireCounters::default(),
            idle_polls: 0,
            backlog: Vec::new(),
            last_async: Instant::now(),
            fill_event: None,
            loose: Vec::new(),
        };
        t.counters.rails = t.rails.len() as u8;
        // Dropping `t` on an error below releases what was made.
        for r in 0..t.rails.len() {
            t.make_rail(r, peers as usize)?;
        }
        for _ in 0..peers {
            let mut per_rail = Vec::with_capacity(t.rails.len());
            for r in 0..t.rails.len() {
                let mut list = Vec::with_capacity(t.set.qps);
                for _ in 0..t.set.qps {
                    list.push(t.create_qp(r)?);
                }
                per_rail.push(list);
            }
            t.spare.push(per_rail);
        }
        Ok(t)
    }

    /// Polls every rail's CQ once; how many completions were found.
    fn poll_all(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        for r in 0..self.rails.len() {
            n += self.poll_once(r, out);
        }
        n
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
            max_message: self
                .rails
                .iter()
                .map(|r| u64::from(r.dev.port_attr.max_msg_sz))
                .min()
                .unwrap_or(0),
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
        let mut on = Vec::with_capacity(self.rails.len());
        for r in 0..self.rails.len() {
            let got = match region.kind() {
                MemoryKind::Cuda { device } => self.reg_device(r, region, device, access),
                MemoryKind::Host => {
                    self.reg_mr(r, addr, region.len().max(1), access)
                        .map_err(|errno| {
                            verbs_err(
                                "ibv_reg_mr",
                                &format!(
                                    "{} bytes of {} on {}",
                                    region.len(),
                                    region.kind(),
                                    self.rails[r].name()
                                ),
                                errno,
                            )
                        })
                }
            };
            match got {
                // SAFETY: a live MR.
                Ok(mr) => on.push((mr, unsafe { (*mr).lkey })),
                Err(e) => {
                    for (mr, _) in on {
                        // SAFETY: registered just above, not yet shared.
                        unsafe { (self.lib.ibv_dereg_mr)(mr) };
                    }
                    return Err(e);
                }
            }
        }
        // SAFETY: a live MR. (Rail 0's key stands for the region here;
        // peers get each rail's in the endpoint blob.)
        let rkey = unsafe { (*on[0].0).rkey };
        let id = self.mrs.len() as u32;
        self.mrs.push(Mr {
            on,
            region: region.clone(),
            access,
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
        w.u32(self.rails.len() as u32);
        for (r, rail) in self.rails.iter().enumerate() {
            let dev = &rail.dev;
            w.u32(u32::from(dev.port_attr.lid));
            let mut hi = [0u8; 8];
            let mut lo = [0u8; 8];
            hi.copy_from_slice(&dev.gid[..8]);
            lo.copy_from_slice(&dev.gid[8..]);
            w.u64(u64::from_be_bytes(hi));
            w.u64(u64::from_be_bytes(lo));
            w.u32(u32::from(dev.roce()));
            w.u32(dev.port_attr.active_mtu);
            let keys: Vec<RegionKey> = self
                .mrs
                .iter()
                .enumerate()
                .filter(|(_, m)| m.access == Access::RemoteWrite)
                .map(|(i, m)| RegionKey {
                    id: i as u32,
                    // SAFETY: a live MR.
                    rkey: unsafe { (*m.on[r].0).rkey },
                    addr: m.addr,
                    len: m.region.len() as u64,
                })
                .collect();
            blob::put_keys(&mut w, &keys);
        }
        w.u32(self.set.qps as u32);
        let all: Vec<&Qp> = self.spare.iter().flatten().flatten().collect();
        w.u32(all.len() as u32);
        for q in all {
            w.u32(q.qpn);
            w.u32(q.psn);
        }
        w.finish()
    }

    fn reaches(&self, b: &[u8]) -> std::result::Result<(), String> {
        let p = self.parse(b)?;
        // Reachable if some pair of rails is (connect picks which).
        let mut why = Vec::new();
        for (r, rail) in self.rails.iter().enumerate() {
            for (i, theirs) in p.rails.iter().enumerate() {
                match self.rail_reaches(r, theirs) {
                    Ok(()) => return Ok(()),
                    Err(e) if self.rails.len() == 1 && p.rails.len() == 1 => return Err(e),
                    Err(e) => why.push(format!("{} to its rail {i}: {e}", rail.name())),
                }
            }
        }
        Err(why.join("; "))
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
        for r in 0..self.rails.len() {
            let mut here = 0;
            loop {
                let n = self.poll_once(r, out);
                here += n;
                if n < POLL_BATCH {
                    break;
                }
            }
            if self.rails[r].armed && here > 0 {
                // The completion raised the armed CQ's event: take it, so
                // the channel's fd does not stay readable.
                self.take_events(r);
            }
            while self.rails[r].srq_missing >= RECV_BATCH {
                self.repost(r)?;
            }
            found += here;
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
        for r in 0..self.rails.len() {
            if self.rails[r].armed {
                self.take_events(r);
            }
            if !self.rails[r].armed {
                self.arm_cq(r);
            }
        }
        // A completion that came before the arming raised no event: look
        // once more.
        self.poll_all(out);
        Ok(())
    }

    fn wake(&self) -> Wake {
        if self.links.iter().all(|l| l.down) {
            return Wake::Nothing;
        }
        // Every rail's channel: one wait covers all NICs.
        let read = self
            .rails
            .iter()
            // SAFETY: a live channel.
            .map(|r| unsafe { (*r.channel).fd })
            .collect();
        Wake::Fds {
            read,
            write: Vec::new(),
        }
    }

    fn close(&mut self) {
        self.close_links();
    }

    fn abort(&mut self, link: LinkId) {
        self.abort_link(link);
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    fn counters(&self) -> WireCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests;
