//! The RDMA half of execution: WRITE, WRITE_WITH_IMM and READ move bytes
//! straight to or from the target's registered memory, named by remote key
//! and address; WRITE_WITH_IMM also consumes a receive to carry its
//! immediate. Atomics read, compute and write 8 bytes of the target's
//! memory under the namespace's atomic lock.

use std::sync::atomic::Ordering;

use super::execute::{iov, pvm_error, take_recv, transfer, Checked, MrEntry, Outcome, Remote};
use super::{Pending, QpShared};
use crate::abi::*;
use crate::fabric::Fabric;
use crate::shm;

/// Executes an RDMA WRITE, WRITE_WITH_IMM or READ whose target and local
/// memory `t` has checked.
pub(super) fn execute_rdma(f: &Fabric, sh: &QpShared, p: &Pending, t: &Checked<'_>) -> Outcome {
    let read = p.opcode == IBV_WR_RDMA_READ;
    // What the region and the target QP must both allow.
    let need = if read {
        IBV_ACCESS_REMOTE_READ
    } else {
        IBV_ACCESS_REMOTE_WRITE
    };
    let remote = if t.len == 0 {
        Some(0)
    } else {
        MrEntry::lookup(f, p.rkey)
            .and_then(|m| m.translate(t.pid, t.pd, need, p.remote_addr, t.len))
    };
    let Some(remote) = remote else {
        return Outcome::Fail(IBV_WC_REM_ACCESS_ERR);
    };
    if t.qp.access.load(Ordering::Acquire) & need != need {
        return Outcome::Fail(IBV_WC_REM_ACCESS_ERR);
    }
    let recv = if p.opcode == IBV_WR_RDMA_WRITE_WITH_IMM {
        match take_recv(f, t.slot) {
            Err(s) => return Outcome::Fail(s),
            Ok(None) => return Outcome::Rnr,
            Ok(Some(r)) => Some(r),
        }
    } else {
        None
    };
    if t.len > 0 {
        let r = [iov(remote, t.len as usize)];
        if let Err(e) = transfer(t.pid, &t.local, &r, !read) {
            return Outcome::Fail(pvm_error(f, t.pid, e));
        }
    }
    if let Some(r) = recv {
        let wc = ibv_wc {
            wr_id: r.wr_id,
            status: IBV_WC_SUCCESS,
            opcode: IBV_WC_RECV_RDMA_WITH_IMM,
            byte_len: t.len as u32,
            imm_data: p.imm,
            qp_num: t.qp.qpn.load(Ordering::Acquire),
            src_qp: sh.qpn,
            wc_flags: IBV_WC_WITH_IMM,
            slid: t.slid,
            ..ibv_wc::default()
        };
        return Outcome::Done(
            t.len as u32,
            Some(Remote {
                slot: t.slot,
                wc,
                solicited: p.flags & IBV_SEND_SOLICITED != 0,
            }),
        );
    }
    Outcome::Done(t.len as u32, None)
}

/// Executes an atomic compare-and-swap or fetch-and-add on 8 aligned
/// bytes (host byte order, as rxe and siw do) of the target's memory; the
/// old value lands in the initiator's local entry.
pub(super) fn execute_atomic(f: &Fabric, p: &Pending, t: &Checked<'_>) -> Outcome {
    if !p.remote_addr.is_multiple_of(8) {
        return Outcome::Fail(IBV_WC_REM_INV_REQ_ERR);
    }
    let remote = MrEntry::lookup(f, p.rkey)
        .and_then(|m| m.translate(t.pid, t.pd, IBV_ACCESS_REMOTE_ATOMIC, p.remote_addr, 8));
    let Some(remote) = remote else {
        return Outcome::Fail(IBV_WC_REM_ACCESS_ERR);
    };
    if t.qp.access.load(Ordering::Acquire) & IBV_ACCESS_REMOTE_ATOMIC == 0 {
        return Outcome::Fail(IBV_WC_REM_ACCESS_ERR);
    }
    let Some(dst) = t.local.first().filter(|v| v.iov_len >= 8) else {
        return Outcome::Fail(IBV_WC_LOC_LEN_ERR);
    };
    let mut old = 0u64;
    let here = [iov(&mut old as *mut u64 as u64, 8)];
    let there = [iov(remote, 8)];
    {
        let _g = shm::lock(f.atomic_lock());
        if let Err(e) = transfer(t.pid, &here, &there, false) {
            return Outcome::Fail(pvm_error(f, t.pid, e));
        }
        let new = if p.opcode == IBV_WR_ATOMIC_CMP_AND_SWP {
            (old == p.compare_add).then_some(p.swap)
        } else {
            Some(old.wrapping_add(p.compare_add))
        };
        if let Some(mut v) = new {
            let src = [iov(&mut v as *mut u64 as u64, 8)];
            if let Err(e) = transfer(t.pid, &src, &there, true) {
                return Outcome::Fail(pvm_error(f, t.pid, e));
            }
        }
    }
    // SAFETY: `dst` is this process's registered, locally writable memory
    // (checked by `execute`), at least 8 bytes.
    unsafe { std::ptr::write_unaligned(dst.iov_base.cast::<u64>(), old) };
    Outcome::Done(8, None)
}
