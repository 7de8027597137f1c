//! Verbs on softverbs when things fail: a killed rank or an injected error
//! completion is a lost peer everywhere, and a rank that cannot start (no
//! library, no device, a bad device in a rail list) names why.

#![allow(clippy::unwrap_used)]

#[path = "common/cdylib.rs"]
mod cdylib;
mod common;
#[path = "common/verbs_mesh.rs"]
mod verbs_mesh;

use std::time::Duration;

use common::{rank_command, scheduler, Proc};
use verbs_mesh::*;

/// Ranks that stop with an error: each must exit 1 (never a signal or a
/// hang) reporting a lost peer, and name `who`.
fn assert_all_lost(mesh: &mut Mesh, skip: Option<usize>, who: &str) {
    for (i, p) in mesh.ranks.iter_mut().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let st = p.wait_exit(Duration::from_secs(15));
        let out = p.output();
        assert_eq!(st.code(), Some(1), "{} must fail, not hang:\n{out}", p.name);
        assert!(
            out.contains("peer lost") || out.contains("lost"),
            "{} must report a lost peer:\n{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{}:\n{out}", p.name);
    }
    let text: String = mesh.ranks.iter().map(|p| p.output()).collect();
    assert!(text.contains(who), "someone names {who}:\n{text}");
}

const ENDLESS: [&str; 8] = [
    "--tokens",
    "16",
    "--hidden",
    "1024",
    "--iters",
    "1000000",
    "--timeout-ms",
    "3000",
];

/// SIGKILL of an FFN rank mid-run: every other rank sees a lost peer
/// within its timeout (the attention ranks through their failed writes or
/// probes, the other FFN rank through the attention ranks leaving).
#[test]
fn sigkill_of_a_rank_is_peer_lost_everywhere() {
    let mut mesh = start("kill", 2, 2, &ENDLESS, &[], &[]);
    for p in &mesh.ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    // FFN ranks come first: index 1 is F1.
    mesh.ranks[1].kill();
    assert_all_lost(&mut mesh, Some(1), "F1");
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
}

/// An error completion injected by softverbs' fault switch on A0's 40th
/// work request: the link goes down with the verbs status named, A0 and
/// its peer see a lost peer, nothing hangs.
#[test]
fn injected_error_completion_is_peer_lost() {
    let mut mesh = start(
        "fault",
        1,
        1,
        &ENDLESS,
        &[],
        &[("A0", "SOFTVERBS_FAIL_WR", "40:10")],
    );
    assert_all_lost(&mut mesh, None, "F0");
    let a0 = mesh.ranks[1].output();
    assert!(
        a0.contains("IBV_WC_REM_ACCESS_ERR") && a0.contains("softverbs0:1"),
        "A0 names the status and the rail's device:\n{a0}"
    );
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
}

/// One rank on verbs that cannot start: it fails at once with `what`.
fn lone_rank_fails(env: &[(&str, &str)], what: &[&str]) {
    let (_sched, addr) = scheduler(&[]);
    let mut cmd = rank_command("ffn", 0, &addr, 1, 1, &["--timeout-ms", "3000"], env);
    cmd.env("AFMESH_TRANSPORT", "verbs");
    let mut p = Proc::spawn("F0", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    assert!(!st.success(), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        what.iter().any(|w| out.contains(w)),
        "expected one of {what:?}:\n{out}"
    );
}

#[test]
fn a_missing_verbs_library_is_named() {
    lone_rank_fails(
        &[("AFMESH_VERBS_LIB", "/nonexistent/libibverbs.so.1")],
        &["/nonexistent/libibverbs.so.1"],
    );
}

#[test]
fn no_rdma_device_is_named() {
    let so = softverbs();
    lone_rank_fails(
        &[("LD_PRELOAD", &so), ("SOFTVERBS_DEVICES", "0")],
        &["no RDMA device"],
    );
    // A named device that is not there.
    lone_rank_fails(
        &[("LD_PRELOAD", &so), ("AFMESH_IB_DEVICE", "mlx5_9")],
        &["no RDMA device \"mlx5_9\""],
    );
}

/// A bad name in a list of several NICs is an error naming it (the good
/// ones are not used alone), as is a device listed twice.
#[test]
fn a_bad_device_in_a_rail_list_is_named() {
    let so = softverbs();
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs0,mlx5_9,softverbs1"),
        ],
        &["no RDMA device \"mlx5_9\""],
    );
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs1,softverbs1"),
        ],
        &["softverbs1 is listed twice"],
    );
    lone_rank_fails(
        &[
            ("LD_PRELOAD", &so),
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs1:1,softverbs1"),
        ],
        &["softverbs1:1 is listed twice"],
    );
}
