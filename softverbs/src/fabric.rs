//! The emulated fabric: one shared file per namespace (`SOFTVERBS_NAMESPACE`,
//! default `default`) with a table for each kind of object that peers must
//! find — queue pairs by number, memory regions by key, completion queues,
//! shared receive queues, completion channels — plus per-object files for
//! the rings (receive queues, completion queues).
//!
//! Slots are claimed with a compare-and-swap and carry the owner's pid and a
//! generation: a slot whose owner died is reclaimed (and its files removed)
//! by the next process that needs one; a key or QP number that names an old
//! generation no longer resolves.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::shm::{self, AtomicOnly, Mapping};

pub const MAX_QP: usize = 1024;
pub const MAX_MR: usize = 4096;
pub const MAX_CQ: usize = 1024;
pub const MAX_SRQ: usize = 256;
pub const MAX_CH: usize = 256;
pub const CH_EVENTS: usize = 256;

const MAGIC: u64 = u64::from_le_bytes(*b"SOFTVRB3");
const FREE: u32 = 0;
const BUSY: u32 = 1;
const LIVE: u32 = 2;

/// Common head of every slot. `pid` is the owner (0: free) and is what a
/// claim swaps; `state` says whether the owner has published it.
#[repr(C)]
pub struct SlotHdr {
    pub state: AtomicU32,
    pub gen: AtomicU32,
    pub pid: AtomicU32,
    pub _r: AtomicU32,
}

// SAFETY: `#[repr(C)]` and made only of atomics.
unsafe impl AtomicOnly for SlotHdr {}

/// A queue pair as peers see it.
#[repr(C, align(64))]
pub struct QpSlot {
    pub hdr: SlotHdr,
    /// Device index (its LID is index + 1).
    pub dev: AtomicU32,
    /// Protection domain id.
    pub pd: AtomicU32,
    /// `IBV_QPS_*`.
    pub state: AtomicU32,
    /// `qp_access_flags` (remote write/read allowed).
    pub access: AtomicU32,
    /// Encoded `min_rnr_timer`.
    pub min_rnr_timer: AtomicU32,
    /// Receive CQ slot and generation.
    pub recv_cq: AtomicU32,
    pub recv_cq_gen: AtomicU32,
    /// SRQ slot + 1 (0: none) and generation.
    pub srq: AtomicU32,
    pub srq_gen: AtomicU32,
    pub qpn: AtomicU32,
}

// SAFETY: `#[repr(C)]` and made only of atomics (and a `SlotHdr`).
unsafe impl AtomicOnly for QpSlot {}

/// A memory region as peers see it.
#[repr(C, align(64))]
pub struct MrSlot {
    pub hdr: SlotHdr,
    pub key: AtomicU32,
    pub pd: AtomicU32,
    pub access: AtomicU32,
    pub _r: AtomicU32,
    pub addr: AtomicU64,
    pub len: AtomicU64,
    /// The address the region starts at in work requests (`iova` of
    /// `ibv_reg_mr_iova2`; the virtual address for `ibv_reg_mr`).
    pub iova: AtomicU64,
}

// SAFETY: `#[repr(C)]` and made only of atomics (and a `SlotHdr`).
unsafe impl AtomicOnly for MrSlot {}

/// A completion queue or shared receive queue: its ring file is named by
/// slot and generation.
#[repr(C, align(64))]
pub struct ObjSlot {
    pub hdr: SlotHdr,
    pub pd: AtomicU32,
}

// SAFETY: `#[repr(C)]` and made only of atomics (and a `SlotHdr`).
unsafe impl AtomicOnly for ObjSlot {}

/// A completion channel: events are CQ slots, pushed by whoever adds a
/// completion to an armed CQ; `seq` is the futex its owner sleeps on.
#[repr(C, align(64))]
pub struct ChSlot {
    pub hdr: SlotHdr,
    pub seq: AtomicU32,
    pub lock: AtomicU32,
    pub head: AtomicU32,
    pub tail: AtomicU32,
    pub events: [AtomicU32; CH_EVENTS],
}

// SAFETY: `#[repr(C)]` and made only of atomics (and a `SlotHdr`).
unsafe impl AtomicOnly for ChSlot {}

#[derive(Debug)]
pub struct Fabric {
    map: Mapping,
    pub ns: String,
    qp_off: usize,
    mr_off: usize,
    cq_off: usize,
    srq_off: usize,
    ch_off: usize,
}

fn tables() -> (usize, usize, usize, usize, usize, usize) {
    let qp_off = 4096;
    let mr_off = qp_off + MAX_QP * std::mem::size_of::<QpSlot>();
    let cq_off = mr_off + MAX_MR * std::mem::size_of::<MrSlot>();
    let srq_off = cq_off + MAX_CQ * std::mem::size_of::<ObjSlot>();
    let ch_off = srq_off + MAX_SRQ * std::mem::size_of::<ObjSlot>();
    let end = ch_off + MAX_CH * std::mem::size_of::<ChSlot>();
    (qp_off, mr_off, cq_off, srq_off, ch_off, end)
}

static FABRIC: OnceLock<Result<Fabric, String>> = OnceLock::new();

/// The fabric of this process's namespace.
pub fn get() -> Result<&'static Fabric, String> {
    FABRIC
        .get_or_init(|| {
            let ns: String = std::env::var("SOFTVERBS_NAMESPACE")
                .unwrap_or_else(|_| "default".into())
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect();
            let (qp_off, mr_off, cq_off, srq_off, ch_off, end) = tables();
            let name = format!("softverbs.{ns}.fabric");
            let (map, created) = Mapping::open_or_create(&name, end)
                .map_err(|e| format!("softverbs: fabric /dev/shm/{name}: {e}"))?;
            let magic: &AtomicU64 = map.at(0);
            if created {
                map.at::<AtomicU64>(8).store(1, Ordering::Relaxed); // next pd id
                magic.store(MAGIC, Ordering::Release);
            } else {
                let deadline = Instant::now() + Duration::from_secs(5);
                while magic.load(Ordering::Acquire) != MAGIC {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "softverbs: /dev/shm/{name} is not a softverbs fabric (remove it)"
                        ));
                    }
                    std::thread::yield_now();
                }
            }
            if map.len() < end {
                return Err(format!(
                    "softverbs: /dev/shm/{name} is from another version (remove it)"
                ));
            }
            Ok(Fabric {
                map,
                ns,
                qp_off,
                mr_off,
                cq_off,
                srq_off,
                ch_off,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qp,
    Mr,
    Cq,
    Srq,
    Ch,
}

impl Fabric {
    pub fn qp(&self, i: usize) -> &QpSlot {
        self.map.at(self.qp_off + i * std::mem::size_of::<QpSlot>())
    }
    pub fn mr(&self, i: usize) -> &MrSlot {
        self.map.at(self.mr_off + i * std::mem::size_of::<MrSlot>())
    }
    pub fn cq(&self, i: usize) -> &ObjSlot {
        self.map
            .at(self.cq_off + i * std::mem::size_of::<ObjSlot>())
    }
    pub fn srq(&self, i: usize) -> &ObjSlot {
        self.map
            .at(self.srq_off + i * std::mem::size_of::<ObjSlot>())
    }
    pub fn ch(&self, i: usize) -> &ChSlot {
        self.map.at(self.ch_off + i * std::mem::size_of::<ChSlot>())
    }

    /// The lock every atomic work request of the namespace holds while it
    /// reads, computes and writes its target: atomicity among the
    /// emulated NIC's atomics (`IBV_ATOMIC_HCA`), as a NIC gives.
    pub fn atomic_lock(&self) -> &AtomicU32 {
        self.map.at(16)
    }

    /// A new protection-domain id, unique in the namespace.
    pub fn next_pd(&self) -> u32 {
        self.map.at::<AtomicU64>(8).fetch_add(1, Ordering::Relaxed) as u32
    }

    fn hdr(&self, kind: Kind, i: usize) -> &SlotHdr {
        match kind {
            Kind::Qp => &self.qp(i).hdr,
            Kind::Mr => &self.mr(i).hdr,
            Kind::Cq => &self.cq(i).hdr,
            Kind::Srq => &self.srq(i).hdr,
            Kind::Ch => &self.ch(i).hdr,
        }
    }

    fn cap(kind: Kind) -> usize {
        match kind {
            Kind::Qp => MAX_QP,
            Kind::Mr => MAX_MR,
            Kind::Cq => MAX_CQ,
            Kind::Srq => MAX_SRQ,
            Kind::Ch => MAX_CH,
        }
    }

    /// Claims a slot (reclaiming one whose owner died); returns (index,
    /// generation). The caller fills it and calls `publish`.
    ///
    /// Ownership is the `pid` word itself: a compare-and-swap from 0 (free)
    /// or from a dead owner's pid to ours, so there is no moment at which
    /// a claimed slot looks ownerless to another process.
    pub fn claim(&self, kind: Kind) -> Option<(usize, u32)> {
        let me = shm::my_pid();
        for i in 0..Self::cap(kind) {
            let h = self.hdr(kind, i);
            let owner = h.pid.load(Ordering::Acquire);
            let ok = if owner == 0 {
                h.pid
                    .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            } else if owner != me && !shm::pid_alive(owner) {
                let won = h
                    .pid
                    .compare_exchange(owner, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                if won {
                    self.remove_files(kind, i, h.gen.load(Ordering::Acquire));
                }
                won
            } else {
                false
            };
            if ok {
                h.state.store(BUSY, Ordering::Release);
                let mut gen = h.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & 0xfff;
                if gen == 0 {
                    gen = h.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & 0xfff;
                }
                return Some((i, gen));
            }
        }
        None
    }

    pub fn publish(&self, kind: Kind, i: usize) {
        self.hdr(kind, i).state.store(LIVE, Ordering::Release);
    }

    pub fn release(&self, kind: Kind, i: usize) {
        let h = self.hdr(kind, i);
        self.remove_files(kind, i, h.gen.load(Ordering::Acquire) & 0xfff);
        h.state.store(FREE, Ordering::Release);
        h.pid.store(0, Ordering::Release);
    }

    /// Whether slot `i` is live at generation `gen`, and its owner pid.
    pub fn live(&self, kind: Kind, i: usize, gen: u32) -> Option<u32> {
        if i >= Self::cap(kind) {
            return None;
        }
        let h = self.hdr(kind, i);
        (h.state.load(Ordering::Acquire) == LIVE && h.gen.load(Ordering::Acquire) & 0xfff == gen)
            .then(|| h.pid.load(Ordering::Acquire))
    }

    pub fn file(&self, kind: Kind, i: usize, gen: u32) -> String {
        let k = match kind {
            Kind::Qp => "rq",
            Kind::Srq => "srq",
            Kind::Cq => "cq",
            Kind::Mr => "mr",
            Kind::Ch => "ch",
        };
        format!("softverbs.{}.{k}.{i}.{gen}", self.ns)
    }

    fn remove_files(&self, kind: Kind, i: usize, gen: u32) {
        // Rings, and a channel's doorbell socket.
        if matches!(kind, Kind::Qp | Kind::Srq | Kind::Cq | Kind::Ch) {
            let _ = shm::unlink(&self.file(kind, i, gen & 0xfff));
        }
    }

    /// Frees every slot of process `pid` once it is gone (a peer that
    /// crashed): its objects and their files do not outlive it.
    pub fn reap(&self, pid: u32) {
        if pid == shm::my_pid() || shm::pid_alive(pid) {
            return;
        }
        for kind in [Kind::Qp, Kind::Mr, Kind::Cq, Kind::Srq, Kind::Ch] {
            for i in 0..Self::cap(kind) {
                let h = self.hdr(kind, i);
                // Take it over first, so a concurrent claim cannot be
                // clobbered.
                if h.pid
                    .compare_exchange(pid, shm::my_pid(), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.release(kind, i);
                }
            }
        }
    }

    /// Frees every slot this process owns (at exit).
    pub fn release_all_mine(&self) {
        let me = shm::my_pid();
        for kind in [Kind::Qp, Kind::Mr, Kind::Cq, Kind::Srq, Kind::Ch] {
            for i in 0..Self::cap(kind) {
                let h = self.hdr(kind, i);
                if h.pid.load(Ordering::Acquire) == me {
                    self.release(kind, i);
                }
            }
        }
    }
}

/// QP numbers carry the slot and 12 bits of generation.
pub fn qpn_of(slot: usize, gen: u32) -> u32 {
    ((gen & 0xfff) << 12) | slot as u32
}

pub fn qpn_parts(qpn: u32) -> (usize, u32) {
    ((qpn & 0xfff) as usize, (qpn >> 12) & 0xfff)
}

/// Memory keys carry the slot and the generation.
pub fn key_of(slot: usize, gen: u32) -> u32 {
    ((gen & 0xfff) << 16) | slot as u32
}

pub fn key_parts(key: u32) -> (usize, u32) {
    ((key & 0xffff) as usize, (key >> 16) & 0xfff)
}
