//! The bench's progress: a bar on stderr when it is a terminal (here a
//! pseudo-terminal from `script(1)`), plain lines otherwise (the sweep
//! test in `sweep.rs` checks those).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::Proc;

#[test]
fn a_terminal_gets_a_progress_bar_instead_of_lines() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no script(1) to give the bench a terminal");
        return;
    }
    let bench = format!(
        "{} bench --sweep tokens=1,2 --hidden 8 --stages 1 --iters 200 --warmup 2",
        env!("CARGO_BIN_EXE_afmesh")
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &bench, "/dev/null"]);
    for k in [
        "AFMESH_TRANSPORT",
        "AFMESH_JOB",
        "AFMESH_TRACE",
        "AFMESH_METRICS",
    ] {
        cmd.env_remove(k);
    }
    let mut p = Proc::spawn("bench on a terminal", cmd);
    assert!(
        p.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        p.output()
    );
    let out = p.output();
    assert!(out.contains("afmesh bench ["), "no bar: {out}");
    assert!(out.contains("/2 "), "no position: {out}");
    assert!(
        !out.contains("afmesh bench: point"),
        "plain lines on a terminal: {out}"
    );
    // The table still reaches stdout, row by row.
    let rows = out.matches("1x1 1 ").count();
    assert!(rows >= 2, "{out}");
}
