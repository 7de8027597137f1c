//! Multi-process runs, spawning the project's own binary, on each real
//! transport: the same suite runs over tcp and over shared memory. Ranks in
//! namespaces of their own are `tests/namespaces.rs`; `afmesh sweep` is
//! `tests/sweep.rs`; stopping `afmesh bench` and its argument checks are
//! `tests/bench_cli.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::{
    afmesh, bench_json, json_field, leftover_segments, rank_env, rank_on, scheduler, unique_job,
    Proc,
};

/// Caller-owned receive memory over shm (cross-memory attach): every byte
/// verified, one library copy per message, no fallback to tcp.
#[test]
fn caller_buffers_move_over_shm_verified() {
    let line = bench_json(&[
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
    ]);
    assert_eq!(json_field(&line, "transport"), "\"shm\"");
    let copies: f64 = json_field(&line, "copies_per_msg").parse().unwrap();
    assert!((copies - 1.0).abs() < 1e-9, "{line}");
}

/// Pinned ranks that never yield measure what the machine takes from their
/// spinning in the timed layers, and the bench sums it.
#[test]
fn pinned_shm_ranks_measure_their_spin_gaps() {
    let line = bench_json(&[
        "--transport",
        "shm",
        "--stages",
        "1",
        "--pin",
        "on",
        "--iters",
        "50",
        "--warmup",
        "5",
    ]);
    assert_eq!(json_field(&line, "pinned"), "true");
    // Each layer's waits spin for the reference stage's 0.9 MB and 1.8 MB:
    // far past the 32 polls a measured stretch needs.
    let spun: f64 = json_field(&line, "spun_ms").parse().expect("spun_ms");
    let lost: f64 = json_field(&line, "spin_gap_ms")
        .parse()
        .expect("spin_gap_ms");
    assert!(spun > 0.0, "no spinning measured: {line}");
    assert!(lost <= spun, "{line}");
}

fn bench_2a2f_reference_sizes_verified(transport: &str) {
    let line = bench_json(&[
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
    ]);
    let line = line.as_str();
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
        "floor_exchange_p99_us",
        "p999_us",
        "ratio",
        "ratio_exchange",
    ] {
        let v: f64 = json_field(line, k).parse().unwrap();
        assert!(v > 0.0, "{k} = {v}");
    }
    // Shared memory copies each message once, into the peer; tcp leaves
    // the copying to the kernel.
    let copies: f64 = json_field(line, "copies_per_msg").parse().unwrap();
    let want = if transport == "shm" { 1.0 } else { 0.0 };
    assert!((copies - want).abs() < 1e-3, "copies_per_msg = {copies}");
    let ex: f64 = json_field(line, "floor_exchange_us").parse().unwrap();
    let ex99: f64 = json_field(line, "floor_exchange_p99_us").parse().unwrap();
    assert!(
        ex99 >= ex,
        "the exchange floor's p99 {ex99} under its p50 {ex}"
    );
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
    // Over shm the exchange whose receivers never read is reported beside
    // the floor, never as one.
    let unread = json_field(line, "floor_exchange_unread_us");
    assert_eq!(unread == "null", transport != "shm", "{line}");
    // Host steal while the mesh ran: a count of ms, or null off Linux.
    let steal = json_field(line, "steal_ms");
    assert!(steal == "null" || steal.parse::<u64>().is_ok(), "{line}");
    assert!(
        json_field(line, "preempted_spins").parse::<u64>().is_ok(),
        "{line}"
    );
    // What the machine took from the spinning waits: a sample within them
    // (none here: four ranks on this box's two cores are not pinned, and
    // yielding spins are not measured).
    let spun: f64 = json_field(line, "spun_ms").parse().expect("spun_ms");
    let lost: f64 = json_field(line, "spin_gap_ms")
        .parse()
        .expect("spin_gap_ms");
    let gaps: u64 = json_field(line, "spin_gaps").parse().expect("spin_gaps");
    assert!(lost >= 0.0 && lost <= spun, "{line}");
    assert_eq!(gaps == 0, lost == 0.0, "{line}");
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

#[test]
fn default_transport_is_shm_locally() {
    no_transport_given_picks_shm_locally();
}
