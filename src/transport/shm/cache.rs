//! Cache-line hints for the lines a message carries between two cores.
//!
//! Hints only: none changes what any load or store sees, so none needs
//! an ordering argument, and none can fault (a prefetch or a demote of an
//! address is not an access). On other architectures they are nothing.
//!
//! * [`prefetch`]: the receiver, on a notice, asks for the first lines of
//!   the message at once, so that the header, the side block and the first
//!   rows cross together rather than one miss after another as the engine
//!   and the caller get to them.
//! * [`demote`]: `CLDEMOTE` pushes a line this core wrote from its private
//!   caches to the shared last level, where the other core's next access
//!   finds it without asking this core for it. It sits in the x86 hint-NOP
//!   space (`0F 1C /0`): a CPU without it runs it as a NOP.
//! * [`prefetch_write`]: `PREFETCHW` takes lines for writing before the
//!   stores come. The sender asks for the first lines of its next message
//!   to a peer as soon as the peer's answer shows that it is done reading
//!   them (`Transport::prepare_write`): the message's stores then commit
//!   without waiting for the peer's copies to be invalidated, so its notice
//!   (ordered after them) becomes visible one line-crossing sooner. Whole
//!   large messages were tried too (up to 256 lines): the receiver then
//!   stalls on issuing them, for no net gain at 7–14 KB.

/// How many lines of a message the hints cover: the header, the side block
/// and the first rows of a small message. Larger payloads stream, and the
/// hardware prefetchers follow them.
pub(crate) const HINT_LINES: usize = 8;
const LINE: usize = 64;

/// Calls `f` with the start of each line of `[addr, addr + len)`, up to
/// [`HINT_LINES`] (a plain loop: a stepped range costs more than the hints).
#[inline(always)]
fn each_line(addr: usize, len: usize, mut f: impl FnMut(usize)) {
    let mut line = addr & !(LINE - 1);
    let end = addr.saturating_add(len.min(HINT_LINES * LINE));
    while line < end {
        f(line);
        match line.checked_add(LINE) {
            Some(next) => line = next,
            None => break,
        }
    }
}

/// Asks for the first lines of `[addr, addr + len)` in this core's cache.
#[inline(always)]
pub(crate) fn prefetch(addr: usize, len: usize) {
    each_line(addr, len, |_l| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHT0 is a hint: it never faults and changes no
        // value, whatever the address.
        unsafe {
            std::arch::asm!("prefetcht0 [{0}]", in(reg) _l, options(nostack, preserves_flags, readonly));
        }
    });
}

/// Asks for the first lines of `[addr, addr + len)` in this core's cache
/// for writing (`PREFETCHW`), taking them from whichever core holds them,
/// so that stores to them soon after find them here.
#[inline(always)]
pub(crate) fn prefetch_write(addr: usize, len: usize) {
    each_line(addr, len, |_l| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHW is a hint: it never faults and changes no
        // value, whatever the address.
        unsafe {
            std::arch::asm!("prefetchw [{0}]", in(reg) _l, options(nostack, preserves_flags, readonly));
        }
    });
}

/// Moves the first lines of `[addr, addr + len)` that this core wrote to
/// the shared cache, for the other core to read.
#[inline(always)]
pub(crate) fn demote(addr: usize, len: usize) {
    each_line(addr, len, |_l| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: CLDEMOTE (encoded by hand: `0F 1C /0` with the address in
        // rax) is a hint: it never faults, changes no value, and runs as a
        // NOP where unsupported.
        unsafe {
            std::arch::asm!(".byte 0x0f, 0x1c, 0x00", in("rax") _l, options(nostack, preserves_flags, readonly));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cover_the_message_start_capped() {
        let lines = |addr, len| {
            let mut v = Vec::new();
            each_line(addr, len, |l| v.push(l));
            v
        };
        assert_eq!(lines(130, 10), vec![128]);
        assert_eq!(lines(120, 10), vec![64, 128]);
        assert_eq!(lines(0, 1 << 20).len(), HINT_LINES);
        assert_eq!(lines(64, 0).len(), 0);
        assert_eq!(lines(usize::MAX - 10, 100), vec![usize::MAX & !63]);
    }

    #[test]
    fn hints_change_nothing() {
        let v: Vec<u8> = (0..=255).collect();
        prefetch(v.as_ptr() as usize, v.len());
        prefetch_write(v.as_ptr() as usize, v.len());
        demote(v.as_ptr() as usize, v.len());
        // An address that maps nothing: a prefetch never faults.
        prefetch(8, 64);
        prefetch_write(8, 64);
        assert!(v.iter().enumerate().all(|(i, &b)| b as usize == i));
    }
}
