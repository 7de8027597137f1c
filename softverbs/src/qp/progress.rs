//! Running a QP's work requests in order: completions (held back for the
//! emulated acknowledgement), the move to the error state with its
//! flushes, RNR and transport retries, and the progress thread that
//! retries work waiting out a timer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::execute::{execute, push_remote, Outcome};
use super::{Inner, Pending, QpShared};
use crate::abi::*;
use crate::cq::CqShared;
use crate::events::Element;
use crate::fabric::{self, Fabric};
use crate::fault::Action;
use crate::ring;

fn wc_opcode(op: u32) -> u32 {
    match op {
        IBV_WR_RDMA_WRITE | IBV_WR_RDMA_WRITE_WITH_IMM => IBV_WC_RDMA_WRITE,
        IBV_WR_RDMA_READ => IBV_WC_RDMA_READ,
        IBV_WR_ATOMIC_CMP_AND_SWP => IBV_WC_COMP_SWAP,
        IBV_WR_ATOMIC_FETCH_AND_ADD => IBV_WC_FETCH_ADD,
        _ => IBV_WC_SEND,
    }
}

/// Runs pending work requests in order until one must wait (RNR) or all
/// are done. Called with the QP's lock held.
pub(super) fn progress(f: &Fabric, sh: &Arc<QpShared>, inner: &mut Inner) {
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
        match p.fault {
            Some(Action::Status(status)) => {
                complete(f, sh, &p, status, 0);
                enter_error(f, sh, inner);
                continue;
            }
            Some(Action::Fatal) => {
                if inner.handle != 0 {
                    sh.events
                        .raise(IBV_EVENT_QP_FATAL, Element::Qp(inner.handle));
                }
                enter_error(f, sh, inner);
                complete(f, sh, &p, IBV_WC_WR_FLUSH_ERR, 0);
                continue;
            }
            None => {}
        }
        // The status to complete `p` with, or the wait before its retry.
        let status = match execute(f, sh, inner, &p) {
            Outcome::Done(len, remote) => {
                inner.rnr_tries = 0;
                inner.retry_tries = 0;
                // The initiator's completion first: a NIC's acknowledgement
                // beats anything the target's software can send back.
                if p.flags & IBV_SEND_SIGNALED != 0 || sh.sq_sig_all {
                    complete(f, sh, &p, IBV_WC_SUCCESS, len);
                }
                if let Some(r) = remote {
                    push_remote(f, r.slot, &r.wc, r.solicited);
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

/// How long an initiator's completion trails the delivery
/// (`SOFTVERBS_ACK_DELAY_US`, default 0). The target's NIC acknowledges in
/// hardware, long before software on the target can answer, so by default
/// the initiator's completion is pushed before the target's receive
/// completion, in the posting thread: a delay longer than the target's
/// reaction time (10 µs and more here, plus a thread wake-up) would invert
/// that order, which event-driven ping-pong programs such as
/// `ib_send_lat -e` depend on. A delay, when set, is served by the progress
/// thread.
fn ack_delay() -> Duration {
    static D: OnceLock<Duration> = OnceLock::new();
    *D.get_or_init(|| {
        Duration::from_micros(
            std::env::var("SOFTVERBS_ACK_DELAY_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    })
}

fn complete(f: &Fabric, sh: &QpShared, p: &Pending, status: u32, len: u32) {
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
        if d.is_empty() && ack_delay().is_zero() {
            // Nothing waits ahead of it: straight onto the ring.
            let _ = ring::cq_push(f, &cq.ring, &wc, false);
            return;
        }
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
        last_wqe(sh, inner);
    }
}

/// A QP on an SRQ that enters the error state consumes no more of its
/// receives: `IBV_EVENT_QP_LAST_WQE_REACHED`, as the IB spec requires.
fn last_wqe(sh: &QpShared, inner: &Inner) {
    if sh.srq.is_some() && inner.handle != 0 {
        sh.events
            .raise(IBV_EVENT_QP_LAST_WQE_REACHED, Element::Qp(inner.handle));
    }
}

/// `ibv_modify_qp` to the error state (from another state).
pub(super) fn to_error(f: &Fabric, sh: &Arc<QpShared>) {
    let mut inner = sh.inner.lock().unwrap_or_else(|p| p.into_inner());
    inner.state = IBV_QPS_ERR;
    f.qp(sh.slot).state.store(IBV_QPS_ERR, Ordering::Release);
    flush_rq(f, sh);
    last_wqe(sh, &inner);
    progress(f, sh, &mut inner);
}

/// Completes every posted receive with a flush error.
pub(super) fn flush_rq(f: &Fabric, sh: &QpShared) {
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
