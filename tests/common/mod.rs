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
        "AFMESH_TRACE",
        "AFMESH_METRICS",
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

/// `cmd` run inside new Linux namespaces by `unshare(1)` with `flags`
/// (`--pid`, `--mount`, ...), its environment kept; `setup` is a shell
/// line run inside first (`""` for none). `None` if this machine does not
/// permit it (not root, no unshare, a seccomp policy).
pub fn unshared(cmd: &Command, flags: &[&str], setup: &str) -> Option<Command> {
    let mut probe = Command::new("unshare");
    probe
        .args(flags)
        .args([
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &setup_line(setup, "true"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if !probe.status().is_ok_and(|s| s.success()) {
        return None;
    }
    let mut c = Command::new("unshare");
    c.args(flags)
        .args(["--fork", "--kill-child", "sh", "-c"])
        .arg(setup_line(setup, "exec \"$0\" \"$@\""))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    Some(c)
}

fn setup_line(setup: &str, then: &str) -> String {
    if setup.is_empty() {
        then.to_string()
    } else {
        format!("{setup} && {then}")
    }
}

/// The command `rank_env` runs.
#[allow(clippy::too_many_arguments)]
pub fn rank_command(
    role: &str,
    rank: u32,
    sched: &str,
    m: u32,
    n: u32,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Command {
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
    cmd
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
    let cmd = rank_command(role, rank, sched, m, n, extra, env);
    Proc::spawn(&format!("{role} {rank}"), cmd)
}

/// One rank on `transport`, in job `job`.
#[allow(clippy::too_many_arguments)]
pub fn rank_on(
    transport: &str,
    job: &str,
    role: &str,
    r: u32,
    sched: &str,
    m: u32,
    n: u32,
    extra: &[&str],
) -> Proc {
    rank_env(
        role,
        r,
        sched,
        m,
        n,
        extra,
        &[("AFMESH_TRANSPORT", transport), ("AFMESH_JOB", job)],
    )
}

pub fn unique_job(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

/// Runs `afmesh bench ARGS --json` (within a minute), asserts that it
/// succeeded and verified every byte, and returns its JSON line.
pub fn bench_json(args: &[&str]) -> String {
    let mut cmd = afmesh();
    cmd.arg("bench").args(args).arg("--json");
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("json line")
        .to_string();
    assert_eq!(json_field(&line, "verified"), "true", "{line}");
    line
}

pub fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let rest = &json[json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len()..];
    &rest[..rest.find([',', '}']).unwrap()]
}
