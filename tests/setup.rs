//! Setup as a transaction, and the cluster token, across processes of the
//! project's own binary: a job that cannot form fails every rank at once
//! with the reason, the scheduler takes a fresh attempt right after, and
//! a wrong token is refused while the job goes on.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{afmesh, rank_env as rank, Proc};

/// A long run: it is still going when the test needs it to be.
const LONG: &[&str] = &[
    "--tokens",
    "16",
    "--hidden",
    "256",
    "--iters",
    "1000000",
    "--timeout-ms",
    "5000",
];
/// A short run that finishes on its own.
const SHORT: &[&str] = &[
    "--tokens", "16", "--hidden", "256", "--iters", "20", "--warmup", "1",
];

fn job(tag: &str) -> String {
    format!("setup-{tag}-{}", std::process::id())
}

/// `afmesh scheduler` on a free loopback port, logging joins; extra args.
fn scheduler(extra: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let mut cmd = afmesh();
    cmd.args(["scheduler", "--bind", "127.0.0.1:0"])
        .args(extra)
        .env("AFMESH_LOG", "afmesh=debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = Proc::spawn("scheduler", cmd);
    let line = p.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (p, addr)
}

/// Waits until the scheduler has admitted `n` ranks in total.
fn wait_joined(sched: &Proc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sched.output().matches("rank joined").count() < n {
        assert!(
            Instant::now() < deadline,
            "the scheduler did not admit {n} ranks:\n{}",
            sched.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `p` to exit with an error; returns how long after `t0` it
/// was seen to, and its output.
fn fails(p: &mut Proc, t0: Instant, within: Duration) -> (Duration, String) {
    let st = p.wait_exit(within + Duration::from_secs(10));
    let took = t0.elapsed();
    let out = p.output();
    assert_eq!(st.code(), Some(1), "{} must fail:\n{out}", p.name);
    assert!(!out.contains("panicked"), "{}:\n{out}", p.name);
    assert!(
        took < within,
        "{} failed after {took:?}, more than {within:?}:\n{out}",
        p.name
    );
    (took, out)
}

#[test]
fn geometry_mismatch_fails_every_rank_at_once_naming_rank_and_field() {
    let job = job("geometry");
    let env = [("AFMESH_JOB", job.as_str())];
    let (_sched, addr) = scheduler(&[], &[]);
    let mut f0 = rank(
        "ffn",
        0,
        &addr,
        2,
        1,
        &["--tokens", "128", "--hidden", "256"],
        &env,
    );
    // F0 sets the job's geometry before anyone else joins.
    wait_joined(&_sched, 1);
    let mut a0 = rank(
        "attention",
        0,
        &addr,
        2,
        1,
        &["--tokens", "128", "--hidden", "256"],
        &env,
    );
    wait_joined(&_sched, 2);
    let t0 = Instant::now();
    let mut a1 = rank(
        "attention",
        1,
        &addr,
        2,
        1,
        &["--tokens", "64", "--hidden", "256"],
        &env,
    );
    let reason = "A1 asked for max_tokens 64, the job has 128 (set by F0)";
    for p in [&mut a1, &mut f0, &mut a0] {
        let (took, out) = fails(p, t0, Duration::from_secs(2));
        assert!(
            out.contains(reason),
            "{} must give the reason:\n{out}",
            p.name
        );
        eprintln!("{} failed {took:?} after A1 started", p.name);
    }
    assert!(a1.output().contains("refused this rank"), "{}", a1.output());
    for p in [&f0, &a0] {
        let out = p.output();
        assert!(out.contains("config: the job cannot form"), "{out}");
    }
}

#[test]
fn a_retry_right_after_a_refused_rank_succeeds() {
    let job = job("retry");
    let env = [("AFMESH_JOB", job.as_str())];
    let (mut sched, addr) = scheduler(&["--join-timeout", "30"], &[]);
    let mut f0 = rank("ffn", 0, &addr, 1, 1, LONG, &env);
    wait_joined(&sched, 1);
    // An attention rank of another job: the attempt fails.
    let mut stray = rank(
        "attention",
        0,
        &addr,
        1,
        1,
        LONG,
        &[("AFMESH_JOB", "other")],
    );
    let t0 = Instant::now();
    for p in [&mut stray, &mut f0] {
        let (_, out) = fails(p, t0, Duration::from_secs(5));
        assert!(out.contains("asked for job \"other\""), "{out}");
    }
    // The same scheduler takes the fresh attempt at once.
    let t1 = Instant::now();
    let mut f0 = rank("ffn", 0, &addr, 1, 1, SHORT, &env);
    let mut a0 = rank("attention", 0, &addr, 1, 1, SHORT, &env);
    for p in [&mut f0, &mut a0] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    eprintln!("the retry ran to completion in {:?}", t1.elapsed());
    let st = sched.wait_exit(Duration::from_secs(10));
    let out = sched.output();
    assert!(st.success(), "{out}");
    assert!(out.contains("1 setup attempts failed before it"), "{out}");
}

#[test]
fn a_rank_asked_for_twice_is_refused() {
    let job = job("twice");
    let env = [("AFMESH_JOB", job.as_str())];
    let (sched, addr) = scheduler(&["--attention", "1", "--ffn", "2"], &[]);
    let mut first = rank("ffn", 0, &addr, 1, 2, LONG, &env);
    wait_joined(&sched, 1);
    let t0 = Instant::now();
    let mut second = rank("ffn", 0, &addr, 1, 2, LONG, &env);
    for (which, p) in [("the second", &mut second), ("the first", &mut first)] {
        let (took, out) = fails(p, t0, Duration::from_secs(2));
        assert!(out.contains("F0 is asked for twice"), "{out}");
        eprintln!("{which} F0 failed {took:?} after the second started");
    }
    assert!(second.output().contains("refused this rank"));
}

#[test]
fn a_rank_killed_during_setup_is_reported_to_the_others_within_a_second() {
    let job = job("killed");
    let env = [("AFMESH_JOB", job.as_str())];
    let (sched, addr) = scheduler(&[], &[]);
    let mut ranks = [
        rank("ffn", 0, &addr, 2, 2, LONG, &env),
        rank("ffn", 1, &addr, 2, 2, LONG, &env),
        rank("attention", 0, &addr, 2, 2, LONG, &env),
    ];
    // A1 never comes: the others wait for it, and F1 dies meanwhile.
    wait_joined(&sched, 3);
    let t0 = Instant::now();
    ranks[1].kill();
    for i in [0, 2] {
        let p = &mut ranks[i];
        let (took, out) = fails(p, t0, Duration::from_secs(1));
        assert!(
            out.contains("peer lost: F1"),
            "{} must name F1:\n{out}",
            p.name
        );
        assert!(out.contains("died during setup"), "{out}");
        eprintln!("{} reported F1's death {took:?} after the kill", p.name);
    }
}

#[test]
fn a_late_rank_hears_the_job_already_formed() {
    let job = job("late");
    let env = [("AFMESH_JOB", job.as_str())];
    let (_sched, addr) = scheduler(&[], &[]);
    let f0 = rank("ffn", 0, &addr, 1, 1, LONG, &env);
    let a0 = rank("attention", 0, &addr, 1, 1, LONG, &env);
    for p in [&f0, &a0] {
        p.wait_line(Duration::from_secs(20), |l| {
            l.contains("joined a 1A+1F mesh")
        });
    }
    let t0 = Instant::now();
    let mut late = rank("ffn", 0, &addr, 1, 1, LONG, &env);
    let (took, out) = fails(&mut late, t0, Duration::from_secs(2));
    assert!(out.contains("already formed"), "{out}");
    eprintln!("the late rank was refused after {took:?}");
}

/// A token file under the temp dir, removed on drop.
struct TokenFile(std::path::PathBuf);

impl TokenFile {
    fn new(tag: &str, secret: &str) -> TokenFile {
        let p = std::env::temp_dir().join(format!("afmesh-{tag}-{}.token", std::process::id()));
        std::fs::write(&p, format!("{secret}\n")).unwrap();
        TokenFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_wrong_token_is_auth_within_a_second_while_the_job_forms() {
    let job = job("token");
    let file = TokenFile::new("token", "correct horse battery staple");
    let (mut sched, addr) = scheduler(&["--token-file", file.path()], &[]);
    let good = [
        ("AFMESH_JOB", job.as_str()),
        ("AFMESH_TOKEN_FILE", file.path()),
    ];
    let mut f0 = rank("ffn", 0, &addr, 1, 1, SHORT, &good);
    // Strangers: a wrong token, and none at all.
    for (name, env) in [
        (
            "wrong",
            vec![("AFMESH_JOB", job.as_str()), ("AFMESH_TOKEN", "guess")],
        ),
        ("none", vec![("AFMESH_JOB", job.as_str())]),
    ] {
        let t0 = Instant::now();
        let mut p = rank("attention", 0, &addr, 1, 1, SHORT, &env);
        let (took, out) = fails(&mut p, t0, Duration::from_secs(1));
        assert!(out.contains("afmesh: auth: "), "{out}");
        eprintln!("the rank with {name} token got Auth after {took:?}");
    }
    let mut a0 = rank("attention", 0, &addr, 1, 1, SHORT, &good);
    for p in [&mut f0, &mut a0] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let st = sched.wait_exit(Duration::from_secs(10));
    let out = sched.output();
    assert!(st.success(), "{out}");
    assert_eq!(out.matches("auth failed from").count(), 2, "{out}");
    assert!(out.contains("wrong cluster token"), "{out}");
    assert!(out.contains("2 failed the token"), "{out}");
    assert!(
        !out.contains("correct horse"),
        "the token is never logged:\n{out}"
    );
}

#[test]
fn without_a_token_the_scheduler_binds_loopback_and_warns_elsewhere() {
    let listening = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = afmesh();
        cmd.arg("scheduler").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let p = Proc::spawn("scheduler", cmd);
        let line = p.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
        (p, line)
    };
    let (_p, line) = listening(&["--bind", "0"], &[]);
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");
    let (_p, line) = listening(&["--bind", "0"], &[("AFMESH_TOKEN", "t")]);
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
    let (p, line) = listening(&["--bind", "0.0.0.0:0"], &[]);
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
    let warn = p.wait_line(Duration::from_secs(10), |l| {
        l.contains("without a cluster token")
    });
    assert!(warn.contains("WARN"), "{warn}");
}
