//! softverbs: a user-space verbs provider that emulates an RC-capable RDMA
//! NIC across the processes of one host, for machines with no RDMA device
//! (this kernel has no InfiniBand support, so neither Soft-RoCE nor siw).
//!
//! Load it under an unchanged libibverbs program:
//! `LD_PRELOAD=target/release/libsoftverbs.so ibv_rc_pingpong`. Its exported
//! `ibv_*` functions take precedence over the system libibverbs, and the
//! inline fast paths of `verbs.h` (`ibv_post_send`, `ibv_post_recv`,
//! `ibv_poll_cq`, `ibv_req_notify_cq`, `ibv_post_srq_recv`) reach it through
//! the `ops` table of the contexts it hands out. Contexts are not
//! `verbs_context`s, so the other inline helpers take their documented
//! legacy paths into exported functions.
//!
//! # How data moves
//!
//! The initiator's CPU does the NIC's work inside `ibv_post_send`:
//! * RDMA WRITE / READ go straight between the two processes' registered
//!   memory with `process_vm_writev` / `process_vm_readv`, after the remote
//!   key, bounds, access flags and protection domain are checked against
//!   the shared fabric table. The target process does not run: a one-sided
//!   write lands without it calling into the library, as with a NIC.
//! * SEND and WRITE WITH IMM consume a receive work request that the target
//!   posted on its receive queue (or SRQ), a ring in shared memory, scatter
//!   into it, and push the completion onto the target's completion queue,
//!   also in shared memory, waking its completion channel if armed.
//!
//! `process_vm_writev` was chosen over mapping registered memory: verbs
//! programs register arbitrary heap memory, which another process cannot
//! map, while cross-memory attach reaches it with one copy and needs nothing
//! from the target. It requires ptrace permission over the target (same
//! user, and no Yama restriction or `CAP_SYS_PTRACE`); where that is denied
//! the work request completes with `IBV_WC_LOC_QP_OP_ERR` and a message.
//!
//! A work request that finds no receive posted is retried after the
//! target's `min_rnr_timer`, up to `rnr_retry` times (7: forever), by a
//! progress thread of the initiating process; then it completes with
//! `IBV_WC_RNR_RETRY_EXC_ERR`. A target process that has exited makes work
//! complete with `IBV_WC_RETRY_EXC_ERR` at once (a NIC waits `timeout` ×
//! `retry_cnt` first).
//!
//! # Configuration
//!
//! `SOFTVERBS_DEVICES`: a count (`2`) or names (`mlx5_0,mlx5_1`); default
//! one device `softverbs0`. `SOFTVERBS_LINK_LAYER=ethernet` makes ports
//! RoCE-like (LID 0, address by GID). `SOFTVERBS_NAMESPACE` separates
//! unrelated jobs (default `default`); processes that talk must share it.
//!
//! # Not emulated
//!
//! UD/UC/XRC queue pairs, atomics, memory windows, the extended (`_ex`)
//! verbs (`ibv_qp_to_qp_ex` returns NULL), asynchronous events, SRQ limit
//! events, device memory. A completion channel's `fd` becomes readable only
//! for events raised inside its own process; `ibv_get_cq_event` sees all.

#![deny(unsafe_op_in_unsafe_fn)]
// The C mirrors hold raw pointers and unions; Debug on them is noise.
#![allow(missing_debug_implementations)]

pub mod abi;
mod fabric;
mod qp;
mod ring;
mod shm;

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use abi::*;
use fabric::Kind;
use shm::Mapping;

/// Sets `errno`.
pub(crate) fn set_errno(e: i32) {
    // SAFETY: `__errno_location` returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// Runs an exported function body; a panic becomes `on_panic` (with errno
/// EIO) instead of unwinding into C.
pub(crate) fn guard<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            set_errno(libc::EIO);
            on_panic
        }
    }
}

/// One emulated device.
#[repr(C)]
pub struct Device {
    pub ibv: ibv_device,
    pub index: usize,
    pub guid: u64,
}

// SAFETY: devices are immutable after creation and live forever.
unsafe impl Send for Device {}
// SAFETY: as for `Send`.
unsafe impl Sync for Device {}

fn copy_name(dst: &mut [u8], s: &str) {
    let n = s.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    dst[n] = 0;
}

pub(crate) fn ethernet() -> bool {
    std::env::var("SOFTVERBS_LINK_LAYER").is_ok_and(|v| v.eq_ignore_ascii_case("ethernet"))
}

/// The devices, created once; the vector never changes after, so their
/// addresses (handed out as `ibv_device *`) are stable.
pub(crate) fn devices() -> &'static [Device] {
    static DEVS: OnceLock<Vec<Device>> = OnceLock::new();
    DEVS.get_or_init(|| {
        let spec = std::env::var("SOFTVERBS_DEVICES").unwrap_or_default();
        let names: Vec<String> = match spec.trim().parse::<usize>() {
            Ok(n) => (0..n.min(64)).map(|i| format!("softverbs{i}")).collect(),
            Err(_) if spec.trim().is_empty() => vec!["softverbs0".into()],
            Err(_) => spec
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .take(64)
                .collect(),
        };
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                // SAFETY: `ibv_device` is plain data; all-zero is valid.
                let mut ibv: ibv_device = unsafe { std::mem::zeroed() };
                ibv.node_type = IBV_NODE_CA;
                ibv.transport_type = IBV_TRANSPORT_IB;
                copy_name(&mut ibv.name, name);
                copy_name(&mut ibv.dev_name, &format!("uverbs{i}"));
                copy_name(
                    &mut ibv.dev_path,
                    &format!("/softverbs/class/infiniband_verbs/uverbs{i}"),
                );
                copy_name(
                    &mut ibv.ibdev_path,
                    &format!("/softverbs/class/infiniband/{name}"),
                );
                Device {
                    ibv,
                    index: i,
                    guid: 0x0200_5e00_0000_0000 | ((i as u64 + 1) << 8) | 0x5f,
                }
            })
            .collect()
    })
}

/// LID of device `i`'s port (0 on Ethernet link layers).
pub(crate) fn lid_of(i: usize) -> u16 {
    if ethernet() {
        0
    } else {
        (i + 1) as u16
    }
}

/// GID `index` of device `i`: 0 is link-local from the GUID (RoCEv1/IB
/// style), 1 an IPv4-mapped address (RoCEv2 style, 127.0.0.<i+1>).
pub(crate) fn gid_of(i: usize, index: i32) -> Option<ibv_gid> {
    let mut g = ibv_gid::default();
    match index {
        0 => {
            g.raw[0] = 0xfe;
            g.raw[1] = 0x80;
            g.raw[8..].copy_from_slice(&devices().get(i)?.guid.to_be_bytes());
        }
        1 => {
            g.raw[10] = 0xff;
            g.raw[11] = 0xff;
            g.raw[12..].copy_from_slice(&[127, 0, 0, (i + 1) as u8]);
        }
        _ => return None,
    }
    Some(g)
}

/// The device a destination (LID or GID) names.
pub(crate) fn resolve(ah: &ibv_ah_attr) -> Option<usize> {
    (0..devices().len()).find(|&i| {
        if ah.is_global != 0 {
            (0..2).any(|x| gid_of(i, x) == Some(ah.grh.dgid))
        } else {
            !ethernet() && ah.dlid == lid_of(i)
        }
    })
}

pub(crate) fn fabric_or_errno() -> Option<&'static fabric::Fabric> {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    match fabric::get() {
        Ok(f) => {
            AT_EXIT.call_once(|| {
                extern "C" fn cleanup() {
                    if let Ok(f) = fabric::get() {
                        f.release_all_mine();
                    }
                }
                // SAFETY: registering a plain extern "C" function.
                unsafe { libc::atexit(cleanup) };
            });
            Some(f)
        }
        Err(e) => {
            eprintln!("{e}");
            set_errno(libc::EIO);
            None
        }
    }
}

// ---------------------------------------------------------------- devices

/// # Safety
/// `num` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_list(num: *mut i32) -> *mut *mut ibv_device {
    guard(ptr::null_mut(), || {
        let devs = devices();
        // SAFETY: calloc of n+1 pointers; freed by `ibv_free_device_list`.
        let list = unsafe { libc::calloc(devs.len() + 1, std::mem::size_of::<*mut ibv_device>()) }
            as *mut *mut ibv_device;
        if list.is_null() {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        }
        for (i, d) in devs.iter().enumerate() {
            // SAFETY: `list` holds n+1 pointers; devices live forever.
            unsafe { *list.add(i) = &d.ibv as *const ibv_device as *mut ibv_device };
        }
        if !num.is_null() {
            // SAFETY: non-NULL, caller-provided.
            unsafe { *num = devs.len() as i32 };
        }
        list
    })
}

/// # Safety
/// `list` came from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_free_device_list(list: *mut *mut ibv_device) {
    // SAFETY: allocated with calloc in `ibv_get_device_list`.
    unsafe { libc::free(list.cast()) };
}

/// # Safety
/// `dev` is a device from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_name(dev: *mut ibv_device) -> *const c_char {
    if dev.is_null() {
        return ptr::null();
    }
    // SAFETY: a live device (caller's contract).
    unsafe { (*dev).name.as_ptr().cast() }
}

fn device_of(dev: *const ibv_device) -> Option<&'static Device> {
    devices().iter().find(|d| ptr::eq(&d.ibv, dev))
}

/// # Safety
/// `dev` is a device from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_guid(dev: *mut ibv_device) -> u64 {
    device_of(dev).map_or(0, |d| d.guid.to_be())
}

/// An open device.
#[repr(C)]
pub struct Context {
    pub ibv: ibv_context,
    pub dev: usize,
}

pub(crate) fn ops() -> ibv_context_ops {
    // SAFETY: all-NULL function pointers and Options are valid.
    let mut o: ibv_context_ops = unsafe { std::mem::zeroed() };
    o.poll_cq = Some(poll_cq);
    o.req_notify_cq = Some(req_notify_cq);
    o.post_srq_recv = Some(post_srq_recv);
    o.post_send = Some(qp::post_send);
    o.post_recv = Some(qp::post_recv);
    o
}

/// # Safety
/// `dev` is a device from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_open_device(dev: *mut ibv_device) -> *mut ibv_context {
    guard(ptr::null_mut(), || {
        let Some(d) = device_of(dev) else {
            set_errno(libc::ENODEV);
            return ptr::null_mut();
        };
        fabric_or_errno();
        // SAFETY: eventfd with no flags beyond CLOEXEC.
        let async_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let ctx = Box::new(Context {
            ibv: ibv_context {
                device: dev,
                ops: ops(),
                cmd_fd: -1,
                async_fd,
                num_comp_vectors: 1,
                mutex: pthread_mutex::default(),
                abi_compat: ptr::null_mut(),
            },
            dev: d.index,
        });
        Box::into_raw(ctx).cast()
    })
}

/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_close_device(ctx: *mut ibv_context) -> i32 {
    if ctx.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: from `Box::into_raw` in `ibv_open_device`, closed once.
    let c = unsafe { Box::from_raw(ctx.cast::<Context>()) };
    if c.ibv.async_fd >= 0 {
        // SAFETY: our eventfd.
        unsafe { libc::close(c.ibv.async_fd) };
    }
    0
}

fn ctx_dev(ctx: *const ibv_context) -> Option<usize> {
    if ctx.is_null() {
        return None;
    }
    // SAFETY: contexts handed out are `Context`s (first field `ibv`).
    Some(unsafe { (*ctx.cast::<Context>()).dev })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_device(
    ctx: *mut ibv_context,
    attr: *mut ibv_device_attr,
) -> i32 {
    guard(libc::EIO, || {
        let (Some(i), false) = (ctx_dev(ctx), attr.is_null()) else {
            return libc::EINVAL;
        };
        let mut a = ibv_device_attr::default();
        copy_name(&mut a.fw_ver, "softverbs 0.1.0");
        a.node_guid = devices()[i].guid.to_be();
        a.sys_image_guid = devices()[i].guid.to_be();
        a.max_mr_size = u64::MAX;
        a.page_size_cap = 0xffff_f000;
        a.vendor_id = 0x5f;
        a.vendor_part_id = 1;
        a.hw_ver = 1;
        a.max_qp = fabric::MAX_QP as i32;
        a.max_qp_wr = qp::MAX_WR as i32;
        a.max_sge = ring::MAX_SGE as i32;
        a.max_sge_rd = ring::MAX_SGE as i32;
        a.max_cq = fabric::MAX_CQ as i32;
        a.max_cqe = MAX_CQE as i32;
        a.max_mr = fabric::MAX_MR as i32;
        a.max_pd = 1 << 20;
        a.max_qp_rd_atom = 16;
        a.max_res_rd_atom = 16 * fabric::MAX_QP as i32;
        a.max_qp_init_rd_atom = 16;
        a.max_srq = fabric::MAX_SRQ as i32;
        a.max_srq_wr = qp::MAX_WR as i32;
        a.max_srq_sge = ring::MAX_SGE as i32;
        a.max_pkeys = 1;
        a.local_ca_ack_delay = 0;
        a.phys_port_cnt = 1;
        // SAFETY: non-NULL, caller-provided.
        unsafe { attr.write(a) };
        0
    })
}

/// # Safety
/// Pointers are valid; `attr` has room for `struct ibv_port_attr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_port(
    ctx: *mut ibv_context,
    port: u8,
    attr: *mut ibv_port_attr,
) -> i32 {
    guard(libc::EIO, || {
        let (Some(i), false) = (ctx_dev(ctx), attr.is_null()) else {
            return libc::EINVAL;
        };
        if port != 1 {
            return libc::EINVAL;
        }
        let a = ibv_port_attr {
            state: IBV_PORT_ACTIVE,
            max_mtu: IBV_MTU_4096,
            active_mtu: IBV_MTU_4096,
            gid_tbl_len: 2,
            port_cap_flags: 0,
            max_msg_sz: 1 << 31,
            pkey_tbl_len: 1,
            lid: lid_of(i),
            sm_lid: if ethernet() { 0 } else { 1 },
            lmc: 0,
            max_vl_num: 1,
            active_width: 2,
            active_speed: 32,
            phys_state: 5,
            link_layer: if ethernet() {
                IBV_LINK_LAYER_ETHERNET
            } else {
                IBV_LINK_LAYER_INFINIBAND
            },
            ..ibv_port_attr::default()
        };
        // SAFETY: non-NULL, caller-provided.
        unsafe { attr.write(a) };
        0
    })
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
        let (Some(i), false) = (ctx_dev(ctx), gid.is_null()) else {
            return -1;
        };
        match (port, gid_of(i, index)) {
            (1, Some(g)) => {
                // SAFETY: non-NULL, caller-provided.
                unsafe { gid.write(g) };
                0
            }
            _ => -1,
        }
    })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid_type(
    ctx: *mut ibv_context,
    port: u8,
    index: u32,
    ty: *mut u32,
) -> i32 {
    let (Some(i), false) = (ctx_dev(ctx), ty.is_null()) else {
        return -1;
    };
    if port != 1 || gid_of(i, index as i32).is_none() {
        return -1;
    }
    // SAFETY: non-NULL, caller-provided. 0: IB/RoCEv1, 1: RoCEv2.
    unsafe { ty.write(index.min(1)) };
    0
}

/// Reads a sysfs attribute; the soft devices' paths answer from here.
///
/// # Safety
/// Strings are NUL-terminated; `buf` is writable for `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn ibv_read_sysfs_file(
    dir: *const c_char,
    file: *const c_char,
    buf: *mut c_char,
    size: usize,
) -> i32 {
    guard(-1, || {
        if dir.is_null() || file.is_null() || buf.is_null() || size == 0 {
            return -1;
        }
        // SAFETY: NUL-terminated (caller's contract).
        let (d, f) = unsafe {
            (
                CStr::from_ptr(dir).to_string_lossy(),
                CStr::from_ptr(file).to_string_lossy(),
            )
        };
        let text = if let Some(name) = d.strip_prefix("/softverbs/class/infiniband/") {
            match f.as_ref() {
                "board_id" => "SOFTVERBS_0001".to_string(),
                "fw_ver" => "0.1.0".to_string(),
                "hw_rev" => "1".to_string(),
                "node_type" => "1: CA".to_string(),
                "node_desc" => format!("softverbs {name}"),
                _ => return -1,
            }
        } else {
            match std::fs::read_to_string(format!("{d}/{f}")) {
                Ok(s) => s,
                Err(_) => return -1,
            }
        };
        let t = text.trim_end_matches('\n').as_bytes();
        let n = t.len().min(size - 1);
        // SAFETY: `buf` holds `size > n` bytes.
        unsafe {
            ptr::copy_nonoverlapping(t.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
        n as i32
    })
}

/// # Safety
/// Always safe.
#[no_mangle]
pub extern "C" fn ibv_wc_status_str(status: u32) -> *const c_char {
    WC_STATUS_STR
        .get(status as usize)
        .map_or(c"unknown".as_ptr(), |s| s.as_ptr())
}

#[no_mangle]
pub extern "C" fn ibv_fork_init() -> i32 {
    0
}

/// Extended QPs are not emulated.
#[no_mangle]
pub extern "C" fn ibv_qp_to_qp_ex(_qp: *mut ibv_qp) -> *mut c_void {
    set_errno(libc::EOPNOTSUPP);
    ptr::null_mut()
}

// --------------------------------------------------------- PDs and MRs

#[repr(C)]
pub struct Pd {
    pub ibv: ibv_pd,
    pub id: u32,
}

pub(crate) fn pd_id(pd: *const ibv_pd) -> Option<u32> {
    if pd.is_null() {
        return None;
    }
    // SAFETY: PDs handed out are `Pd`s.
    Some(unsafe { (*pd.cast::<Pd>()).id })
}

/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_alloc_pd(ctx: *mut ibv_context) -> *mut ibv_pd {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        if ctx.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let id = f.next_pd();
        Box::into_raw(Box::new(Pd {
            ibv: ibv_pd {
                context: ctx,
                handle: id,
            },
            id,
        }))
        .cast()
    })
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dealloc_pd(pd: *mut ibv_pd) -> i32 {
    if pd.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: from `Box::into_raw` in `ibv_alloc_pd`, freed once.
    drop(unsafe { Box::from_raw(pd.cast::<Pd>()) });
    0
}

#[repr(C)]
pub struct Mr {
    pub ibv: ibv_mr,
    pub slot: usize,
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`; `addr` is valid for `length` bytes while
/// registered.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    access: i32,
) -> *mut ibv_mr {
    // SAFETY: forwarded contract.
    unsafe { ibv_reg_mr_iova2(pd, addr, length, addr as u64, access as u32) }
}

/// # Safety
/// As `ibv_reg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: i32,
) -> *mut ibv_mr {
    // SAFETY: forwarded contract.
    unsafe { ibv_reg_mr_iova2(pd, addr, length, iova, access as u32) }
}

/// # Safety
/// As `ibv_reg_mr`. Only `iova == addr` is emulated.
#[no_mangle]
pub unsafe extern "C" fn ibv_reg_mr_iova2(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: u32,
) -> *mut ibv_mr {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        let Some(pdid) = pd_id(pd) else {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        };
        let known = IBV_ACCESS_LOCAL_WRITE
            | IBV_ACCESS_REMOTE_WRITE
            | IBV_ACCESS_REMOTE_READ
            | IBV_ACCESS_REMOTE_ATOMIC;
        // As the IB spec (and every NIC): remote write needs local write;
        // a region must be somewhere; iova other than the address is not
        // emulated.
        let bad = (addr.is_null() && length > 0)
            || access & !(known | 0xfff0) != 0
            || (access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC) != 0
                && access & IBV_ACCESS_LOCAL_WRITE == 0)
            || iova != addr as u64;
        if bad {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Mr) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let key = fabric::key_of(slot, gen);
        let s = f.mr(slot);
        s.key.store(key, Ordering::Relaxed);
        s.pd.store(pdid, Ordering::Relaxed);
        s.access.store(access, Ordering::Relaxed);
        s.addr.store(addr as u64, Ordering::Relaxed);
        s.len.store(length as u64, Ordering::Relaxed);
        f.publish(Kind::Mr, slot);
        // SAFETY: `pd` is a live PD (checked non-NULL above).
        let context = unsafe { (*pd).context };
        Box::into_raw(Box::new(Mr {
            ibv: ibv_mr {
                context,
                pd,
                addr,
                length,
                handle: key,
                lkey: key,
                rkey: key,
            },
            slot,
        }))
        .cast()
    })
}

/// # Safety
/// `mr` came from `ibv_reg_mr`.
#[no_mangle]
pub unsafe extern "C" fn ibv_dereg_mr(mr: *mut ibv_mr) -> i32 {
    guard(libc::EIO, || {
        if mr.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: from `Box::into_raw` in `ibv_reg_mr_iova2`, freed once.
        let m = unsafe { Box::from_raw(mr.cast::<Mr>()) };
        if let Ok(f) = fabric::get() {
            f.release(Kind::Mr, m.slot);
        }
        0
    })
}

// -------------------------------------------------- channels and CQs

#[repr(C)]
pub struct Channel {
    pub ibv: ibv_comp_channel,
    pub slot: usize,
    pub gen: u32,
}

/// # Safety
/// `ctx` came from `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_comp_channel(ctx: *mut ibv_context) -> *mut ibv_comp_channel {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        if ctx.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Ch) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let c = f.ch(slot);
        c.head.store(0, Ordering::Relaxed);
        c.tail.store(0, Ordering::Relaxed);
        c.lock.store(0, Ordering::Relaxed);
        f.publish(Kind::Ch, slot);
        // SAFETY: plain eventfd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        Box::into_raw(Box::new(Channel {
            ibv: ibv_comp_channel {
                context: ctx,
                fd,
                refcnt: 0,
            },
            slot,
            gen,
        }))
        .cast()
    })
}

/// # Safety
/// `ch` came from `ibv_create_comp_channel`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_comp_channel(ch: *mut ibv_comp_channel) -> i32 {
    guard(libc::EIO, || {
        if ch.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live channel.
        if unsafe { (*ch).refcnt } > 0 {
            return libc::EBUSY;
        }
        // SAFETY: from `Box::into_raw`, freed once.
        let c = unsafe { Box::from_raw(ch.cast::<Channel>()) };
        if let Ok(f) = fabric::get() {
            f.release(Kind::Ch, c.slot);
        }
        if c.ibv.fd >= 0 {
            // SAFETY: our eventfd.
            unsafe { libc::close(c.ibv.fd) };
        }
        0
    })
}

pub const MAX_CQE: u32 = 65536;

/// A completion queue: the handle the program holds, and the shared part
/// that queue pairs (and the progress thread) push to.
#[repr(C)]
pub struct Cq {
    pub ibv: ibv_cq,
    pub shared: Arc<CqShared>,
}

#[derive(Debug)]
pub struct CqShared {
    pub slot: usize,
    pub gen: u32,
    pub ring: Arc<Mapping>,
    pub name: String,
    /// Initiator completions waiting out the emulated acknowledgement
    /// delay, in order (see `qp::ack_delay`).
    pub deferred: Mutex<std::collections::VecDeque<(std::time::Instant, ibv_wc)>>,
}

impl CqShared {
    /// Moves every deferred completion that is due onto the ring. Returns
    /// when the next one is due, if any.
    pub fn flush_due(&self, f: &fabric::Fabric) -> Option<std::time::Instant> {
        let mut d = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        while let Some((due, wc)) = d.front() {
            if *due > now {
                return Some(*due);
            }
            let _ = ring::cq_push(f, &self.ring, wc, false);
            d.pop_front();
        }
        None
    }
}

/// Local CQs by fabric slot, for channel events.
fn local_cqs() -> &'static Mutex<std::collections::HashMap<usize, usize>> {
    static M: OnceLock<Mutex<std::collections::HashMap<usize, usize>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(std::collections::HashMap::new()))
}

/// # Safety
/// `ctx` came from `ibv_open_device`; `channel` is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_cq(
    ctx: *mut ibv_context,
    cqe: i32,
    cq_context: *mut c_void,
    channel: *mut ibv_comp_channel,
    _comp_vector: i32,
) -> *mut ibv_cq {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        if ctx.is_null() || cqe < 1 || cqe as u32 > MAX_CQE {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Cq) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        let ch = if channel.is_null() {
            None
        } else {
            // SAFETY: a live channel (caller's contract).
            let c = unsafe { &mut *channel.cast::<Channel>() };
            c.ibv.refcnt += 1;
            Some((c.slot as u32, c.gen))
        };
        let name = f.file(Kind::Cq, slot, gen);
        let ring = match ring::cq_create(&name, cqe as u32, slot as u32, ch) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("softverbs: create CQ: {e}");
                f.release(Kind::Cq, slot);
                set_errno(libc::ENOMEM);
                return ptr::null_mut();
            }
        };
        f.publish(Kind::Cq, slot);
        let cq = Box::new(Cq {
            ibv: ibv_cq {
                context: ctx,
                channel,
                cq_context,
                handle: slot as u32,
                cqe,
                mutex: pthread_mutex::default(),
                cond: pthread_cond::default(),
                comp_events_completed: 0,
                async_events_completed: 0,
            },
            shared: Arc::new(CqShared {
                slot,
                gen,
                ring,
                name,
                deferred: Mutex::new(std::collections::VecDeque::new()),
            }),
        });
        let p = Box::into_raw(cq);
        local_cqs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot, p as usize);
        p.cast()
    })
}

/// # Safety
/// `cq` came from `ibv_create_cq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_cq(cq: *mut ibv_cq) -> i32 {
    guard(libc::EIO, || {
        if cq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: from `Box::into_raw` in `ibv_create_cq`, destroyed once.
        let c = unsafe { Box::from_raw(cq.cast::<Cq>()) };
        local_cqs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c.shared.slot);
        if !c.ibv.channel.is_null() {
            // SAFETY: the channel outlives its CQs (EBUSY otherwise).
            unsafe { (*c.ibv.channel).refcnt -= 1 };
        }
        if let Ok(f) = fabric::get() {
            f.release(Kind::Cq, c.shared.slot);
        }
        ring::forget(&c.shared.name);
        0
    })
}

/// The `poll_cq` op behind `ibv_poll_cq`.
///
/// # Safety
/// `cq` is live; `wc` holds `n` entries.
pub unsafe extern "C" fn poll_cq(cq: *mut ibv_cq, n: i32, wc: *mut ibv_wc) -> i32 {
    guard(-1, || {
        if cq.is_null() || n < 0 || (n > 0 && wc.is_null()) {
            return -1;
        }
        // SAFETY: a live CQ; `wc` holds `n` entries (caller's contract).
        let (c, out) = unsafe {
            (
                &*cq.cast::<Cq>(),
                std::slice::from_raw_parts_mut(wc, n as usize),
            )
        };
        if let Ok(f) = fabric::get() {
            c.shared.flush_due(f);
        }
        match ring::cq_pop(&c.shared.ring, out) {
            Ok(k) => k as i32,
            Err(()) => {
                set_errno(libc::EOVERFLOW);
                -1
            }
        }
    })
}

/// The `req_notify_cq` op behind `ibv_req_notify_cq`.
///
/// # Safety
/// `cq` is live.
pub unsafe extern "C" fn req_notify_cq(cq: *mut ibv_cq, solicited_only: i32) -> i32 {
    if cq.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: a live CQ.
    let c = unsafe { &*cq.cast::<Cq>() };
    ring::cq_arm(&c.shared.ring, if solicited_only != 0 { 2 } else { 1 });
    0
}

/// Blocks until a CQ attached to `ch` has an event (or, on a non-blocking
/// channel fd, fails with EAGAIN).
///
/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_cq_event(
    ch: *mut ibv_comp_channel,
    cq_out: *mut *mut ibv_cq,
    ctx_out: *mut *mut c_void,
) -> i32 {
    guard(-1, || {
        let Ok(f) = fabric::get() else { return -1 };
        if ch.is_null() || cq_out.is_null() || ctx_out.is_null() {
            set_errno(libc::EINVAL);
            return -1;
        }
        // SAFETY: a live channel.
        let c = unsafe { &*ch.cast::<Channel>() };
        // SAFETY: fcntl on our own eventfd.
        let nonblock = unsafe { libc::fcntl(c.ibv.fd, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
        let slot = f.ch(c.slot);
        loop {
            let seen = slot.seq.load(Ordering::Acquire);
            if let Some(cq_slot) = ring::channel_pop(f, c.slot) {
                let cqs = local_cqs().lock().unwrap_or_else(|e| e.into_inner());
                let Some(&p) = cqs.get(&(cq_slot as usize)) else {
                    continue;
                };
                let cq = p as *mut Cq;
                // SAFETY: registered CQs are live until destroyed, which
                // removes them from the map under this lock.
                unsafe {
                    *cq_out = cq.cast();
                    *ctx_out = (*cq).ibv.cq_context;
                }
                return 0;
            }
            if nonblock {
                set_errno(libc::EAGAIN);
                return -1;
            }
            shm::futex_wait(&slot.seq, seen, Duration::from_millis(100));
        }
    })
}

/// # Safety
/// `cq` is live.
#[no_mangle]
pub unsafe extern "C" fn ibv_ack_cq_events(cq: *mut ibv_cq, n: u32) {
    if !cq.is_null() {
        // SAFETY: a live CQ.
        unsafe { (*cq).comp_events_completed = (*cq).comp_events_completed.wrapping_add(n) };
    }
}

// ---------------------------------------------------------------- SRQs

#[repr(C)]
pub struct Srq {
    pub ibv: ibv_srq,
    pub shared: Arc<SrqShared>,
}

#[derive(Debug)]
pub struct SrqShared {
    pub slot: usize,
    pub gen: u32,
    pub ring: Arc<Mapping>,
    pub name: String,
    pub max_sge: u32,
    pub max_wr: u32,
    pub limit: AtomicU32,
}

/// # Safety
/// `pd` came from `ibv_alloc_pd`; `attr` is valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_create_srq(
    pd: *mut ibv_pd,
    attr: *mut ibv_srq_init_attr,
) -> *mut ibv_srq {
    guard(ptr::null_mut(), || {
        let Some(f) = fabric_or_errno() else {
            return ptr::null_mut();
        };
        let Some(pdid) = pd_id(pd) else {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        };
        if attr.is_null() {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        // SAFETY: non-NULL, caller-provided.
        let a = unsafe { &mut *attr };
        if a.attr.max_wr == 0
            || a.attr.max_wr > qp::MAX_WR
            || a.attr.max_sge as usize > ring::MAX_SGE
        {
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
        let Some((slot, gen)) = f.claim(Kind::Srq) else {
            set_errno(libc::ENOMEM);
            return ptr::null_mut();
        };
        f.srq(slot).pd.store(pdid, Ordering::Relaxed);
        let name = f.file(Kind::Srq, slot, gen);
        let ring = match ring::rq_create(&name, a.attr.max_wr) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("softverbs: create SRQ: {e}");
                f.release(Kind::Srq, slot);
                set_errno(libc::ENOMEM);
                return ptr::null_mut();
            }
        };
        f.publish(Kind::Srq, slot);
        // SAFETY: `pd` is live.
        let context = unsafe { (*pd).context };
        let srq = Box::new(Srq {
            ibv: ibv_srq {
                context,
                srq_context: a.srq_context,
                pd,
                handle: slot as u32,
                mutex: pthread_mutex::default(),
                cond: pthread_cond::default(),
                events_completed: 0,
            },
            shared: Arc::new(SrqShared {
                slot,
                gen,
                ring,
                name,
                max_sge: a.attr.max_sge.max(1),
                max_wr: a.attr.max_wr,
                limit: AtomicU32::new(a.attr.srq_limit),
            }),
        });
        Box::into_raw(srq).cast()
    })
}

/// # Safety
/// `srq` came from `ibv_create_srq`.
#[no_mangle]
pub unsafe extern "C" fn ibv_destroy_srq(srq: *mut ibv_srq) -> i32 {
    guard(libc::EIO, || {
        if srq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: from `Box::into_raw`, destroyed once.
        let s = unsafe { Box::from_raw(srq.cast::<Srq>()) };
        if let Ok(f) = fabric::get() {
            f.release(Kind::Srq, s.shared.slot);
        }
        ring::forget(&s.shared.name);
        0
    })
}

/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_srq(srq: *mut ibv_srq, attr: *mut ibv_srq_attr) -> i32 {
    if srq.is_null() || attr.is_null() {
        return libc::EINVAL;
    }
    // SAFETY: a live SRQ; `attr` writable.
    unsafe {
        let s = &(&*srq.cast::<Srq>()).shared;
        attr.write(ibv_srq_attr {
            max_wr: s.max_wr,
            max_sge: s.max_sge,
            srq_limit: s.limit.load(Ordering::Relaxed),
        });
    }
    0
}

/// Only the limit can change (resizing is not emulated).
///
/// # Safety
/// Pointers are valid.
#[no_mangle]
pub unsafe extern "C" fn ibv_modify_srq(
    srq: *mut ibv_srq,
    attr: *mut ibv_srq_attr,
    mask: i32,
) -> i32 {
    if srq.is_null() || attr.is_null() || mask & 1 != 0 {
        return libc::EINVAL;
    }
    if mask & 2 != 0 {
        // SAFETY: a live SRQ; `attr` readable.
        let (s, limit) = unsafe { (&*srq.cast::<Srq>(), (*attr).srq_limit) };
        s.shared.limit.store(limit, Ordering::Relaxed);
    }
    0
}

/// The `post_srq_recv` op behind `ibv_post_srq_recv`.
///
/// # Safety
/// Pointers are valid.
pub unsafe extern "C" fn post_srq_recv(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad: *mut *mut ibv_recv_wr,
) -> i32 {
    guard(libc::EIO, || {
        if srq.is_null() {
            return libc::EINVAL;
        }
        // SAFETY: a live SRQ.
        let s = unsafe { &(*srq.cast::<Srq>()).shared };
        // SAFETY: forwarded contract.
        unsafe { qp::post_recv_list(&s.ring, s.max_sge, wr, bad) }
    })
}

#[cfg(test)]
mod layout_table;

#[cfg(test)]
mod layout_tests {
    /// Every size and offset of the mirrored structures equals the system
    /// header's, as compiled by the system C compiler.
    #[test]
    fn mirrors_match_the_system_header() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/layout.c");
        let bin = std::env::temp_dir().join(format!("softverbs-layout-{}", std::process::id()));
        let st = std::process::Command::new("cc")
            .args(["-std=c11", "-Wall", "-Werror", src, "-o"])
            .arg(&bin)
            .status()
            .expect("cc runs");
        assert!(
            st.success(),
            "compiling layout.c failed: is libibverbs-dev installed?"
        );
        let out = std::process::Command::new(&bin)
            .output()
            .expect("layout program runs");
        let _ = std::fs::remove_file(&bin);
        let text = String::from_utf8_lossy(&out.stdout);
        let c: std::collections::HashMap<&str, usize> = text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k, v.parse().expect("number")))
            .collect();
        let rust = super::layout_table::table();
        assert_eq!(
            c.len(),
            rust.len(),
            "the C program and the table list the same things"
        );
        let wrong: Vec<String> = rust
            .iter()
            .filter(|(what, n)| c.get(what) != Some(n))
            .map(|(what, n)| format!("{what}: C {:?}, Rust {n}", c.get(what)))
            .collect();
        assert!(
            wrong.is_empty(),
            "layout differs from the system header:\n{}",
            wrong.join("\n")
        );
    }
}
