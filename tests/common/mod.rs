//! Spawning the project's own binary in tests: every wait bounded, every
//! child killed on every path out.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

mod proc;
pub use proc::Proc;

pub fn afmesh() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afmesh"));
    for k in [
        "AFMESH_LOG",
        "AFMESH_TRANSPORT",
        "AFMESH_JOB",
        "AFMESH_HOST_ID",
        "AFMESH_POLL",
        "AFMESH_CPU",
        "AFMESH_TOKEN",
        "AFMESH_TOKEN_FILE",
    ] {
        c.env_remove(k);
    }
    c
}

/// Segment files of `job` left in /dev/shm.
pub fn leftover_segments(job: &str) -> Vec<String> {
    let prefix = format!("afmesh.{job}.");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts `afmesh scheduler` on a free port; returns it and its address.
pub fn scheduler(extra: &[&str]) -> (Proc, String) {
    let mut cmd = afmesh();
    cmd.args(["scheduler", "--bind", "127.0.0.1:0"]).args(extra);
    let p = Proc::spawn("scheduler", cmd);
    let line = p.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (p, addr)
}

/// `afmesh run` for one rank.
pub fn rank(role: &str, rank: u32, sched: &str, m: u32, n: u32, extra: &[&str]) -> Proc {
    rank_env(role, rank, sched, m, n, extra, &[])
}

/// `afmesh run` for one rank, with extra environment.
pub fn rank_env(
    role: &str,
    rank: u32,
    sched: &str,
    m: u32,
    n: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = afmesh();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args([
        "run",
        "--role",
        role,
        "--scheduler",
        sched,
        "--rank",
        &rank.to_string(),
    ])
    .args(["--attention", &m.to_string(), "--ffn", &n.to_string()])
    .args(extra);
    Proc::spawn(&format!("{role} {rank}"), cmd)
}
