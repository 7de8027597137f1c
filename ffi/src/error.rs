//! Result codes, the thread-local last error message and the panic
//! boundary every `extern "C"` body runs inside.
//!
//! A failure inside the library is a `Fail`: the code C sees and the
//! message [`afmesh_last_error_message`] returns. `boundary` turns a body's
//! `Result` (or a panic) into the code and records the message.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use afmesh_core::Error;

/// Result codes. The values are part of the ABI and never change.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum afmesh_result {
    /// Success.
    AFMESH_OK = 0,
    /// A NULL pointer or an out-of-range value was passed.
    AFMESH_ERR_INVALID_ARGUMENT = 1,
    /// Bad configuration (the message names the setting).
    AFMESH_ERR_CONFIG = 2,
    /// A bounded wait ran out.
    AFMESH_ERR_TIMEOUT = 3,
    /// A peer's process or link is gone.
    AFMESH_ERR_PEER_LOST = 4,
    /// A stage was dispatched again before its combine completed.
    AFMESH_ERR_STAGE_BUSY = 5,
    /// A peer sent something that breaks the protocol.
    AFMESH_ERR_BAD_FRAME = 6,
    /// A buffer has the wrong size.
    AFMESH_ERR_BUFFER_SIZE = 7,
    /// Authentication or job identity failed.
    AFMESH_ERR_AUTH = 8,
    /// Not supported by this build or transport.
    AFMESH_ERR_UNSUPPORTED = 9,
    /// The handle was finalized or aborted.
    AFMESH_ERR_SHUTDOWN = 10,
    /// An operating-system error.
    AFMESH_ERR_IO = 11,
    /// A bug inside afmesh was caught at the boundary.
    AFMESH_ERR_PANIC = 12,
}

use afmesh_result::*;

pub(crate) struct Fail(pub(crate) afmesh_result, pub(crate) String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::Timeout { .. } => AFMESH_ERR_TIMEOUT,
            Error::PeerLost { .. } => AFMESH_ERR_PEER_LOST,
            Error::StageBusy { .. } => AFMESH_ERR_STAGE_BUSY,
            Error::BadFrame { .. } => AFMESH_ERR_BAD_FRAME,
            Error::BufferSize { .. } => AFMESH_ERR_BUFFER_SIZE,
            Error::Auth(_) => AFMESH_ERR_AUTH,
            Error::Config(_) => AFMESH_ERR_CONFIG,
            Error::Unsupported(_) => AFMESH_ERR_UNSUPPORTED,
            Error::Shutdown(_) => AFMESH_ERR_SHUTDOWN,
            Error::Io { .. } => AFMESH_ERR_IO,
            _ => AFMESH_ERR_IO,
        };
        Fail(code, e.to_string())
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> Fail {
    Fail(AFMESH_ERR_INVALID_ARGUMENT, msg.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs `f` inside the panic boundary and turns its outcome into a code.
pub(crate) fn boundary(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> afmesh_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => AFMESH_OK,
        Ok(Err(Fail(code, msg))) => {
            set_last_error(&format!("{name}: {msg}"));
            code
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "{name}: internal error (panic caught at the C boundary): {what}"
            ));
            AFMESH_ERR_PANIC
        }
    }
}

/// A static description of a result code (any value). Thread-safe; never
/// blocks.
#[no_mangle]
pub extern "C" fn afmesh_result_str(result: i32) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"success",
        1 => c"invalid argument",
        2 => c"configuration error",
        3 => c"timeout",
        4 => c"peer lost",
        5 => c"stage busy",
        6 => c"bad frame",
        7 => c"buffer size",
        8 => c"authentication failed",
        9 => c"unsupported",
        10 => c"shut down",
        11 => c"I/O error",
        12 => c"internal error (panic)",
        _ => c"unknown result code",
    };
    s.as_ptr()
}

/// The message of the last failure on this thread (never NULL; empty if
/// none). Valid until the next failing call on this thread. Thread-safe.
#[no_mangle]
pub extern "C" fn afmesh_last_error_message() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}
