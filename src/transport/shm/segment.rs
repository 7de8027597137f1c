//! A rank's shared segment: a control page (identity, doorbell), one
//! incoming ring per peer of the other role, then the registered region.
//!
//! Segments are files in `/dev/shm` named `afmesh.<job>.<pid>.<n>.<nonce>`,
//! so two jobs never collide, nor two ranks whose pids are equal in their
//! own pid namespaces. The owner unlinks its file as soon as every peer has
//! mapped it (after the mesh's barrier), so even a crash later leaves
//! nothing behind; files left by a crash during setup are removed by the
//! next rank that starts on the host, once their owner is gone.
//!
//! # The owner's lock
//!
//! Whether the owner lives is told by a lock, not by its pid: ranks in
//! containers share `/dev/shm` but not always the pid namespace, where a
//! pid names nobody, or somebody else. The owner takes an exclusive
//! open-file-description lock on its file before the file has a length, and
//! holds it (its descriptor stays open) for its lifetime; the kernel drops
//! it when the owner dies, however and wherever. Peers keep a descriptor of
//! the file, opened before the name goes, and test the lock through it
//! ([`Segment::owner_alive`], one `fcntl`). A file whose lock is held is
//! never removed as stale, whatever the pid in its name says.
//!
//! # The doorbell
//!
//! A consumer with nothing to do parks on a futex, its doorbell; producers
//! ring it only when it is parked, so the fast path has no syscall. The
//! words live in the control page and the protocol is [`Bell`]'s:
//!
//! ```text
//! consumer (Bell::park)                 producer (after publishing: Bell::bump)
//!   seen = bell                           publish: ring sequence (release),
//!   sleeping = 1            (release)              or external += 1
//!   fence(SeqCst)           (Fc)          fence(SeqCst)              (Fp)
//!   re-check rings, external              if sleeping != 0 (acquire):
//!   if nothing: futex_wait(bell, seen)        bell += 1; futex_wake(bell)
//!   sleeping = 0
//! ```
//!
//! `Fc` and `Fp` fall in one total order. If `Fc` is first, the producer's
//! load after `Fp` sees `sleeping = 1` and rings; the bump comes after the
//! consumer read `seen` (the release store and acquire load of `sleeping`
//! order that read before the bump), so the futex wait returns at once or
//! is woken. If `Fp` is first, the consumer's re-check after `Fc` sees what
//! the producer published before `Fp`. No wakeup is lost. Each side stores
//! one word and then loads the other's (Dekker's pattern), which release
//! and acquire alone do not order: the two fences do, and they are the
//! form loom can check (`crate::sync`); the loom tests below run this code.
//! The bump itself is relaxed: the futex calls order themselves against
//! the word (the kernel compares it under its own lock), and after a wake
//! the consumer's next round of the protocol re-checks from the start.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::ring::{ring_bytes, Ring};
use super::sys::{self, Mapping};
use crate::sync::shared::AtomicU32;
use crate::sync::{fence, Ordering, Word32};

const MAGIC: u64 = u64::from_le_bytes(*b"AFMSHM01");
/// 2: the owner holds its lock (see the module docs) from creation on.
const VERSION: u32 = 2;
const PAGE: usize = 4096;
const DOORBELL_OFF: usize = 128;
const SLEEPING_OFF: usize = 192;
const EXTERNAL_OFF: usize = 256;
/// The owner's identity nonce (see `ShmTransport`'s cross-memory probe).
const NONCE_OFF: usize = 48;
/// Entries per incoming ring. In-flight messages per link are bounded by
/// the stages, so this never fills in a correct mesh.
pub const RING_CAP: u32 = 256;

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// A stable 64-bit hash (FNV-1a) of the job name, kept in the header so a
/// rank never maps another job's segment.
pub fn job_hash(job: &str) -> u64 {
    job.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// One rank's segment, owned (created here) or mapped (a peer's).
#[derive(Debug)]
pub struct Segment {
    map: Arc<Mapping>,
    /// The owner's: holds the lock. A peer's: tests it.
    fd: OwnedFd,
    name: String,
    owner: bool,
    unlinked: AtomicBool,
    rings: u32,
    region_off: usize,
    region_len: usize,
    pid: u32,
}

fn read_u32(m: &Mapping, off: usize) -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: callers pass offsets inside the first page, which every
    // mapping has (checked at open).
    unsafe { std::ptr::copy_nonoverlapping(m.ptr().add(off), b.as_mut_ptr(), 4) };
    u32::from_le_bytes(b)
}

fn read_u64(m: &Mapping, off: usize) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: as in `read_u32`.
    unsafe { std::ptr::copy_nonoverlapping(m.ptr().add(off), b.as_mut_ptr(), 8) };
    u64::from_le_bytes(b)
}

fn write_bytes(m: &Mapping, off: usize, b: &[u8]) {
    // SAFETY: offsets inside the first page of a mapping we just created.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), m.ptr().add(off), b.len()) };
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn sanitize(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// How old a file without our header must be before its pid may condemn
/// it: its creator may be between creating it and taking the lock.
const UNLOCKED_GRACE: Duration = Duration::from_secs(5);

/// Removes segment files whose owner is gone. Returns how many.
///
/// A file whose lock is held is alive, whatever its name's pid says (the
/// owner may be in another pid namespace). An unlocked file with a header
/// of this version lost its owner (the lock is taken before the header is
/// written). Any other file (an older version, or one a creator has not
/// locked yet) is judged by the pid in its name, once it is a few seconds
/// old.
pub fn remove_stale() -> usize {
    let Ok(dir) = std::fs::read_dir(sys::SHM_DIR) else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('.');
        if parts.next() != Some("afmesh") {
            continue;
        }
        let pid = parts.nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if stale(&name, pid) && sys::unlink(&name).is_ok() {
                tracing::info!("removed stale segment {name}: its owner is gone");
                n += 1;
            }
        }
    }
    n
}

/// Whether segment file `name`, named for process `pid`, has lost its
/// owner (see [`remove_stale`]).
fn stale(name: &str, pid: u32) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("{}/{name}", sys::SHM_DIR))
    else {
        return false;
    };
    match sys::locked_by_another(f.as_fd()) {
        Ok(false) => {}
        // Held: alive. Untestable: leave it.
        Ok(true) | Err(_) => return false,
    }
    let mut head = [0u8; 12];
    if f.read_exact(&mut head).is_ok()
        && head[..8] == MAGIC.to_le_bytes()
        && head[8..12] == VERSION.to_le_bytes()
    {
        return true;
    }
    let old = f
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > UNLOCKED_GRACE);
    old && !sys::pid_alive(pid)
}

impl Segment {
    /// Creates this rank's segment with `rings` incoming rings and a region
    /// of `region_len` bytes.
    pub fn create(
        job: &str,
        rings: u32,
        region_len: usize,
        nonce: u64,
    ) -> std::io::Result<Segment> {
        remove_stale();
        let name = format!(
            "afmesh.{}.{}.{}.{nonce:016x}",
            sanitize(job),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Segment::create_as(name, job, rings, region_len, nonce)
    }

    /// As [`Segment::create`], under file name `name`.
    fn create_as(
        name: String,
        job: &str,
        rings: u32,
        region_len: usize,
        nonce: u64,
    ) -> std::io::Result<Segment> {
        let pid = std::process::id();
        let region_off = align(PAGE + rings as usize * ring_bytes(RING_CAP), PAGE);
        let total = region_off + align(region_len.max(1), PAGE);
        let (map, fd) = Mapping::create_locked(&name, total)?;
        write_bytes(&map, 8, &VERSION.to_le_bytes());
        write_bytes(&map, 12, &pid.to_le_bytes());
        write_bytes(&map, 16, &rings.to_le_bytes());
        write_bytes(&map, 20, &RING_CAP.to_le_bytes());
        write_bytes(&map, 24, &(region_off as u64).to_le_bytes());
        write_bytes(&map, 32, &(region_len as u64).to_le_bytes());
        write_bytes(&map, 40, &job_hash(job).to_le_bytes());
        write_bytes(&map, NONCE_OFF, &nonce.to_le_bytes());
        write_bytes(&map, 0, &MAGIC.to_le_bytes());
        Ok(Segment {
            map: Arc::new(map),
            fd,
            name,
            owner: true,
            unlinked: AtomicBool::new(false),
            rings,
            region_off,
            region_len,
            pid,
        })
    }

    /// Maps a peer's segment and checks its header.
    pub fn open(name: &str, job: &str) -> Result<Segment, String> {
        let (map, fd) =
            Mapping::open_keeping_fd(name).map_err(|e| format!("open segment {name}: {e}"))?;
        if map.len() < PAGE {
            return Err(format!("segment {name}: {} bytes is too small", map.len()));
        }
        if read_u64(&map, 0) != MAGIC || read_u32(&map, 8) != VERSION {
            return Err(format!(
                "segment {name}: not an afmesh segment of version {VERSION}"
            ));
        }
        if read_u64(&map, 40) != job_hash(job) {
            return Err(format!("segment {name} belongs to another job"));
        }
        let rings = read_u32(&map, 16);
        let cap = read_u32(&map, 20);
        let region_off = read_u64(&map, 24) as usize;
        let region_len = read_u64(&map, 32) as usize;
        let rings_end = (rings as usize)
            .checked_mul(ring_bytes(cap))
            .and_then(|r| r.checked_add(PAGE));
        let region_end = region_off.checked_add(region_len);
        match (rings_end, region_end) {
            (Some(re), Some(ge))
                if cap == RING_CAP
                    && re <= region_off
                    && ge <= map.len()
                    && region_off.is_multiple_of(64) => {}
            _ => return Err(format!("segment {name}: inconsistent layout")),
        }
        Ok(Segment {
            pid: read_u32(&map, 12),
            map: Arc::new(map),
            fd,
            name: name.to_string(),
            owner: false,
            unlinked: AtomicBool::new(true),
            rings,
            region_off,
            region_len,
        })
    }

    /// The file name peers open.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The owner's identity nonce.
    pub fn nonce(&self) -> u64 {
        read_u64(&self.map, NONCE_OFF)
    }

    /// Whether the owner still holds its lock, that is still lives (in any
    /// pid namespace). One `fcntl`; a test that fails counts as alive (a
    /// descriptor we hold cannot fail it). Always true of our own segment.
    pub fn owner_alive(&self) -> bool {
        self.owner || sys::locked_by_another(self.fd.as_fd()).unwrap_or(true)
    }

    /// The creating process, as its own pid namespace numbers it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Number of incoming rings.
    pub fn rings(&self) -> u32 {
        self.rings
    }

    /// Incoming ring `i` (written by the peer of rank `i`).
    pub fn ring(&self, i: u32) -> Option<Ring> {
        if i >= self.rings {
            return None;
        }
        // SAFETY: ring `i` lies between the first page and the region
        // (checked at create/open), is 64-byte aligned (the page is, and
        // ring sizes are multiples of 64), and lives as long as `map`.
        Some(unsafe {
            Ring::new(
                self.map.ptr().add(PAGE + i as usize * ring_bytes(RING_CAP)),
                RING_CAP,
            )
        })
    }

    /// The doorbell word: bumped by producers to wake a parked consumer.
    pub fn doorbell(&self) -> &AtomicU32 {
        self.bell().bell
    }

    /// Non-zero while the consumer is parked (or about to be).
    pub fn sleeping(&self) -> &AtomicU32 {
        self.bell().sleeping
    }

    /// Bumped by other backends of this rank (tcp readers) when they have
    /// something; the consumer returns from a wait when it changes.
    pub fn external(&self) -> &AtomicU32 {
        self.bell().external
    }

    /// The mapping (to keep alive from regions and wakers).
    pub fn mapping(&self) -> Arc<Mapping> {
        self.map.clone()
    }

    /// Region bounds within the mapping.
    pub fn region_range(&self) -> (usize, usize) {
        (self.region_off, self.region_len)
    }

    /// Copies the concatenation of `src` into the region at `offset`,
    /// after checking bounds.
    pub fn write_region(&self, offset: u64, src: &[&[u8]]) -> Result<(), String> {
        let total: u64 = src.iter().map(|s| s.len() as u64).sum();
        match offset.checked_add(total) {
            Some(end) if end <= self.region_len as u64 => {}
            _ => {
                return Err(format!(
                    "write of {total} bytes at offset {offset} outside region of {} bytes",
                    self.region_len
                ))
            }
        }
        let mut at = self.region_off + offset as usize;
        for s in src {
            // SAFETY: bounds checked above against the region, which lies
            // inside the mapping; the protocol gives this writer the range.
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), self.map.ptr().add(at), s.len()) };
            at += s.len();
        }
        Ok(())
    }

    /// The doorbell protocol over this segment's control page.
    pub(crate) fn bell(&self) -> Bell<'_> {
        Bell::of(&self.map)
    }

    /// Wakes the consumer if it is parked. Call after publishing.
    pub fn ring_doorbell(&self) {
        let bell = self.bell();
        if bell.bump() {
            sys::futex_wake(bell.bell);
        }
    }

    /// A handle that rings this segment's doorbell from any thread.
    pub fn doorbell_handle(&self) -> Doorbell {
        Doorbell {
            map: self.map.clone(),
        }
    }

    /// Removes the file name (owner only; idempotent).
    pub fn unlink(&self) {
        if self.owner && !self.unlinked.swap(true, Ordering::SeqCst) {
            let _ = sys::unlink(&self.name);
        }
    }
}

/// Tells one segment's consumer that another backend has something for it;
/// keeps the mapping alive.
#[derive(Debug, Clone)]
pub struct Doorbell {
    map: Arc<Mapping>,
}

impl Doorbell {
    /// Parks the consumer (the [`Bell`] protocol): announces the park,
    /// runs `recheck` (is there work, now that producers will ring?), and
    /// if not sleeps until rung, at most `timeout`, then re-checks. Returns
    /// what the last `recheck` said.
    pub fn park(&self, recheck: impl FnMut() -> bool, timeout: Duration) -> bool {
        Bell::of(&self.map).park(recheck, |word, seen| sys::futex_wait(word, seen, timeout))
    }

    /// Counts one external event and wakes the consumer if it is parked.
    pub fn ring(&self) {
        let bell = Bell::of(&self.map);
        if bell.count_external() {
            sys::futex_wake(bell.bell);
        }
    }
}

/// A consumer's doorbell: the words it parks on, and the protocol over
/// them (see the module docs). Over the control page in production
/// ([`Bell::of`]), over loom's atomics in the model tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bell<'a, W = AtomicU32> {
    /// Non-zero while the consumer is parked or about to be.
    pub(crate) sleeping: &'a W,
    /// The futex word: bumped to wake the consumer.
    pub(crate) bell: &'a W,
    /// Counts other backends' events (tcp readers of the same rank).
    pub(crate) external: &'a W,
}

impl Bell<'_> {
    /// The doorbell in the control page of `map`.
    pub(crate) fn of(map: &Mapping) -> Bell<'_> {
        // SAFETY: every mapping has its first page (checked at create and
        // open); the words are inside it, 4-byte aligned, and live as long
        // as `map`, which the result borrows.
        unsafe {
            Bell {
                sleeping: &*map.ptr().add(SLEEPING_OFF).cast::<AtomicU32>(),
                bell: &*map.ptr().add(DOORBELL_OFF).cast::<AtomicU32>(),
                external: &*map.ptr().add(EXTERNAL_OFF).cast::<AtomicU32>(),
            }
        }
    }
}

impl<W: Word32> Bell<'_, W> {
    /// Producer, after publishing: bumps the bell if the consumer is parked
    /// or about to be. `true` means the caller must wake the futex.
    #[inline]
    pub(crate) fn bump(&self) -> bool {
        // Fp: pairs with the consumer's Fc in `park`.
        fence(Ordering::SeqCst);
        // Acquire pairs with `park`'s release store of 1: the consumer read
        // `seen` before this bump.
        if self.sleeping.load(Ordering::Acquire) != 0 {
            self.bell.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Another backend's event: counts it, then as [`Bell::bump`].
    pub(crate) fn count_external(&self) -> bool {
        // Ordered before the check of `sleeping` by `bump`'s fence.
        self.external.fetch_add(1, Ordering::Relaxed);
        self.bump()
    }

    /// The count of other backends' events (read after `park`'s fence,
    /// when it matters).
    #[cfg(loom)]
    pub(crate) fn external(&self) -> u32 {
        self.external.load(Ordering::Relaxed)
    }

    /// Consumer: announces the park, runs `recheck` (is there anything,
    /// now that producers will ring?), and if not, `wait`s on the bell word
    /// for a change from the value it had before the announcement, then
    /// re-checks once more. Returns what the last `recheck` said.
    pub(crate) fn park(
        &self,
        mut recheck: impl FnMut() -> bool,
        wait: impl FnOnce(&W, u32),
    ) -> bool {
        let seen = self.bell.load(Ordering::Relaxed);
        self.sleeping.store(1, Ordering::Release);
        // Fc: pairs with the producer's Fp in `bump`.
        fence(Ordering::SeqCst);
        let mut found = recheck();
        if !found {
            wait(self.bell, seen);
            found = recheck();
        }
        // A producer that still sees 1 only rings once too often.
        self.sleeping.store(0, Ordering::Relaxed);
        found
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_write_unlink() {
        let s = Segment::create("unit-test", 3, 1000, 7).unwrap();
        let p = Segment::open(s.name(), "unit-test").unwrap();
        assert_eq!(
            (p.pid(), p.rings(), p.region_range().1),
            (std::process::id(), 3, 1000)
        );
        assert!(Segment::open(s.name(), "other-job")
            .unwrap_err()
            .contains("another job"));
        p.write_region(990, &[b"0123456789"]).unwrap();
        assert!(p.write_region(991, &[b"0123456789"]).is_err());
        let (off, _) = s.region_range();
        // SAFETY: reading back bytes inside the region we just wrote.
        let got = unsafe { std::slice::from_raw_parts(s.mapping().ptr().add(off + 990), 10) };
        assert_eq!(got, b"0123456789");
        assert!(p.ring(2).is_some() && p.ring(3).is_none());
        let path = format!("{}/{}", sys::SHM_DIR, s.name());
        assert!(std::path::Path::new(&path).exists());
        s.unlink();
        assert!(!std::path::Path::new(&path).exists());
    }

    /// A segment whose owner holds its lock is alive whatever the pid in
    /// its name says (here one above any `pid_max`, as a rank in another
    /// pid namespace may give); once the lock is gone it is stale.
    #[test]
    fn remove_stale_keeps_segments_whose_lock_is_held() {
        let tag = format!("{}-{}", std::process::id(), sys::random_u64().unwrap());
        let name = format!("afmesh.unit-test.4194305.{tag}");
        // A second name for the same file: it outlives the owner's unlink.
        let link = format!("afmesh.unit-test.4194305.{tag}.link");
        let path = |n: &str| format!("{}/{n}", sys::SHM_DIR);
        let exists = |n: &str| std::path::Path::new(&path(n)).exists();
        let s = Segment::create_as(name.clone(), "unit-test", 1, 64, 7).unwrap();
        std::fs::hard_link(path(&name), path(&link)).unwrap();
        remove_stale();
        assert!(
            exists(&name) && exists(&link),
            "a locked segment was removed"
        );
        let peer = Segment::open(&link, "unit-test").unwrap();
        assert!(peer.owner_alive());
        drop(s);
        assert!(!peer.owner_alive(), "the owner's lock outlived it");
        remove_stale();
        assert!(!exists(&link), "an unlocked segment of this version stayed");
    }

    /// A file without our header and without a lock is judged by its pid,
    /// and only once it is older than its creator needs to lock it.
    #[test]
    fn a_young_unlocked_file_is_left_to_its_creator() {
        let name = format!(
            "afmesh.unit-test.4194305.young-{}-{}",
            std::process::id(),
            sys::random_u64().unwrap()
        );
        drop(Mapping::create(&name, 4096).unwrap());
        remove_stale();
        let path = format!("{}/{name}", sys::SHM_DIR);
        assert!(std::path::Path::new(&path).exists());
        sys::unlink(&name).unwrap();
    }
}

/// Model checking of the doorbell (see the module's own docs).
#[cfg(test)]
#[cfg(loom)]
#[path = "segment_loom.rs"]
mod loom_tests;
