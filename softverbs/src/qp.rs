//! Reliable-connected queue pairs: the state machine of `ibv_modify_qp`,
//! posting, and the initiator-side execution of work requests (see the
//! crate docs for how data moves).

use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::abi::*;
use crate::cq::{Cq, CqShared};
use crate::device::Context;
use crate::fabric::{self, Fabric, Kind};
use crate::memory::pd_id;
use crate::ring::{self, RecvWr, MAX_SGE};
use crate::shm::{self, Mapping};
use crate::srq::{Srq, SrqShared};
use crate::{guard, set_errno};

/// Most work requests per queue.
pub const MAX_WR: u32 = 16384;
/// Most inline bytes per work request.
pub const MAX_INLINE: u32 = 1024;

/// The handle the program holds.
#[repr(C)]
pub struct Qp {
    pub ibv: ibv_qp,
    pub shared: Arc<QpShared>,
}

#[derive(Debug)]
struct Remote {
    qpn: u32,
    dev: Option<usize>,
}

#[derive(Debug)]
struct Pending {
    wr_id: u64,
    opcode: u32,
    flags: u32,
    imm: u32,
    sges: Vec<ibv_sge>,
    inline: Option<Vec<u8>>,
    remote_addr: u64,
    rkey: u32,
}

#[derive(Debug)]
struct Inner {
    state: u32,
    attr: ibv_qp_attr,
    remote: Option<Remote>,
    pending: VecDeque<Pending>,
    rnr_tries: u32,
    retry_tries: u32,
    next_try: Instant,
}

/// What peers and the progress thread share with the handle.
#[derive(Debug)]
pub struct QpShared {
    slot: usize,
    qpn: u32,
    dev: usize,
    pd: u32,
    cap: ibv_qp_cap,
    sq_sig_all: bool,
    send_cq: Arc<CqShared>,
    recv_cq: Arc<CqShared>,
    /// Keeps the SRQ's shared part alive while this QP uses it.
    _srq: Option<Arc<SrqShared>>,
    rq: Option<(Arc<Mapping>, String)>,
    inner: Mutex<Inner>,
}

// SAFETY: the raw parts (mappings) are process-shared memory used through
// atomics and locks; everything else is owned data behind a Mutex.
unsafe impl Send for QpShared {}
// SAFETY: as for `Send`.
unsafe impl Sync for QpShared {}

fn errno_null<T>(e: i32) -> *mut T {
    set_errno(e);
    ptr::null_mut()
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`; `attr` is valid and its CQs/SRQ live.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_qp(
    pd: *mut ibv_pd,
    attr: *mut ibv_qp_init_attr,
) -> *mut ibv_qp {
    guard(ptr::null_mut(), || {
        let Some(f) = crate::fabric_or_errno() else {
            return ptr::null_mut();
        };
        let Some(pdid) = pd_id(pd) else {
            return errno_null(libc::EINVAL);
        };
        if attr.is_null() {
            return errno_null(libc::EINVAL);
        }
        // SAFETY: non-NULL, caller-provided.
        let a = unsafe { &mut *attr };
        if a.qp_type != IBV_QPT_RC {
            return errno_null(libc::EOPNOTSUPP);
        }
        if a.send_cq.is_null() || a.recv_cq.is_null() {
            return errno_null(libc::EINVAL);
        }
        let c = &mut a.cap;
        let srq = !a.srq.is_null();
        if c.max_send_wr > MAX_WR
            || (!srq && c.max_recv_wr > MAX_WR)
            || c.max_send_sge as usize > MAX_SGE
            || (!srq && c.max_recv_sge as usize > MAX_SGE)
            || c.max_inline_data > MAX_INLINE
        {
            return errno_null(libc::EINVAL);
        }
        // Report what was created, as a NIC does (at least what was asked).
        c.max_send_wr = c.max_send_wr.max(1);
        c.max_send_sge = c.max_send_sge.max(1);
        c.max_inline_data = c.max_inline_data.max(64);
        if srq {
            c.max_recv_wr = 0;
            c.max_recv_sge = 0;
        } else {
            c.max_recv_wr = c.max_recv_wr.max(1);
            c.max_recv_sge = c.max_recv_sge.max(1);
        }
        // SAFETY: pd, CQs and SRQ are live objects of this provider.
        let (ctx, send_cq, recv_cq, srq_shared) = unsafe {
            (
                (*pd).context,
                (*a.send_cq.cast::<Cq>()).shared.clone(),
                (*a.recv_cq.cast::<Cq>()).shared.clone(),
                (!a.srq.is_null()).then(|| (*a.srq.cast::<Srq>()).shared.clone()),
            )
        };
        // SAFETY: contexts are `Context`s.
        let dev = unsafe { (*ctx.cast::<Context>()).dev };
        let Some((slot, gen)) = f.claim(Kind::Qp) else {
            return errno_null(libc::ENOMEM);
        };
        let qpn = fabric::qpn_of(slot, gen);
        let rq = if srq_shared.is_none() {
            let name = f.file(Kind::Qp, slot, gen);
            match ring::rq_create(&name, c.max_recv_wr) {
                Ok(m) => Some((m, name)),
                Err(e) => {
                    eprintln!("softverbs: create QP: {e}");
                    f.release(Kind::Qp, slot);
                    return errno_null(libc::ENOMEM);
                }
            }
        } else {
            None
        };
        let s = f.qp(slot);
        s.dev.store(dev as u32, Ordering::Relaxed);
        s.pd.store(pdid, Ordering::Relaxed);
        s.state.store(IBV_QPS_RESET, Ordering::Relaxed);
        s.access.store(0, Ordering::Relaxed);
        s.min_rnr_timer.store(0, Ordering::Relaxed);
        s.recv_cq.store(recv_cq.slot as u32, Ordering::Relaxed);
        s.recv_cq_gen.store(recv_cq.gen, Ordering::Relaxed);
        match &srq_shared {
            Some(q) => {
                s.srq.store(q.slot as u32 + 1, Ordering::Relaxed);
                s.srq_gen.store(q.gen, Ordering::Relaxed);
            }
            None => s.srq.store(0, Ordering::Relaxed),
        }
        s.qpn.store(qpn, Ordering::Relaxed);
        f.publish(Kind::Qp, slot);
        let shared = Arc::new(QpShared {
            slot,
            qpn,
            dev,
            pd: pdid,
            cap: *c,
            sq_sig_all: a.sq_sig_all != 0,
            send_cq,
            recv_cq,
            _srq: srq_shared,
            rq,
            inner: Mutex::new(Inner {
                state: IBV_QPS_RESET,
                attr: ibv_qp_attr::default(),
                remote: None,
                pending: VecDeque::new(),
                rnr_tries: 0,
                retry_tries: 0,
                next_try: Instant::now(),
            }),
        });
        let qp = Box::new(Qp {
            ibv: ibv_qp {
                context: ctx,
                qp_context: a.qp_context,
                pd,
                send_cq: a.send_cq,
                recv_cq: a.recv_cq,
                srq: a.srq,
                handle: qpn,
                qp_num: qpn,
                state: IBV_QPS_RESET,
                qp_type: IBV_QPT_RC,
                mutex: pthread_mutex::default(),
                cond: pthread_cond::default(),
                events_completed: 0,
            },
            shared,
        });
        Box::into_raw(qp).cast()
    })
}

/// # Safety
/// `qp` came from `ibv_create_qp`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_qp(qp: *mut ibv_qp) -> i32 {
    guard(libc::EIO, || {
        if qp.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: from `Box::into_raw`, destroyed once.
        let q = unsafe { Box::from_raw(qp.cast::<Qp>()) };
        if let Ok(f) = fabric::get() {
            f.qp(q.shared.slot)
                .state
                .store(IBV_QPS_ERR, Ordering::Release);
            f.release(Kind::Qp, q.shared.slot);
        }
        if let Some((_, name)) = &q.shared.rq {
            ring::forget(name);
        }
        0
    })
}

/// Attributes each RC transition requires and allows (IB spec 11.2.1).
fn masks(from: u32, to: u32) -> Option<(i32, i32)> {
    let s = IBV_QP_STATE;
    Some(match (from, to) {
        (_, IBV_QPS_RESET) | (_, IBV_QPS_ERR) => (s, 0),
        (IBV_QPS_RESET, IBV_QPS_INIT) => {
            (s | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, 0)
        }
        (IBV_QPS_INIT, IBV_QPS_INIT) => (s, IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS),
        (IBV_QPS_INIT, IBV_QPS_RTR) => (
            s | IBV_QP_AV
                | IBV_QP_PATH_MTU
                | IBV_QP_DEST_QPN
                | IBV_QP_RQ_PSN
                | IBV_QP_MAX_DEST_RD_ATOMIC
                | IBV_QP_MIN_RNR_TIMER,
            IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX,
        ),
        (IBV_QPS_RTR, IBV_QPS_RTS) => (
            s | IBV_QP_SQ_PSN
                | IBV_QP_TIMEOUT
                | IBV_QP_RETRY_CNT
                | IBV_QP_RNR_RETRY
                | IBV_QP_MAX_QP_RD_ATOMIC,
            IBV_QP_CUR_STATE
                | IBV_QP_ACCESS_FLAGS
                | IBV_QP_MIN_RNR_TIMER
                | IBV_QP_ALT_PATH
                | IBV_QP_PATH_MIG_STATE,
        ),
        (IBV_QPS_RTS, IBV_QPS_RTS) => (
            s,
            IBV_QP_CUR_STATE
                | IBV_QP_ACCESS_FLAGS
                | IBV_QP_MIN_RNR_TIMER
                | IBV_QP_ALT_PATH
                | IBV_QP_PATH_MIG_STATE,
        ),
        _ => return None,
    })
}

/// # Safety
/// `qp` came from `ibv_create_qp`; `attr` is valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_modify_qp(qp: *mut ibv_qp, attr: *mut ibv_qp_attr, mask: i32) -> i32 {
    guard(libc::EIO, || {
        let Ok(f) = fabric::get() else {
            return libc::EIO;
        };
        if qp.is_null() || attr.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: live QP; `attr` readable.
        let (q, a) = unsafe { (&mut *qp.cast::<Qp>(), *attr) };
        let sh = q.shared.clone();
        let mut inner = sh.inner.lock().unwrap_or_else(|p| p.into_inner());
        let from = inner.state;
        let to = if mask & IBV_QP_STATE != 0 {
            a.qp_state
        } else {
            from
        };
        if mask & IBV_QP_CUR_STATE != 0 && a.cur_qp_state != from {
            return libc::EINVAL;
        }
        let Some((required, optional)) = masks(from, to) else {
            return libc::EINVAL;
        };
        if mask & required != required || mask & !(required | optional) != 0 {
            return libc::EINVAL;
        }
        if mask & IBV_QP_PORT != 0 && a.port_num != 1 {
            return libc::EINVAL;
        }
        if mask & IBV_QP_PKEY_INDEX != 0 && a.pkey_index != 0 {
            return libc::EINVAL;
        }
        if mask & IBV_QP_PATH_MTU != 0 && !(1..=IBV_MTU_4096).contains(&a.path_mtu) {
            return libc::EINVAL;
        }
        if mask & IBV_QP_MIN_RNR_TIMER != 0 && a.min_rnr_timer > 31 {
            return libc::EINVAL;
        }
        if mask & IBV_QP_RNR_RETRY != 0 && a.rnr_retry > 7
            || mask & IBV_QP_RETRY_CNT != 0 && a.retry_cnt > 7
        {
            return libc::EINVAL;
        }
        let slot = f.qp(sh.slot);
        let st = &mut inner.attr;
        if mask & IBV_QP_ACCESS_FLAGS != 0 {
            st.qp_access_flags = a.qp_access_flags;
            slot.access.store(a.qp_access_flags, Ordering::Release);
        }
        // Attributes kept for `ibv_query_qp`, each when its mask bit is set.
        macro_rules! keep {
            ($($bit:ident => $field:ident),* $(,)?) => {
                $(if mask & $bit != 0 {
                    st.$field = a.$field;
                })*
            };
        }
        keep!(
            IBV_QP_PORT => port_num,
            IBV_QP_PATH_MTU => path_mtu,
            IBV_QP_RQ_PSN => rq_psn,
            IBV_QP_SQ_PSN => sq_psn,
            IBV_QP_MAX_DEST_RD_ATOMIC => max_dest_rd_atomic,
            IBV_QP_MAX_QP_RD_ATOMIC => max_rd_atomic,
            IBV_QP_MIN_RNR_TIMER => min_rnr_timer,
            IBV_QP_TIMEOUT => timeout,
            IBV_QP_RETRY_CNT => retry_cnt,
            IBV_QP_RNR_RETRY => rnr_retry,
            IBV_QP_AV => ah_attr,
        );
        if mask & IBV_QP_MIN_RNR_TIMER != 0 {
            // Peers read it to time their RNR retries.
            slot.min_rnr_timer
                .store(u32::from(a.min_rnr_timer), Ordering::Release);
        }
        if mask & IBV_QP_DEST_QPN != 0 {
            st.dest_qp_num = a.dest_qp_num;
            inner.remote = Some(Remote {
                qpn: a.dest_qp_num,
                dev: crate::device::resolve(&a.ah_attr),
            });
        }
        inner.state = to;
        slot.state.store(to, Ordering::Release);
        q.ibv.state = to;
        match to {
            IBV_QPS_RESET => {
                inner.pending.clear();
                inner.remote = None;
                if let Some((rq, _)) = &sh.rq {
                    while ring::rq_pop(rq).is_some() {}
                }
            }
            IBV_QPS_ERR if from != IBV_QPS_ERR => {
                drop(inner);
                to_error(f, &sh);
            }
            _ => {}
        }
        0
    })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_qp(
    qp: *mut ibv_qp,
    attr: *mut ibv_qp_attr,
    _mask: i32,
    init: *mut ibv_qp_init_attr,
) -> i32 {
    guard(libc::EIO, || {
        if qp.is_null() || attr.is_null() || init.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: live QP; outputs writable.
        let q = unsafe { &*qp.cast::<Qp>() };
        let inner = q.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut a = inner.attr;
        a.qp_state = inner.state;
        a.cur_qp_state = inner.state;
        a.cap = q.shared.cap;
        // SAFETY: as above.
        unsafe {
            attr.write(a);
            init.write(ibv_qp_init_attr {
                qp_context: q.ibv.qp_context,
                send_cq: q.ibv.send_cq,
                recv_cq: q.ibv.recv_cq,
                srq: q.ibv.srq,
                cap: q.shared.cap,
                qp_type: IBV_QPT_RC,
                sq_sig_all: i32::from(q.shared.sq_sig_all),
            });
        }
        0
    })
}

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
            ) {
                return fail(libc::EINVAL, wr);
            }
            if inner.pending.len() >= sh.cap.max_send_wr as usize {
                return fail(libc::ENOMEM, wr);
            }
            // SAFETY: `sg_list` holds `num_sge` entries.
            let sges: Vec<ibv_sge> = (0..w.num_sge as usize)
                .map(|i| unsafe { *w.sg_list.add(i) })
                .collect();
            let inline = if w.send_flags & IBV_SEND_INLINE != 0 && w.opcode != IBV_WR_RDMA_READ {
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
            inner.pending.push_back(Pending {
                wr_id: w.wr_id,
                opcode: w.opcode,
                flags: w.send_flags,
                imm: w.imm_data,
                sges,
                inline,
                remote_addr: w.wr.remote_addr,
                rkey: w.rdma_rkey(),
            });
            wr = w.next;
        }
        progress(f, &sh, &mut inner);
        0
    })
}

/// Why a work request did not complete.
enum Outcome {
    Done(u32),
    Rnr,
    /// Nothing answered (no such QP, or not ready): retried after the
    /// transport timeout, `retry_cnt` times.
    NoAnswer,
    /// Initiator status, and whether the QP moves to error.
    Fail(u32),
}

fn wc_opcode(op: u32) -> u32 {
    match op {
        IBV_WR_RDMA_WRITE | IBV_WR_RDMA_WRITE_WITH_IMM => IBV_WC_RDMA_WRITE,
        IBV_WR_RDMA_READ => IBV_WC_RDMA_READ,
        _ => IBV_WC_SEND,
    }
}

/// Runs pending work requests in order until one must wait (RNR) or all
/// are done. Called with the QP's lock held.
fn progress(f: &Fabric, sh: &Arc<QpShared>, inner: &mut Inner) {
    while let Some(p) = inner.pending.pop_front() {
        if inner.state == IBV_QPS_ERR {
            complete(f, sh, &p, IBV_WC_WR_FLUSH_ERR, 0);
            continue;
        }
        if Instant::now() < inner.next_try {
            inner.pending.push_front(p);
            schedule(sh);
            return;
        }
        // The status to complete `p` with, or the wait before its retry.
        let status = match execute(f, sh, inner, &p) {
            Outcome::Done(len) => {
                inner.rnr_tries = 0;
                inner.retry_tries = 0;
                if p.flags & IBV_SEND_SIGNALED != 0 || sh.sq_sig_all {
                    complete(f, sh, &p, IBV_WC_SUCCESS, len);
                }
                continue;
            }
            Outcome::Rnr
                if inner.attr.rnr_retry == 7
                    || inner.rnr_tries < u32::from(inner.attr.rnr_retry) =>
            {
                inner.rnr_tries += 1;
                Err(remote_rnr_timer(f, inner))
            }
            Outcome::Rnr => Ok(IBV_WC_RNR_RETRY_EXC_ERR),
            Outcome::NoAnswer if inner.retry_tries < u32::from(inner.attr.retry_cnt) => {
                inner.retry_tries += 1;
                Err(transport_timeout(inner.attr.timeout))
            }
            Outcome::NoAnswer => Ok(IBV_WC_RETRY_EXC_ERR),
            Outcome::Fail(status) => Ok(status),
        };
        match status {
            Ok(status) => {
                complete(f, sh, &p, status, 0);
                enter_error(f, sh, inner);
            }
            Err(wait) => {
                inner.next_try = Instant::now() + wait;
                inner.pending.push_front(p);
                schedule(sh);
                return;
            }
        }
    }
}

/// How long an initiator's completion trails the delivery, standing in
/// for the acknowledgement's trip back (`SOFTVERBS_ACK_DELAY_US`, default
/// 20). Without it a peer could see its own completion before the target
/// had a chance to react, an ordering no NIC produces.
fn ack_delay() -> Duration {
    static D: OnceLock<Duration> = OnceLock::new();
    *D.get_or_init(|| {
        Duration::from_micros(
            std::env::var("SOFTVERBS_ACK_DELAY_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(20),
        )
    })
}

fn complete(_f: &Fabric, sh: &QpShared, p: &Pending, status: u32, len: u32) {
    let wc = ibv_wc {
        wr_id: p.wr_id,
        status,
        opcode: wc_opcode(p.opcode),
        byte_len: len,
        qp_num: sh.qpn,
        ..ibv_wc::default()
    };
    let cq = &sh.send_cq;
    {
        let mut d = cq.deferred.lock().unwrap_or_else(|e| e.into_inner());
        // Completions of one CQ leave in order: never before one already
        // waiting.
        let due = (Instant::now() + ack_delay()).max(d.back().map_or(Instant::now(), |b| b.0));
        d.push_back((due, wc));
    }
    schedule_cq(cq);
}

fn enter_error(f: &Fabric, sh: &QpShared, inner: &mut Inner) {
    if inner.state != IBV_QPS_ERR {
        inner.state = IBV_QPS_ERR;
        f.qp(sh.slot).state.store(IBV_QPS_ERR, Ordering::Release);
        flush_rq(f, sh);
    }
}

fn to_error(f: &Fabric, sh: &Arc<QpShared>) {
    let mut inner = sh.inner.lock().unwrap_or_else(|p| p.into_inner());
    inner.state = IBV_QPS_ERR;
    f.qp(sh.slot).state.store(IBV_QPS_ERR, Ordering::Release);
    flush_rq(f, sh);
    progress(f, sh, &mut inner);
}

/// Completes every posted receive with a flush error.
fn flush_rq(f: &Fabric, sh: &QpShared) {
    if let Some((rq, _)) = &sh.rq {
        while let Some(r) = ring::rq_pop(rq) {
            let wc = ibv_wc {
                wr_id: r.wr_id,
                status: IBV_WC_WR_FLUSH_ERR,
                opcode: IBV_WC_RECV,
                qp_num: sh.qpn,
                ..ibv_wc::default()
            };
            let _ = ring::cq_push(f, &sh.recv_cq.ring, &wc, false);
        }
    }
}

/// The local ACK timeout, 4.096 µs × 2^timeout (0: the spec's "infinite",
/// taken as the longest wait here); each wait is capped at 100 ms so a
/// wrong address fails in bounded time.
fn transport_timeout(t: u8) -> Duration {
    let us = if t == 0 {
        u64::MAX
    } else {
        4096u64.saturating_mul(1 << t.min(31)) / 1000
    };
    Duration::from_micros(us.clamp(1000, 100_000))
}

/// The IB spec's RNR NAK timer table (milliseconds ×100).
fn rnr_delay(code: u32) -> Duration {
    const T: [u32; 32] = [
        65536, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
        1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152,
    ];
    Duration::from_micros(u64::from(T[(code & 31) as usize]) * 10)
}

fn remote_rnr_timer(f: &Fabric, inner: &Inner) -> Duration {
    let code = inner
        .remote
        .as_ref()
        .map(|r| fabric::qpn_parts(r.qpn).0)
        .filter(|&s| s < fabric::MAX_QP)
        .map_or(1, |s| f.qp(s).min_rnr_timer.load(Ordering::Acquire));
    rnr_delay(code)
}

/// A checked memory region: (owner pid, pd, access, addr, len).
fn mr_lookup(f: &Fabric, key: u32) -> Option<(u32, u32, u32, u64, u64)> {
    let (slot, gen) = fabric::key_parts(key);
    let pid = f.live(Kind::Mr, slot, gen)?;
    let m = f.mr(slot);
    (m.key.load(Ordering::Acquire) == key).then(|| {
        (
            pid,
            m.pd.load(Ordering::Acquire),
            m.access.load(Ordering::Acquire),
            m.addr.load(Ordering::Acquire),
            m.len.load(Ordering::Acquire),
        )
    })
}

fn covers(addr: u64, len: u64, mr_addr: u64, mr_len: u64) -> bool {
    addr >= mr_addr && addr.checked_add(len).is_some_and(|e| e <= mr_addr + mr_len)
}

/// Checks local scatter/gather entries against this process's regions.
fn check_local(f: &Fabric, sh: &QpShared, sges: &[ibv_sge], need: u32) -> bool {
    let me = shm::my_pid();
    sges.iter().filter(|s| s.length > 0).all(|s| {
        mr_lookup(f, s.lkey).is_some_and(|(pid, pd, access, a, l)| {
            pid == me
                && pd == sh.pd
                && access & need == need
                && covers(s.addr, u64::from(s.length), a, l)
        })
    })
}

fn iov(addr: u64, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

fn pvm_error(f: &Fabric, pid: u32, e: i32) -> u32 {
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
fn transfer(
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
fn take_recv(f: &Fabric, slot: usize) -> Result<Option<RecvWr>, u32> {
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

fn push_remote(f: &Fabric, slot: usize, wc: &ibv_wc, solicited: bool) {
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

/// Executes one work request as the initiator's NIC would.
fn execute(f: &Fabric, sh: &QpShared, inner: &Inner, p: &Pending) -> Outcome {
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
    let need_local = if p.opcode == IBV_WR_RDMA_READ {
        IBV_ACCESS_LOCAL_WRITE
    } else {
        0
    };
    if p.inline.is_none() && !check_local(f, sh, &p.sges, need_local) {
        return Outcome::Fail(IBV_WC_LOC_PROT_ERR);
    }
    let local: Vec<libc::iovec> = match &p.inline {
        Some(v) => vec![iov(v.as_ptr() as u64, v.len())],
        None => p
            .sges
            .iter()
            .filter(|s| s.length > 0)
            .map(|s| iov(s.addr, s.length as usize))
            .collect(),
    };
    let len: u64 = local.iter().map(|v| v.iov_len as u64).sum();
    let slid = crate::device::lid_of(sh.dev);
    match p.opcode {
        IBV_WR_RDMA_WRITE | IBV_WR_RDMA_WRITE_WITH_IMM | IBV_WR_RDMA_READ => {
            let (need, qp_need) = if p.opcode == IBV_WR_RDMA_READ {
                (IBV_ACCESS_REMOTE_READ, IBV_ACCESS_REMOTE_READ)
            } else {
                (IBV_ACCESS_REMOTE_WRITE, IBV_ACCESS_REMOTE_WRITE)
            };
            let ok = len == 0
                || mr_lookup(f, p.rkey).is_some_and(|(pid, pd, access, a, l)| {
                    pid == rpid
                        && pd == rpd
                        && access & need == need
                        && covers(p.remote_addr, len, a, l)
                });
            if !ok || rq.access.load(Ordering::Acquire) & qp_need != qp_need {
                return Outcome::Fail(IBV_WC_REM_ACCESS_ERR);
            }
            let recv = if p.opcode == IBV_WR_RDMA_WRITE_WITH_IMM {
                match take_recv(f, rslot) {
                    Err(s) => return Outcome::Fail(s),
                    Ok(None) => return Outcome::Rnr,
                    Ok(Some(r)) => Some(r),
                }
            } else {
                None
            };
            if len > 0 {
                let r = [iov(p.remote_addr, len as usize)];
                if let Err(e) = transfer(rpid, &local, &r, p.opcode != IBV_WR_RDMA_READ) {
                    return Outcome::Fail(pvm_error(f, rpid, e));
                }
            }
            if let Some(r) = recv {
                let wc = ibv_wc {
                    wr_id: r.wr_id,
                    status: IBV_WC_SUCCESS,
                    opcode: IBV_WC_RECV_RDMA_WITH_IMM,
                    byte_len: len as u32,
                    imm_data: p.imm,
                    qp_num: rq.qpn.load(Ordering::Acquire),
                    src_qp: sh.qpn,
                    wc_flags: IBV_WC_WITH_IMM,
                    slid,
                    ..ibv_wc::default()
                };
                push_remote(f, rslot, &wc, p.flags & IBV_SEND_SOLICITED != 0);
            }
            Outcome::Done(len as u32)
        }
        _ => {
            // SEND, SEND_WITH_IMM.
            let r = match take_recv(f, rslot) {
                Err(s) => return Outcome::Fail(s),
                Ok(None) => return Outcome::Rnr,
                Ok(Some(r)) => r,
            };
            let rqpn = rq.qpn.load(Ordering::Acquire);
            let recv_fail = |status: u32| ibv_wc {
                wr_id: r.wr_id,
                status,
                opcode: IBV_WC_RECV,
                qp_num: rqpn,
                src_qp: sh.qpn,
                slid,
                ..ibv_wc::default()
            };
            let sges = &r.sge[..r.num_sge as usize];
            let room: u64 = sges.iter().map(|s| u64::from(s.length)).sum();
            if room < len {
                push_remote(f, rslot, &recv_fail(IBV_WC_LOC_LEN_ERR), false);
                rq.state.store(IBV_QPS_ERR, Ordering::Release);
                return Outcome::Fail(IBV_WC_REM_INV_REQ_ERR);
            }
            let ok = sges.iter().filter(|s| s.length > 0).all(|s| {
                mr_lookup(f, s.lkey).is_some_and(|(pid, pd, access, a, l)| {
                    pid == rpid
                        && pd == rpd
                        && access & IBV_ACCESS_LOCAL_WRITE != 0
                        && covers(s.addr, u64::from(s.length), a, l)
                })
            });
            if !ok {
                push_remote(f, rslot, &recv_fail(IBV_WC_LOC_PROT_ERR), false);
                rq.state.store(IBV_QPS_ERR, Ordering::Release);
                return Outcome::Fail(IBV_WC_REM_OP_ERR);
            }
            // Scatter into the receive's entries, in order, up to `len`.
            let mut left = len;
            let mut remote = Vec::new();
            for s in sges {
                if left == 0 {
                    break;
                }
                let n = u64::from(s.length).min(left);
                if n > 0 {
                    remote.push(iov(s.addr, n as usize));
                }
                left -= n;
            }
            if len > 0 {
                if let Err(e) = transfer(rpid, &local, &remote, true) {
                    return Outcome::Fail(pvm_error(f, rpid, e));
                }
            }
            let with_imm = p.opcode == IBV_WR_SEND_WITH_IMM;
            let wc = ibv_wc {
                wr_id: r.wr_id,
                status: IBV_WC_SUCCESS,
                opcode: IBV_WC_RECV,
                byte_len: len as u32,
                imm_data: if with_imm { p.imm } else { 0 },
                qp_num: rqpn,
                src_qp: sh.qpn,
                wc_flags: if with_imm { IBV_WC_WITH_IMM } else { 0 },
                slid,
                ..ibv_wc::default()
            };
            push_remote(f, rslot, &wc, p.flags & IBV_SEND_SOLICITED != 0);
            Outcome::Done(len as u32)
        }
    }
}

// The progress thread: retries work requests waiting out an RNR timer.

struct Progress {
    /// Queue pairs that may have work waiting, and whether one was added
    /// since the thread last looked.
    qps: Mutex<(Vec<Weak<QpShared>>, bool)>,
    /// Completion queues with deferred completions.
    cqs: Mutex<Vec<Weak<CqShared>>>,
    wake: Condvar,
}

fn progress_state() -> &'static Progress {
    static P: OnceLock<Progress> = OnceLock::new();
    P.get_or_init(|| {
        std::thread::Builder::new()
            .name("softverbs-progress".into())
            .spawn(progress_loop)
            .ok();
        Progress {
            qps: Mutex::new((Vec::new(), false)),
            cqs: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        }
    })
}

/// Makes sure the progress thread will look at `sh`. Lock order: a QP's
/// lock may be held here; the thread never holds this lock while taking a
/// QP's.
fn schedule(sh: &Arc<QpShared>) {
    let p = progress_state();
    let mut g = p.qps.lock().unwrap_or_else(|e| e.into_inner());
    if !g.0.iter().any(|w| w.as_ptr() == Arc::as_ptr(sh)) {
        g.0.push(Arc::downgrade(sh));
    }
    g.1 = true;
    p.wake.notify_one();
}

/// Makes sure the progress thread will deliver `cq`'s deferred completions.
fn schedule_cq(cq: &Arc<CqShared>) {
    let p = progress_state();
    {
        let mut v = p.cqs.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|w| w.as_ptr() == Arc::as_ptr(cq)) {
            v.push(Arc::downgrade(cq));
        }
    }
    let mut g = p.qps.lock().unwrap_or_else(|e| e.into_inner());
    g.1 = true;
    p.wake.notify_one();
}

fn progress_loop() {
    let p = progress_state();
    let Ok(f) = fabric::get() else { return };
    loop {
        let list: Vec<Arc<QpShared>> = {
            let mut g = p.qps.lock().unwrap_or_else(|e| e.into_inner());
            g.0.retain(|w| w.strong_count() > 0);
            g.1 = false;
            g.0.iter().filter_map(Weak::upgrade).collect()
        };
        let mut next: Option<Instant> = None;
        for sh in &list {
            let mut inner = sh.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.pending.is_empty() {
                continue;
            }
            if Instant::now() >= inner.next_try {
                progress(f, sh, &mut inner);
            }
            if !inner.pending.is_empty() {
                next = Some(next.map_or(inner.next_try, |n| n.min(inner.next_try)));
            }
        }
        drop(list);
        let cqs: Vec<Arc<CqShared>> = {
            let mut v = p.cqs.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        for cq in &cqs {
            if let Some(due) = cq.flush_due(f) {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        {
            // Forget CQs with nothing deferred (they are re-added on demand).
            let mut v = p.cqs.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| {
                w.upgrade().is_some_and(|c| {
                    !c.deferred
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_empty()
                })
            });
        }
        drop(cqs);
        let g = p.qps.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 {
            continue;
        }
        let wait = next.map_or(Duration::from_secs(1), |t| {
            t.saturating_duration_since(Instant::now())
        });
        let _ = p.wake.wait_timeout(g, wait.max(Duration::from_micros(5)));
    }
}
