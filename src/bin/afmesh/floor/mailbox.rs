//! The shared mapping of the shared-memory floor: one mailbox per
//! (attention, FFN) pair, each a dispatch buffer, a combine buffer and two
//! flags. The only `unsafe` of the `afmesh` command lives here.
//!
//! Protocol, per pair: messages are numbered 1, 2, ... (a layer's stages in
//! order, then the next layer's). For message `k` the attention process
//! copies its bytes into its part of the dispatch buffer and stores `k` in
//! `request` (Release); the FFN process, answering message `k` once
//! `request >= k` (Acquire), copies its reply into its part of the combine
//! buffer and stores `k` in `reply` (Release); the attention process reads
//! `reply` (Acquire). The messages of one layer use disjoint parts of the
//! buffers, and the attention process starts the next layer only once the
//! last reply of this one is in, so each byte has one writer at a time.
//! The buffers are written and read through raw pointers only (copies in
//! and out; a receiver reading what it got is the floor that reads, as the
//! mesh's workload does), never through a reference, so a peer that breaks
//! the protocol can garble bytes but cannot make a Rust reference lie.
//!
//! Each flag has a 128-byte span of its own (two cache lines: adjacent-line
//! prefetch would otherwise couple the two writers); buffers start on pages.

use std::io;
use std::sync::atomic::AtomicU64;

use afmesh::transport::shm::sys::Mapping;

const FLAG_SPAN: usize = 128;
const PAGE: usize = 4096;

/// Where everything lives; computed the same way by every process from the
/// per-pair sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    m: usize,
    n: usize,
    /// Per attention rank: offset of its first pair's buffers, and the
    /// dispatch and combine bytes of each of its pairs.
    rows: Vec<(usize, usize, usize)>,
    len: usize,
}

fn round_up(x: usize, to: usize) -> Option<usize> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

impl Layout {
    /// `dispatch[a]` and `combine[a]` are the bytes attention rank `a`
    /// exchanges with each FFN rank per layer.
    pub fn new(m: usize, n: usize, dispatch: &[u64], combine: &[u64]) -> io::Result<Layout> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "floor segment too large");
        if m == 0 || n == 0 || dispatch.len() != m || combine.len() != m {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "floor segment: {m}x{n} pairs with {} dispatch and {} combine sizes",
                    dispatch.len(),
                    combine.len()
                ),
            ));
        }
        let flags = m
            .checked_mul(n)
            .and_then(|p| p.checked_mul(2 * FLAG_SPAN))
            .ok_or_else(too_big)?;
        let mut at = round_up(flags, PAGE).ok_or_else(too_big)?;
        let mut rows = Vec::with_capacity(m);
        for (&d, &c) in dispatch.iter().zip(combine) {
            let d = usize::try_from(d).map_err(|_| too_big())?;
            let c = usize::try_from(c).map_err(|_| too_big())?;
            let pair = round_up(d, PAGE)
                .zip(round_up(c, PAGE))
                .and_then(|(d, c)| d.checked_add(c))
                .ok_or_else(too_big)?;
            rows.push((at, d, c));
            at = pair
                .checked_mul(n)
                .and_then(|r| at.checked_add(r))
                .ok_or_else(too_big)?;
        }
        Ok(Layout {
            m,
            n,
            rows,
            len: at.max(PAGE),
        })
    }

    /// Bytes of the whole mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    fn flag(&self, a: usize, f: usize, which: usize) -> usize {
        assert!(a < self.m && f < self.n, "pair ({a}, {f}) out of range");
        ((a * self.n + f) * 2 + which) * FLAG_SPAN
    }

    /// (offset, length) of pair (a, f)'s dispatch and combine buffers.
    fn buffers(&self, a: usize, f: usize) -> ((usize, usize), (usize, usize)) {
        assert!(a < self.m && f < self.n, "pair ({a}, {f}) out of range");
        let (base, d, c) = self.rows[a];
        // `new` checked that these sums fit.
        let dp = round_up(d, PAGE).unwrap_or(0);
        let cp = round_up(c, PAGE).unwrap_or(0);
        let at = base + f * (dp + cp);
        ((at, d), (at + dp, c))
    }
}

/// The mailboxes of every pair, in one shared mapping.
#[derive(Debug)]
pub struct Mailboxes {
    map: Mapping,
    layout: Layout,
}

impl Mailboxes {
    /// Views `map` as the mailboxes of `layout`; refuses a mapping of the
    /// wrong size (another run's segment, or a different workload).
    pub fn new(map: Mapping, layout: Layout) -> io::Result<Mailboxes> {
        if map.len() != layout.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "floor segment is {} bytes, the workload needs {}",
                    map.len(),
                    layout.len()
                ),
            ));
        }
        Ok(Mailboxes { map, layout })
    }

    fn atomic(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(FLAG_SPAN) && offset + 8 <= self.map.len());
        // SAFETY: `offset` comes from `Layout::flag`: inside the flag area
        // of a mapping whose length `new` checked against the layout, and a
        // multiple of 128 from a page-aligned base, so the 8 bytes are in
        // bounds and aligned for `AtomicU64`. The mapping starts zeroed (a
        // valid `u64`), lives as long as `self`, and its flag bytes are
        // only ever accessed as atomics, here and in the peer processes.
        unsafe { &*self.map.ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Raised by the attention rank: the layer whose dispatch has landed.
    pub fn request(&self, a: usize, f: usize) -> &AtomicU64 {
        self.atomic(self.layout.flag(a, f, 0))
    }

    /// Raised by the FFN rank: the layer whose reply has landed.
    pub fn reply(&self, a: usize, f: usize) -> &AtomicU64 {
        self.atomic(self.layout.flag(a, f, 1))
    }

    fn put(&self, (base, len): (usize, usize), at: usize, src: &[u8]) {
        assert!(
            at.checked_add(src.len()).is_some_and(|end| end <= len),
            "floor mailbox: {} bytes at {at} overflow a {len}-byte buffer",
            src.len()
        );
        // SAFETY: `base..base + len` is a buffer of the layout, inside the
        // mapping (its length was checked in `new`), and the write stays
        // inside it (asserted above); `src` is private memory of this
        // process, which never holds a reference into the mapping, so the
        // ranges do not overlap. Only the one process the protocol names
        // writes this part of the buffer, and no process reads it.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.ptr().add(base + at), src.len());
        }
    }

    fn get(&self, (base, len): (usize, usize), at: usize, dst: &mut [u8]) {
        assert!(
            at.checked_add(dst.len()).is_some_and(|end| end <= len),
            "floor mailbox: {} bytes at {at} overflow a {len}-byte buffer",
            dst.len()
        );
        // SAFETY: as in `put`, the range lies inside one buffer of the
        // mapping and `dst` is private memory of this process. The protocol
        // gives this part of the buffer to the reader now (its writer
        // raised the flag this process acquired, and writes it again only
        // after this process answers); a peer breaking it can only make the
        // copied bytes garbage, and any byte pattern is a valid `u8`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.ptr().add(base + at),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }

    /// Copies attention rank `a`'s bytes for FFN rank `f` into the pair's
    /// dispatch buffer at `at` (the attention rank's half of the protocol).
    pub fn put_dispatch(&self, a: usize, f: usize, at: usize, src: &[u8]) {
        self.put(self.layout.buffers(a, f).0, at, src);
    }

    /// Copies FFN rank `f`'s reply for attention rank `a` into the pair's
    /// combine buffer at `at` (the FFN rank's half).
    pub fn put_combine(&self, a: usize, f: usize, at: usize, src: &[u8]) {
        self.put(self.layout.buffers(a, f).1, at, src);
    }

    /// Reads the pair's dispatch bytes at `at` (the FFN rank, once the
    /// request flag says they landed).
    pub fn get_dispatch(&self, a: usize, f: usize, at: usize, dst: &mut [u8]) {
        self.get(self.layout.buffers(a, f).0, at, dst);
    }

    /// Reads the pair's combine bytes at `at` (the attention rank, once
    /// the reply flag says they landed).
    pub fn get_combine(&self, a: usize, f: usize, at: usize, dst: &mut [u8]) {
        self.get(self.layout.buffers(a, f).1, at, dst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn buffers_are_disjoint_page_aligned_and_inside() {
        let l = Layout::new(2, 3, &[5000, 80], &[100, 9000]).unwrap();
        let mut spans = Vec::new();
        for a in 0..2 {
            for f in 0..3 {
                let (d, c) = l.buffers(a, f);
                for (off, len) in [d, c] {
                    assert_eq!(off % PAGE, 0);
                    assert!(off + len <= l.len());
                    spans.push((off, off + len));
                }
                assert!(l.flag(a, f, 1) + 8 <= PAGE);
            }
        }
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
        assert!(spans[0].0 >= 2 * 3 * 2 * FLAG_SPAN);
    }

    #[test]
    fn flags_and_bytes_round_trip_through_the_mapping() {
        let l = Layout::new(1, 2, &[16], &[8]).unwrap();
        let m = Mailboxes::new(Mapping::anonymous(l.len()).unwrap(), l.clone()).unwrap();
        m.put_dispatch(0, 1, 0, &[7u8; 16]);
        m.put_combine(0, 1, 4, &[9u8; 4]);
        let mut back = [0u8; 6];
        m.get_combine(0, 1, 2, &mut back);
        assert_eq!(back, [0, 0, 9, 9, 9, 9]);
        let mut d = [0u8; 16];
        m.get_dispatch(0, 1, 0, &mut d);
        assert_eq!(d, [7u8; 16]);
        m.request(0, 1).store(3, Ordering::Release);
        assert_eq!(m.request(0, 1).load(Ordering::Acquire), 3);
        assert_eq!(m.reply(0, 1).load(Ordering::Acquire), 0);
        assert_eq!(m.request(0, 0).load(Ordering::Acquire), 0);
        let wrong = Mapping::anonymous(l.len() + PAGE).unwrap();
        assert!(Mailboxes::new(wrong, l).is_err());
    }

    #[test]
    #[should_panic(expected = "overflow")]
    fn a_write_past_its_buffer_is_refused() {
        let l = Layout::new(1, 1, &[16], &[8]).unwrap();
        let m = Mailboxes::new(Mapping::anonymous(l.len()).unwrap(), l).unwrap();
        m.put_combine(0, 0, 4, &[9u8; 5]);
    }

    #[test]
    fn sizes_must_match_the_pairs() {
        assert!(Layout::new(2, 1, &[1], &[1, 2]).is_err());
        assert!(Layout::new(0, 1, &[], &[]).is_err());
        assert!(Layout::new(1, 1, &[u64::MAX], &[1]).is_err());
    }
}
