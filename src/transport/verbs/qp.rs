//! Queue pairs: creation, the receive queue kept posted, INIT→RTR→RTS, and
//! the peer's endpoint blob.

use super::*;

impl VerbsTransport {
    pub(super) fn create_qp(&mut self) -> Result<Qp> {
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

    pub(super) fn destroy_qp(&self, q: &Qp) {
        // SAFETY: a QP of ours, destroyed once.
        unsafe { (self.lib.ibv_destroy_qp)(q.qp) };
    }

    /// Posts one batch of receives on the shared receive queue.
    pub(super) fn repost(&mut self) -> Result<()> {
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
    pub(super) fn connect_qp(
        &self,
        q: &Qp,
        peer: &PeerEndpoint,
        remote: (u32, u32),
        who: &str,
    ) -> Result<()> {
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

    pub(super) fn parse(&self, b: &[u8]) -> std::result::Result<PeerEndpoint, String> {
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

    /// [`Transport::connect`]: each peer's QPs taken from the spares and
    /// brought up against its blob.
    pub(super) fn connect_peers(&mut self, peers: &[PeerSpec]) -> Result<Vec<Connected>> {
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
}
