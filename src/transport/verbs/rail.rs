//! Rails: one NIC's objects (device and port, protection domain,
//! completion channel and queue, shared receive queue), made when the
//! transport opens, and what the rank's rails say about themselves.

use super::*;

/// One NIC of the rank (a rail): its device and port, protection domain,
/// completion channel and queue, and shared receive queue. Every region
/// is registered on every rail; each link's QPs are on one rail.
#[derive(Debug)]
pub(super) struct Rail {
    pub(super) dev: Box<Device>,
    pub(super) pd: *mut ibv_pd,
    pub(super) channel: *mut ibv_comp_channel,
    pub(super) cq: *mut ibv_cq,
    pub(super) srq: *mut ibv_srq,
    pub(super) srq_depth: usize,
    /// Receives consumed and not yet reposted.
    pub(super) srq_missing: usize,
    pub(super) armed: bool,
    pub(super) unacked: u32,
    /// This rail's QPs by number (QPNs are per device).
    pub(super) by_qpn: HashMap<u32, (LinkId, usize)>,
}

impl Rail {
    pub(super) fn new(dev: Device) -> Rail {
        Rail {
            dev: Box::new(dev),
            pd: std::ptr::null_mut(),
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            srq: std::ptr::null_mut(),
            srq_depth: 0,
            srq_missing: 0,
            armed: false,
            unacked: 0,
            by_qpn: HashMap::new(),
        }
    }

    /// `mlx5_0:1`, for logs and errors.
    pub(super) fn name(&self) -> String {
        format!("{}:{}", self.dev.name, self.dev.port)
    }
}

impl VerbsTransport {
    /// Makes rail `r`'s PD, completion channel, CQ and SRQ (receives
    /// posted).
    pub(super) fn make_rail(&mut self, r: usize, peers: usize) -> Result<()> {
        let lib = self.lib;
        let qps = peers * self.set.qps;
        let rail = &mut self.rails[r];
        let ctx = rail.dev.ctx;
        let what = rail.name();
        // SAFETY: a live context.
        rail.pd = unsafe { (lib.ibv_alloc_pd)(ctx) };
        if rail.pd.is_null() {
            return Err(verbs_err("ibv_alloc_pd", &what, last_errno()));
        }
        // SAFETY: as above.
        rail.channel = unsafe { (lib.ibv_create_comp_channel)(ctx) };
        if rail.channel.is_null() {
            return Err(verbs_err("ibv_create_comp_channel", &what, last_errno()));
        }
        // SAFETY: the channel's fd is ours to set non-blocking.
        unsafe {
            let fd = (*rail.channel).fd;
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
        let a = &rail.dev.attr;
        rail.srq_depth = (RECV_BATCH * 8)
            .max(VERBS_WINDOW * peers * 2)
            .min(a.max_srq_wr.max(RECV_BATCH as i32) as usize);
        let cqe = (qps * SQ_DEPTH + rail.srq_depth).clamp(64, a.max_cqe.max(64) as usize);
        // SAFETY: a live context and channel.
        rail.cq = unsafe {
            (lib.ibv_create_cq)(ctx, cqe as c_int, std::ptr::null_mut(), rail.channel, 0)
        };
        if rail.cq.is_null() {
            return Err(verbs_err(
                "ibv_create_cq",
                &format!("{what}, {cqe} entries"),
                last_errno(),
            ));
        }
        let mut sa = ibv_srq_init_attr::default();
        sa.attr.max_wr = rail.srq_depth as u32;
        sa.attr.max_sge = 1;
        // SAFETY: a live PD and a filled attribute struct.
        rail.srq = unsafe { (lib.ibv_create_srq)(rail.pd, &mut sa) };
        if rail.srq.is_null() {
            return Err(verbs_err(
                "ibv_create_srq",
                &format!("{what}, {} receives", rail.srq_depth),
                last_errno(),
            ));
        }
        rail.srq_missing = rail.srq_depth;
        while self.rails[r].srq_missing >= RECV_BATCH {
            self.repost(r)?;
        }
        Ok(())
    }

    /// The devices and ports in use (`mlx5_0:1`, or `mlx5_0:1,mlx5_1:1`
    /// for several rails), for logs and the bench.
    pub fn device(&self) -> String {
        let names: Vec<String> = self.rails.iter().map(Rail::name).collect();
        names.join(",")
    }

    /// The rails' summed line rate, Gb/s (0 when unknown).
    pub fn port_gbps(&self) -> f64 {
        self.rails.iter().map(|r| r.dev.port_gbps()).sum()
    }

    /// How many NICs (rails) this rank drives.
    pub fn rail_count(&self) -> usize {
        self.rails.len()
    }
}
