//! The port's GID and P_Key tables, laid out as a ConnectX port's are.
//!
//! InfiniBand link layer: one GID, the link-local `fe80::<GUID>`.
//! Ethernet (`SOFTVERBS_LINK_LAYER=ethernet`, RoCE): four, as mlx5 fills
//! them for an interface with one IPv4 address: 0 and 1 the link-local
//! GID as RoCE v1 and v2, 2 and 3 the IPv4-mapped `::ffff:127.0.0.<i+1>`
//! as RoCE v1 and v2. So index 3 is the RoCE v2 IPv4-mapped GID that
//! NCCL-style configurations name. The P_Key table is the default
//! partition, `0xffff`, alone.

use std::ffi::c_void;

use crate::abi::*;
use crate::device::{ctx_dev, devices, ethernet};
use crate::guard;

/// One GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    pub gid: ibv_gid,
    /// `IBV_GID_TYPE_IB`, `_ROCE_V1` or `_ROCE_V2`.
    pub gid_type: u32,
}

fn link_local(i: usize) -> ibv_gid {
    let mut g = ibv_gid::default();
    g.raw[0] = 0xfe;
    g.raw[1] = 0x80;
    if let Some(d) = devices().get(i) {
        g.raw[8..].copy_from_slice(&d.guid.to_be_bytes());
    }
    g
}

fn ipv4_mapped(i: usize) -> ibv_gid {
    let mut g = ibv_gid::default();
    g.raw[10] = 0xff;
    g.raw[11] = 0xff;
    g.raw[12..].copy_from_slice(&[127, 0, 0, (i + 1) as u8]);
    g
}

/// Device `i`'s port 1 GID table.
pub fn table(i: usize) -> Vec<GidEntry> {
    if ethernet() {
        let (ll, v4) = (link_local(i), ipv4_mapped(i));
        vec![
            GidEntry {
                gid: ll,
                gid_type: IBV_GID_TYPE_ROCE_V1,
            },
            GidEntry {
                gid: ll,
                gid_type: IBV_GID_TYPE_ROCE_V2,
            },
            GidEntry {
                gid: v4,
                gid_type: IBV_GID_TYPE_ROCE_V1,
            },
            GidEntry {
                gid: v4,
                gid_type: IBV_GID_TYPE_ROCE_V2,
            },
        ]
    } else {
        vec![GidEntry {
            gid: link_local(i),
            gid_type: IBV_GID_TYPE_IB,
        }]
    }
}

fn entry(ctx: *const ibv_context, port: u32, index: u32) -> Option<GidEntry> {
    let i = ctx_dev(ctx)?;
    if port != 1 {
        return None;
    }
    table(i).get(index as usize).copied()
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid(
    ctx: *mut ibv_context,
    port: u8,
    index: i32,
    gid: *mut ibv_gid,
) -> i32 {
    guard(-1, || {
        match (
            gid.is_null(),
            u32::try_from(index)
                .ok()
                .and_then(|x| entry(ctx, port.into(), x)),
        ) {
            (false, Some(e)) => {
                // SAFETY: non-NULL, caller-provided.
                unsafe { gid.write(e.gid) };
                0
            }
            _ => -1,
        }
    })
}

/// The sysfs view of a GID's type: 0 for IB and RoCE v1, 1 for RoCE v2.
///
/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid_type(
    ctx: *mut ibv_context,
    port: u8,
    index: u32,
    ty: *mut u32,
) -> i32 {
    guard(-1, || {
        match (ty.is_null(), entry(ctx, port.into(), index)) {
            (false, Some(e)) => {
                // SAFETY: non-NULL, caller-provided.
                unsafe { ty.write(u32::from(e.gid_type == IBV_GID_TYPE_ROCE_V2)) };
                0
            }
            _ => -1,
        }
    })
}

fn write_entry(out: *mut c_void, e: GidEntry, index: u32) {
    let v = ibv_gid_entry {
        gid: e.gid,
        gid_index: index,
        port_num: 1,
        gid_type: e.gid_type,
        // RoCE GIDs belong to the loopback interface (ifindex 1).
        ndev_ifindex: u32::from(e.gid_type != IBV_GID_TYPE_IB),
    };
    // SAFETY: the caller checked `out` holds an entry.
    unsafe { out.cast::<ibv_gid_entry>().write_unaligned(v) };
}

/// Behind the inline `ibv_query_gid_ex`: 0 or an errno value (ENODATA for
/// an index past the table, as rdma-core answers for an empty entry).
///
/// # Safety
/// `entry` holds `entry_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn _ibv_query_gid_ex(
    ctx: *mut ibv_context,
    port: u32,
    index: u32,
    out: *mut c_void,
    flags: u32,
    entry_size: usize,
) -> i32 {
    guard(libc::EIO, || {
        if flags != 0 {
            return libc::EOPNOTSUPP;
        }
        if ctx_dev(ctx).is_none()
            || port != 1
            || out.is_null()
            || entry_size < std::mem::size_of::<ibv_gid_entry>()
        {
            return libc::EINVAL;
        }
        match entry(ctx, port, index) {
            Some(e) => {
                write_entry(out, e, index);
                0
            }
            None => libc::ENODATA,
        }
    })
}

/// Behind the inline `ibv_query_gid_table`: the number of entries, or a
/// negative errno value (EINVAL when they do not fit).
///
/// # Safety
/// `entries` holds `max` entries of `entry_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn _ibv_query_gid_table(
    ctx: *mut ibv_context,
    entries: *mut c_void,
    max: usize,
    flags: u32,
    entry_size: usize,
) -> isize {
    guard(-(libc::EIO as isize), || {
        if flags != 0 {
            return -(libc::EOPNOTSUPP as isize);
        }
        let Some(i) = ctx_dev(ctx) else {
            return -(libc::EINVAL as isize);
        };
        let t = table(i);
        if entry_size < std::mem::size_of::<ibv_gid_entry>()
            || t.len() > max
            || (entries.is_null() && !t.is_empty())
        {
            return -(libc::EINVAL as isize);
        }
        for (k, e) in t.iter().enumerate() {
            // SAFETY: `entries` holds `max >= t.len()` entries.
            let at = unsafe { entries.cast::<u8>().add(k * entry_size) };
            write_entry(at.cast(), *e, k as u32);
        }
        t.len() as isize
    })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_pkey(
    ctx: *mut ibv_context,
    port: u8,
    index: i32,
    pkey: *mut u16,
) -> i32 {
    guard(-1, || {
        if ctx_dev(ctx).is_none() || port != 1 || index != 0 || pkey.is_null() {
            return -1;
        }
        // SAFETY: non-NULL, caller-provided. Network byte order, as the
        // real one returns it.
        unsafe { pkey.write(0xffffu16.to_be()) };
        0
    })
}

/// The index of `pkey` (network byte order) in the table, or -1.
///
/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_pkey_index(ctx: *mut ibv_context, port: u8, pkey: u16) -> i32 {
    if ctx_dev(ctx).is_none() || port != 1 {
        return -1;
    }
    // An exact match, as rdma-core's walk over `ibv_query_pkey` finds.
    if pkey == 0xffffu16.to_be() {
        0
    } else {
        -1
    }
}
