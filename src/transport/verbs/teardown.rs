//! Taking links down: one link on an error or an abort (its QPs to the
//! error state, its posted work drained, bounded), every link on `close`
//! (a goodbye write each first), and every verbs object on drop.

use super::*;

/// Bound on waiting for an aborted link's posted work to flush.
const ABORT_DRAIN: Duration = Duration::from_millis(200);

impl VerbsTransport {
    /// Takes `link` down once, reporting `reason` as its `LinkDown`.
    pub(super) fn mark_down(&mut self, link: LinkId, reason: String, out: &mut Vec<Completion>) {
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
    pub(super) fn fail_qps(&mut self, link: LinkId) {
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

    /// `Transport::close`: a goodbye on QP 0 of each live link, bounded
    /// wait for their completions, then every link down.
    pub(super) fn close_links(&mut self) {
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
            self.poll_all(&mut out);
            std::thread::yield_now();
        }
        for link in 0..self.links.len() {
            if !self.links[link].down {
                self.links[link].down = true;
                self.fail_qps(link);
            }
        }
    }

    /// `Transport::abort`: the link down and its posted work flushed
    /// (bounded), completions kept for the next `progress`.
    pub(super) fn abort_link(&mut self, link: LinkId) {
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
            if self.poll_all(&mut out) == 0 {
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
}

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        let lib = self.lib;
        // SAFETY: every object below was made by this value and is
        // destroyed once, QPs before the SRQs and CQs they use, each CQ's
        // events acked before it goes, MRs and everything else before
        // their PD, each context last.
        unsafe {
            for l in &self.links {
                for q in &l.qps {
                    (lib.ibv_destroy_qp)(q.qp);
                }
            }
            for q in self.spare.iter().flatten().flatten() {
                (lib.ibv_destroy_qp)(q.qp);
            }
            for r in 0..self.rails.len() {
                let rail = &self.rails[r];
                if !rail.srq.is_null() {
                    (lib.ibv_destroy_srq)(rail.srq);
                }
                if !rail.cq.is_null() {
                    if rail.armed {
                        self.take_events(r);
                    }
                    let rail = &self.rails[r];
                    if rail.unacked > 0 {
                        (lib.ibv_ack_cq_events)(rail.cq, rail.unacked);
                    }
                    (lib.ibv_destroy_cq)(rail.cq);
                }
                let rail = &self.rails[r];
                if !rail.channel.is_null() {
                    (lib.ibv_destroy_comp_channel)(rail.channel);
                }
            }
            for m in &self.mrs {
                for &(mr, _) in &m.on {
                    (lib.ibv_dereg_mr)(mr);
                }
            }
            for &mr in &self.loose {
                (lib.ibv_dereg_mr)(mr);
            }
            for rail in &self.rails {
                if !rail.pd.is_null() {
                    (lib.ibv_dealloc_pd)(rail.pd);
                }
                (lib.ibv_close_device)(rail.dev.ctx);
            }
        }
    }
}
