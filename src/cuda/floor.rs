//! What `afmesh bench --device cuda` holds a device mesh against, measured
//! in the same run: the same bytes moved GPU to GPU the plainest ways.
//!
//! * [`copy_engine`]: per layer, every (attention, FFN) pair's dispatch
//!   bytes of every stage copied with `cuMemcpyPeerAsync` (one stream per
//!   source GPU), a sync of all streams, then every combine copied back
//!   and synced: no protocol, no notices, no second process.
//! * [`nccl`]: the same pattern as NCCL send/recv (one communicator over
//!   the GPUs in use, in this process; pairs on one GPU copy locally), with
//!   libnccl loaded at run time; [`Error::Unsupported`] where it is absent.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Instant;

use super::{Device, DeviceMemory, Stream};
use crate::engine::Histogram;
use crate::error::{Error, Result};

/// One (attention, FFN) pair's bytes per stage and the GPUs they sit on.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// The attention rank's GPU.
    pub attention_device: i32,
    /// The FFN rank's GPU.
    pub ffn_device: i32,
    /// Bytes out per stage.
    pub dispatch: usize,
    /// Bytes back per stage.
    pub combine: usize,
}

struct Buffers {
    /// Per pair and stage: source and target of the dispatch and the
    /// combine.
    out_src: Vec<DeviceMemory>,
    out_dst: Vec<DeviceMemory>,
    back_src: Vec<DeviceMemory>,
    back_dst: Vec<DeviceMemory>,
}

fn buffers(pairs: &[Pair], stages: u32) -> Result<Buffers> {
    let mut b = Buffers {
        out_src: Vec::new(),
        out_dst: Vec::new(),
        back_src: Vec::new(),
        back_dst: Vec::new(),
    };
    for p in pairs {
        for _ in 0..stages {
            b.out_src
                .push(DeviceMemory::alloc(p.attention_device, p.dispatch.max(1))?);
            b.out_dst
                .push(DeviceMemory::alloc(p.ffn_device, p.dispatch.max(1))?);
            b.back_src
                .push(DeviceMemory::alloc(p.ffn_device, p.combine.max(1))?);
            b.back_dst
                .push(DeviceMemory::alloc(p.attention_device, p.combine.max(1))?);
        }
    }
    Ok(b)
}

/// One stream per GPU in use, by ordinal.
fn streams(pairs: &[Pair]) -> Result<Vec<(Device, Stream)>> {
    let mut devs: Vec<i32> = pairs
        .iter()
        .flat_map(|p| [p.attention_device, p.ffn_device])
        .collect();
    devs.sort_unstable();
    devs.dedup();
    let mut out = Vec::new();
    for &d in &devs {
        let dev = Device::get(d)?;
        out.push((dev, Stream::new(&dev)?));
    }
    for (a, _) in &out {
        for (b, _) in &out {
            if a.ordinal() != b.ordinal() && a.can_access(b)? {
                a.enable_peer(b)?;
            }
        }
    }
    Ok(out)
}

fn stream_of(s: &[(Device, Stream)], d: i32) -> Result<&(Device, Stream)> {
    s.iter()
        .find(|(dev, _)| dev.ordinal() == d)
        .ok_or_else(|| Error::invalid(format!("no stream for device {d}")))
}

fn sync_all(s: &[(Device, Stream)]) -> Result<()> {
    s.iter().try_for_each(|(_, st)| st.synchronize())
}

/// The copy-engine floor: `warmup` untimed then `iters` timed layers;
/// nanoseconds per layer.
pub fn copy_engine(pairs: &[Pair], stages: u32, warmup: u32, iters: u32) -> Result<Histogram> {
    let b = buffers(pairs, stages)?;
    let s = streams(pairs)?;
    let mut h = Histogram::new();
    let st = stages as usize;
    for layer in 0..warmup + iters {
        let t0 = Instant::now();
        for (i, p) in pairs.iter().enumerate() {
            let (adev, stream) = stream_of(&s, p.attention_device)?;
            let fdev = Device::get(p.ffn_device)?;
            adev.bind()?;
            for k in 0..st {
                let j = i * st + k;
                // SAFETY: both buffers are `dispatch` bytes of live
                // allocations, kept until after the sync below.
                unsafe {
                    stream.copy_peer_async(
                        b.out_dst[j].ptr(),
                        &fdev,
                        b.out_src[j].ptr(),
                        adev,
                        p.dispatch,
                    )
                }?;
            }
        }
        sync_all(&s)?;
        for (i, p) in pairs.iter().enumerate() {
            let (fdev, stream) = stream_of(&s, p.ffn_device)?;
            let adev = Device::get(p.attention_device)?;
            fdev.bind()?;
            for k in 0..st {
                let j = i * st + k;
                // SAFETY: as above, `combine` bytes each.
                unsafe {
                    stream.copy_peer_async(
                        b.back_dst[j].ptr(),
                        &adev,
                        b.back_src[j].ptr(),
                        fdev,
                        p.combine,
                    )
                }?;
            }
        }
        sync_all(&s)?;
        if layer >= warmup {
            h.record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(h)
}

type NcclComm = *mut c_void;

struct Nccl {
    comm_init_all: unsafe extern "C" fn(*mut NcclComm, c_int, *const c_int) -> c_int,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> c_int,
    group_start: unsafe extern "C" fn() -> c_int,
    group_end: unsafe extern "C" fn() -> c_int,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

fn load_nccl() -> Result<Nccl> {
    let path = std::env::var("AFMESH_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
    let c = CString::new(path.clone()).map_err(|_| Error::invalid("NCCL path holds NUL"))?;
    // SAFETY: a NUL-terminated path; loading libnccl runs its initialisers.
    let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return Err(Error::Unsupported(format!(
            "NCCL is not available: {path} could not be loaded (set AFMESH_NCCL_LIBRARY)"
        )));
    }
    let sym = |name: &str| -> Result<*mut c_void> {
        let n = CString::new(name).map_err(|_| Error::invalid("symbol name"))?;
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(lib, n.as_ptr()) };
        if p.is_null() {
            Err(Error::Unsupported(format!("NCCL: {path} has no {name}")))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each address is libnccl's exported function of that name,
    // whose C signature (nccl.h) is the field's type.
    unsafe {
        Ok(Nccl {
            comm_init_all: as_fn(sym("ncclCommInitAll")?),
            comm_destroy: as_fn(sym("ncclCommDestroy")?),
            group_start: as_fn(sym("ncclGroupStart")?),
            group_end: as_fn(sym("ncclGroupEnd")?),
            send: as_fn(sym("ncclSend")?),
            recv: as_fn(sym("ncclRecv")?),
            error_string: as_fn(sym("ncclGetErrorString")?),
        })
    }
}

/// # Safety
/// `p` must be the address of a function whose type is `F`.
unsafe fn as_fn<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller's contract; sizes are equal (checked).
    unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) }
}

fn nccl_check(n: &Nccl, rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
    let msg = unsafe {
        let p = (n.error_string)(rc);
        if p.is_null() {
            format!("ncclResult {rc}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::io(
        format!("NCCL {what}"),
        std::io::Error::other(msg),
    ))
}

/// NCCL send/recv of the same pattern as [`copy_engine`]; nanoseconds per
/// layer. [`Error::Unsupported`] without libnccl.
pub fn nccl(pairs: &[Pair], stages: u32, warmup: u32, iters: u32) -> Result<Histogram> {
    let n = load_nccl()?;
    let s = streams(pairs)?;
    let devs: Vec<c_int> = s.iter().map(|(d, _)| d.ordinal()).collect();
    let rank_of = |d: i32| devs.iter().position(|&x| x == d).unwrap_or(0);
    let b = buffers(pairs, stages)?;
    let mut comms: Vec<NcclComm> = vec![std::ptr::null_mut(); devs.len()];
    nccl_check(
        &n,
        // SAFETY: `comms` has room for one communicator per listed device.
        unsafe { (n.comm_init_all)(comms.as_mut_ptr(), devs.len() as c_int, devs.as_ptr()) },
        "ncclCommInitAll",
    )?;
    let st = stages as usize;
    // One direction of a layer: every pair's bytes of every stage.
    let phase = |back: bool| -> Result<()> {
        // SAFETY: group calls take no arguments.
        nccl_check(&n, unsafe { (n.group_start)() }, "ncclGroupStart")?;
        for (i, p) in pairs.iter().enumerate() {
            let (from, to, bytes) = if back {
                (p.ffn_device, p.attention_device, p.combine)
            } else {
                (p.attention_device, p.ffn_device, p.dispatch)
            };
            for k in 0..st {
                let j = i * st + k;
                let (src, dst) = if back {
                    (b.back_src[j].ptr(), b.back_dst[j].ptr())
                } else {
                    (b.out_src[j].ptr(), b.out_dst[j].ptr())
                };
                let (fr, tr) = (rank_of(from), rank_of(to));
                if fr == tr {
                    let (dev, stream) = &s[fr];
                    dev.bind()?;
                    // SAFETY: live buffers of `bytes`, synced before reuse.
                    unsafe { stream.copy_async(dst, src, bytes) }?;
                    continue;
                }
                // SAFETY: live device buffers of `bytes` on the comms'
                // devices, and the streams of those devices; int8 type 0.
                unsafe {
                    nccl_check(
                        &n,
                        (n.send)(
                            src as *const c_void,
                            bytes,
                            0,
                            tr as c_int,
                            comms[fr],
                            s[fr].1.raw(),
                        ),
                        "ncclSend",
                    )?;
                    nccl_check(
                        &n,
                        (n.recv)(
                            dst as *mut c_void,
                            bytes,
                            0,
                            fr as c_int,
                            comms[tr],
                            s[tr].1.raw(),
                        ),
                        "ncclRecv",
                    )?;
                }
            }
        }
        // SAFETY: as above.
        nccl_check(&n, unsafe { (n.group_end)() }, "ncclGroupEnd")?;
        sync_all(&s)
    };
    let mut h = Histogram::new();
    let mut result = Ok(());
    for layer in 0..warmup + iters {
        let t0 = Instant::now();
        if let Err(e) = phase(false).and_then(|()| phase(true)) {
            result = Err(e);
            break;
        }
        if layer >= warmup {
            h.record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    for c in comms {
        if !c.is_null() {
            // SAFETY: a communicator ncclCommInitAll made, destroyed once.
            unsafe { (n.comm_destroy)(c) };
        }
    }
    result.map(|()| h)
}
