//! What the attention and FFN handles share: the live/finalized/aborted
//! state, and the bodies of `_info`, `_stats`, `_finalize` and `_abort`,
//! written once over the `Handle` trait.

use afmesh_core::{Peer, RankStats};

use crate::args::obj;
use crate::error::afmesh_result::{AFMESH_ERR_BUFFER_SIZE, AFMESH_ERR_SHUTDOWN};
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
/// writes the fields it knows into each element and leaves any later
/// fields of a newer header untouched.
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
        if size < known {
            return Err(invalid(format!(
                "out[0].size is {size}, smaller than this library's afmesh_peer_stats ({known}); use AFMESH_PEER_STATS_INIT"
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
        };
        // SAFETY: `out` holds `cap >= n` elements of `stride` bytes, the
        // size the caller declared (contract); elements of a larger
        // declared size need not be aligned for ours, so write unaligned.
        unsafe {
            out.cast::<u8>()
                .add(i * stride)
                .cast::<afmesh_peer_stats>()
                .write_unaligned(v)
        };
    }
    // SAFETY: checked non-NULL above.
    unsafe { count_out.write(n) };
    Ok(())
}

/// What the C handles of both roles share.
pub(crate) trait RankOps: Sized {
    const WHAT: &'static str;
    fn shutdown(self) -> afmesh_core::Result<()>;
    fn info(&self) -> afmesh_rank_info;
    fn stats(&self) -> RankStats;
    fn progress(&mut self) -> afmesh_core::Result<()>;
}

pub(crate) trait Handle {
    type Rank: RankOps;
    fn state(&mut self) -> &mut State<Self::Rank>;
}

/// # Safety
/// `h` is NULL or a live handle; `out` is NULL or writable.
pub(crate) unsafe fn info_of<H: Handle>(h: *mut H, out: *mut afmesh_rank_info) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let info = h.state().live(H::Rank::WHAT)?.info();
    // SAFETY: checked non-NULL.
    unsafe { out.write(info) };
    Ok(())
}

/// # Safety
/// As `write_stats`, and `h` is NULL or live.
pub(crate) unsafe fn stats_of<H: Handle>(
    h: *mut H,
    out: *mut afmesh_peer_stats,
    cap: usize,
    count_out: *mut usize,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    let stats = h.state().live(H::Rank::WHAT)?.stats();
    write_stats(stats, out, cap, count_out)
}

/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn finalize_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    match std::mem::replace(h.state(), State::Finalized) {
        State::Live(r) => r.shutdown().map_err(Fail::from),
        other => {
            *h.state() = other;
            h.state().live(H::Rank::WHAT).map(|_| ())
        }
    }
}

/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn abort_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    drop(std::mem::replace(h.state(), State::Aborted));
    Ok(())
}

/// # Safety
/// `h` is NULL or live.
pub(crate) unsafe fn progress_of<H: Handle>(h: *mut H) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let h = unsafe { obj(h, "handle") }?;
    h.state()
        .live(H::Rank::WHAT)?
        .progress()
        .map_err(Fail::from)
}
