//! A rank's shared segment: a control page (identity, doorbell), one
//! incoming ring per peer of the other role, then the registered region.
//!
//! Segments are files in `/dev/shm` named `afmesh.<job>.<pid>.<n>`, so two
//! jobs never collide and the owner of a stale file can be checked. The
//! owner unlinks its file as soon as every peer has mapped it (after the
//! mesh's barrier), so even a crash later leaves nothing behind; files left
//! by a crash during setup are removed by the next rank that starts on the
//! host, once their owner process is gone.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ring::{ring_bytes, Ring};
use super::sys::{self, Mapping};

const MAGIC: u64 = u64::from_le_bytes(*b"AFMSHM01");
const VERSION: u32 = 1;
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

static COUNTER: AtomicU32 = AtomicU32::new(0);

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

/// Removes segment files whose owner process is gone. Returns how many.
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
            if !sys::pid_alive(pid) && sys::unlink(&name).is_ok() {
                tracing::info!("removed stale segment {name} of dead process {pid}");
                n += 1;
            }
        }
    }
    n
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
        let pid = std::process::id();
        let name = format!(
            "afmesh.{}.{pid}.{}",
            sanitize(job),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let region_off = align(PAGE + rings as usize * ring_bytes(RING_CAP), PAGE);
        let total = region_off + align(region_len.max(1), PAGE);
        let map = Mapping::create(&name, total)?;
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
        let map = Mapping::open(name).map_err(|e| format!("open segment {name}: {e}"))?;
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
                    && region_off % 64 == 0 => {}
            _ => return Err(format!("segment {name}: inconsistent layout")),
        }
        Ok(Segment {
            pid: read_u32(&map, 12),
            map: Arc::new(map),
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

    /// The creating process.
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
        // SAFETY: inside the first page, 4-byte aligned, lives with `map`.
        unsafe { &*self.map.ptr().add(DOORBELL_OFF).cast::<AtomicU32>() }
    }

    /// Non-zero while the consumer is parked (or about to be).
    pub fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as for `doorbell`.
        unsafe { &*self.map.ptr().add(SLEEPING_OFF).cast::<AtomicU32>() }
    }

    /// Bumped by other backends of this rank (tcp readers) when they have
    /// something; the consumer returns from a wait when it changes.
    pub fn external(&self) -> &AtomicU32 {
        // SAFETY: as for `doorbell`.
        unsafe { &*self.map.ptr().add(EXTERNAL_OFF).cast::<AtomicU32>() }
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

    /// Wakes the consumer if it is parked.
    pub fn ring_doorbell(&self) {
        if self.sleeping().load(Ordering::SeqCst) != 0 {
            self.doorbell().fetch_add(1, Ordering::SeqCst);
            sys::futex_wake(self.doorbell());
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
    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: the control words are inside the first page of the
        // mapping, 4-byte aligned, and live as long as `map`.
        unsafe { &*self.map.ptr().add(off).cast::<AtomicU32>() }
    }

    /// The consumer is about to park: announces it (producers ring from
    /// now on) and returns the doorbell value to wait on. The consumer must
    /// look for work once more after this and before [`Doorbell::wait`]:
    /// a producer that published before seeing the flag did not ring.
    pub fn arm(&self) -> u32 {
        let seen = self.word(DOORBELL_OFF).load(Ordering::SeqCst);
        self.word(SLEEPING_OFF).store(1, Ordering::SeqCst);
        seen
    }

    /// Sleeps until the doorbell moves from `seen`, at most `timeout`.
    pub fn wait(&self, seen: u32, timeout: Duration) {
        sys::futex_wait(self.word(DOORBELL_OFF), seen, timeout);
    }

    /// The consumer is awake again.
    pub fn disarm(&self) {
        self.word(SLEEPING_OFF).store(0, Ordering::SeqCst);
    }

    /// Counts one external event and wakes the consumer if it is parked.
    pub fn ring(&self) {
        // SAFETY: the three words are inside the first page of the mapping,
        // aligned, and live as long as `map`.
        let (sleeping, bell, external) = unsafe {
            (
                &*self.map.ptr().add(SLEEPING_OFF).cast::<AtomicU32>(),
                &*self.map.ptr().add(DOORBELL_OFF).cast::<AtomicU32>(),
                &*self.map.ptr().add(EXTERNAL_OFF).cast::<AtomicU32>(),
            )
        };
        // The count first: a consumer that sets `sleeping` afterwards sees
        // it before it parks (both SeqCst), one that set it before is woken.
        external.fetch_add(1, Ordering::SeqCst);
        if sleeping.load(Ordering::SeqCst) != 0 {
            bell.fetch_add(1, Ordering::SeqCst);
            sys::futex_wake(bell);
        }
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

    #[test]
    fn stale_segments_of_dead_processes_are_removed() {
        // A pid that cannot be running: above the kernel's pid_max limit.
        let name = "afmesh.unit-test.4194305.0";
        drop(Mapping::create(name, 4096).unwrap());
        // Another test's segment creation may have removed it first.
        remove_stale();
        assert!(!std::path::Path::new(&format!("{}/{name}", sys::SHM_DIR)).exists());
    }
}
