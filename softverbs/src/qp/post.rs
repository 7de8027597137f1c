//! Posting work requests: receives onto a receive ring (a QP's own or an
//! SRQ's), sends onto the QP's queue, which `progress` then runs.

use super::progress::{flush_rq, progress};
use super::{Pending, Qp};
use crate::abi::*;
use crate::fabric;
use crate::guard;
use crate::ring::{self, RecvWr};
use crate::shm::Mapping;

/// Posts a list of receives onto `rq`.
///
/// # Safety
/// `wr` is NULL or a valid list; `bad` is NULL or writable.
pub unsafe fn post_recv_list(
    rq: &Mapping,
    max_sge: u32,
    mut wr: *mut ibv_recv_wr,
    bad: *mut *mut ibv_recv_wr,
) -> i32 {
    while !wr.is_null() {
        // SAFETY: a valid list element (caller's contract).
        let w = unsafe { &*wr };
        let fail = |e: i32| {
            if !bad.is_null() {
                // SAFETY: writable (caller's contract).
                unsafe { *bad = wr };
            }
            e
        };
        if w.num_sge < 0 || w.num_sge as u32 > max_sge || (w.num_sge > 0 && w.sg_list.is_null()) {
            return fail(libc::EINVAL);
        }
        let mut r = RecvWr {
            wr_id: w.wr_id,
            num_sge: w.num_sge as u32,
            ..RecvWr::default()
        };
        for i in 0..w.num_sge as usize {
            // SAFETY: `sg_list` holds `num_sge` entries.
            r.sge[i] = unsafe { *w.sg_list.add(i) };
        }
        if !ring::rq_push(rq, &r) {
            return fail(libc::ENOMEM);
        }
        wr = w.next;
    }
    0
}

/// The `post_recv` op behind `ibv_post_recv`.
///
/// # Safety
/// Pointers are valid.
pub unsafe extern "C" fn post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad: *mut *mut ibv_recv_wr,
) -> i32 {
    guard(libc::EIO, || {
        if qp.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live QP.
        let q = unsafe { &*qp.cast::<Qp>() };
        let sh = &q.shared;
        let Some((rq, _)) = &sh.rq else {
            // A QP on an SRQ has no receive queue of its own.
            if !bad.is_null() {
                // SAFETY: writable (caller's contract).
                unsafe { *bad = wr };
            }
            return libc::EINVAL;
        };
        let state = sh.inner.lock().unwrap_or_else(|p| p.into_inner()).state;
        if state == IBV_QPS_RESET {
            if !bad.is_null() {
                // SAFETY: writable.
                unsafe { *bad = wr };
            }
            return libc::EINVAL;
        }
        // SAFETY: forwarded contract.
        let r = unsafe { post_recv_list(rq, sh.cap.max_recv_sge, wr, bad) };
        if r == 0 && state == IBV_QPS_ERR {
            if let Ok(f) = fabric::get() {
                flush_rq(f, sh);
            }
        }
        r
    })
}

/// The `post_send` op behind `ibv_post_send`.
///
/// # Safety
/// Pointers are valid.
pub unsafe extern "C" fn post_send(
    qp: *mut ibv_qp,
    mut wr: *mut ibv_send_wr,
    bad: *mut *mut ibv_send_wr,
) -> i32 {
    guard(libc::EIO, || {
        let Ok(f) = fabric::get() else {
            return libc::EIO;
        };
        if qp.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live QP.
        let sh = unsafe { (*qp.cast::<Qp>()).shared.clone() };
        let mut inner = sh.inner.lock().unwrap_or_else(|p| p.into_inner());
        let fail = |e: i32, w: *mut ibv_send_wr| {
            if !bad.is_null() {
                // SAFETY: writable (caller's contract).
                unsafe { *bad = w };
            }
            e
        };
        let faults = crate::fault::get().ok();
        if !matches!(inner.state, IBV_QPS_RTS | IBV_QPS_SQD | IBV_QPS_ERR) {
            return fail(libc::EINVAL, wr);
        }
        while !wr.is_null() {
            // SAFETY: a valid list element (caller's contract).
            let w = unsafe { &*wr };
            if w.num_sge < 0
                || w.num_sge as u32 > sh.cap.max_send_sge
                || (w.num_sge > 0 && w.sg_list.is_null())
            {
                return fail(libc::EINVAL, wr);
            }
            if !matches!(
                w.opcode,
                IBV_WR_RDMA_WRITE
                    | IBV_WR_RDMA_WRITE_WITH_IMM
                    | IBV_WR_SEND
                    | IBV_WR_SEND_WITH_IMM
                    | IBV_WR_RDMA_READ
                    | IBV_WR_ATOMIC_CMP_AND_SWP
                    | IBV_WR_ATOMIC_FETCH_AND_ADD
            ) {
                return fail(libc::EINVAL, wr);
            }
            // An atomic returns the old 8 bytes into one local entry.
            // SAFETY: `sg_list` holds `num_sge` entries.
            if w.is_atomic() && (w.num_sge != 1 || unsafe { (*w.sg_list).length } < 8) {
                return fail(libc::EINVAL, wr);
            }
            if inner.pending.len() >= sh.cap.max_send_wr as usize {
                return fail(libc::ENOMEM, wr);
            }
            // SAFETY: `sg_list` holds `num_sge` entries.
            let sges: Vec<ibv_sge> = (0..w.num_sge as usize)
                .map(|i| unsafe { *w.sg_list.add(i) })
                .collect();
            let inline = if w.send_flags & IBV_SEND_INLINE != 0
                && w.opcode != IBV_WR_RDMA_READ
                && !w.is_atomic()
            {
                let total: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
                if total > u64::from(sh.cap.max_inline_data) {
                    return fail(libc::EINVAL, wr);
                }
                let mut v = Vec::with_capacity(total as usize);
                for s in &sges {
                    // SAFETY: inline data is read from the caller's memory
                    // at post time, which the verbs contract makes valid.
                    v.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(s.addr as *const u8, s.length as usize)
                    });
                }
                Some(v)
            } else {
                None
            };
            inner.posted += 1;
            let fault = faults.and_then(|f| f.on_post(sh.ordinal, inner.posted));
            inner.pending.push_back(Pending {
                wr_id: w.wr_id,
                opcode: w.opcode,
                flags: w.send_flags,
                imm: w.imm_data,
                sges,
                inline,
                remote_addr: w.wr.remote_addr,
                rkey: if w.is_atomic() {
                    w.wr.atomic_rkey
                } else {
                    w.rdma_rkey()
                },
                compare_add: w.wr.rkey_or_compare_add,
                swap: w.wr.swap,
                fault,
            });
            wr = w.next;
        }
        progress(f, &sh, &mut inner);
        0
    })
}
