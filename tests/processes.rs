//! Multi-process runs, spawning the project's own binary, on each real
//! transport: the same suite runs over tcp and over shared memory.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::{afmesh, leftover_segments, rank_command, rank_env, scheduler, unshared, Proc};

/// One rank on `transport`, in job `job`.
#[allow(clippy::too_many_arguments)]
fn rank_on(
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

fn unique_job(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let rest = &json[json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len()..];
    &rest[..rest.find([',', '}']).unwrap()]
}

/// Caller-owned receive memory over shm (cross-memory attach): every byte
/// verified, one library copy per message, no fallback to tcp.
#[test]
fn caller_buffers_move_over_shm_verified() {
    let mut cmd = afmesh();
    cmd.args([
        "bench",
        "--attention",
        "2",
        "--ffn",
        "2",
        "--transport",
        "shm",
        "--caller-buffers",
        "--iters",
        "5",
        "--warmup",
        "2",
        "--json",
    ]);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("json line");
    assert_eq!(json_field(line, "verified"), "true");
    assert_eq!(json_field(line, "transport"), "\"shm\"");
    let copies: f64 = json_field(line, "copies_per_msg").parse().unwrap();
    assert!((copies - 1.0).abs() < 1e-9, "{line}");
}

fn bench_2a2f_reference_sizes_verified(transport: &str) {
    let mut cmd = afmesh();
    cmd.args([
        "bench",
        "--attention",
        "2",
        "--ffn",
        "2",
        "--transport",
        transport,
        "--iters",
        "5",
        "--warmup",
        "2",
        "--json",
    ]);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("json line");
    assert_eq!(json_field(line, "verified"), "true");
    assert_eq!(json_field(line, "transport"), format!("\"{transport}\""));
    assert_eq!(json_field(line, "tokens"), "128");
    assert_eq!(json_field(line, "hidden"), "7168");
    assert_eq!(json_field(line, "stages"), "3");
    for k in [
        "mean_us",
        "p50_us",
        "p99_us",
        "max_us",
        "goodput_gbps",
        "floor_us",
        "floor_exchange_us",
        "p999_us",
        "ratio",
    ] {
        let v: f64 = json_field(line, k).parse().unwrap();
        assert!(v > 0.0, "{k} = {v}");
    }
    // Shared memory copies each message once, into the peer; tcp leaves
    // the copying to the kernel.
    let copies: f64 = json_field(line, "copies_per_msg").parse().unwrap();
    let want = if transport == "shm" { 1.0 } else { 0.0 };
    assert!((copies - want).abs() < 1e-3, "copies_per_msg = {copies}");
    // The floor is the fastest plain way measured: the exchange, and over
    // tcp its polled twin, over shm one thread's memcpy.
    let floor: f64 = json_field(line, "floor_us").parse().unwrap();
    let ways: Vec<f64> = ["floor_exchange_us", "floor_polled_us", "floor_memcpy_us"]
        .iter()
        .map(|k| json_field(line, k))
        .filter(|v| *v != "null")
        .map(|v| v.parse().unwrap())
        .collect();
    let (other, other_null) = if transport == "shm" {
        ("floor_memcpy_us", "floor_polled_us")
    } else {
        ("floor_polled_us", "floor_memcpy_us")
    };
    assert_ne!(json_field(line, other), "null", "{line}");
    assert_eq!(json_field(line, other_null), "null", "{line}");
    assert_eq!(
        floor,
        ways.iter().copied().fold(f64::MAX, f64::min),
        "{line}"
    );
}

fn varying_token_counts_across_processes(transport: &str) {
    let mut cmd = afmesh();
    cmd.args([
        "bench",
        "--transport",
        transport,
        "--attention",
        "2",
        "--ffn",
        "3",
        "--tokens",
        "32",
        "--hidden",
        "512",
        "--vary-tokens",
    ])
    .args([
        "--iters",
        "30",
        "--warmup",
        "2",
        "--dispatch-dtype",
        "bf16",
        "--combine-dtype",
        "f32",
        "--json",
    ]);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    assert!(out.contains("\"verified\":true"), "{out}");
}

fn killed_rank_is_peer_lost_everywhere(transport: &str) {
    let job = unique_job(&format!("kill-{transport}"));
    let (mut sched, addr) = scheduler(&[]);
    let work = [
        "--tokens",
        "16",
        "--hidden",
        "1024",
        "--iters",
        "1000000",
        "--timeout-ms",
        "3000",
    ];
    let mut ranks: Vec<Proc> = Vec::new();
    for r in 0..2 {
        ranks.push(rank_on(transport, &job, "ffn", r, &addr, 2, 2, &work));
    }
    for r in 0..2 {
        ranks.push(rank_on(transport, &job, "attention", r, &addr, 2, 2, &work));
    }
    for p in &ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    // Mid-run: SIGKILL F1.
    ranks[1].kill();
    for (i, p) in ranks.iter_mut().enumerate() {
        if i == 1 {
            continue;
        }
        let st = p.wait_exit(Duration::from_secs(10));
        let out = p.output();
        assert_eq!(
            st.code(),
            Some(1),
            "{} must exit with an error, not a signal:\n{out}",
            p.name
        );
        assert!(
            out.contains("peer lost"),
            "{} must report the lost peer:\n{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{}:\n{out}", p.name);
    }
    // The scheduler sees every rank leave and finishes.
    let st = sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", sched.output());
    let a0 = ranks[2].output();
    assert!(a0.contains("F1"), "A0 names F1:\n{a0}");
    assert_eq!(
        leftover_segments(&job),
        Vec::<String>::new(),
        "no shared-memory segment outlives the run"
    );
}

fn stranger_sending_garbage_does_not_stop_the_mesh(transport: &str) {
    let job = unique_job(&format!("stranger-{transport}"));
    let (mut sched, addr) = scheduler(&["--attention", "1", "--ffn", "1"]);
    // One stranger sends garbage, another a frame that claims 4 GiB, a
    // third says nothing at all.
    let mut g = std::net::TcpStream::connect(&addr).unwrap();
    g.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut big = std::net::TcpStream::connect(&addr).unwrap();
    big.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let _silent = std::net::TcpStream::connect(&addr).unwrap();
    let work = [
        "--tokens", "8", "--hidden", "256", "--iters", "20", "--warmup", "1",
    ];
    let mut f = rank_on(transport, &job, "ffn", 0, &addr, 1, 1, &work);
    let mut a = rank_on(transport, &job, "attention", 0, &addr, 1, 1, &work);
    for p in [&mut f, &mut a] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let st = sched.wait_exit(Duration::from_secs(10));
    let out = sched.output();
    assert!(st.success(), "{out}");
    assert!(
        out.contains("dropping connection"),
        "the garbage is logged:\n{out}"
    );
}

#[test]
fn misconfigured_rank_is_refused_with_a_reason() {
    let (_sched, addr) = scheduler(&["--attention", "1", "--ffn", "1"]);
    // A rank that believes in a 2A+1F mesh.
    let mut bad = rank_env(
        "attention",
        0,
        &addr,
        2,
        1,
        &["--tokens", "8", "--hidden", "256", "--iters", "1"],
        &[],
    );
    let st = bad.wait_exit(Duration::from_secs(20));
    let out = bad.output();
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(out.contains("refused") && out.contains("2A+1F"), "{out}");
}

#[test]
fn environment_configuration_with_dmlc_names() {
    let (_sched, addr) = scheduler(&[]);
    let (host, port) = addr.rsplit_once(':').unwrap();
    let spawn = |role: &str| {
        let mut c = afmesh();
        c.args([
            "run", "--tokens", "8", "--hidden", "256", "--iters", "5", "--warmup", "1",
        ])
        .env("DMLC_ROLE", role)
        .env("DMLC_PS_ROOT_URI", host)
        .env("DMLC_PS_ROOT_PORT", port)
        .env("DMLC_NUM_WORKER", "1")
        .env("DMLC_NUM_SERVER", "1")
        .env("DMLC_NODE_RANK", "0");
        Proc::spawn(role, c)
    };
    let mut f = spawn("server");
    let mut a = spawn("worker");
    for p in [&mut f, &mut a] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let mut bad = afmesh();
    bad.args(["run"])
        .env("DMLC_ROLE", "worker")
        .env_remove("DMLC_PS_ROOT_URI")
        .env_remove("AFMESH_SCHEDULER");
    let mut p = Proc::spawn("bad env", bad);
    let st = p.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    assert!(p.output().contains("AFMESH_SCHEDULER"), "{}", p.output());
}

#[test]
fn afd_pipeline_example_matches_its_reference() {
    // `cargo test` builds the examples next to the binaries.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_afmesh"));
    let ex = bin.parent().unwrap().join("examples").join("afd_pipeline");
    assert!(ex.exists(), "{} not built: run the whole suite with `cargo test` (a filtered `--test processes` does not build examples)", ex.display());
    let mut cmd = std::process::Command::new(ex);
    cmd.args(["2", "3", "3"]);
    let mut p = Proc::spawn("afd_pipeline", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    assert!(out.contains("match"), "{out}");
}

fn no_transport_given_picks_shm_locally() {
    let mut cmd = afmesh();
    cmd.args([
        "bench", "--tokens", "4", "--hidden", "64", "--iters", "5", "--warmup", "1", "--json",
    ]);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    assert!(
        out.contains("\"transport\":\"shm\"") && out.contains("\"verified\":true"),
        "{out}"
    );
}

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

macro_rules! on_each_transport {
    ($($name:ident),* $(,)?) => {
        mod tcp {
            $(#[test] fn $name() { super::$name("tcp") })*
        }
        mod shm {
            $(#[test] fn $name() { super::$name("shm") })*
        }
    };
}

on_each_transport!(
    bench_2a2f_reference_sizes_verified,
    varying_token_counts_across_processes,
    killed_rank_is_peer_lost_everywhere,
    stranger_sending_garbage_does_not_stop_the_mesh,
);

/// Checks that `svg` is one well-formed `<svg>` element (tags balanced and
/// properly nested) and returns how many of each tag it holds.
fn svg_tags(svg: &str) -> std::collections::BTreeMap<String, usize> {
    let mut open: Vec<&str> = Vec::new();
    let mut counts = std::collections::BTreeMap::new();
    let mut rest = svg.trim();
    assert!(
        rest.starts_with("<svg"),
        "root is not <svg>: {}",
        &rest[..40.min(rest.len())]
    );
    while let Some(start) = rest.find('<') {
        let end = start + rest[start..].find('>').expect("an unclosed tag");
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
            continue;
        }
        let name = tag.split_whitespace().next().expect("a tag name");
        assert!(
            !open.is_empty() || name == "svg" && counts.is_empty(),
            "<{name}> outside the root"
        );
        *counts
            .entry(name.trim_end_matches('/').to_string())
            .or_insert(0) += 1;
        if !tag.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed: {open:?}");
    assert!(rest.trim().is_empty(), "text after the root: {rest}");
    counts
}

#[test]
fn a_sweep_reports_every_point_and_plots_them() {
    let svg = std::env::temp_dir().join(format!("afmesh-sweep-{}.svg", std::process::id()));
    let _ = std::fs::remove_file(&svg);
    let mut cmd = afmesh();
    cmd.args([
        "bench",
        "--sweep",
        "tokens=1,4,16",
        "--transport",
        "shm,tcp",
    ])
    .args([
        "--hidden", "64", "--stages", "1", "--iters", "20", "--warmup", "2",
    ])
    .args(["--json", "--plot"])
    .arg(&svg);
    let mut p = Proc::spawn("sweep", cmd);
    let st = p.wait_exit(Duration::from_secs(240));
    let out = p.output();
    assert!(st.success(), "{out}");
    let points: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut seen: Vec<(String, u64, u64)> = points
        .iter()
        .map(|v| {
            assert_eq!(v["verified"], true, "{v}");
            assert_eq!(v["iters"], 20, "{v}");
            for k in [
                "p50_us",
                "p99_us",
                "p999_us",
                "goodput_gbps",
                "floor_us",
                "ratio",
            ] {
                assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
            }
            let t = v["transport"].as_str().unwrap().to_string();
            (
                t,
                v["tokens"].as_u64().unwrap(),
                v["layer_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let shape: Vec<(&str, u64)> = seen.iter().map(|(t, k, _)| (t.as_str(), *k)).collect();
    assert_eq!(
        shape,
        [
            ("shm", 1),
            ("shm", 4),
            ("shm", 16),
            ("tcp", 1),
            ("tcp", 4),
            ("tcp", 16)
        ],
        "{out}"
    );
    assert!(seen[0].2 < seen[1].2 && seen[1].2 < seen[2].2, "{seen:?}");
    let progress = out
        .lines()
        .filter(|l| l.starts_with("afmesh bench: point "))
        .count();
    assert_eq!(progress, 6, "a progress line per point on stderr: {out}");
    let tags = svg_tags(&std::fs::read_to_string(&svg).unwrap());
    let _ = std::fs::remove_file(&svg);
    // Per panel and transport: the curve and its floor, at least.
    assert!(tags.get("polyline").copied().unwrap_or(0) >= 8, "{tags:?}");
    assert_eq!(
        tags.get("circle"),
        Some(&12),
        "a marker per point per panel: {tags:?}"
    );
}

#[test]
fn a_sweep_of_an_unknown_key_is_refused() {
    let mut cmd = afmesh();
    cmd.args(["bench", "--sweep", "colour=1,2", "--iters", "5"]);
    let mut p = Proc::spawn("sweep", cmd);
    let st = p.wait_exit(Duration::from_secs(30));
    let out = p.output();
    assert!(!st.success(), "{out}");
    assert!(out.contains("unknown key colour"), "{out}");
}

#[test]
fn default_transport_is_shm_locally() {
    no_transport_given_picks_shm_locally();
}

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
