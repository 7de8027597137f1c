//! Verbs meshes on softverbs that the `tests/verbs*.rs` binaries share:
//! the preloaded provider, a fabric of its own per test, ranks started
//! under it, and the checks of a rank's JSON line and counters. A binary
//! that includes it (`#[path]`) declares `mod common;` and
//! `#[path = "common/cdylib.rs"] mod cdylib;` beside it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use crate::cdylib;
use crate::common::{rank_command, scheduler, Proc};

pub fn softverbs() -> String {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("softverbs/src");
    cdylib::built("libsoftverbs.so", &[src])
        .to_string_lossy()
        .into_owned()
}

pub fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let at = json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len();
    let rest = &json[at..];
    &rest[..rest.find([',', '}']).unwrap()]
}

pub fn num(json: &str, key: &str) -> u64 {
    field(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

/// A softverbs fabric of its own per test, so parallel tests never meet.
pub fn fabric_env(tag: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), softverbs()),
        ("AFMESH_TRANSPORT".into(), "verbs".into()),
        (
            "SOFTVERBS_NAMESPACE".into(),
            format!("afmesh-{tag}-{}", std::process::id()),
        ),
        (
            "AFMESH_JOB".into(),
            format!("verbs-{tag}-{}", std::process::id()),
        ),
    ]
}

/// A test's softverbs fabric file (`fabric_env`'s namespace), removed
/// when the test is done with it, after its processes (declare it last).
pub struct FabricFile(String);

impl FabricFile {
    pub fn new(tag: &str) -> FabricFile {
        FabricFile(format!(
            "/dev/shm/softverbs.afmesh-{tag}-{}.fabric",
            std::process::id()
        ))
    }
}

impl Drop for FabricFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Mesh {
    pub sched: Proc,
    pub ranks: Vec<Proc>,
    /// Dropped after the ranks (fields drop in order).
    pub fabric: FabricFile,
}

/// M attention and N FFN ranks over verbs running `afmesh run --json`
/// with `args`; `per_rank` adds environment to one rank ("A0", "F1").
pub fn start(
    tag: &str,
    m: u32,
    n: u32,
    args: &[&str],
    env: &[(&str, &str)],
    per_rank: &[(&str, &str, &str)],
) -> Mesh {
    let (sched, addr) = scheduler(&[]);
    let mut base = fabric_env(tag);
    base.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut ranks = Vec::new();
    for (role, count, tag) in [("ffn", n, "F"), ("attention", m, "A")] {
        for r in 0..count {
            let who = format!("{tag}{r}");
            let mut e: Vec<(&str, &str)> =
                base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            for (w, k, v) in per_rank {
                if *w == who {
                    e.push((k, v));
                }
            }
            let mut a = vec!["--json"];
            a.extend_from_slice(args);
            let cmd = rank_command(role, r, &addr, m, n, &a, &e);
            ranks.push(Proc::spawn(&who, cmd));
        }
    }
    Mesh {
        sched,
        ranks,
        fabric: FabricFile::new(tag),
    }
}

/// Runs a mesh to its end; every rank must succeed verified. Returns each
/// rank's JSON line (FFN ranks first).
pub fn run_verified(tag: &str, m: u32, n: u32, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut mesh = start(tag, m, n, args, env, &[]);
    let mut lines = Vec::new();
    for p in &mut mesh.ranks {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{} failed:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{}: no JSON line:\n{out}", p.name))
            .to_string();
        assert_eq!(field(&line, "errors"), "0", "{}: {line}", p.name);
        assert_eq!(field(&line, "transport"), "\"verbs\"", "{line}");
        lines.push(line);
    }
    let st = mesh.sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", mesh.sched.output());
    lines
}

/// The post path's promises, from a rank's counters: no registration and
/// no payload copy after setup, `stripes` work requests per message (plus
/// flushes and probes, counted apart).
pub fn assert_counters(line: &str, stripes: u64) {
    let messages = num(line, "messages");
    assert!(messages > 0, "{line}");
    assert_eq!(num(line, "registrations_after_setup"), 0, "{line}");
    assert_eq!(num(line, "copied_bytes"), 0, "{line}");
    let data = num(line, "work_requests") - num(line, "flushes");
    assert_eq!(
        data,
        messages * stripes,
        "work requests per message: {line}"
    );
    assert!(
        num(line, "signaled") <= num(line, "work_requests"),
        "{line}"
    );
}
