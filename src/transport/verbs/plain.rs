//! Plain verbs, for the bench's floor: one buffer, one CQ polled busily,
//! one RC QP per peer with its own receive queue, every write signalled.
//! Each method is one verbs call; there is no window, striping, SRQ,
//! selective signalling or link logic — what the transport adds is what
//! the floor leaves out. Not used by the transport itself.

use std::ffi::c_int;

use super::device::{Device, Settings, Wanted};
use super::library::{self, Verbs};
use super::sys::*;
use crate::error::{Error, Result};

/// What one completion was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A write of ours completed on QP `qp`.
    Sent {
        /// QP index.
        qp: usize,
    },
    /// A peer's write-with-imm landed on QP `qp`.
    Landed {
        /// QP index.
        qp: usize,
        /// Its imm.
        imm: u32,
    },
}

/// One process's plain-verbs endpoint.
pub struct PlainEndpoint {
    lib: &'static Verbs,
    dev: Box<Device>,
    /// The line rate of every rail the transport would drive, Gb/s.
    rails_gbps: f64,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    mr: *mut ibv_mr,
    buf: Vec<u8>,
    qps: Vec<(*mut ibv_qp, u32, u32)>,
    remote: Vec<(u64, u32)>,
    wcs: Vec<ibv_wc>,
}

impl std::fmt::Debug for PlainEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainEndpoint")
            .field("qps", &self.qps.len())
            .finish()
    }
}

fn fail(call: &str) -> Error {
    Error::io(
        format!("plain verbs: {call}"),
        std::io::Error::last_os_error(),
    )
}

impl PlainEndpoint {
    /// Opens the device (as the transport would choose it), registers a
    /// buffer of `len` bytes (filled, so every page is real) and makes `peers` QPs, each with
    /// `recvs` receives posted.
    pub fn new(len: usize, peers: usize, recvs: usize) -> Result<PlainEndpoint> {
        let lib = library::verbs().map_err(|e| Error::Unsupported(format!("verbs: {e}")))?;
        // Every listed rail is opened for its line rate (what the mesh's
        // share of line rate is measured against); the floor itself moves
        // its bytes on the first.
        let mut devs = Device::open_all(
            lib,
            &Wanted::from_env()?,
            std::env::var("AFMESH_IB_GID_INDEX").ok(),
        )?;
        let rails_gbps = devs.iter().map(Device::port_gbps).sum();
        for d in devs.drain(1..) {
            // SAFETY: opened by `open_all`, nothing made on it.
            unsafe { (lib.ibv_close_device)(d.ctx) };
        }
        let dev = Box::new(devs.remove(0));
        let mut e = PlainEndpoint {
            lib,
            dev,
            rails_gbps,
            pd: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            mr: std::ptr::null_mut(),
            // Real pages, not the shared zero page a fresh allocation
            // reads as: the floor moves bytes from memory like the mesh.
            buf: vec![0x5au8; len.max(64)],
            qps: Vec::new(),
            remote: vec![(0, 0); peers],
            wcs: vec![ibv_wc::default(); 64],
        };
        // SAFETY: a live context.
        e.pd = unsafe { (lib.ibv_alloc_pd)(e.dev.ctx) };
        if e.pd.is_null() {
            return Err(fail("ibv_alloc_pd"));
        }
        let cqe = (peers * (recvs + 256)).clamp(64, 65536) as c_int;
        // SAFETY: a live context.
        e.cq = unsafe {
            (lib.ibv_create_cq)(
                e.dev.ctx,
                cqe,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if e.cq.is_null() {
            return Err(fail("ibv_create_cq"));
        }
        let access = (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE) as c_int;
        // SAFETY: the buffer lives as long as the endpoint, which
        // deregisters it first when dropped.
        e.mr = unsafe { (lib.ibv_reg_mr)(e.pd, e.buf.as_mut_ptr().cast(), e.buf.len(), access) };
        if e.mr.is_null() {
            return Err(fail("ibv_reg_mr"));
        }
        let set = Settings::default();
        for _ in 0..peers {
            let mut ia = ibv_qp_init_attr {
                send_cq: e.cq,
                recv_cq: e.cq,
                qp_type: IBV_QPT_RC,
                ..Default::default()
            };
            ia.cap.max_send_wr = 256;
            ia.cap.max_recv_wr = recvs as u32;
            ia.cap.max_send_sge = 1;
            ia.cap.max_recv_sge = 1;
            // SAFETY: live PD and CQ.
            let qp = unsafe { (lib.ibv_create_qp)(e.pd, &mut ia) };
            if qp.is_null() {
                return Err(fail("ibv_create_qp"));
            }
            // SAFETY: a live QP.
            let qpn = unsafe { (*qp).qp_num };
            e.qps.push((qp, qpn, qpn & 0xff_ffff));
            let mut a = ibv_qp_attr {
                qp_state: IBV_QPS_INIT,
                port_num: e.dev.port,
                qp_access_flags: IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE,
                ..Default::default()
            };
            let mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
            // SAFETY: a live QP.
            if unsafe { (lib.ibv_modify_qp)(qp, &mut a, mask as c_int) } != 0 {
                return Err(fail("ibv_modify_qp INIT"));
            }
            for _ in 0..recvs {
                e.post_recv(e.qps.len() - 1)?;
            }
        }
        let _ = set;
        Ok(e)
    }

    /// The buffer (what peers' writes land in).
    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// The line rate of every rail `AFMESH_IB_DEVICE` lists, summed,
    /// Gb/s (the floor moves its bytes on the first).
    pub fn port_gbps(&self) -> f64 {
        self.rails_gbps
    }

    /// Device name.
    pub fn device(&self) -> &str {
        &self.dev.name
    }

    /// This end of QP `i`, as one line of text for the peer.
    pub fn info(&self, i: usize) -> String {
        let g: String = self.dev.gid.iter().map(|b| format!("{b:02x}")).collect();
        // SAFETY: a live MR.
        let rkey = unsafe { (*self.mr).rkey };
        format!(
            "{} {} {} {} {} {} {}",
            self.dev.port_attr.lid,
            g,
            self.dev.port_attr.active_mtu,
            self.qps[i].1,
            self.qps[i].2,
            self.buf.as_ptr() as u64,
            rkey
        )
    }

    /// Connects QP `i` to the peer whose [`PlainEndpoint::info`] is `peer`.
    pub fn connect(&mut self, i: usize, peer: &str) -> Result<()> {
        let bad = || Error::config(format!("plain verbs: bad peer info {peer:?}"));
        let f: Vec<&str> = peer.split_whitespace().collect();
        if f.len() != 7 || f[1].len() != 32 {
            return Err(bad());
        }
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let mut gid = [0u8; 16];
        for (k, b) in gid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&f[1][2 * k..2 * k + 2], 16).map_err(|_| bad())?;
        }
        let (lid, mtu, qpn, psn) = (
            n(f[0])? as u16,
            n(f[2])? as u32,
            n(f[3])? as u32,
            n(f[4])? as u32,
        );
        self.remote[i] = (n(f[5])?, n(f[6])? as u32);
        let set = Settings::default();
        let qp = self.qps[i].0;
        let mut a = ibv_qp_attr {
            qp_state: IBV_QPS_RTR,
            path_mtu: mtu.min(self.dev.port_attr.active_mtu),
            dest_qp_num: qpn,
            rq_psn: psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: set.min_rnr_timer,
            ..Default::default()
        };
        a.ah_attr.port_num = self.dev.port;
        a.ah_attr.dlid = lid;
        if let (true, Some(gi)) = (self.dev.roce(), self.dev.gid_index) {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: gid };
            a.ah_attr.grh.sgid_index = gi;
            a.ah_attr.grh.hop_limit = 64;
        }
        let mask = IBV_QP_STATE
            | IBV_QP_AV
            | IBV_QP_PATH_MTU
            | IBV_QP_DEST_QPN
            | IBV_QP_RQ_PSN
            | IBV_QP_MAX_DEST_RD_ATOMIC
            | IBV_QP_MIN_RNR_TIMER;
        // SAFETY: a live QP.
        if unsafe { (self.lib.ibv_modify_qp)(qp, &mut a, mask as c_int) } != 0 {
            return Err(fail("ibv_modify_qp RTR"));
        }
        let mut a = ibv_qp_attr {
            qp_state: IBV_QPS_RTS,
            timeout: set.timeout,
            retry_cnt: set.retry_cnt,
            rnr_retry: set.rnr_retry,
            sq_psn: self.qps[i].2,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = IBV_QP_STATE
            | IBV_QP_TIMEOUT
            | IBV_QP_RETRY_CNT
            | IBV_QP_RNR_RETRY
            | IBV_QP_SQ_PSN
            | IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: a live QP.
        if unsafe { (self.lib.ibv_modify_qp)(qp, &mut a, mask as c_int) } != 0 {
            return Err(fail("ibv_modify_qp RTS"));
        }
        Ok(())
    }

    /// Posts one receive (for one write-with-imm) on QP `i`.
    pub fn post_recv(&mut self, i: usize) -> Result<()> {
        let mut wr = ibv_recv_wr {
            wr_id: i as u64,
            ..Default::default()
        };
        let mut bad = std::ptr::null_mut();
        let qp = self.qps[i].0;
        // SAFETY: a live QP; the inline `ibv_post_recv` through ops.
        let rc = unsafe {
            match (*(*qp).context).ops.post_recv {
                Some(f) => f(qp, &mut wr, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(Error::io(
                "plain verbs: ibv_post_recv",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// One signalled write-with-imm of `len` bytes at `at` of the buffer
    /// to `to` of the peer's on QP `i`.
    pub fn write(&mut self, i: usize, at: usize, len: usize, to: u64, imm: u32) -> Result<()> {
        // SAFETY: a live MR.
        let lkey = unsafe { (*self.mr).lkey };
        let mut sge = ibv_sge {
            addr: self.buf.as_ptr() as u64 + at as u64,
            length: len as u32,
            lkey,
        };
        let mut wr = ibv_send_wr {
            wr_id: i as u64,
            sg_list: &mut sge,
            num_sge: 1,
            opcode: IBV_WR_RDMA_WRITE_WITH_IMM,
            send_flags: IBV_SEND_SIGNALED,
            ..Default::default()
        };
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        wr.wr.rdma = ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
            remote_addr: self.remote[i].0 + to,
            rkey: self.remote[i].1,
        };
        let mut bad = std::ptr::null_mut();
        let qp = self.qps[i].0;
        // SAFETY: a live QP; the gather list is in the registered buffer.
        let rc = unsafe {
            match (*(*qp).context).ops.post_send {
                Some(f) => f(qp, &mut wr, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(Error::io(
                "plain verbs: ibv_post_send",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Polls the CQ once, appending what completed.
    pub fn poll(&mut self, out: &mut Vec<Event>) -> Result<()> {
        // SAFETY: a live CQ; the inline `ibv_poll_cq` through ops.
        let n = unsafe {
            match (*(*self.cq).context).ops.poll_cq {
                Some(f) => f(self.cq, self.wcs.len() as c_int, self.wcs.as_mut_ptr()),
                None => -1,
            }
        };
        if n < 0 {
            return Err(Error::io(
                "plain verbs: ibv_poll_cq",
                std::io::Error::other("failed"),
            ));
        }
        for wc in &self.wcs[..n as usize] {
            if wc.status != IBV_WC_SUCCESS {
                return Err(Error::io(
                    "plain verbs: completion",
                    std::io::Error::other(format!("status {}", wc.status)),
                ));
            }
            let qp = wc.wr_id as usize;
            if wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM {
                // SAFETY: a write-with-imm's completion carries the imm.
                let imm = u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data });
                out.push(Event::Landed { qp, imm });
            } else {
                out.push(Event::Sent { qp });
            }
        }
        Ok(())
    }
}

impl Drop for PlainEndpoint {
    fn drop(&mut self) {
        let lib = self.lib;
        // SAFETY: objects made here, destroyed once, in dependency order.
        unsafe {
            for q in &self.qps {
                (lib.ibv_destroy_qp)(q.0);
            }
            if !self.mr.is_null() {
                (lib.ibv_dereg_mr)(self.mr);
            }
            if !self.cq.is_null() {
                (lib.ibv_destroy_cq)(self.cq);
            }
            if !self.pd.is_null() {
                (lib.ibv_dealloc_pd)(self.pd);
            }
            (lib.ibv_close_device)(self.dev.ctx);
        }
    }
}
