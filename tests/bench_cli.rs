//! `afmesh bench` as a command: stopped by SIGTERM, SIGINT or SIGKILL it
//! leaves no rank running, and arguments no host can run are clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{afmesh, Proc};

/// Live processes whose environment names `AFMESH_JOB=job` (a zombie has
/// no environment left to read, so it does not count).
fn processes_of_job(job: &str) -> Vec<u32> {
    let want = format!("AFMESH_JOB={job}");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// SIGTERM, SIGINT or SIGKILL of `afmesh bench` mid-run: within a few
/// seconds none of its ranks runs. TERM and INT go through the bench's
/// wait loop (it kills and reaps them, and exits 128+signal); KILL through
/// the ranks' parent-death signal.
#[test]
fn a_stopped_bench_leaves_no_rank_running() {
    for (sig, code) in [("TERM", Some(143)), ("INT", Some(130)), ("KILL", None)] {
        let mut cmd = afmesh();
        cmd.args(["bench", "--attention", "2", "--ffn", "1", "--tokens", "1"])
            .args(["--hidden", "8", "--stages", "1", "--warmup", "0"])
            .args(["--iters", "1000000000", "--transport", "tcp"]);
        // The ranks inherit the bench's stderr: their "joined" lines say
        // the mesh is up and running its layers.
        cmd.env("AFMESH_LOG", "afmesh=info");
        let mut bench = Proc::spawn(&format!("bench for SIG{sig}"), cmd);
        let job = format!("bench-{}", bench.id());
        let up = wait_until(Duration::from_secs(30), || {
            bench.output().matches("rank joined").count() == 3
        });
        assert!(up, "SIG{sig}: the mesh never formed:\n{}", bench.output());
        assert_eq!(processes_of_job(&job).len(), 3, "{}", bench.output());
        signal(bench.id(), sig);
        let st = bench.wait_exit(Duration::from_secs(10));
        let gone = wait_until(Duration::from_secs(5), || processes_of_job(&job).is_empty());
        let left = processes_of_job(&job);
        for pid in &left {
            signal(*pid, "KILL");
        }
        assert!(gone, "SIG{sig}: ranks {left:?} outlived the bench");
        assert_eq!(st.code(), code, "SIG{sig}: {st}\n{}", bench.output());
        if code.is_some() {
            let out = bench.output();
            assert!(out.contains("stopped by signal"), "SIG{sig}: {out}");
        }
    }
}

/// Arguments no host can run are refused up front, naming the flag or
/// variable, with an error exit instead of an abort on an allocation.
#[test]
fn absurd_arguments_are_clear_errors() {
    // (arguments, environment, what the error must name)
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 6] = [
        (
            &["run", "--warmup", "10", "--iters", "4294967290"],
            &[],
            "--iters",
        ),
        (
            &["bench", "--warmup", "10", "--iters", "4294967290"],
            &[],
            "--iters",
        ),
        (
            &[
                "bench",
                "--tokens",
                "20000",
                "--hidden",
                "100000",
                "--attention",
                "64",
            ],
            &[],
            "this host has",
        ),
        (&["run", "--timeout-ms", "0"], &[], "--timeout-ms"),
        (
            &["run"],
            &[("AFMESH_IO_TIMEOUT_MS", "0")],
            "AFMESH_IO_TIMEOUT_MS",
        ),
        (
            &["run"],
            &[("AFMESH_SETUP_TIMEOUT_MS", "0")],
            "AFMESH_SETUP_TIMEOUT_MS",
        ),
    ];
    for (args, env, named) in cases {
        let mut cmd = afmesh();
        cmd.args(args)
            .args([
                "--scheduler",
                "127.0.0.1:1",
                "--attention",
                "1",
                "--ffn",
                "1",
            ])
            .envs(env.iter().copied());
        // The bench has no --scheduler: its own flags only.
        if args[0] == "bench" {
            cmd = afmesh();
            cmd.args(args);
        }
        let mut p = Proc::spawn(&format!("{args:?} {env:?}"), cmd);
        let st = p.wait_exit(Duration::from_secs(30));
        let out = p.output();
        assert!(
            matches!(st.code(), Some(1 | 2)),
            "{args:?} {env:?}: {st}\n{out}"
        );
        assert!(
            out.contains(named),
            "{args:?} {env:?}: {named} not named:\n{out}"
        );
    }
}
