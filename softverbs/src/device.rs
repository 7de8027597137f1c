//! Devices and their contexts: the emulated devices (`SOFTVERBS_DEVICES`),
//! their ports, GIDs and sysfs attributes, opening and closing a device,
//! and the exported functions that only describe things.

use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::{Arc, OnceLock};

use crate::abi::*;
use crate::cq::{poll_cq, req_notify_cq, MAX_CQE};
use crate::events::EventQueue;
use crate::srq::post_srq_recv;
use crate::{fabric, fabric_or_errno, guard, qp, ring, set_errno};

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

/// The device a destination (LID or GID) names.
pub(crate) fn resolve(ah: &ibv_ah_attr) -> Option<usize> {
    (0..devices().len()).find(|&i| {
        if ah.is_global != 0 {
            crate::gid::table(i).iter().any(|e| e.gid == ah.grh.dgid)
        } else {
            !ethernet() && ah.dlid == lid_of(i)
        }
    })
}

/// # Safety
/// `num` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_list(num: *mut i32) -> *mut *mut ibv_device {
    guard(ptr::null_mut(), || {
        if let Err(e) = crate::fault::get() {
            // A mistyped fault must not pass as a run without faults.
            eprintln!("softverbs: {e}");
            set_errno(libc::EINVAL);
            return ptr::null_mut();
        }
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

/// The device's index (its `uverbs<i>` number), or -1.
///
/// # Safety
/// `dev` is a device from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_index(dev: *mut ibv_device) -> i32 {
    device_of(dev).map_or(-1, |d| d.index as i32)
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
    /// Its asynchronous events; `ibv.async_fd` is this queue's fd.
    pub events: Arc<EventQueue>,
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
        let events = match EventQueue::new() {
            Ok(q) => q,
            Err(e) => {
                set_errno(e.raw_os_error().unwrap_or(libc::EMFILE));
                return ptr::null_mut();
            }
        };
        crate::fault::context_opened(&events);
        let async_fd = events.fd();
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
            events,
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
    // Its event queue (and fd) goes with the last object that uses it.
    drop(unsafe { Box::from_raw(ctx.cast::<Context>()) });
    0
}

pub(crate) fn ctx_dev(ctx: *const ibv_context) -> Option<usize> {
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
        a.max_qp_rd_atom = qp::MAX_RD_ATOMIC as i32;
        a.max_res_rd_atom = qp::MAX_RD_ATOMIC as i32 * fabric::MAX_QP as i32;
        a.max_qp_init_rd_atom = qp::MAX_RD_ATOMIC as i32;
        // What it does as a real RC NIC would: cur_qp_state checked on
        // modify, port events, a system image GUID, RNR NAKs.
        a.device_cap_flags = IBV_DEVICE_CURR_QP_STATE_MOD
            | IBV_DEVICE_PORT_ACTIVE_EVENT
            | IBV_DEVICE_SYS_IMAGE_GUID
            | IBV_DEVICE_RC_RNR_NAK_GEN;
        // Atomic among this NIC's atomics (the namespace's atomic lock).
        a.atomic_cap = IBV_ATOMIC_HCA;
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
        let down = crate::fault::port_down();
        let a = ibv_port_attr {
            state: if down { IBV_PORT_DOWN } else { IBV_PORT_ACTIVE },
            max_mtu: IBV_MTU_4096,
            active_mtu: IBV_MTU_4096,
            gid_tbl_len: crate::gid::table(i).len() as i32,
            // RoCE GIDs come from IP addresses.
            port_cap_flags: if ethernet() {
                IBV_PORT_IP_BASED_GIDS
            } else {
                0
            },
            max_msg_sz: 1 << 31,
            pkey_tbl_len: 1,
            lid: lid_of(i),
            sm_lid: if ethernet() { 0 } else { 1 },
            lmc: 0,
            max_vl_num: 1,
            active_width: 2,
            active_speed: 32,
            // 5: LinkUp; 3: Disabled.
            phys_state: if down { 3 } else { 5 },
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
