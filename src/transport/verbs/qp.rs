//! Queue pairs: creation, the receive queue kept posted, INIT→RTR→RTS, and
//! the peer's endpoint blob.

use super::*;

/// The rail pairs (ours, the peer's) a link between ranks `my_rank` and
/// `peer_rank` (of the two roles) may use, best first, with `mine` and
/// `theirs` rails at the two ends: round-robin by the ranks' sum, which
/// both ends compute alike (each sees the other's pairs mirrored).
pub(super) fn rail_pairs(
    my_rank: u32,
    peer_rank: u32,
    mine: usize,
    theirs: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let s = my_rank as usize + peer_rank as usize;
    let (mine, theirs) = (mine.max(1), theirs.max(1));
    (0..mine.max(theirs)).map(move |t| ((s + t) % mine, (s + t) % theirs))
}

impl VerbsTransport {
    /// An RC QP on rail `r`, in INIT.
    pub(super) fn create_qp(&mut self, r: usize) -> Result<Qp> {
        let lib = self.lib;
        let mut inline = self.set.inline;
        let rail = &self.rails[r];
        loop {
            let mut ia = ibv_qp_init_attr {
                send_cq: rail.cq,
                recv_cq: rail.cq,
                srq: rail.srq,
                qp_type: IBV_QPT_RC,
                sq_sig_all: 0,
                ..Default::default()
            };
            ia.cap.max_send_wr = SQ_DEPTH as u32;
            ia.cap.max_send_sge = MAX_SGE as u32;
            ia.cap.max_inline_data = inline;
            // SAFETY: a live PD, CQ and SRQ; the attributes are filled.
            let qp = unsafe { (lib.ibv_create_qp)(rail.pd, &mut ia) };
            if qp.is_null() {
                let e = last_errno();
                if inline > 0 {
                    // Some devices take no inline data at all.
                    inline = 0;
                    continue;
                }
                return Err(verbs_err(
                    "ibv_create_qp",
                    &format!("RC queue pair on {}", rail.name()),
                    e,
                ));
            }
            let mut psn = [0u8; 4];
            getrandom::fill(&mut psn)
                .map_err(|e| Error::io("random PSN", std::io::Error::other(e.to_string())))?;
            let psn = u32::from_le_bytes(psn) & 0x00ff_ffff;
            let mut a = ibv_qp_attr {
                qp_state: IBV_QPS_INIT,
                pkey_index: 0,
                port_num: rail.dev.port,
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
                return Err(verbs_err(
                    "ibv_modify_qp",
                    &format!("QP {qpn} of {} to INIT", rail.name()),
                    rc,
                ));
            }
            return Ok(q);
        }
    }

    pub(super) fn destroy_qp(&self, q: &Qp) {
        // SAFETY: a QP of ours, destroyed once.
        unsafe { (self.lib.ibv_destroy_qp)(q.qp) };
    }

    /// Posts one batch of receives on rail `r`'s shared receive queue.
    pub(super) fn repost(&mut self, r: usize) -> Result<()> {
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
        let rail = &mut self.rails[r];
        // SAFETY: a live SRQ of a live context whose ops table holds the
        // provider's post_srq_recv (the inline `ibv_post_srq_recv`); the
        // chain is valid for the call.
        let rc = unsafe {
            let ctx = (*rail.srq).context;
            match (*ctx).ops.post_srq_recv {
                Some(f) => f(rail.srq, base, &mut bad),
                None => libc::EOPNOTSUPP,
            }
        };
        if rc != 0 {
            return Err(verbs_err(
                "ibv_post_srq_recv",
                &format!("shared receive queue of {}", rail.name()),
                rc,
            ));
        }
        rail.srq_missing -= n;
        Ok(())
    }

    /// Moves `qp` of rail `r` to RTR and RTS towards the peer's QP
    /// `(qpn, psn)` on its rail `peer`.
    pub(super) fn connect_qp(
        &self,
        r: usize,
        q: &Qp,
        peer: &RailEndpoint,
        remote: (u32, u32),
        who: &str,
    ) -> Result<()> {
        let lib = self.lib;
        let dev = &self.rails[r].dev;
        let on = self.rails[r].name();
        let mut a = ibv_qp_attr {
            qp_state: IBV_QPS_RTR,
            path_mtu: dev.port_attr.active_mtu.min(peer.mtu),
            dest_qp_num: remote.0,
            rq_psn: remote.1,
            max_dest_rd_atomic: 1,
            min_rnr_timer: self.set.min_rnr_timer,
            ..Default::default()
        };
        a.ah_attr.port_num = dev.port;
        a.ah_attr.sl = self.set.sl;
        a.ah_attr.dlid = peer.lid;
        if let (true, Some(gi)) = (peer.roce || dev.roce(), dev.gid_index) {
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
                &format!(
                    "QP {} of {on} to RTR towards {who}'s QP {}",
                    q.qpn, remote.0
                ),
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
                &format!("QP {} of {on} to RTS towards {who}", q.qpn),
                rc,
            ));
        }
        Ok(())
    }

    pub(super) fn parse(&self, b: &[u8]) -> std::result::Result<PeerEndpoint, String> {
        let mut r = blob::reader(b, MAGIC).map_err(|e| e.0)?;
        let e = |e: crate::proto::DecodeError| e.0;
        let n_rails = r.u32("rails").map_err(e)? as usize;
        if n_rails == 0 || n_rails > crate::transport::MAX_RAILS {
            return Err(format!("{n_rails} rails"));
        }
        let mut rails = Vec::with_capacity(n_rails);
        for _ in 0..n_rails {
            let lid = r.u32("lid").map_err(e)? as u16;
            let mut gid = [0u8; 16];
            let hi = r.u64("gid.hi").map_err(e)?;
            let lo = r.u64("gid.lo").map_err(e)?;
            gid[..8].copy_from_slice(&hi.to_be_bytes());
            gid[8..].copy_from_slice(&lo.to_be_bytes());
            let roce = r.u32("link layer").map_err(e)? == 1;
            let mtu = r.u32("mtu").map_err(e)?;
            let keys = blob::get_keys(&mut r).map_err(e)?;
            rails.push(RailEndpoint {
                lid,
                gid,
                roce,
                mtu,
                keys,
            });
        }
        let qps = r.u32("qps per peer").map_err(e)? as usize;
        let n = r.count("queue pairs").map_err(e)?;
        let mut qpn_psn = Vec::with_capacity(n);
        for _ in 0..n {
            qpn_psn.push((r.u32("qpn").map_err(e)?, r.u32("psn").map_err(e)?));
        }
        if qps == 0 || qps > 8 {
            return Err(format!("{qps} queue pairs per peer"));
        }
        if !n.is_multiple_of(qps * n_rails) {
            return Err(format!(
                "{n} queue pairs for {n_rails} rails of {qps} per peer"
            ));
        }
        Ok(PeerEndpoint {
            rails,
            qps,
            qpn_psn,
        })
    }

    /// Whether our rail `r` can reach the peer's rail `p`.
    pub(super) fn rail_reaches(
        &self,
        r: usize,
        p: &RailEndpoint,
    ) -> std::result::Result<(), String> {
        let dev = &self.rails[r].dev;
        if p.roce != dev.roce() {
            return Err(format!(
                "the peer's port is {} and ours {}",
                if p.roce { "RoCE" } else { "InfiniBand" },
                dev.link_layer()
            ));
        }
        if p.roce {
            if p.gid == [0; 16] || dev.gid_index.is_none() {
                return Err("no RoCE GID on one of the ends".into());
            }
        } else if p.lid == 0 {
            return Err("the peer's InfiniBand port has no LID".into());
        } else if p.gid[..8] != dev.gid[..8] {
            return Err("the peer is on another InfiniBand subnet (GID prefix differs)".into());
        }
        Ok(())
    }

    /// The rails a link between ranks `my_rank` and `peer_rank` (of the
    /// two roles) runs on, ours and the peer's, with `theirs` rails
    /// there: round-robin by the sum of the ranks, which both ends
    /// compute alike, so rail i meets rail i when the counts agree. The
    /// first pair in that order that reaches wins.
    pub(super) fn pick_rails(
        &self,
        my_rank: u32,
        peer_rank: u32,
        ep: &PeerEndpoint,
    ) -> std::result::Result<(usize, usize), String> {
        let mut why = Vec::new();
        for (a, b) in rail_pairs(my_rank, peer_rank, self.rails.len(), ep.rails.len()) {
            match self.rail_reaches(a, &ep.rails[b]) {
                Ok(()) => return Ok((a, b)),
                Err(e) => why.push(format!("{} to its rail {b}: {e}", self.rails[a].name())),
            }
        }
        Err(why.join("; "))
    }

    /// [`Transport::connect`]: each peer's QPs taken from the spares of
    /// the rail [`VerbsTransport::pick_rails`] names and brought up
    /// against its blob; the other rails' spares for that peer go.
    pub(super) fn connect_peers(&mut self, peers: &[PeerSpec]) -> Result<Vec<Connected>> {
        let mut up = Vec::with_capacity(peers.len());
        for p in peers {
            let bad = |reason: String| Error::BadFrame {
                peer: p.label.clone(),
                reason: format!("verbs endpoint: {reason}"),
            };
            let ep = self.parse(&p.blob).map_err(bad)?;
            let (rail, theirs_rail) = self
                .pick_rails(p.my_rank, p.peer_rank, &ep)
                .map_err(|e| Error::config(format!("verbs: {} is unreachable: {e}", p.label)))?;
            let n = self.set.qps.min(ep.qps);
            let per_rail = self
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
            let mut mine = Vec::new();
            for (r, list) in per_rail.into_iter().enumerate() {
                if r == rail {
                    mine = list;
                } else {
                    for q in &list {
                        self.destroy_qp(q);
                    }
                }
            }
            let theirs = match ep.qps_for(p.my_rank as usize, theirs_rail) {
                Some(t) => t[..n].to_vec(),
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
            let far = &ep.rails[theirs_rail];
            for (q, r) in use_now.iter().zip(&theirs) {
                if let Err(e) = self.connect_qp(rail, q, far, *r, &p.label) {
                    for q in &use_now {
                        self.destroy_qp(q);
                    }
                    return Err(e);
                }
            }
            let link = self.links.len();
            for (i, q) in use_now.iter().enumerate() {
                self.rails[rail].by_qpn.insert(q.qpn, (link, i));
            }
            let probe_at = far.keys.first().map(|k| (k.addr, k.rkey));
            self.links.push(Link {
                peer: p.label.clone(),
                rail,
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
                remote: far.keys.clone(),
            });
            if self.rails.len() != ep.rails.len() {
                tracing::info!(
                    "verbs: link to {} over our {} and its rail {theirs_rail} ({n} QPs): we have {} rails and it {}, paired round-robin",
                    p.label,
                    self.rails[rail].name(),
                    self.rails.len(),
                    ep.rails.len()
                );
            } else {
                tracing::debug!(
                    "verbs: link to {} over {} (rail {rail} of {}, {n} QPs)",
                    p.label,
                    self.rails[rail].name(),
                    self.rails.len()
                );
            }
        }
        self.connected = true;
        Ok(up)
    }
}
