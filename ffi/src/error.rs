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

// A new code takes the next value here and a row in `result_table!` below
// (the build fails without one); a value is never renumbered or reused.
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
    /// A wait was woken by `afmesh_*_interrupt`; nothing was consumed.
    AFMESH_ERR_INTERRUPTED = 13,
    /// Another thread is inside a call on this handle (one call at a time
    /// per handle; only `_abort` and `_interrupt` may overlap). Nothing
    /// was done.
    AFMESH_ERR_BUSY = 14,
}

/// The one table of result codes: each `afmesh_result` variant with what
/// `afmesh_result_str` says for it, in value order.
///
/// The enum is written out above, not generated here, because cbindgen
/// reads source and cannot see a macro's output. The macro ties the two
/// together at build time: the match it writes has no wildcard arm, so a
/// variant missing from the table (or a row naming no variant) does not
/// compile, and the assertion after it rejects rows out of value order.
macro_rules! result_table {
    ($($code:ident => $text:literal,)+) => {
        /// Every code, in value order: the code with value `i` is at `i`.
        const ALL_RESULTS: &[afmesh_result] = &[$(afmesh_result::$code),+];

        impl afmesh_result {
            /// What `afmesh_result_str` says for this code.
            #[deny(unreachable_patterns)]
            const fn text(self) -> &'static CStr {
                match self {
                    $(afmesh_result::$code => $text,)+
                }
            }
        }
    };
}

result_table! {
    AFMESH_OK => c"success",
    AFMESH_ERR_INVALID_ARGUMENT => c"invalid argument",
    AFMESH_ERR_CONFIG => c"configuration error",
    AFMESH_ERR_TIMEOUT => c"timeout",
    AFMESH_ERR_PEER_LOST => c"peer lost",
    AFMESH_ERR_STAGE_BUSY => c"stage busy",
    AFMESH_ERR_BAD_FRAME => c"bad frame",
    AFMESH_ERR_BUFFER_SIZE => c"buffer size",
    AFMESH_ERR_AUTH => c"authentication failed",
    AFMESH_ERR_UNSUPPORTED => c"unsupported",
    AFMESH_ERR_SHUTDOWN => c"shut down",
    AFMESH_ERR_IO => c"I/O error",
    AFMESH_ERR_PANIC => c"internal error (panic)",
    AFMESH_ERR_INTERRUPTED => c"interrupted",
    AFMESH_ERR_BUSY => c"handle busy",
}

// Rows in value order with no gap or repeat, so `afmesh_result_str` can
// index the table by the value it is given.
const _: () = {
    let mut i = 0;
    while i < ALL_RESULTS.len() {
        assert!(
            ALL_RESULTS[i] as usize == i,
            "result_table rows must be in value order, one per code"
        );
        i += 1;
    }
};

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
            Error::InvalidArgument(_) => AFMESH_ERR_INVALID_ARGUMENT,
            Error::Unsupported(_) => AFMESH_ERR_UNSUPPORTED,
            Error::Shutdown(_) => AFMESH_ERR_SHUTDOWN,
            Error::Interrupted => AFMESH_ERR_INTERRUPTED,
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
    usize::try_from(result)
        .ok()
        .and_then(|i| ALL_RESULTS.get(i))
        .map_or(c"unknown result code", |r| r.text())
        .as_ptr()
}

/// The message of the last failure on this thread (never NULL; empty if
/// none). Valid until the next failing call on this thread. Thread-safe.
#[no_mangle]
pub extern "C" fn afmesh_last_error_message() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(result: i32) -> &'static str {
        // SAFETY: `afmesh_result_str` returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(afmesh_result_str(result)) }
            .to_str()
            .unwrap()
    }

    #[test]
    fn result_str_gives_each_code_its_text() {
        // Pinned: these strings are what C callers have always seen.
        let expected = [
            (AFMESH_OK, "success"),
            (AFMESH_ERR_INVALID_ARGUMENT, "invalid argument"),
            (AFMESH_ERR_CONFIG, "configuration error"),
            (AFMESH_ERR_TIMEOUT, "timeout"),
            (AFMESH_ERR_PEER_LOST, "peer lost"),
            (AFMESH_ERR_STAGE_BUSY, "stage busy"),
            (AFMESH_ERR_BAD_FRAME, "bad frame"),
            (AFMESH_ERR_BUFFER_SIZE, "buffer size"),
            (AFMESH_ERR_AUTH, "authentication failed"),
            (AFMESH_ERR_UNSUPPORTED, "unsupported"),
            (AFMESH_ERR_SHUTDOWN, "shut down"),
            (AFMESH_ERR_IO, "I/O error"),
            (AFMESH_ERR_PANIC, "internal error (panic)"),
            (AFMESH_ERR_INTERRUPTED, "interrupted"),
            (AFMESH_ERR_BUSY, "handle busy"),
        ];
        assert_eq!(ALL_RESULTS.len(), expected.len());
        for (value, (code, want)) in expected.into_iter().enumerate() {
            assert_eq!(code as usize, value);
            assert_eq!(text(code as i32), want);
        }
    }

    #[test]
    fn result_str_of_an_unknown_value() {
        for value in [-1, 15, 999, i32::MIN, i32::MAX] {
            assert_eq!(text(value), "unknown result code", "{value}");
        }
    }
}
