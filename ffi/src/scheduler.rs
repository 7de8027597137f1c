//! The rendezvous server from C, for the process a StepMesh-style launch
//! starts with `DMLC_ROLE=scheduler` (or any program that hosts the
//! server itself rather than running `afmesh scheduler`):
//! [`afmesh_env_role`] says what the environment makes this process, and
//! [`afmesh_scheduler`] serves a mesh's rendezvous on a thread of its own.

use std::ffi::{c_char, CString};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;

use afmesh_core::{Error, MeshConfig, Role};

use crate::args::{ms, obj_ref};
use crate::config::{afmesh_config, config_of};
use crate::error::afmesh_result::{self, AFMESH_ERR_BUSY, AFMESH_ERR_TIMEOUT};
use crate::error::{boundary, invalid, Fail};

/// `afmesh_env_role`: the environment names no role.
pub const AFMESH_ROLE_NONE: u32 = 0;
/// `afmesh_env_role`: an attention rank (`worker`).
pub const AFMESH_ROLE_ATTENTION: u32 = 1;
/// `afmesh_env_role`: an FFN rank (`server`).
pub const AFMESH_ROLE_FFN: u32 = 2;
/// `afmesh_env_role`: the rendezvous server (`scheduler`): make an
/// `afmesh_scheduler`, not a rank.
pub const AFMESH_ROLE_SCHEDULER: u32 = 3;

/// A rendezvous server running on a thread of its own (opaque). It serves
/// one mesh: it ends when every rank of the mesh that formed has left,
/// or with an error when none forms within its join timeout (60 s from
/// the start or from the last failed attempt).
#[derive(Debug)]
pub struct afmesh_scheduler {
    addr: CString,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Running(Receiver<Result<(), Error>>),
    Done(Result<(), (afmesh_result, String)>),
}

/// Reads `AFMESH_ROLE` or `DMLC_ROLE` (with the rest of the
/// configuration, which must be valid) and writes one of
/// `AFMESH_ROLE_NONE`, `_ATTENTION`, `_FFN` or `_SCHEDULER` to `*out`.
/// A StepMesh launch script starts every process alike and tells them
/// apart by `DMLC_ROLE`: this is how a C program does the same.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_env_role(out: *mut u32) -> afmesh_result {
    boundary("afmesh_env_role", || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let cfg = MeshConfig::from_env()?;
        let role = match (cfg.is_scheduler, cfg.role) {
            (true, _) => AFMESH_ROLE_SCHEDULER,
            (false, Some(Role::Attention)) => AFMESH_ROLE_ATTENTION,
            (false, Some(Role::Ffn)) => AFMESH_ROLE_FFN,
            (false, None) => AFMESH_ROLE_NONE,
        };
        // SAFETY: checked non-NULL; writable per the contract.
        unsafe { out.write(role) };
        Ok(())
    })
}

/// Starts a rendezvous server listening on `cfg->scheduler` (port 0
/// picks one; see `afmesh_scheduler_address`) for a mesh of
/// `cfg->num_attention` + `cfg->num_ffn` ranks of `cfg->job`. Without a
/// cluster token, bind a loopback address.
///
/// # Safety
/// `cfg` is NULL or a valid config (see `afmesh_attention_new`); `out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_scheduler_new(
    cfg: *const afmesh_config,
    out: *mut *mut afmesh_scheduler,
) -> afmesh_result {
    boundary("afmesh_scheduler_new", || {
        // SAFETY: forwarded contract.
        let (cfg, _) = unsafe { config_of(cfg) }?;
        // SAFETY: forwarded contract.
        unsafe { start(&cfg, out) }
    })
}

/// Starts a rendezvous server as the environment describes it, where its
/// ranks connect: `AFMESH_SCHEDULER`, or `DMLC_PS_ROOT_URI` and
/// `DMLC_PS_ROOT_PORT`; M and N from `AFMESH_NUM_*`, or
/// `DMLC_NUM_WORKER` / `DMLC_NUM_SERVER`, for each of `DMLC_GROUP_SIZE`
/// meshes (instance groups); the job and cluster token as ranks read them.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_scheduler_new_from_env(
    out: *mut *mut afmesh_scheduler,
) -> afmesh_result {
    boundary("afmesh_scheduler_new_from_env", || {
        let cfg = MeshConfig::from_env()?;
        // SAFETY: forwarded contract.
        unsafe { start(&cfg, out) }
    })
}

/// # Safety
/// `out` is NULL or writable.
unsafe fn start(cfg: &MeshConfig, out: *mut *mut afmesh_scheduler) -> Result<(), Fail> {
    crate::log::init();
    if out.is_null() {
        return Err(invalid("out is NULL"));
    }
    let server = cfg.bind_scheduler()?;
    let addr = server.local_addr()?.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("afmesh-scheduler".into())
        .spawn(move || {
            // The handle may be gone (freed early): nobody to tell.
            let _ = tx.send(server.run().map(|_| ()));
        })
        .map_err(|e| Error::Io {
            op: "spawn the scheduler thread".into(),
            source: e,
        })?;
    let h = Box::new(afmesh_scheduler {
        addr: CString::new(addr).map_err(|_| invalid("address holds a NUL"))?,
        state: Mutex::new(State::Running(rx)),
    });
    // SAFETY: checked non-NULL.
    unsafe { out.write(Box::into_raw(h)) };
    Ok(())
}

/// The address the server listens on, `"host:port"`, into `*out`; valid
/// until `afmesh_scheduler_free`. Thread-safe.
///
/// # Safety
/// `s` is NULL or a live scheduler; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn afmesh_scheduler_address(
    s: *const afmesh_scheduler,
    out: *mut *const c_char,
) -> afmesh_result {
    boundary("afmesh_scheduler_address", || {
        // SAFETY: forwarded contract.
        let s = unsafe { obj_ref(s, "scheduler") }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: checked non-NULL; writable per the contract.
        unsafe { out.write(s.addr.as_ptr()) };
        Ok(())
    })
}

/// Waits up to `timeout_ms` (0: just looks) for the server to finish.
/// `AFMESH_OK`: its mesh formed and every rank has left.
/// `AFMESH_ERR_TIMEOUT`: still serving (call again). Any other code: the
/// server failed (e.g. no mesh formed within its join timeout; the
/// message says). Once finished, every later call returns the
/// same. One thread at a time: another thread's call meanwhile gets
/// `AFMESH_ERR_BUSY`.
///
/// # Safety
/// `s` is NULL or a live scheduler.
#[no_mangle]
pub unsafe extern "C" fn afmesh_scheduler_wait(
    s: *const afmesh_scheduler,
    timeout_ms: u32,
) -> afmesh_result {
    boundary("afmesh_scheduler_wait", || {
        // SAFETY: forwarded contract.
        let s = unsafe { obj_ref(s, "scheduler") }?;
        let mut state = s.state.try_lock().map_err(|_| {
            Fail(
                AFMESH_ERR_BUSY,
                "another thread is waiting on this scheduler".into(),
            )
        })?;
        if let State::Running(rx) = &*state {
            let done = match rx.recv_timeout(ms(timeout_ms)) {
                Ok(r) => r.map_err(|e| {
                    let f = Fail::from(e);
                    (f.0, f.1)
                }),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Fail(
                        AFMESH_ERR_TIMEOUT,
                        format!(
                            "the scheduler at {} is still serving after {timeout_ms} ms",
                            s.addr.to_string_lossy()
                        ),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => Err((
                    afmesh_result::AFMESH_ERR_PANIC,
                    "the scheduler thread ended without a result".into(),
                )),
            };
            *state = State::Done(done);
        }
        match &*state {
            State::Done(Ok(())) => Ok(()),
            State::Done(Err((code, msg))) => Err(Fail(*code, msg.clone())),
            State::Running(_) => Err(Fail(
                afmesh_result::AFMESH_ERR_PANIC,
                "scheduler state".into(),
            )),
        }
    })
}

/// Frees the handle; NULL does nothing. A server still serving keeps
/// running on its thread (and holds its port) until its mesh finishes or
/// its join timeout passes: wait for `AFMESH_OK` first to end it cleanly.
/// No other call on `s` may run during or after this.
///
/// # Safety
/// `s` is NULL or a live scheduler not used after this call.
#[no_mangle]
pub unsafe extern "C" fn afmesh_scheduler_free(s: *mut afmesh_scheduler) {
    let _ = boundary("afmesh_scheduler_free", || {
        if !s.is_null() {
            // SAFETY: from `Box::into_raw` in `start`; the caller gives it up.
            drop(unsafe { Box::from_raw(s) });
        }
        Ok(())
    });
}
