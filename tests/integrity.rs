//! `AFMESH_CHECKSUM=1` across real processes: every message carries a
//! CRC32C that the receiver checks, on each real transport; a rank that
//! requires checksums refuses a peer that sends none, naming it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{rank_env, scheduler};

fn job(tag: &str) -> String {
    format!("test-crc-{tag}-{}", std::process::id())
}

fn checksummed_run_verifies(transport: &str) {
    let job = job(transport);
    let (mut sched, addr) = scheduler(&[]);
    let env = [
        ("AFMESH_TRANSPORT", transport),
        ("AFMESH_JOB", job.as_str()),
        ("AFMESH_CHECKSUM", "1"),
        ("AFMESH_LOG", "afmesh=info"),
    ];
    let work = ["--tokens", "8", "--hidden", "512", "--iters", "200"];
    let mut ranks = [
        rank_env("ffn", 0, &addr, 1, 1, &work, &env),
        rank_env("attention", 0, &addr, 1, 1, &work, &env),
    ];
    for p in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(30));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        assert!(out.contains("CRC32C checksums on"), "{}:\n{out}", p.name);
    }
    let a = ranks[1].output();
    assert!(
        a.contains("200 layers") && a.contains(" 0 verification errors"),
        "{a}"
    );
    assert!(sched.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn checksummed_run_verifies_over_shm() {
    checksummed_run_verifies("shm");
}

#[test]
fn checksummed_run_verifies_over_tcp() {
    checksummed_run_verifies("tcp");
}

/// An FFN rank that requires checksums and an attention rank that sends
/// none: the FFN rank fails with a bad frame naming A0, not a timeout.
#[test]
fn a_peer_without_checksums_is_refused_by_name() {
    let job = job("mixed");
    let (_sched, addr) = scheduler(&[]);
    let base = [("AFMESH_TRANSPORT", "shm"), ("AFMESH_JOB", job.as_str())];
    let work = [
        "--tokens",
        "4",
        "--hidden",
        "64",
        "--iters",
        "20",
        "--timeout-ms",
        "20000",
    ];
    let mut with = base.to_vec();
    with.push(("AFMESH_CHECKSUM", "1"));
    let mut f = rank_env("ffn", 0, &addr, 1, 1, &work, &with);
    let mut a = rank_env("attention", 0, &addr, 1, 1, &work, &base);
    let st = f.wait_exit(Duration::from_secs(10));
    let out = f.output();
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(
        out.contains("bad frame from A0") && out.contains("AFMESH_CHECKSUM"),
        "{out}"
    );
    // A0 then sees its peer go, well before its 20 s wait bound.
    let st = a.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{}", a.output());
}

/// Checksums are computed by the CPU, which never reads device memory: a
/// device rank asking for them is refused at once, naming the setting,
/// before it contacts anyone (the scheduler address here is unreachable).
#[test]
fn checksums_with_device_memory_are_refused_before_joining() {
    let mut cfg = afmesh::MeshConfig::new("127.0.0.1:1", 1, 1);
    cfg.checksum = true;
    cfg.setup_timeout = Duration::from_secs(30);
    let mesh = afmesh::Mesh::new(cfg);
    let spec = afmesh::StageSpec {
        stages: 1,
        max_tokens: 4,
        row_bytes: 64,
        out_row_bytes: 64,
        side_bytes: 0,
    };
    let t0 = std::time::Instant::now();
    let e = mesh.attention_on_device(spec, 0).unwrap_err().to_string();
    assert!(e.contains("AFMESH_CHECKSUM"), "{e}");
    let e = mesh.ffn_on_device(spec, 0).unwrap_err().to_string();
    assert!(e.contains("AFMESH_CHECKSUM"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}
