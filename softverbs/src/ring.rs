//! The rings peers share: receive queues (the owner posts, the connected
//! peers' senders consume) and completion queues (anyone produces, the
//! owner polls). Each is a file in `/dev/shm` guarded by a process-shared
//! lock; operations are short copies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::abi::{ibv_sge, ibv_wc};
use crate::fabric::{self, Fabric};
use crate::shm::{self, Mapping};

/// Most scatter entries in one receive work request.
pub const MAX_SGE: usize = 8;
const HEAD: usize = 64;
const TAIL: usize = 128;
const ENTRIES: usize = 192;
const RQ_ENTRY: usize = 16 + MAX_SGE * 16;
const CQ_ENTRY: usize = std::mem::size_of::<ibv_wc>();

/// Mappings of other processes' ring files, by file name.
fn cache() -> &'static Mutex<HashMap<String, Arc<Mapping>>> {
    static C: OnceLock<Mutex<HashMap<String, Arc<Mapping>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Maps `name` (cached per process).
pub fn map(name: &str) -> Result<Arc<Mapping>, String> {
    let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = c.get(name) {
        return Ok(m.clone());
    }
    let m = Arc::new(Mapping::open(name).map_err(|e| format!("{name}: {e}"))?);
    if m.len() < ENTRIES {
        return Err(format!("{name}: too small"));
    }
    c.insert(name.to_string(), m.clone());
    Ok(m)
}

/// Creates a ring file and caches its mapping.
pub fn create(name: &str, entry: usize, cap: u32) -> Result<Arc<Mapping>, String> {
    let m = Arc::new(
        Mapping::create(name, ENTRIES + entry * cap as usize)
            .map_err(|e| format!("{name}: {e}"))?,
    );
    m.at::<AtomicU32>(4).store(cap, Ordering::Release);
    cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_string(), m.clone());
    Ok(m)
}

/// Forgets a cached mapping (the object is gone).
pub fn forget(name: &str) {
    cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
}

fn cap(m: &Mapping, entry: usize) -> u64 {
    let c = u64::from(m.at::<AtomicU32>(4).load(Ordering::Acquire));
    // Never trust a peer's header beyond the mapping.
    c.min(((m.len() - ENTRIES) / entry) as u64).max(1)
}

/// A receive work request as stored in a receive queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvWr {
    pub wr_id: u64,
    pub num_sge: u32,
    pub sge: [ibv_sge; MAX_SGE],
}

pub fn rq_create(name: &str, cap: u32) -> Result<Arc<Mapping>, String> {
    create(name, RQ_ENTRY, cap)
}

fn rq_slot(m: &Mapping, i: u64) -> *mut u8 {
    let c = cap(m, RQ_ENTRY);
    // SAFETY: `i % c` indexes the entry array, which `cap` bounds by the
    // mapping's length.
    unsafe { m.ptr().add(ENTRIES + (i % c) as usize * RQ_ENTRY) }
}

/// Owner: posts a receive; `false` if the queue is full.
pub fn rq_push(m: &Mapping, wr: &RecvWr) -> bool {
    let _g = shm::lock(m.at(0));
    let head = m.at::<AtomicU64>(HEAD).load(Ordering::Relaxed);
    let tail = m.at::<AtomicU64>(TAIL).load(Ordering::Relaxed);
    if head.wrapping_sub(tail) >= cap(m, RQ_ENTRY) {
        return false;
    }
    // SAFETY: the slot is in the mapping (see `rq_slot`) and the lock is
    // held; `RecvWr` is plain data.
    unsafe { std::ptr::write_unaligned(rq_slot(m, head).cast::<RecvWr>(), *wr) };
    m.at::<AtomicU64>(HEAD)
        .store(head.wrapping_add(1), Ordering::Release);
    true
}

// Receive queue header fields (an SRQ's limit).
/// The armed limit (0: not armed).
const RQ_LIMIT: usize = 8;
/// Set when the armed limit was crossed; the owner raises the event.
const RQ_LIMIT_HIT: usize = 12;

/// Owner: arms the SRQ limit (0 disarms).
pub fn rq_arm_limit(m: &Mapping, limit: u32) {
    m.at::<AtomicU32>(RQ_LIMIT_HIT).store(0, Ordering::Release);
    m.at::<AtomicU32>(RQ_LIMIT).store(limit, Ordering::Release);
}

/// The armed limit (0 once it fired or when never armed).
pub fn rq_limit(m: &Mapping) -> u32 {
    m.at::<AtomicU32>(RQ_LIMIT).load(Ordering::Acquire)
}

/// Owner: whether the limit fired since the last call (and clears it).
pub fn rq_take_limit_hit(m: &Mapping) -> bool {
    m.at::<AtomicU32>(RQ_LIMIT_HIT).swap(0, Ordering::AcqRel) != 0
}

/// Sender (any process): takes the oldest posted receive. Taking one
/// below an armed limit disarms it and flags the owner.
pub fn rq_pop(m: &Mapping) -> Option<RecvWr> {
    let _g = shm::lock(m.at(0));
    let head = m.at::<AtomicU64>(HEAD).load(Ordering::Relaxed);
    let tail = m.at::<AtomicU64>(TAIL).load(Ordering::Relaxed);
    if head == tail || head.wrapping_sub(tail) > cap(m, RQ_ENTRY) {
        return None;
    }
    // SAFETY: as in `rq_push`.
    let mut wr = unsafe { std::ptr::read_unaligned(rq_slot(m, tail).cast::<RecvWr>()) };
    wr.num_sge = wr.num_sge.min(MAX_SGE as u32);
    m.at::<AtomicU64>(TAIL)
        .store(tail.wrapping_add(1), Ordering::Release);
    let left = head.wrapping_sub(tail) - 1;
    let limit = m.at::<AtomicU32>(RQ_LIMIT);
    let l = limit.load(Ordering::Acquire);
    if l > 0
        && left < u64::from(l)
        && limit
            .compare_exchange(l, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        m.at::<AtomicU32>(RQ_LIMIT_HIT).store(1, Ordering::Release);
    }
    Some(wr)
}

// Completion queue header fields.
const CQ_OVERFLOW: usize = 8;
const CQ_ARMED: usize = 12;
const CQ_CHANNEL: usize = 16;
const CQ_CHANNEL_GEN: usize = 20;
const CQ_SLOT: usize = 24;

pub fn cq_create(
    name: &str,
    cap: u32,
    slot: u32,
    channel: Option<(u32, u32)>,
) -> Result<Arc<Mapping>, String> {
    let m = create(name, CQ_ENTRY, cap)?;
    m.at::<AtomicU32>(CQ_SLOT).store(slot, Ordering::Relaxed);
    if let Some((ch, gen)) = channel {
        m.at::<AtomicU32>(CQ_CHANNEL)
            .store(ch + 1, Ordering::Relaxed);
        m.at::<AtomicU32>(CQ_CHANNEL_GEN)
            .store(gen, Ordering::Relaxed);
    }
    Ok(m)
}

fn cq_slot(m: &Mapping, i: u64) -> *mut u8 {
    let c = cap(m, CQ_ENTRY);
    // SAFETY: bounded by the mapping (see `cap`).
    unsafe { m.ptr().add(ENTRIES + (i % c) as usize * CQ_ENTRY) }
}

/// Anyone: adds a completion. `Err` if the queue overflowed (it is then
/// in error, as a NIC's would be). Wakes the owner's channel if armed.
pub fn cq_push(f: &Fabric, m: &Mapping, wc: &ibv_wc, solicited: bool) -> Result<(), ()> {
    {
        let _g = shm::lock(m.at(0));
        let head = m.at::<AtomicU64>(HEAD).load(Ordering::Relaxed);
        let tail = m.at::<AtomicU64>(TAIL).load(Ordering::Relaxed);
        if head.wrapping_sub(tail) >= cap(m, CQ_ENTRY) {
            m.at::<AtomicU32>(CQ_OVERFLOW).store(1, Ordering::Release);
            return Err(());
        }
        // SAFETY: in the mapping; lock held; `ibv_wc` is plain data.
        unsafe { std::ptr::write_unaligned(cq_slot(m, head).cast::<ibv_wc>(), *wc) };
        m.at::<AtomicU64>(HEAD)
            .store(head.wrapping_add(1), Ordering::Release);
    }
    let armed: &AtomicU32 = m.at(CQ_ARMED);
    let a = armed.load(Ordering::Acquire);
    if (a == 1 || (a == 2 && solicited))
        && armed
            .compare_exchange(a, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        let ch = m.at::<AtomicU32>(CQ_CHANNEL).load(Ordering::Acquire);
        let gen = m.at::<AtomicU32>(CQ_CHANNEL_GEN).load(Ordering::Acquire);
        if ch > 0 && f.live(fabric::Kind::Ch, ch as usize - 1, gen).is_some() {
            channel_push(
                f,
                ch as usize - 1,
                m.at::<AtomicU32>(CQ_SLOT).load(Ordering::Relaxed),
            );
        }
    }
    Ok(())
}

/// Owner: takes up to `out.len()` completions. `Err` if overflowed.
pub fn cq_pop(m: &Mapping, out: &mut [ibv_wc]) -> Result<usize, ()> {
    if m.at::<AtomicU32>(CQ_OVERFLOW).load(Ordering::Acquire) != 0 {
        return Err(());
    }
    let _g = shm::lock(m.at(0));
    let head = m.at::<AtomicU64>(HEAD).load(Ordering::Relaxed);
    let mut tail = m.at::<AtomicU64>(TAIL).load(Ordering::Relaxed);
    let mut n = 0;
    while tail != head && n < out.len() {
        // SAFETY: as in `cq_push`.
        out[n] = unsafe { std::ptr::read_unaligned(cq_slot(m, tail).cast::<ibv_wc>()) };
        tail = tail.wrapping_add(1);
        n += 1;
    }
    m.at::<AtomicU64>(TAIL).store(tail, Ordering::Release);
    Ok(n)
}

/// Owner: arms the queue (1: any completion, 2: solicited only).
pub fn cq_arm(m: &Mapping, how: u32) {
    m.at::<AtomicU32>(CQ_ARMED).store(how, Ordering::Release);
}

/// Pushes a CQ event on channel `ch` and wakes its owner.
pub fn channel_push(f: &Fabric, ch: usize, cq_slot: u32) {
    let c = f.ch(ch);
    {
        let _g = shm::lock(&c.lock);
        let head = c.head.load(Ordering::Relaxed);
        let tail = c.tail.load(Ordering::Relaxed);
        if head.wrapping_sub(tail) < fabric::CH_EVENTS as u32 {
            c.events[head as usize % fabric::CH_EVENTS].store(cq_slot, Ordering::Relaxed);
            c.head.store(head.wrapping_add(1), Ordering::Release);
        }
    }
    c.seq.fetch_add(1, Ordering::AcqRel);
    shm::futex_wake(&c.seq);
    crate::channel::ring_doorbell(f, ch);
}

/// Whether channel `ch` has events waiting.
pub fn channel_pending(f: &Fabric, ch: usize) -> bool {
    let c = f.ch(ch);
    c.head.load(Ordering::Acquire) != c.tail.load(Ordering::Acquire)
}

/// Owner: takes the oldest CQ event of channel `ch`.
pub fn channel_pop(f: &Fabric, ch: usize) -> Option<u32> {
    let c = f.ch(ch);
    let _g = shm::lock(&c.lock);
    let head = c.head.load(Ordering::Relaxed);
    let tail = c.tail.load(Ordering::Relaxed);
    if head == tail {
        return None;
    }
    let v = c.events[tail as usize % fabric::CH_EVENTS].load(Ordering::Relaxed);
    c.tail.store(tail.wrapping_add(1), Ordering::Release);
    Some(v)
}
