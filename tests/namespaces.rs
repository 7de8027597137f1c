//! Ranks in Linux namespaces of their own, spawned as processes: a private
//! `/dev/shm` stands for another host (auto mixes shm and tcp; forced shm is
//! a clear error), and a rank in another pid namespace still shares memory
//! and its death is seen.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{leftover_segments, rank_command, rank_env, scheduler, unique_job, unshared, Proc};

/// A rank with a `/dev/shm` of its own (a private tmpfs in a mount
/// namespace): another host, as far as shared memory can tell.
const OWN_SHM: &str = "mount -t tmpfs tmpfs /dev/shm";

#[test]
fn auto_mixes_shm_and_tcp_by_host() {
    // F1 has a /dev/shm of its own: A0 and A1 reach F0 over shm and F1
    // over tcp. Its host id differs too, but that is only a hint.
    let probe = rank_command("ffn", 1, "-", 2, 2, &[], &[]);
    if unshared(&probe, &["--mount"], OWN_SHM).is_none() {
        eprintln!("skipped: this machine does not permit `unshare --mount` (not root?)");
        return;
    }
    let job = unique_job("mixed");
    let (_sched, addr) = scheduler(&[]);
    let work = [
        "--tokens",
        "16",
        "--hidden",
        "512",
        "--iters",
        "40",
        "--warmup",
        "2",
        "--vary-tokens",
    ];
    let mut ranks = Vec::new();
    for r in 0..2u32 {
        let host = if r == 1 { "elsewhere" } else { "here" };
        let cmd = rank_command(
            "ffn",
            r,
            &addr,
            2,
            2,
            &work,
            &[
                ("AFMESH_JOB", &job),
                ("AFMESH_HOST_ID", host),
                ("AFMESH_LOG", "afmesh=info"),
            ],
        );
        let cmd = if r == 1 {
            unshared(&cmd, &["--mount"], OWN_SHM).unwrap()
        } else {
            cmd
        };
        ranks.push(Proc::spawn(&format!("ffn {r}"), cmd));
    }
    for r in 0..2u32 {
        ranks.push(rank_env(
            "attention",
            r,
            &addr,
            2,
            2,
            &work,
            &[
                ("AFMESH_JOB", &job),
                ("AFMESH_HOST_ID", "here"),
                ("AFMESH_LOG", "afmesh=info"),
            ],
        ));
    }
    for p in &mut ranks {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let a0 = ranks[2].output();
    assert!(a0.contains("A0 -> F0: shm"), "{a0}");
    assert!(a0.contains("A0 -> F1: tcp"), "{a0}");
    assert!(a0.contains("shm+tcp") || a0.contains("tcp+shm"), "{a0}");
    assert_eq!(leftover_segments(&job), Vec::<String>::new());
}

#[test]
fn forced_shm_across_hosts_is_a_clear_error() {
    let probe = rank_command("ffn", 0, "-", 1, 1, &[], &[]);
    if unshared(&probe, &["--mount"], OWN_SHM).is_none() {
        eprintln!("skipped: this machine does not permit `unshare --mount` (not root?)");
        return;
    }
    let (_sched, addr) = scheduler(&[]);
    let work = [
        "--tokens",
        "4",
        "--hidden",
        "64",
        "--iters",
        "2",
        "--timeout-ms",
        "3000",
    ];
    let f = rank_command(
        "ffn",
        0,
        &addr,
        1,
        1,
        &work,
        &[("AFMESH_TRANSPORT", "shm"), ("AFMESH_HOST_ID", "h1")],
    );
    let mut f = Proc::spawn("ffn 0", unshared(&f, &["--mount"], OWN_SHM).unwrap());
    let mut a = rank_env(
        "attention",
        0,
        &addr,
        1,
        1,
        &work,
        &[("AFMESH_TRANSPORT", "shm"), ("AFMESH_HOST_ID", "h2")],
    );
    for p in [&mut f, &mut a] {
        let st = p.wait_exit(Duration::from_secs(40));
        let out = p.output();
        assert_eq!(st.code(), Some(1), "{out}");
    }
    let out = a.output();
    assert!(
        out.contains("AFMESH_TRANSPORT=shm") && out.contains("h1"),
        "{out}"
    );
}

/// Ranks in containers of one node: F0 in a pid namespace of its own (its
/// pid names nobody here, A0's nobody there), both on one `/dev/shm`. A0
/// starts first, so F0's start must not take A0's live segment for a dead
/// process's. The mesh forms over shm and runs verified; then a SIGKILL of
/// F0 is seen by A0 within a second (the lock on F0's segment, not its
/// pid).
#[test]
fn a_rank_in_another_pid_namespace_shares_memory_and_its_death_is_seen() {
    let probe = rank_command("ffn", 0, "-", 1, 1, &[], &[]);
    if unshared(&probe, &["--pid"], "").is_none() {
        eprintln!("skipped: this machine does not permit `unshare --pid` (not root?)");
        return;
    }
    let pair = |job: &str, work: &[&str]| {
        let (sched, addr) = scheduler(&["--attention", "1", "--ffn", "1"]);
        let env = [("AFMESH_TRANSPORT", "shm"), ("AFMESH_JOB", job)];
        let a = rank_env("attention", 0, &addr, 1, 1, work, &env);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while leftover_segments(job).is_empty() {
            assert!(std::time::Instant::now() < deadline, "A0 made no segment");
            std::thread::sleep(Duration::from_millis(5));
        }
        let f = rank_command("ffn", 0, &addr, 1, 1, work, &env);
        let f = Proc::spawn(
            "ffn 0 (own pid namespace)",
            unshared(&f, &["--pid"], "").unwrap(),
        );
        (sched, a, f)
    };
    // A whole run, verified.
    let job = unique_job("pidns-run");
    let work = [
        "--tokens", "16", "--hidden", "256", "--iters", "30", "--json",
    ];
    let (_sched, mut a, mut f) = pair(&job, &work);
    for p in [&mut a, &mut f] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let out = a.output();
    assert!(
        out.contains("\"transport\":\"shm\"") && out.contains("\"errors\":0"),
        "{out}"
    );
    // A death, mid-run.
    let job = unique_job("pidns-kill");
    let work = [
        "--tokens",
        "16",
        "--hidden",
        "256",
        "--iters",
        "100000000",
        "--timeout-ms",
        "5000",
    ];
    let (_sched, mut a, f) = pair(&job, &work);
    for p in [&a, &f] {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    // Both joined: the mesh passed its barrier and runs its layers.
    // unshare's child is F0 (sh execs it); kill it, not unshare.
    let children = format!("/proc/{0}/task/{0}/children", f.id());
    let rank = std::fs::read_to_string(&children).unwrap();
    let rank = rank.split_whitespace().next().expect("F0 runs");
    let killed = std::time::Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-KILL", rank])
        .status()
        .unwrap();
    assert!(st.success());
    let line = a.wait_line(Duration::from_secs(10), |l| l.contains("peer lost"));
    let seen = killed.elapsed();
    assert!(
        seen < Duration::from_secs(1),
        "A0 saw F0's death after {seen:?}: {line}"
    );
    assert!(line.contains("F0"), "{line}");
    eprintln!("A0 saw F0's death {seen:?} after the SIGKILL: {line}");
    let st = a.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{}", a.output());
    assert_eq!(leftover_segments(&job), Vec::<String>::new());
}
