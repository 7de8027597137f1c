//! The verbs backend across processes, on softverbs: the project's own
//! `afmesh` binary under `LD_PRELOAD=libsoftverbs.so` (what a preloaded
//! provider looks like to afmesh), every rank forced onto verbs. Here:
//! meshes that run verified (shapes, sizes, striped QPs, rails, the matrix
//! layout). Peer loss and ranks that cannot start are
//! `tests/verbs_faults.rs`; choosing the library is `tests/verbs_setup.rs`;
//! in-process checks under softverbs are `tests/verbs_inprocess.rs`. The
//! shared mesh helpers are `tests/common/verbs_mesh.rs`.

#![allow(clippy::unwrap_used)]

#[path = "common/cdylib.rs"]
mod cdylib;
mod common;
#[path = "common/verbs_mesh.rs"]
mod verbs_mesh;

use std::time::Duration;

use verbs_mesh::*;

#[test]
fn one_by_one_reference_sizes_verified() {
    let lines = run_verified("1x1", 1, 1, &["--iters", "5", "--warmup", "2"], &[]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// Four QPs per link: the reference messages (0.9 and 1.8 MB) are striped
/// over QPs 1..3, three work requests each, and still land once.
#[test]
fn two_by_two_four_qps_striped_verified() {
    let lines = run_verified(
        "2x2q4",
        2,
        2,
        &["--iters", "5", "--warmup", "2"],
        &[("AFMESH_QPS", "4")],
    );
    for l in &lines {
        assert_counters(l, 3);
    }
}

/// A JSON array of numbers (`"rail_messages":[3,4]`).
fn nums(json: &str, key: &str) -> Vec<u64> {
    let k = format!("\"{key}\":[");
    let at = json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len();
    let rest = &json[at..];
    let body = &rest[..rest.find(']').unwrap()];
    body.split(',')
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{key} in {json}")))
        .collect()
}

/// A rank's per-rail counters: `rails` rails, each carrying messages
/// and bytes, adding up to the rank's messages.
fn assert_rails(line: &str, rails: usize) {
    assert_eq!(num(line, "rails") as usize, rails, "{line}");
    let msgs = nums(line, "rail_messages");
    let bytes = nums(line, "rail_bytes");
    assert_eq!((msgs.len(), bytes.len()), (rails, rails), "{line}");
    assert!(
        msgs.iter().all(|&m| m > 0),
        "every rail carried messages: {line}"
    );
    assert!(
        bytes.iter().all(|&b| b > 0),
        "every rail carried bytes: {line}"
    );
    assert_eq!(msgs.iter().sum::<u64>(), num(line, "messages"), "{line}");
}

/// Two NICs per rank (`AFMESH_IB_DEVICE=softverbs0,softverbs1`): a 2A2F
/// mesh verified, its links spread over both rails on every rank (rail
/// i meets rail i: A_a and F_f meet on rail (a + f) mod 2), and the post
/// path's promises kept.
#[test]
fn two_rails_per_rank_2x2_verified() {
    let lines = run_verified(
        "rails",
        2,
        2,
        &["--iters", "5", "--warmup", "2"],
        &[
            ("SOFTVERBS_DEVICES", "2"),
            ("AFMESH_IB_DEVICE", "softverbs0,softverbs1"),
        ],
    );
    for l in &lines {
        assert_counters(l, 1);
        assert_rails(l, 2);
    }
}

/// Two rails on the attention ranks, one on the FFN ranks: links pair
/// the rails round-robin (said in the log), all verified; the attention
/// ranks still use both of theirs.
#[test]
fn mismatched_rail_counts_pair_round_robin() {
    let two = "softverbs0,softverbs1";
    let mut mesh = start(
        "railmix",
        2,
        2,
        &["--iters", "3", "--warmup", "1"],
        &[("SOFTVERBS_DEVICES", "2")],
        &[
            ("A0", "AFMESH_IB_DEVICE", two),
            ("A1", "AFMESH_IB_DEVICE", two),
            ("A0", "AFMESH_LOG", "afmesh=info"),
            ("F0", "AFMESH_IB_DEVICE", "softverbs1"),
            ("F1", "AFMESH_IB_DEVICE", "softverbs0"),
        ],
    );
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap()
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{line}");
        assert_counters(&line, 1);
        lines.push((p.name.clone(), line, out));
    }
    for (who, line, out) in &lines {
        let rails = if who.starts_with('A') { 2 } else { 1 };
        assert_rails(line, rails);
        if who == "A0" {
            assert!(
                out.contains("paired round-robin"),
                "A0 says how it paired the rails:\n{out}"
            );
        }
    }
    assert!(mesh.sched.wait_exit(Duration::from_secs(10)).success());
}

/// Odd sizes, wider types, 3×2, one QP.
#[test]
fn three_by_two_odd_sizes_verified() {
    let args = [
        "--tokens",
        "7",
        "--hidden",
        "33",
        "--dispatch-dtype",
        "bf16",
        "--combine-dtype",
        "f32",
        "--iters",
        "5",
        "--warmup",
        "1",
    ];
    let lines = run_verified("3x2", 3, 2, &args, &[("AFMESH_QPS", "1")]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// Eight-byte payloads (one fp8 row of 8), inline, on four QPs: small
/// messages stay one work request on QP 0.
#[test]
fn eight_byte_messages_verified() {
    let args = [
        "--tokens",
        "1",
        "--hidden",
        "8",
        "--dispatch-dtype",
        "fp8",
        "--combine-dtype",
        "fp8",
        "--iters",
        "20",
        "--warmup",
        "2",
    ];
    let lines = run_verified("8b", 1, 1, &args, &[("AFMESH_QPS", "4")]);
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// 4 MiB messages each way (512 rows of 4096 bf16), one QP and four.
#[test]
fn four_mib_messages_verified() {
    let args = [
        "--tokens",
        "512",
        "--hidden",
        "4096",
        "--dispatch-dtype",
        "bf16",
        "--combine-dtype",
        "bf16",
        "--stages",
        "1",
        "--iters",
        "3",
        "--warmup",
        "1",
    ];
    for (qps, stripes) in [("1", 1), ("4", 3)] {
        let lines = run_verified(&format!("4m{qps}"), 1, 1, &args, &[("AFMESH_QPS", qps)]);
        for l in &lines {
            assert_counters(l, stripes);
        }
    }
}

/// Ends asking for different QP counts use the smaller on each link.
#[test]
fn mismatched_qp_counts_use_the_smaller() {
    let mut mesh = start(
        "qpmix",
        1,
        2,
        &["--iters", "3", "--warmup", "1"],
        &[],
        &[("A0", "AFMESH_QPS", "4"), ("F1", "AFMESH_QPS", "2")],
    );
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap()
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{line}");
        lines.push(line);
    }
    // F0 (1 QP) and F1 (2 QPs: its big messages on QP 1, one stripe) send
    // one work request per message; A0's links use 1 and 2 QPs, one each.
    for l in &lines {
        assert_counters(l, 1);
    }
    assert!(mesh.sched.wait_exit(Duration::from_secs(10)).success());
}

/// The matrix stage layout on one QP per link (RC keeps a QP's writes in
/// order): each dispatch is two writes, rows then head, one work request
/// each; every byte verified, the FFN ranks reading the matrix.
#[test]
fn matrix_layout_on_one_qp_verified() {
    let lines = run_verified(
        "matrix",
        2,
        2,
        &[
            "--iters",
            "4",
            "--warmup",
            "3",
            "--layout",
            "matrix",
            "--tokens",
            "64",
            "--hidden",
            "2048",
            "--vary-tokens",
        ],
        &[("AFMESH_QPS", "1")],
    );
    for l in &lines {
        assert_counters(l, 1);
    }
}

/// With several QPs per link verbs stripes large writes, so a link's two
/// writes could land out of order: the matrix layout is refused, naming
/// the way out.
#[test]
fn matrix_layout_on_striped_qps_is_a_clear_error() {
    let mut mesh = start(
        "matrixq4",
        1,
        1,
        &["--layout", "matrix", "--iters", "1", "--warmup", "0"],
        &[("AFMESH_QPS", "4"), ("AFMESH_SETUP_TIMEOUT_MS", "5000")],
        &[],
    );
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(30));
        let out = p.output();
        assert!(
            !st.success(),
            "{}:
{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{out}");
        assert!(
            out.contains("matrix stage layout") && out.contains("AFMESH_QPS=1"),
            "{}:
{out}",
            p.name
        );
    }
    mesh.sched.kill();
}
