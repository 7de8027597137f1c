//! The SEND half of execution: SEND and SEND_WITH_IMM consume a receive
//! the target posted and scatter into its entries, which must be the
//! target's own registered, locally writable memory and hold the message.

use std::sync::atomic::Ordering;

use super::execute::{
    iov, push_remote, pvm_error, take_recv, transfer, Checked, MrEntry, Outcome, Remote,
};
use super::{Pending, QpShared};
use crate::abi::*;
use crate::fabric::Fabric;

/// Executes a SEND or SEND_WITH_IMM whose target and local memory `t` has
/// checked.
pub(super) fn execute_send(f: &Fabric, sh: &QpShared, p: &Pending, t: &Checked<'_>) -> Outcome {
    let r = match take_recv(f, t.slot) {
        Err(s) => return Outcome::Fail(s),
        Ok(None) => return Outcome::Rnr,
        Ok(Some(r)) => r,
    };
    let rqpn = t.qp.qpn.load(Ordering::Acquire);
    let recv_fail = |status: u32| ibv_wc {
        wr_id: r.wr_id,
        status,
        opcode: IBV_WC_RECV,
        qp_num: rqpn,
        src_qp: sh.qpn,
        slid: t.slid,
        ..ibv_wc::default()
    };
    let sges = &r.sge[..r.num_sge as usize];
    let room: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
    if room < t.len {
        push_remote(f, t.slot, &recv_fail(IBV_WC_LOC_LEN_ERR), false);
        t.qp.state.store(IBV_QPS_ERR, Ordering::Release);
        return Outcome::Fail(IBV_WC_REM_INV_REQ_ERR);
    }
    // Each entry checked and translated to the target's address, then
    // scattered into in order, up to the message's length.
    let targets: Option<Vec<(u64, u64)>> = sges
        .iter()
        .filter(|s| s.length > 0)
        .map(|s| {
            MrEntry::lookup(f, s.lkey)
                .and_then(|m| {
                    m.translate(
                        t.pid,
                        t.pd,
                        IBV_ACCESS_LOCAL_WRITE,
                        s.addr,
                        u64::from(s.length),
                    )
                })
                .map(|va| (va, u64::from(s.length)))
        })
        .collect();
    let Some(targets) = targets else {
        push_remote(f, t.slot, &recv_fail(IBV_WC_LOC_PROT_ERR), false);
        t.qp.state.store(IBV_QPS_ERR, Ordering::Release);
        return Outcome::Fail(IBV_WC_REM_OP_ERR);
    };
    let mut left = t.len;
    let mut remote = Vec::new();
    for (va, n) in targets {
        if left == 0 {
            break;
        }
        let n = n.min(left);
        remote.push(iov(va, n as usize));
        left -= n;
    }
    if t.len > 0 {
        if let Err(e) = transfer(t.pid, &t.local, &remote, true) {
            return Outcome::Fail(pvm_error(f, t.pid, e));
        }
    }
    let with_imm = p.opcode == IBV_WR_SEND_WITH_IMM;
    let wc = ibv_wc {
        wr_id: r.wr_id,
        status: IBV_WC_SUCCESS,
        opcode: IBV_WC_RECV,
        byte_len: t.len as u32,
        imm_data: if with_imm { p.imm } else { 0 },
        qp_num: rqpn,
        src_qp: sh.qpn,
        wc_flags: if with_imm { IBV_WC_WITH_IMM } else { 0 },
        slid: t.slid,
        ..ibv_wc::default()
    };
    Outcome::Done(
        t.len as u32,
        Some(Remote {
            slot: t.slot,
            wc,
            solicited: p.flags & IBV_SEND_SOLICITED != 0,
        }),
    )
}
