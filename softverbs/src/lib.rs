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
//! * Atomics (compare-and-swap, fetch-and-add) read, compute and write
//!   the target's 8 bytes the same way, under one lock for the namespace.
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
//! one device `softverbs0`. Each device keeps its own objects and keys (a
//! QP takes no CQ or SRQ of another device; one device's keys fail on
//! another's QPs), all on one fabric. `SOFTVERBS_LINK_LAYER=ethernet` makes ports
//! RoCE-like (LID 0, address by GID, a GRH required; the GID table laid
//! out as mlx5's: 0/1 link-local RoCE v1/v2, 2/3 IPv4-mapped RoCE v1/v2).
//! `SOFTVERBS_NAMESPACE` separates unrelated jobs (default `default`);
//! processes that talk must share it. `SOFTVERBS_FAULT` injects errors
//! for tests (see the `fault` module: `wr:<n>:<status>`,
//! `qp:<k>:wr:<n>:<status>`, status `fatal`, `port-err:<ms>`,
//! `port-active:<ms>`). `SOFTVERBS_ACK_DELAY_US` delays initiator
//! completions (default 0). `SOFTVERBS_DEBUG` says why work is retried.
//!
//! # The specification
//!
//! The verbs man pages and rdma-core's behaviour for a provider: optional
//! memory access flags (`IBV_ACCESS_OPTIONAL_RANGE`, e.g. relaxed
//! ordering) are accepted and ignored; unknown ones are EINVAL, on-demand
//! paging EOPNOTSUPP, unmapped memory EFAULT; verbs of absent features
//! answer as rdma-core's dummy ops do (EOPNOTSUPP: `ibv_reg_dmabuf_mr`,
//! `ibv_rereg_mr`, `ibv_resize_cq`, address handles, multicast, ECE,
//! imports); destroying a PD, CQ or SRQ still in use is EBUSY.
//! Asynchronous events (`ibv_get_async_event` on the context's
//! `async_fd`) are raised for this process's objects: `QP_FATAL` (fault
//! switch), `QP_LAST_WQE_REACHED` (a QP on an SRQ enters the error state),
//! `SRQ_LIMIT_REACHED` and `CQ_ERR` (an armed SRQ fell below its limit, a
//! CQ overflowed: both seen at the owner's next CQ poll, since a peer's
//! process does the taking and pushing), `PORT_ERR` / `PORT_ACTIVE` (fault
//! switch).
//!
//! # Not emulated
//!
//! UD/UC/XRC queue pairs, address handles and multicast; atomics beyond
//! `IBV_ATOMIC_HCA` (they are atomic among the namespace's atomic work
//! requests, not against the target's CPU); memory windows, on-demand paging, dma-buf and device memory,
//! re-registration, CQ resizing, SRQ resizing; the SQD state and alternate
//! paths; the extended (`_ex`) verbs (`ibv_qp_to_qp_ex` returns NULL;
//! `ibv_create_cq_ex`, and `ibv_create_qp_ex` with more than a PD, take
//! the header's EOPNOTSUPP path); async events for errors a peer causes (a
//! responder QP that a short receive put in error raises nothing;
//! `COMM_EST`, `SQ_DRAINED`, path migration never happen); destroying an
//! object does not wait for its unacknowledged async events.

#![deny(unsafe_op_in_unsafe_fn)]
// The C mirrors hold raw pointers and unions; Debug on them is noise.
#![allow(missing_debug_implementations)]

pub mod abi;
mod channel;
mod cq;
mod device;
mod events;
mod fabric;
mod fault;
mod gid;
mod memory;
mod qp;
mod ring;
mod shm;
mod srq;
mod unsupported;

use std::panic::{catch_unwind, AssertUnwindSafe};

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
