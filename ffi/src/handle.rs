//! What the attention and FFN handles share: the live/finalized/aborted
//! state, who may touch it from which thread, and the bodies of `_info`,
//! `_stats`, `_finalize`, `_abort` and `_interrupt`, written once over the
//! `Handle` trait.
//!
//! # Threads
//!
//! A handle is driven by one thread at a time. Every call but `_abort`
//! and `_interrupt` holds the handle for its length ([`Slot::enter`]: a
//! compare-exchange on `busy`); a second thread's call meanwhile fails at
//! once with `AFMESH_ERR_BUSY`, naming the handle, and changes nothing.
//! `_abort` and `_interrupt` may run on any thread at any time but during
//! or after `_free`: they touch only atomics and the [`Interrupter`], never
//! the rank. `_abort` marks the handle dead and wakes a blocked wait (which
//! returns `AFMESH_ERR_SHUTDOWN`); the rank itself is dropped, closing its
//! links, by whoever holds the handle or next takes it (the abort itself
//! when it is free). `_free` belongs to the owner: no other call may run
//! during or after it.
//!
//! The abort and a call that is ending meet like a Dekker pair: the abort
//! stores `aborted` then tries to take `busy`; the call stores `busy =
//! false` then loads `aborted`. Both sides are `SeqCst`, so at least one
//! sees the other, and the rank is dropped by exactly one of them.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use afmesh_core::{Histogram, Interrupter, Peer, RankStats};

use crate::args::obj_ref;
use crate::error::afmesh_result::{
    AFMESH_ERR_BUFFER_SIZE, AFMESH_ERR_BUSY, AFMESH_ERR_INTERRUPTED, AFMESH_ERR_SHUTDOWN,
};
use crate::error::{invalid, Fail};

/// Who a rank is.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_rank_info {
    /// This rank within its role.
    pub rank: u32,
    /// Attention ranks M.
    pub num_attention: u32,
    /// FFN ranks N.
    pub num_ffn: u32,
    /// Stages.
    pub stages: u32,
}

/// Counters for one peer. Sized so it can grow: set `size` to
/// `sizeof(afmesh_peer_stats)` in the first element of the array you pass
/// (`AFMESH_PEER_STATS_INIT`); the library uses it as the element size,
/// writes the fields it knows that fit into each element and leaves any
/// later fields of a newer header untouched (a caller built against an
/// older, shorter header gets the fields it has).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_peer_stats {
    /// `sizeof(afmesh_peer_stats)`, set by the caller in the first element.
    pub size: u32,
    /// 1: attention rank, 2: FFN rank.
    pub role: u32,
    /// Its rank.
    pub rank: u32,
    /// Non-zero if it is lost.
    pub lost: u32,
    /// Messages written to it.
    pub sent: u64,
    /// Bytes written to it (headers included).
    pub sent_bytes: u64,
    /// Bytes of those the library itself copied on the way (a staging
    /// copy, or the shared-memory copy into the peer); 0 where the kernel
    /// or a NIC moves the bytes.
    pub copied_bytes: u64,
    /// Messages from it that counted.
    pub received: u64,
    /// Messages from it that were rejected.
    pub rejected: u64,
    /// Attention ranks: from posting a dispatch to seeing this FFN rank's
    /// combine of it (this rank's clock). Empty on FFN ranks.
    pub round_trip: afmesh_latency,
    /// FFN ranks: from this attention rank's dispatch landing to the
    /// response being posted. Empty on attention ranks.
    pub ffn: afmesh_latency,
    /// Attention ranks, the straggler record: each time this FFN rank's
    /// combine was the last of a stage to arrive, how long after the one
    /// before it (`count`: the stages it held up). Empty on FFN ranks and
    /// with a single FFN rank.
    pub straggler: afmesh_latency,
    /// One way, per message from this peer: from the peer posting it to
    /// this rank counting it (dispatch → arrival on FFN ranks, the
    /// combine's way back on attention ranks); the post stamp is the
    /// peer's clock (exact on one host, skewed by the clock offset across
    /// hosts).
    pub arrival: afmesh_latency,
}

/// A latency distribution in nanoseconds, from a histogram of bounded
/// relative error (quantiles are within it; min and max are exact). All
/// zero when `count` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_latency {
    /// Samples recorded.
    pub count: u64,
    /// Smallest sample.
    pub min_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
    /// Mean, rounded to the nearest nanosecond.
    pub mean_ns: u64,
}

impl afmesh_latency {
    fn of(h: &Histogram) -> afmesh_latency {
        let q = |q: f64| h.quantile(q).unwrap_or(0);
        afmesh_latency {
            count: h.count(),
            min_ns: h.min().unwrap_or(0),
            p50_ns: q(0.5),
            p90_ns: q(0.9),
            p99_ns: q(0.99),
            p999_ns: q(0.999),
            max_ns: h.max().unwrap_or(0),
            mean_ns: h.mean().map_or(0, |m| m.round() as u64),
        }
    }
}

/// `sizeof(afmesh_peer_stats)` in the first header (0.1.0), before the
/// latency fields: callers built against it still get what it has.
const PEER_STATS_V1: usize = std::mem::offset_of!(afmesh_peer_stats, round_trip);

/// What a rank's transports did and what the machine took from its
/// waits, over the rank's life. Sized so it can grow: set `size` to
/// `sizeof(afmesh_rank_counters)` (`AFMESH_RANK_COUNTERS_INIT`); the
/// library writes the fields it knows that fit and leaves later fields of
/// a newer header untouched.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct afmesh_rank_counters {
    /// `sizeof(afmesh_rank_counters)`, set by the caller.
    pub size: u32,
    /// Zero.
    pub reserved: u32,
    /// Messages posted over verbs (the other backends leave `messages`,
    /// `work_requests`, `signaled`, `flushes` and
    /// `registrations_after_setup` at 0; `received_copied_bytes` is tcp's).
    pub messages: u64,
    /// Work requests posted for them (one per QP stripe), flushes and
    /// probes included.
    pub work_requests: u64,
    /// Of those, signalled ones.
    pub signaled: u64,
    /// Zero-length flush or probe writes among the work requests.
    pub flushes: u64,
    /// Memory registrations after the first link came up.
    pub registrations_after_setup: u64,
    /// Received payload bytes a backend copied itself (tcp read-ahead).
    pub received_copied_bytes: u64,
    /// Waits whose spin was cut short because the thread lost its core.
    pub preempted_spins: u64,
    /// Nanoseconds the rank's waits spun, where measured (spins that never
    /// yield, over shm or cuda with GPU-announced notices).
    pub spun_ns: u64,
    /// Stretches of that spinning in which the thread did not run (5 µs or
    /// more over the quickest stretch): interrupts, preemption, or a
    /// hypervisor's own work on the vCPU.
    pub spin_gaps: u64,
    /// Nanoseconds those gaps took.
    pub spin_gap_ns: u64,
}

/// The smallest `size` accepted: the first header's struct (0.1.0).
const RANK_COUNTERS_V1: usize = std::mem::size_of::<afmesh_rank_counters>();

/// # Safety
/// `h` is NULL or live; `out` is NULL or writable for the `size` bytes its
/// first field declares.
pub(crate) unsafe fn counters_of<H: Handle>(
    h: *const H,
    out: *mut afmesh_rank_counters,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let slot = unsafe { slot_of(h, "handle") }?;
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    // SAFETY: non-NULL, writable for at least its `size` field (contract).
    let size = unsafe { out.cast::<u32>().read_unaligned() } as usize;
    if size < RANK_COUNTERS_V1 {
        return Err(invalid(format!(
            "out->size is {size}, smaller than any afmesh_rank_counters ({RANK_COUNTERS_V1} bytes at least); use AFMESH_RANK_COUNTERS_INIT"
        )));
    }
    let stats = slot.with(|r| Ok(r.stats()))?;
    let (w, g) = (&stats.wire, &stats.spin_gaps);
    let v = afmesh_rank_counters {
        size: size as u32,
        reserved: 0,
        messages: w.messages,
        work_requests: w.work_requests,
        signaled: w.signaled,
        flushes: w.flushes,
        registrations_after_setup: w.registrations_after_setup,
        received_copied_bytes: w.received_copied_bytes,
        preempted_spins: w.preempted_spins,
        spun_ns: g.spun_ns,
        spin_gaps: g.count,
        spin_gap_ns: g.lost_ns,
    };
    // SAFETY: `out` is writable for `size` bytes (contract) and at most
    // that many are written: the first `min(size, known)` bytes of `v`,
    // the fields that fit (the struct has no padding), bytewise since a
    // struct of another declared size need not be aligned for ours.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&v as *const afmesh_rank_counters).cast::<u8>(),
            out.cast::<u8>(),
            size.min(std::mem::size_of::<afmesh_rank_counters>()),
        )
    };
    Ok(())
}

#[derive(Debug)]
pub(crate) enum State<T> {
    Live(T),
    Finalized,
    Aborted,
}

impl<T> State<T> {
    pub(crate) fn live(&mut self, what: &str) -> Result<&mut T, Fail> {
        match self {
            State::Live(t) => Ok(t),
            State::Finalized => Err(Fail(AFMESH_ERR_SHUTDOWN, format!("{what} was finalized"))),
            State::Aborted => Err(Fail(AFMESH_ERR_SHUTDOWN, format!("{what} was aborted"))),
        }
    }
}

fn write_stats(
    stats: RankStats,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> Result<(), Fail> {
    if count_out.is_null() {
        return Err(invalid("count_out is NULL"));
    }
    let n = stats.peers.len();
    if cap < n {
        return Err(Fail(
            AFMESH_ERR_BUFFER_SIZE,
            format!("stats array holds {cap}, need {n}"),
        ));
    }
    if n > 0 && out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let known = std::mem::size_of::<afmesh_peer_stats>();
    let stride = if n == 0 {
        known
    } else {
        // SAFETY: `out` is non-NULL and holds at least one element (the
        // caller's contract); `size` is its first field.
        let size = unsafe { out.cast::<u32>().read_unaligned() } as usize;
        if size < PEER_STATS_V1 {
            return Err(invalid(format!(
                "out[0].size is {size}, smaller than any afmesh_peer_stats ({PEER_STATS_V1} bytes at least, {known} in this library); use AFMESH_PEER_STATS_INIT"
            )));
        }
        size
    };
    for (i, (peer, s)) in stats.peers.iter().enumerate() {
        let (role, rank) = match peer {
            Peer::Attention(r) => (1, *r),
            Peer::Ffn(r) => (2, *r),
            _ => (0, 0),
        };
        let v = afmesh_peer_stats {
            size: stride as u32,
            role,
            rank,
            lost: u32::from(s.lost.is_some()),
            sent: s.sent,
            sent_bytes: s.sent_bytes,
            copied_bytes: s.copied_bytes,
            received: s.received,
            rejected: s.rejected,
            round_trip: afmesh_latency::of(&s.round_trip_ns),
            ffn: afmesh_latency::of(&s.ffn_ns),
            straggler: afmesh_latency::of(&s.late_ns),
            arrival: afmesh_latency::of(&s.arrival_ns),
        };
        // SAFETY: `out` holds `cap >= n` elements of `stride` bytes, the
        // size the caller declared (contract), and at most `stride` bytes
        // go into element `i`: the first `min(stride, known)` bytes of
        // `v`, the fields that fit (a header's size ends on a field; the
        // struct has no padding), copied bytewise since an element of
        // another declared size need not be aligned for ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&v as *const afmesh_peer_stats).cast::<u8>(),
                out.cast::<u8>().add(i * stride),
                stride.min(known),
            )
        };
    }
    // SAFETY: checked non-NULL above.
    unsafe { count_out.write(n) };
    Ok(())
}

/// What the C handles of both roles share.
pub(crate) trait RankOps: Sized + Send {
    const WHAT: &'static str;
    fn shutdown(self) -> afmesh_core::Result<()>;
    fn info(&self) -> afmesh_rank_info;
    fn stats(&self) -> RankStats;
    fn progress(&mut self) -> afmesh_core::Result<()>;
    fn interrupter(&self) -> Interrupter;
}

/// A C handle's rank and the flags that let two threads share the handle
/// (see the module docs).
#[derive(Debug)]
pub(crate) struct Slot<R> {
    /// Held for the length of every call but `_abort` and `_interrupt`.
    busy: AtomicBool,
    /// Set by `_abort`: the rank is to be dropped by the holder of `busy`.
    aborted: AtomicBool,
    /// The rank's, taken at construction: `_abort` and `_interrupt` wake a
    /// blocked wait through it without touching the rank.
    interrupter: Interrupter,
    /// Touched only by the holder of `busy`.
    state: UnsafeCell<State<R>>,
}

// SAFETY: the only field that is not `Sync` is `state`, and it is reached
// only through an `InUse`, which exists only while its thread holds `busy`
// (taken by compare-exchange, released with a SeqCst store that orders the
// holder's writes before the next holder's acquire). The rank moves between
// threads that way, hence `R: Send`.
unsafe impl<R: Send> Sync for Slot<R> {}

impl<R: RankOps> Slot<R> {
    pub(crate) fn new(rank: R) -> Slot<R> {
        Slot {
            busy: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            interrupter: rank.interrupter(),
            state: UnsafeCell::new(State::Live(rank)),
        }
    }

    /// Holds the handle for one call, or fails at once with
    /// `AFMESH_ERR_BUSY` if another thread is inside a call on it.
    pub(crate) fn enter(&self) -> Result<InUse<'_, R>, Fail> {
        if self
            .busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_err()
        {
            return Err(Fail(
                AFMESH_ERR_BUSY,
                format!(
                    "the {} handle {:p} is in use by another thread: one call at a time per handle (only _abort and _interrupt may overlap)",
                    R::WHAT,
                    self
                ),
            ));
        }
        let mut g = InUse { slot: self };
        g.reap();
        Ok(g)
    }

    /// Runs `f` on the live rank, holding the handle. A wait that an abort
    /// woke reports `AFMESH_ERR_SHUTDOWN`.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut R) -> Result<T, Fail>) -> Result<T, Fail> {
        let mut g = self.enter()?;
        match f(g.live()?) {
            Err(Fail(AFMESH_ERR_INTERRUPTED, _)) if self.aborted.load(SeqCst) => Err(Fail(
                AFMESH_ERR_SHUTDOWN,
                format!("{} was aborted while this call waited", R::WHAT),
            )),
            r => r,
        }
    }
}

/// One call's hold on a handle: the only way to its rank.
pub(crate) struct InUse<'a, R: RankOps> {
    slot: &'a Slot<R>,
}

impl<R: RankOps> InUse<'_, R> {
    pub(crate) fn state(&mut self) -> &mut State<R> {
        // SAFETY: this thread holds `busy`, so no other reference to the
        // state exists (see `Slot`), and `&mut self` keeps this one unique.
        unsafe { &mut *self.slot.state.get() }
    }

    pub(crate) fn live(&mut self) -> Result<&mut R, Fail> {
        self.state().live(R::WHAT)
    }

    /// Drops the rank if the handle was aborted; whether it was.
    fn reap(&mut self) -> bool {
        let aborted = self.slot.aborted.load(SeqCst);
        if aborted && matches!(self.state(), State::Live(_)) {
            drop(std::mem::replace(self.state(), State::Aborted));
        }
        aborted
    }
}

impl<R: RankOps> Drop for InUse<'_, R> {
    fn drop(&mut self) {
        let reaped = self.reap();
        let slot = self.slot;
        slot.busy.store(false, SeqCst);
        // An abort that came after `reap` looked could not take `busy`:
        // drop the rank for it (the Dekker pair in the module docs). That
        // hold's own drop sees `aborted`, so this goes one level deep.
        if !reaped
            && slot.aborted.load(SeqCst)
            && slot
                .busy
                .compare_exchange(false, true, SeqCst, SeqCst)
                .is_ok()
        {
            drop(InUse { slot });
        }
    }
}

pub(crate) trait Handle: Sync + 'static {
    type Rank: RankOps;
    fn slot(&self) -> &Slot<Self::Rank>;
}

/// The handle behind `h` (the argument `name`), shared: several threads
/// may hold it at once.
///
/// # Safety
/// `h` is NULL or a live handle (not freed, nor being freed).
pub(crate) unsafe fn slot_of<'a, H: Handle>(
    h: *const H,
    name: &str,
) -> Result<&'a Slot<H::Rank>, Fail> {
    // SAFETY: forwarded contract; `H: Sync`, so a shared reference may
    // exist on several threads.
    let h: &'a H = unsafe { obj_ref(h, name) }?;
    Ok(h.slot())
}

/// # Safety
/// `h` is NULL or a live handle; `out` is NULL or writable.
pub(crate) unsafe fn info_of<H: Handle>(
    h: *const H,
    out: *mut afmesh_rank_info,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let slot = unsafe { slot_of(h, "handle") }?;
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let info = slot.with(|r| Ok(r.info()))?;
    // SAFETY: checked non-NULL.
    unsafe { out.write(info) };
    Ok(())
}

/// # Safety
/// As `write_stats`, and `h` is NULL or live.
pub(crate) unsafe fn stats_of<H: Handle>(
    h: *const H,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let slot = unsafe { slot_of(h, "handle") }?;
    let stats = slot.with(|r| Ok(r.stats()))?;
    write_stats(stats, out, cap, count_out)
}

/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn finalize_of<H: Handle>(h: *const H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let mut g = unsafe { slot_of(h, "handle") }?.enter()?;
    match std::mem::replace(g.state(), State::Finalized) {
        State::Live(r) => r.shutdown().map_err(Fail::from),
        other => {
            *g.state() = other;
            g.live().map(|_| ())
        }
    }
}

/// Marks the handle dead and wakes its blocked wait; drops the rank now if
/// no call is inside, else the call drops it on its way out. Any thread.
///
/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn abort_of<H: Handle>(h: *const H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let slot = unsafe { slot_of(h, "handle") }?;
    slot.aborted.store(true, SeqCst);
    slot.interrupter.interrupt();
    if slot
        .busy
        .compare_exchange(false, true, SeqCst, SeqCst)
        .is_ok()
    {
        // No call is inside: drop the rank here (`InUse`'s drop reaps it).
        drop(InUse { slot });
    }
    Ok(())
}

/// Wakes the handle's blocked wait, or the next one that would block. Any
/// thread.
///
/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn interrupt_of<H: Handle>(h: *const H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    unsafe { slot_of(h, "handle") }?.interrupter.interrupt();
    Ok(())
}

/// Frees a handle from `Box::into_raw`. A call still inside on another
/// thread breaks `_free`'s contract; where it is seen, the handle is
/// aborted and left allocated rather than freed under that call.
///
/// # Safety
/// `h` is NULL or a handle from `Box::into_raw` not yet freed, and no other
/// call on it starts during or after this one.
pub(crate) unsafe fn free_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    if h.is_null() {
        return Ok(());
    }
    {
        // SAFETY: live (contract).
        let slot = unsafe { slot_of(h, "handle") }?;
        if slot
            .busy
            .compare_exchange(false, true, SeqCst, SeqCst)
            .is_err()
        {
            // SAFETY: live (contract).
            unsafe { abort_of(h) }?;
            return Err(Fail(
                AFMESH_ERR_BUSY,
                format!(
                    "the {} handle {h:p} was freed while another thread was inside a call on it: aborted it instead and left it allocated (abort, join that thread, then free)",
                    H::Rank::WHAT
                ),
            ));
        }
    }
    // SAFETY: from `Box::into_raw` in a constructor, freed once; this
    // thread holds `busy`, and no other call starts now (contract).
    drop(unsafe { Box::from_raw(h) });
    Ok(())
}

/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn progress_of<H: Handle>(h: *const H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let slot = unsafe { slot_of(h, "handle") }?;
    slot.with(|r| r.progress().map_err(Fail::from))
}
