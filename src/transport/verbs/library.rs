//! libibverbs, loaded at run time.
//!
//! Nothing links libibverbs: the build needs only the Rust toolchain and
//! the binary starts on hosts without rdma-core. The first verbs backend
//! of a process resolves every function it calls once, here:
//!
//! 1. `AFMESH_VERBS_LIB` names a library: it is opened and used.
//! 2. Else, when the process already has `ibv_get_device_list` in its
//!    global scope (a provider preloaded with `LD_PRELOAD`, such as
//!    softverbs, or a program linked against libibverbs), every symbol is
//!    taken from there (`dlsym(RTLD_DEFAULT)`). This order matters: a
//!    symbol looked up through the handle of a `dlopen`ed libibverbs
//!    resolves inside that library's own scope and would bypass the
//!    preloaded provider.
//! 3. Else `libibverbs.so.1` is opened with `RTLD_LOCAL`.
//!
//! The data-path verbs (`ibv_post_send`, `ibv_poll_cq`,
//! `ibv_req_notify_cq`, `ibv_post_srq_recv`) are `static inline` in
//! `verbs.h` and call through the context's `ops` table; the backend
//! does the same.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use super::sys::*;

/// Declares the resolved functions: required ones fail loading when
/// missing, optional ones (newer verbs) are `None`.
macro_rules! functions {
    (
        required { $($name:ident : fn($($a:ty),*) -> $r:ty;)* }
        optional { $($oname:ident : fn($($oa:ty),*) -> $or:ty;)* }
    ) => {
        /// The libibverbs functions afmesh calls.
        #[allow(non_snake_case)]
        pub struct Verbs {
            /// Where they came from (for logs and errors).
            pub from: String,
            $(pub $name: unsafe extern "C" fn($($a),*) -> $r,)*
            $(pub $oname: Option<unsafe extern "C" fn($($oa),*) -> $or>,)*
        }

        impl Verbs {
            fn resolve(from: String, lookup: impl Fn(&CStr) -> *mut c_void) -> Result<Verbs, String> {
                Ok(Verbs {
                    $($name: {
                        let c = CString::new(stringify!($name)).map_err(|e| e.to_string())?;
                        let p = lookup(&c);
                        if p.is_null() {
                            return Err(format!("{from} has no symbol {}", stringify!($name)));
                        }
                        // SAFETY: the symbol is the libibverbs function of
                        // that name, whose C signature this type mirrors
                        // (verbs.h, ABI IBVERBS_1.1).
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($a),*) -> $r>(p) }
                    },)*
                    $($oname: {
                        let c = CString::new(stringify!($oname)).map_err(|e| e.to_string())?;
                        let p = lookup(&c);
                        if p.is_null() {
                            None
                        } else {
                            // SAFETY: as above.
                            Some(unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($oa),*) -> $or>(p) })
                        }
                    },)*
                    from,
                })
            }
        }
    };
}

functions! {
    required {
        ibv_get_device_list: fn(*mut c_int) -> *mut *mut ibv_device;
        ibv_free_device_list: fn(*mut *mut ibv_device) -> ();
        ibv_get_device_name: fn(*mut ibv_device) -> *const c_char;
        ibv_open_device: fn(*mut ibv_device) -> *mut ibv_context;
        ibv_close_device: fn(*mut ibv_context) -> c_int;
        ibv_query_device: fn(*mut ibv_context, *mut ibv_device_attr) -> c_int;
        ibv_query_port: fn(*mut ibv_context, u8, *mut ibv_port_attr) -> c_int;
        ibv_query_gid: fn(*mut ibv_context, u8, c_int, *mut ibv_gid) -> c_int;
        ibv_alloc_pd: fn(*mut ibv_context) -> *mut ibv_pd;
        ibv_dealloc_pd: fn(*mut ibv_pd) -> c_int;
        ibv_reg_mr: fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr;
        ibv_dereg_mr: fn(*mut ibv_mr) -> c_int;
        ibv_create_comp_channel: fn(*mut ibv_context) -> *mut ibv_comp_channel;
        ibv_destroy_comp_channel: fn(*mut ibv_comp_channel) -> c_int;
        ibv_create_cq: fn(*mut ibv_context, c_int, *mut c_void, *mut ibv_comp_channel, c_int) -> *mut ibv_cq;
        ibv_destroy_cq: fn(*mut ibv_cq) -> c_int;
        ibv_get_cq_event: fn(*mut ibv_comp_channel, *mut *mut ibv_cq, *mut *mut c_void) -> c_int;
        ibv_ack_cq_events: fn(*mut ibv_cq, u32) -> ();
        ibv_create_srq: fn(*mut ibv_pd, *mut ibv_srq_init_attr) -> *mut ibv_srq;
        ibv_destroy_srq: fn(*mut ibv_srq) -> c_int;
        ibv_create_qp: fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp;
        ibv_modify_qp: fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int;
        ibv_destroy_qp: fn(*mut ibv_qp) -> c_int;
        ibv_wc_status_str: fn(u32) -> *const c_char;
    }
    optional {
        ibv_reg_mr_iova2: fn(*mut ibv_pd, *mut c_void, usize, u64, u32) -> *mut ibv_mr;
        ibv_reg_dmabuf_mr: fn(*mut ibv_pd, u64, usize, u64, c_int, c_int) -> *mut ibv_mr;
        _ibv_query_gid_ex: fn(*mut ibv_context, u32, u32, *mut ibv_gid_entry, u32, usize) -> c_int;
        ibv_query_gid_type: fn(*mut ibv_context, u8, u32, *mut u32) -> c_int;
        ibv_get_async_event: fn(*mut ibv_context, *mut ibv_async_event) -> c_int;
        ibv_ack_async_event: fn(*mut ibv_async_event) -> ();
    }
}

impl std::fmt::Debug for Verbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verbs").field("from", &self.from).finish()
    }
}

/// The default library name.
pub const LIBIBVERBS: &str = "libibverbs.so.1";

/// The process's verbs functions, resolved on first use; the error names
/// the library that could not be loaded.
pub fn verbs() -> Result<&'static Verbs, String> {
    static LIB: OnceLock<Result<Verbs, String>> = OnceLock::new();
    LIB.get_or_init(|| load(std::env::var("AFMESH_VERBS_LIB").ok()))
        .as_ref()
        .map_err(Clone::clone)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Opens `name` and resolves through its handle.
fn open(name: &str) -> Result<Verbs, String> {
    let c = CString::new(name).map_err(|_| format!("library name {name:?} holds a NUL byte"))?;
    // SAFETY: a NUL-terminated path; the handle is kept for the process's
    // life (never closed: the functions stay in use).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "cannot load the verbs library {name}: {} (install rdma-core's libibverbs, or set AFMESH_VERBS_LIB)",
            dl_error()
        ));
    }
    let h = h as usize;
    Verbs::resolve(name.to_string(), move |s| {
        // SAFETY: a live handle and a NUL-terminated name.
        unsafe { libc::dlsym(h as *mut c_void, s.as_ptr()) }
    })
}

fn load(explicit: Option<String>) -> Result<Verbs, String> {
    if let Some(name) = explicit.filter(|n| !n.trim().is_empty()) {
        return open(name.trim());
    }
    let global = |s: &CStr| {
        // SAFETY: RTLD_DEFAULT lookup of a NUL-terminated name.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, s.as_ptr()) }
    };
    if !global(c"ibv_get_device_list").is_null() {
        return Verbs::resolve(
            "the process's own verbs (preloaded or linked)".into(),
            global,
        );
    }
    open(LIBIBVERBS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named() {
        let e = load(Some("/nonexistent/libnoverbs.so.1".into())).unwrap_err();
        assert!(e.contains("/nonexistent/libnoverbs.so.1"), "{e}");
        assert!(e.contains("AFMESH_VERBS_LIB"), "{e}");
    }

    #[test]
    fn a_library_without_verbs_is_named() {
        let e = load(Some("libc.so.6".into())).unwrap_err();
        assert!(e.contains("libc.so.6 has no symbol ibv_"), "{e}");
    }
}
