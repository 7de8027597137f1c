//! The post path: a message as one write-with-imm per QP stripe.

use super::*;

impl VerbsTransport {
    /// Posts one write on QP `qi` of link `link`. `msg` is the message slot
    /// ([`NO_MSG`] for none).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn post(
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

    /// [`Transport::post_write`]: one write-with-imm per message per QP
    /// stripe, straight from registered memory (inline when small).
    pub(super) fn post_message(
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
        let rail = self.links[link].rail;
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
                lkey: m.on[rail].1,
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
                if let Some(c) = self.counters.rail_messages.get_mut(rail) {
                    *c += 1;
                    self.counters.rail_bytes[rail] += total;
                }
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
                    "verbs: ibv_post_send to {peer} on {} failed: {}",
                    self.rails[rail].name(),
                    std::io::Error::from_raw_os_error(rc)
                );
                let mut out = std::mem::take(&mut self.backlog);
                self.mark_down(link, reason, &mut out);
                self.backlog = out;
                Err(Error::io(
                    format!("write to {peer} on {}", self.rails[rail].name()),
                    std::io::Error::from_raw_os_error(rc),
                ))
            }
        }
    }
}
