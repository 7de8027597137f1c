//! Executing one work request as the initiator's NIC would. `execute`
//! makes the checks every opcode shares (the target QP exists, is on the
//! addressed device, its process runs, it is ready to receive; the local
//! memory is registered to this process and PD) and gathers the local
//! bytes, then hands over to the RDMA half (`rdma.rs`) or the SEND half
//! (`send.rs`). Both use the helpers here: region lookups, the target's
//! receive queue and completion queue, and the cross-memory copy.

use std::sync::atomic::Ordering;

use super::{Inner, Pending, QpShared};
use crate::abi::*;
use crate::fabric::{self, Fabric, Kind, QpSlot};
use crate::ring::{self, RecvWr};
use crate::shm;

/// Why a work request did not complete.
pub(super) enum Outcome {
    /// Executed: the byte count, and the target's completion, which is
    /// made visible after the initiator's (see `progress`).
    Done(u32, Option<Remote>),
    Rnr,
    /// Nothing answered (no such QP, or not ready): retried after the
    /// transport timeout, `retry_cnt` times.
    NoAnswer,
    /// Initiator status, and whether the QP moves to error.
    Fail(u32),
}

/// A memory region as the fabric table has it, found by its key.
#[derive(Debug, Clone, Copy)]
pub(super) struct MrEntry {
    /// The process that registered it.
    owner: u32,
    /// Its protection domain.
    pd: u32,
    /// `IBV_ACCESS_*` flags.
    access: u32,
    addr: u64,
    len: u64,
    /// Where the region starts in work requests' addresses.
    iova: u64,
}

impl MrEntry {
    /// The live region `key` names, if any.
    pub(super) fn lookup(f: &Fabric, key: u32) -> Option<MrEntry> {
        let (slot, gen) = fabric::key_parts(key);
        let owner = f.live(Kind::Mr, slot, gen)?;
        let m = f.mr(slot);
        (m.key.load(Ordering::Acquire) == key).then(|| MrEntry {
            owner,
            pd: m.pd.load(Ordering::Acquire),
            access: m.access.load(Ordering::Acquire),
            addr: m.addr.load(Ordering::Acquire),
            len: m.len.load(Ordering::Acquire),
            iova: m.iova.load(Ordering::Acquire),
        })
    }

    /// Whether process `pid`, in protection domain `pd`, may use `len`
    /// bytes at `addr` (in the region's iova space) of this region with
    /// every access in `need`; if so, their virtual address in the owner.
    pub(super) fn translate(
        &self,
        pid: u32,
        pd: u32,
        need: u32,
        addr: u64,
        len: u64,
    ) -> Option<u64> {
        let ok = self.owner == pid
            && self.pd == pd
            && self.access & need == need
            && addr >= self.iova
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.iova + self.len);
        ok.then(|| addr - self.iova + self.addr)
    }
}

/// Checks local scatter/gather entries against this process's regions;
/// their non-empty ones as iovecs in this process's memory.
fn check_local(f: &Fabric, sh: &QpShared, sges: &[ibv_sge], need: u32) -> Option<Vec<libc::iovec>> {
    let me = shm::my_pid();
    sges.iter()
        .filter(|s| s.length > 0)
        .map(|s| {
            let m = MrEntry::lookup(f, s.lkey)?;
            let va = m.translate(me, sh.pd, need, s.addr, u64::from(s.length))?;
            Some(iov(va, s.length as usize))
        })
        .collect()
}

pub(super) fn iov(addr: u64, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

pub(super) fn pvm_error(f: &Fabric, pid: u32, e: i32) -> u32 {
    match e {
        libc::ESRCH => {
            // The target died after the checks: clean up after it.
            f.reap(pid);
            IBV_WC_RETRY_EXC_ERR
        }
        libc::EFAULT => IBV_WC_REM_ACCESS_ERR,
        libc::EPERM => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!("softverbs: process_vm_writev/readv is not permitted (ptrace restrictions: run the processes as one user, set kernel.yama.ptrace_scope=0, or grant CAP_SYS_PTRACE)");
            });
            IBV_WC_LOC_QP_OP_ERR
        }
        _ => IBV_WC_GENERAL_ERR,
    }
}

/// Moves `local` to/from `remote` in process `pid`, all bytes or an error.
pub(super) fn transfer(
    pid: u32,
    local: &[libc::iovec],
    remote: &[libc::iovec],
    write: bool,
) -> Result<(), i32> {
    let total: usize = local.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    while done < total {
        // Rebuild both lists from `done` on (short transfers are legal).
        let cut = |v: &[libc::iovec]| -> Vec<libc::iovec> {
            let mut skip = done;
            let mut out = Vec::new();
            for x in v {
                if skip >= x.iov_len {
                    skip -= x.iov_len;
                    continue;
                }
                out.push(iov(x.iov_base as u64 + skip as u64, x.iov_len - skip));
                skip = 0;
            }
            out
        };
        let (l, r) = (cut(local), cut(remote));
        // SAFETY: local iovecs point into this process's registered (or
        // inline) memory, checked against the fabric's region table;
        // remote ones were checked against the target's regions; the
        // kernel validates both sides and reports faults as EFAULT.
        let n = unsafe {
            if write {
                libc::process_vm_writev(
                    pid as libc::pid_t,
                    l.as_ptr(),
                    l.len() as u64,
                    r.as_ptr(),
                    r.len() as u64,
                    0,
                )
            } else {
                libc::process_vm_readv(
                    pid as libc::pid_t,
                    l.as_ptr(),
                    l.len() as u64,
                    r.as_ptr(),
                    r.len() as u64,
                    0,
                )
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        if n == 0 {
            return Err(libc::EFAULT);
        }
        done += n as usize;
    }
    Ok(())
}

/// Pops a receive for the target QP (its RQ or SRQ).
pub(super) fn take_recv(f: &Fabric, slot: usize) -> Result<Option<RecvWr>, u32> {
    let q = f.qp(slot);
    let srq = q.srq.load(Ordering::Acquire);
    let name = if srq > 0 {
        f.file(
            Kind::Srq,
            srq as usize - 1,
            q.srq_gen.load(Ordering::Acquire),
        )
    } else {
        f.file(
            Kind::Qp,
            slot,
            fabric::qpn_parts(q.qpn.load(Ordering::Acquire)).1,
        )
    };
    let m = ring::map(&name).map_err(|e| {
        if std::env::var_os("SOFTVERBS_DEBUG").is_some() {
            eprintln!("softverbs: receive queue of QP slot {slot}: {e}");
        }
        IBV_WC_RETRY_EXC_ERR
    })?;
    let r = ring::rq_pop(&m);
    if r.is_none() && std::env::var_os("SOFTVERBS_DEBUG").is_some() {
        eprintln!("softverbs: RNR: no receive posted at QP slot {slot}");
    }
    Ok(r)
}

/// A completion for the target's receive CQ.
pub(super) struct Remote {
    pub slot: usize,
    pub wc: ibv_wc,
    pub solicited: bool,
}

pub(super) fn push_remote(f: &Fabric, slot: usize, wc: &ibv_wc, solicited: bool) {
    let q = f.qp(slot);
    let (cq, gen) = (
        q.recv_cq.load(Ordering::Acquire) as usize,
        q.recv_cq_gen.load(Ordering::Acquire),
    );
    if f.live(Kind::Cq, cq, gen).is_none() {
        return;
    }
    if let Ok(m) = ring::map(&f.file(Kind::Cq, cq, gen)) {
        if ring::cq_push(f, &m, wc, solicited).is_err() {
            // The target's CQ overflowed: as on a NIC, its QP fails.
            q.state.store(IBV_QPS_ERR, Ordering::Release);
        }
    }
}

/// What both halves of execution start from: the target QP, found live,
/// on the addressed device and ready to receive, and the initiator's local
/// memory, checked against its regions and gathered.
pub(super) struct Checked<'a> {
    /// The target QP's slot in the fabric table.
    pub slot: usize,
    /// What peers see of it (state, access flags, QP number, receive CQ).
    pub qp: &'a QpSlot,
    /// The process that owns the target QP.
    pub pid: u32,
    /// The target QP's protection domain.
    pub pd: u32,
    /// The initiator's bytes: its inline copy, or its non-empty
    /// scatter/gather entries.
    pub local: Vec<libc::iovec>,
    /// Their total length.
    pub len: u64,
    /// The initiator's LID, for the target's completion.
    pub slid: u16,
}

/// Executes one work request as the initiator's NIC would: the checks
/// every opcode shares here, then its RDMA half (`rdma.rs`) or its SEND
/// half (`send.rs`).
pub(super) fn execute(f: &Fabric, sh: &QpShared, inner: &Inner, p: &Pending) -> Outcome {
    let debug = std::env::var_os("SOFTVERBS_DEBUG").is_some();
    let no_answer = |why: String| {
        if debug {
            eprintln!("softverbs: QP {:#x}: no answer: {why}", sh.qpn);
        }
        Outcome::NoAnswer
    };
    let Some(remote) = &inner.remote else {
        return no_answer("no destination".into());
    };
    if crate::fault::port_down() {
        return no_answer("the port is down (SOFTVERBS_FAULT)".into());
    }
    let (rslot, rgen) = fabric::qpn_parts(remote.qpn);
    let Some(rpid) = f.live(Kind::Qp, rslot, rgen) else {
        return no_answer(format!("QP {:#x} does not exist", remote.qpn));
    };
    let rq = f.qp(rslot);
    let rdev = rq.dev.load(Ordering::Acquire) as usize;
    if remote.dev != Some(rdev) {
        return no_answer(format!(
            "QP {:#x} is on device {rdev}, the address names {:?}",
            remote.qpn, remote.dev
        ));
    }
    if !shm::pid_alive(rpid) {
        // The target crashed: it will never answer; clean up after it.
        f.reap(rpid);
        if debug {
            eprintln!(
                "softverbs: QP {:#x}: the process of QP {:#x} exited",
                sh.qpn, remote.qpn
            );
        }
        return Outcome::Fail(IBV_WC_RETRY_EXC_ERR);
    }
    let rstate = rq.state.load(Ordering::Acquire);
    if !matches!(rstate, IBV_QPS_RTR | IBV_QPS_RTS | IBV_QPS_SQD) {
        return no_answer(format!("QP {:#x} is in state {rstate}", remote.qpn));
    }
    let rpd = rq.pd.load(Ordering::Acquire);
    let need_local = if matches!(
        p.opcode,
        IBV_WR_RDMA_READ | IBV_WR_ATOMIC_CMP_AND_SWP | IBV_WR_ATOMIC_FETCH_AND_ADD
    ) {
        IBV_ACCESS_LOCAL_WRITE
    } else {
        0
    };
    let local: Vec<libc::iovec> = match &p.inline {
        Some(v) => vec![iov(v.as_ptr() as u64, v.len())],
        None => match check_local(f, sh, &p.sges, need_local) {
            Some(l) => l,
            None => return Outcome::Fail(IBV_WC_LOC_PROT_ERR),
        },
    };
    let len: u64 = local.iter().map(|v| v.iov_len as u64).sum();
    let slid = crate::device::lid_of(sh.dev);
    let t = Checked {
        slot: rslot,
        qp: rq,
        pid: rpid,
        pd: rpd,
        local,
        len,
        slid,
    };
    match p.opcode {
        IBV_WR_ATOMIC_CMP_AND_SWP | IBV_WR_ATOMIC_FETCH_AND_ADD => {
            super::rdma::execute_atomic(f, p, &t)
        }
        IBV_WR_RDMA_WRITE | IBV_WR_RDMA_WRITE_WITH_IMM | IBV_WR_RDMA_READ => {
            super::rdma::execute_rdma(f, sh, p, &t)
        }
        // SEND, SEND_WITH_IMM.
        _ => super::send::execute_send(f, sh, p, &t),
    }
}
