//! The C ABI of afmesh: `libafmesh.so` / `libafmesh.a` and
//! `include/afmesh.h` (generated from this crate by cbindgen).
//!
//! Conventions (after rustls-ffi and NCCL):
//! * opaque handles with `_new`/`_free` pairs; `_free(NULL)` does nothing;
//! * every fallible function returns an [`afmesh_result`](error::afmesh_result)
//!   whose values are fixed forever;
//!   [`afmesh_last_error_message`](error::afmesh_last_error_message) gives
//!   the detail;
//! * the object comes first and outputs last; outputs are written only on
//!   success; there are no in/out parameters;
//! * every body runs inside a panic boundary: a Rust panic becomes
//!   `AFMESH_ERR_PANIC`, never an unwind into C or an abort;
//! * every pointer is checked for NULL;
//! * configuration is a struct that carries its size and version
//!   (`AFMESH_CONFIG_INIT`), or the environment.
//!
//! A handle is driven by one thread at a time (several handles on several
//! threads are fine): a call on a handle while another thread is inside a
//! call on it fails at once with `AFMESH_ERR_BUSY` and does nothing. Only
//! `afmesh_*_abort` and `afmesh_*_interrupt` may run on any thread at any
//! time (but during or after `_free`, which belongs to the owner); they
//! wake a blocked wait, which returns `AFMESH_ERR_SHUTDOWN` or
//! `AFMESH_ERR_INTERRUPTED`. Functions that wait say so and take a timeout.
//!
//! Only afmesh's public Rust API is used here.

#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod args;
pub mod config;
pub mod error;
pub mod handle;
mod log;

// cbindgen lists functions in the order it reads these modules, so this is
// the header's order: one object at a time (kept apart from rustfmt's sort).
pub mod attention;

pub mod ffn;

pub mod batch;

pub mod scheduler;

use std::ffi::{c_char, CStr};

// Every exported function in the AFMESH_0 version node (see build.rs).
#[cfg(target_os = "linux")]
std::arch::global_asm!(include_str!(concat!(env!("OUT_DIR"), "/symver.s")));

/// The library version, e.g. `"0.1.0"`. Thread-safe; never blocks.
#[no_mangle]
pub extern "C" fn afmesh_version() -> *const c_char {
    static V: &CStr = c"0.1.0";
    V.as_ptr()
}
