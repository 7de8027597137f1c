//! Reliable-connected queue pairs: the state machine of `ibv_modify_qp`
//! here; posting (`post`), running work requests in order with their
//! retries and completions (`progress`), and the initiator-side execution
//! of one work request beside it: the checks all opcodes share
//! (`execute`), then the RDMA half (`rdma`) or the SEND half (`send`). The
//! crate docs say how data moves.

mod execute;
mod post;
mod progress;
mod rdma;
mod send;

use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::abi::*;
use crate::cq::{Cq, CqShared};
use crate::device::Context;
use crate::events::{Element, EventQueue};
use crate::fabric::{self, Kind};
use crate::fault::Action;
use crate::memory::pd_id;
use crate::ring::{self, MAX_SGE};
use crate::shm::Mapping;
use crate::srq::{Srq, SrqShared};
use crate::{guard, set_errno};

pub use post::{post_recv, post_recv_list, post_send};
use progress::to_error;

/// Most work requests per queue.
pub const MAX_WR: u32 = 16384;
/// Most inline bytes per work request.
pub const MAX_INLINE: u32 = 1024;
/// Most outstanding RDMA READs per QP, either direction.
pub const MAX_RD_ATOMIC: u32 = 16;

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
    /// Atomics' operands: compare (or add) and swap.
    compare_add: u64,
    swap: u64,
    /// What the fault switch does instead of executing it.
    fault: Option<Action>,
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
    /// Work requests posted on this QP so far (for the fault switch).
    posted: u64,
    /// The `ibv_qp *` the program holds (0 once destroyed): what async
    /// events name. Changed only under this lock.
    handle: usize,
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
    /// The SRQ it takes receives from (kept alive while this QP uses it).
    srq: Option<Arc<SrqShared>>,
    rq: Option<(Arc<Mapping>, String)>,
    /// The context's async events.
    events: Arc<EventQueue>,
    /// Which QP of this process it is, from 1 (for the fault switch).
    ordinal: u64,
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
        // The PD, CQs and SRQ must be of one device context: each device
        // has its own objects (as the kernel's per-context handles), so
        // another device's CQ or SRQ is not found.
        // SAFETY: live objects of this provider (caller's contract).
        let same = unsafe {
            let ctx = (*pd).context;
            (*a.send_cq).context == ctx
                && (*a.recv_cq).context == ctx
                && (a.srq.is_null() || (*a.srq).context == ctx)
        };
        if !same {
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
        let (dev, events) = unsafe {
            let c = &*ctx.cast::<Context>();
            (c.dev, c.events.clone())
        };
        static ORDINAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let ordinal = ORDINAL.fetch_add(1, Ordering::Relaxed) + 1;
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
            srq: srq_shared,
            rq,
            events,
            ordinal,
            inner: Mutex::new(Inner {
                state: IBV_QPS_RESET,
                attr: ibv_qp_attr::default(),
                remote: None,
                pending: VecDeque::new(),
                rnr_tries: 0,
                retry_tries: 0,
                next_try: Instant::now(),
                posted: 0,
                handle: 0,
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
        let sh = qp.shared.clone();
        // What it uses cannot go away under it (EBUSY until destroyed).
        crate::memory::pd_use(pd, true);
        sh.send_cq.users.fetch_add(1, Ordering::AcqRel);
        sh.recv_cq.users.fetch_add(1, Ordering::AcqRel);
        if let Some(s) = &sh.srq {
            s.users.fetch_add(1, Ordering::AcqRel);
        }
        let p = Box::into_raw(qp);
        sh.inner.lock().unwrap_or_else(|e| e.into_inner()).handle = p as usize;
        p.cast()
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
        // No event names it from here on (the progress thread may still
        // hold the shared part for a moment).
        q.shared
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle = 0;
        q.shared.events.forget(Element::Qp(qp as usize));
        crate::memory::pd_use(q.ibv.pd, false);
        q.shared.send_cq.users.fetch_sub(1, Ordering::AcqRel);
        q.shared.recv_cq.users.fetch_sub(1, Ordering::AcqRel);
        if let Some(s) = &q.shared.srq {
            s.users.fetch_sub(1, Ordering::AcqRel);
        }
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
        // At most what `ibv_query_device` offers (max_qp_init_rd_atom,
        // max_qp_rd_atom).
        if mask & IBV_QP_MAX_QP_RD_ATOMIC != 0 && u32::from(a.max_rd_atomic) > MAX_RD_ATOMIC
            || mask & IBV_QP_MAX_DEST_RD_ATOMIC != 0
                && u32::from(a.max_dest_rd_atomic) > MAX_RD_ATOMIC
        {
            return libc::EINVAL;
        }
        if mask & IBV_QP_AV != 0 {
            // RoCE addresses by GID only (the kernel cannot resolve a
            // path without a GRH); the source GID must exist.
            let ah = &a.ah_attr;
            if crate::device::ethernet() && ah.is_global == 0
                || ah.is_global != 0
                    && usize::from(ah.grh.sgid_index) >= crate::gid::table(sh.dev).len()
            {
                return libc::EINVAL;
            }
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
