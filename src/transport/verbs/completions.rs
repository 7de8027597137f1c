//! Completions: retiring posted work, arrivals from write-with-imm,
//! the completion channel, idle probes, and asynchronous events.

use super::*;

impl VerbsTransport {
    /// Retires QP `qi` of `link` up to and including send position `pos`.
    pub(super) fn retire(
        &mut self,
        link: LinkId,
        qi: usize,
        pos32: u64,
        out: &mut Vec<Completion>,
    ) {
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

    /// One completion of rail `r`'s CQ.
    pub(super) fn on_completion(&mut self, r: usize, wc: &ibv_wc, out: &mut Vec<Completion>) {
        let recv = wc.wr_id & RECV_TAG != 0;
        if recv {
            self.rails[r].srq_missing += 1;
        }
        let Some(&(link, qi)) = self.rails[r].by_qpn.get(&wc.qp_num) else {
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
                "verbs {op} with {} failed: {} (QP {} on {}, vendor error {:#x})",
                self.links[link].peer,
                status_name(self.lib, wc.status),
                wc.qp_num,
                self.rails[r].name(),
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

    /// Polls rail `r`'s CQ once; returns how many completions it found.
    pub(super) fn poll_once(&mut self, r: usize, out: &mut Vec<Completion>) -> usize {
        let cq = self.rails[r].cq;
        // SAFETY: a live CQ of a live context whose ops table holds the
        // provider's poll_cq (the inline `ibv_poll_cq`); the array holds
        // POLL_BATCH entries.
        let n = unsafe {
            let ctx = (*cq).context;
            match (*ctx).ops.poll_cq {
                Some(f) => f(cq, POLL_BATCH as c_int, self.wcs.as_mut_ptr()),
                None => -1,
            }
        };
        if n <= 0 {
            return 0;
        }
        for i in 0..n as usize {
            let wc = self.wcs[i];
            self.on_completion(r, &wc, out);
        }
        n as usize
    }

    /// Takes rail `r`'s channel's pending events (non-blocking) and acks
    /// them in batches.
    pub(super) fn take_events(&mut self, r: usize) {
        let lib = self.lib;
        let rail = &mut self.rails[r];
        loop {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: a live channel, whose fd is non-blocking.
            let rc = unsafe { (lib.ibv_get_cq_event)(rail.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                break;
            }
            rail.armed = false;
            rail.unacked += 1;
        }
        if rail.unacked >= 64 {
            // SAFETY: acks events taken from this CQ.
            unsafe { (lib.ibv_ack_cq_events)(rail.cq, rail.unacked) };
            rail.unacked = 0;
        }
    }

    /// Arms rail `r`'s CQ for its next completion's event.
    pub(super) fn arm_cq(&mut self, r: usize) {
        let rail = &mut self.rails[r];
        // SAFETY: a live CQ; the inline `ibv_req_notify_cq` through ops.
        let rc = unsafe {
            let ctx = (*rail.cq).context;
            match (*ctx).ops.req_notify_cq {
                Some(f) => f(rail.cq, 0),
                None => -1,
            }
        };
        rail.armed = rc == 0;
    }

    /// When idle: flush unsignalled tails, probe links that are due.
    pub(super) fn idle_work(&mut self, out: &mut Vec<Completion>) {
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
                            let l = &self.links[link];
                            let reason = format!(
                                "verbs: ibv_post_send (probe) to {} on {} failed: {}",
                                l.peer,
                                self.rails[l.rail].name(),
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
            for r in 0..self.rails.len() {
                self.async_events(r, out);
            }
        }
    }

    /// Takes rail `r`'s device's asynchronous events (non-blocking): a
    /// QP's fatal or access error takes its link down, a port or device
    /// error every link on that rail.
    pub(super) fn async_events(&mut self, r: usize, out: &mut Vec<Completion>) {
        let (Some(get), Some(ack)) = (self.lib.ibv_get_async_event, self.lib.ibv_ack_async_event)
        else {
            return;
        };
        for _ in 0..64 {
            // SAFETY: plain data; all-zero is a valid value.
            let mut ev: ibv_async_event = unsafe { std::mem::zeroed() };
            // SAFETY: a live context whose async fd was made non-blocking.
            if unsafe { get(self.rails[r].dev.ctx, &mut ev) } != 0 {
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
                let l = &self.links[link];
                let hit = l.rail == r && (!qp_event || l.qps.iter().any(|q| q.qp == qp));
                if hit {
                    let reason = format!(
                        "verbs: asynchronous event {name} on {} (link to {})",
                        self.rails[r].name(),
                        self.links[link].peer
                    );
                    self.mark_down(link, reason, out);
                }
            }
        }
    }
}
