//! Transparent huge pages for caller receive memory: the `madvise` calls
//! that back a region's interior with huge pages, what they got
//! ([`HugePages`]), and the kernel's huge page size.

use super::*;

/// `madvise` advice that faults pages in writable, contents unchanged
/// (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `madvise` advice that collapses present pages into transparent huge
/// pages now (Linux 6.1; not in the libc crate yet).
const MADV_COLLAPSE: libc::c_int = 25;

/// What [`Region::advise_huge_pages`] asked of the kernel and got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HugePages {
    /// The huge page size asked for (0: nothing was asked, see `advised`).
    pub page: usize,
    /// Bytes of the region inside whole huge pages: what was advised.
    pub advised: usize,
    /// Whether `MADV_HUGEPAGE` was accepted (later faults get huge pages).
    pub hinted: bool,
    /// Whether the kernel confirmed (`MADV_COLLAPSE`) that the advised
    /// bytes are on huge pages now. Where it did not (older than 6.1, or
    /// memory it cannot touch), pages still fault in huge if `hinted`.
    pub collapsed: bool,
}

impl Region {
    /// Asks the kernel to back this region's whole huge pages with
    /// transparent huge pages: `MADV_HUGEPAGE` on its interior aligned to
    /// the huge page size (so later faults get huge pages), then
    /// `MADV_POPULATE_WRITE` (untouched pages fault in huge now, not on a
    /// peer's first write) and `MADV_COLLAPSE` (Linux 6.1+: pages already
    /// present on 4 KiB pages move now). Costs about 0.3 ms per huge page
    /// that must be collapsed, once, at setup.
    ///
    /// For caller receive memory that peers on this host write with
    /// cross-memory attach: the kernel pins every target page of each write,
    /// one lookup per 4 KiB page against one per huge page. Advice only:
    /// contents are kept, and where the kernel has no huge pages or refuses,
    /// nothing changes but speed. The part outside whole huge pages (an
    /// unaligned start or end) stays on small pages, which is why caller
    /// receive memory is best aligned to [`Region::huge_page_size`] and a
    /// multiple of it. Library memory, a shared mapping or device memory is
    /// left alone.
    pub fn advise_huge_pages(&self) -> HugePages {
        let mut got = HugePages::default();
        let page = Region::huge_page_size();
        let caller = matches!(self.owner, Owner::Vec { .. } | Owner::Borrowed);
        if page == 0 || !caller || self.kind != MemoryKind::Host {
            return got;
        }
        let addr = self.addr() as usize;
        let (Some(start), Some(end)) = (
            addr.checked_next_multiple_of(page),
            addr.checked_add(self.len).map(|e| e / page * page),
        ) else {
            return got;
        };
        if end <= start {
            return got;
        }
        got.page = page;
        got.advised = end - start;
        let p = start as *mut libc::c_void;
        // SAFETY: `[start, end)` lies inside this region (rounded inwards),
        // which is mapped for as long as `self` lives; both calls change how
        // the kernel backs those pages, never their contents.
        got.hinted = unsafe { libc::madvise(p, got.advised, libc::MADV_HUGEPAGE) } == 0;
        // Fault in what was never touched (huge pages now, not on a peer's
        // first write), then move what sat on small pages. Either may be
        // refused (an old kernel, memory that cannot be written); the last
        // one's answer says whether the interior is on huge pages.
        // SAFETY: as above; populating writes no byte.
        let _ = unsafe { libc::madvise(p, got.advised, MADV_POPULATE_WRITE) };
        // SAFETY: as above.
        got.collapsed = unsafe { libc::madvise(p, got.advised, MADV_COLLAPSE) } == 0;
        got
    }

    /// The transparent huge page size of this kernel (what
    /// `/sys/kernel/mm/transparent_hugepage/hpage_pmd_size` says, 2 MiB on
    /// x86-64), or 0 where it has none.
    pub fn huge_page_size() -> usize {
        static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *SIZE.get_or_init(|| {
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|p| p.is_power_of_two())
                .unwrap_or(0)
        })
    }
}

/// Bytes on transparent huge pages in the mapping of this process that
/// holds `addr` (`AnonHugePages` in `/proc/self/smaps`), for tests.
#[cfg(test)]
pub(crate) fn huge_bytes_at(addr: u64) -> Option<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if let (true, Some(kb)) = (inside, line.strip_prefix("AnonHugePages:")) {
            return kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
                .map(|k| k * 1024);
        }
    }
    None
}
