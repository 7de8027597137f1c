//! Ranks on "other hosts": each in its own network namespace, joined to the
//! other by a veth pair, so they share no loopback and reach each other
//! only over that link (tcp; the shared /dev/shm is kept out by forcing
//! the transport). Cutting the link mid-run must make both sides report the
//! lost peer within the liveness bound; a short cut that heals must not
//! corrupt anything. Skipped, with a message, where namespaces are not
//! permitted (not root).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{afmesh, Proc};

/// Two network namespaces joined by a veth pair; removed on drop (which
/// also removes the pair).
struct Hosts {
    ns: [String; 2],
    dev: [String; 2],
    ip: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// `None` (after saying why) where this machine does not permit it.
    fn new() -> Option<Hosts> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let subnet = format!("10.{}.{}", 200 + n % 50, std::process::id() % 250);
        let h = Hosts {
            ns: [format!("afmA{tag}"), format!("afmB{tag}")],
            dev: [format!("afva{tag}"), format!("afvb{tag}")],
            ip: [format!("{subnet}.1"), format!("{subnet}.2")],
        };
        let made = (|| {
            for ns in &h.ns {
                ip(&["netns", "add", ns])?;
            }
            ip(&[
                "link", "add", &h.dev[0], "type", "veth", "peer", "name", &h.dev[1],
            ])?;
            for i in 0..2 {
                ip(&["link", "set", &h.dev[i], "netns", &h.ns[i]])?;
                ip(&[
                    "-n",
                    &h.ns[i],
                    "addr",
                    "add",
                    &format!("{}/24", h.ip[i]),
                    "dev",
                    &h.dev[i],
                ])?;
                ip(&["-n", &h.ns[i], "link", "set", "lo", "up"])?;
                ip(&["-n", &h.ns[i], "link", "set", &h.dev[i], "up"])?;
            }
            Ok::<(), String>(())
        })();
        match made {
            Ok(()) => Some(h),
            Err(e) => {
                eprintln!("skipped: network namespaces are not permitted here ({e})");
                None
            }
        }
    }

    /// `cmd` run inside host `i`'s namespace, its environment kept.
    fn on(&self, i: usize, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// [`Hosts::on`], with a `/dev/shm` of the process's own, so no shared
    /// memory reaches across (a real other host).
    fn on_own_shm(&self, i: usize, cmd: &Command) -> Command {
        let mut sh = Command::new("sh");
        sh.args(["-c", "mount -t tmpfs tmpfs /dev/shm && exec \"$0\" \"$@\""])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        self.on(i, &sh)
    }

    /// Takes host 0's end of the link down (`false`) or up.
    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.ns[0],
            "link",
            "set",
            &self.dev[0],
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Whether `pid` is still running (not exited, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z'))
}

const TOKEN: &str = "hosts-test-token-0123456789";

/// A scheduler on host 0, listening on its veth address.
fn scheduler(h: &Hosts) -> (Proc, String) {
    let mut cmd = afmesh();
    cmd.env("AFMESH_TOKEN", TOKEN).args([
        "scheduler",
        "--bind",
        &format!("{}:0", h.ip[0]),
        "--attention",
        "1",
        "--ffn",
        "1",
    ]);
    let p = Proc::spawn("scheduler", h.on(0, &cmd));
    let line = p.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (p, addr)
}

/// A rank of a 1A1F tcp job on host `i`.
fn rank(
    h: &Hosts,
    i: usize,
    role: &str,
    sched: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    let mut cmd = afmesh();
    cmd.env("AFMESH_TOKEN", TOKEN)
        .env("AFMESH_TRANSPORT", "tcp")
        .env("AFMESH_JOB", format!("hosts-{}", std::process::id()))
        .env("AFMESH_HOST_ID", format!("host{i}"));
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
        "0",
        "--attention",
        "1",
        "--ffn",
        "1",
    ])
    .args(extra);
    Proc::spawn(&format!("{role} on host {i}"), h.on(i, &cmd))
}

/// Each side of a cut link reports its peer lost within the liveness
/// bound (not the much longer wait timeout), naming the peer.
#[test]
fn a_cut_link_is_peer_lost_on_both_sides_within_the_liveness_bound() {
    let Some(h) = Hosts::new() else { return };
    let (_sched, addr) = scheduler(&h);
    // Liveness 2 s; every wait may take 30 s, so only liveness can end it.
    let env = [
        ("AFMESH_LIVENESS_MS", "2000"),
        ("AFMESH_IO_TIMEOUT_MS", "30000"),
    ];
    let work = [
        "--tokens",
        "8",
        "--hidden",
        "256",
        "--iters",
        "100000000",
        "--timeout-ms",
        "30000",
    ];
    let mut ranks = [
        rank(&h, 1, "ffn", &addr, &env, &work),
        rank(&h, 0, "attention", &addr, &env, &work),
    ];
    for p in &ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    std::thread::sleep(Duration::from_millis(300));
    h.link(false);
    let cut = Instant::now();
    for p in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(15));
        let took = cut.elapsed();
        eprintln!("{} saw the cut after {took:?}", p.name);
        let out = p.output();
        assert_eq!(st.code(), Some(1), "{} must fail cleanly:\n{out}", p.name);
        assert!(
            out.contains("peer lost"),
            "{} must report the lost peer:\n{out}",
            p.name
        );
        assert!(!out.contains("panicked"), "{}:\n{out}", p.name);
        // 2 s bound, plus a second of keepalive granularity and slack for
        // a loaded 2-core machine; far below the 30 s wait timeout.
        assert!(
            took < Duration::from_secs(6),
            "{} saw the cut after {took:?}",
            p.name
        );
    }
}

/// A cut shorter than the liveness bound heals: TCP retransmits, the run
/// finishes and every combine verifies.
#[test]
fn a_short_cut_heals_and_corrupts_nothing() {
    let Some(h) = Hosts::new() else { return };
    let (mut sched, addr) = scheduler(&h);
    let env = [
        ("AFMESH_LIVENESS_MS", "8000"),
        ("AFMESH_IO_TIMEOUT_MS", "20000"),
    ];
    let work = [
        "--tokens",
        "16",
        "--hidden",
        "512",
        "--iters",
        "20000",
        "--timeout-ms",
        "20000",
    ];
    let mut ranks = [
        rank(&h, 1, "ffn", &addr, &env, &work),
        rank(&h, 0, "attention", &addr, &env, &work),
    ];
    for p in &ranks {
        p.wait_line(Duration::from_secs(20), |l| l.contains("joined"));
    }
    h.link(false);
    std::thread::sleep(Duration::from_millis(700));
    h.link(true);
    assert!(
        running(ranks[1].id()),
        "the run must outlast the cut for this test to mean anything:\n{}",
        ranks[1].output()
    );
    for p in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(30));
        let out = p.output();
        assert!(st.success(), "{} must finish verified:\n{out}", p.name);
    }
    let a = ranks[1].output();
    assert!(
        a.contains("20000 layers") && a.contains(" 0 verification errors"),
        "the attention rank verifies every layer:\n{a}"
    );
    let st = sched.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{}", sched.output());
}

/// A cluster benchmark across two "hosts": a scheduler and two attention
/// ranks on one, two FFN ranks on the other, each with its own /dev/shm and
/// host id, the default transport (so tcp). The scheduler prints one job
/// summary: each attention rank's layers and every link, slowest named.
#[test]
fn a_two_host_run_ends_with_one_job_summary() {
    let Some(h) = Hosts::new() else { return };
    let mut cmd = afmesh();
    cmd.env("AFMESH_TOKEN", TOKEN).args([
        "scheduler",
        "--bind",
        &format!("{}:0", h.ip[0]),
        "--json",
    ]);
    let mut sched = Proc::spawn("scheduler", h.on(0, &cmd));
    let line = sched.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let mut ranks = Vec::new();
    for (role, host) in [("ffn", 1), ("ffn", 1), ("attention", 0), ("attention", 0)] {
        let mut c = afmesh();
        c.env("AFMESH_TOKEN", TOKEN)
            .env("AFMESH_JOB", format!("summary-{}", std::process::id()))
            .env("AFMESH_HOST_ID", format!("host{host}"))
            .args(["run", "--role", role, "--scheduler", &addr])
            .args(["--attention", "2", "--ffn", "2"])
            .args(["--tokens", "8", "--hidden", "256", "--iters", "300"]);
        ranks.push(Proc::spawn(
            &format!("{role} on host {host}"),
            h.on_own_shm(host, &c),
        ));
    }
    for p in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let st = sched.wait_exit(Duration::from_secs(10));
    let out = sched.output();
    assert!(st.success(), "{out}");
    let json = out
        .lines()
        .find(|l| l.starts_with("{\"job_summary\""))
        .unwrap_or_else(|| panic!("no job summary:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let s = &v["job_summary"];
    assert_eq!(
        s["transport"], "tcp",
        "other hosts are reached over tcp: {json}"
    );
    let ranks: Vec<(&str, u64)> = s["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["rank"].as_str().unwrap(), a["layers"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranks, vec![("A0", 300), ("A1", 300)], "{json}");
    let mut links: Vec<(String, String)> = s["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert!(l["sent_bytes"].as_u64().unwrap() > 0, "{l}");
            assert!(l["rt_p50_us"].as_f64().unwrap() > 0.0, "{l}");
            (
                l["from"].as_str().unwrap().into(),
                l["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    links.sort();
    let want: Vec<(String, String)> = [("A0", "F0"), ("A0", "F1"), ("A1", "F0"), ("A1", "F1")]
        .iter()
        .map(|(a, f)| (a.to_string(), f.to_string()))
        .collect();
    assert_eq!(links, want, "{json}");
    assert!(s["slowest"].as_str().unwrap().starts_with('A'), "{json}");
    assert_eq!(s["silent"].as_array().unwrap().len(), 0, "{json}");
}

/// Traces across "hosts": an attention rank on one, two FFN ranks on the
/// other, each tracing. Every rank estimated its clock against the
/// scheduler's, and the merged trace is causal across hosts: no dispatch
/// lands before it was posted, no combine is seen before it was answered.
#[test]
fn traces_from_two_hosts_merge_onto_one_causal_clock() {
    let Some(h) = Hosts::new() else { return };
    let dir = std::env::temp_dir().join(format!("afmesh-hosts-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = afmesh();
    cmd.env("AFMESH_TOKEN", TOKEN)
        .args(["scheduler", "--bind", &format!("{}:0", h.ip[0])]);
    let _sched = Proc::spawn("scheduler", h.on(0, &cmd));
    let line = _sched.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let layers = 40u64;
    let mut ranks = Vec::new();
    for (role, r, host) in [("ffn", 0, 1), ("ffn", 1, 1), ("attention", 0, 0)] {
        let mut c = afmesh();
        c.env("AFMESH_TOKEN", TOKEN)
            .env("AFMESH_JOB", format!("trace-{}", std::process::id()))
            .env("AFMESH_HOST_ID", format!("host{host}"))
            .env("AFMESH_TRACE", &dir)
            .args(["run", "--role", role, "--scheduler", &addr])
            .args(["--rank", &r.to_string(), "--attention", "1", "--ffn", "2"])
            .args(["--tokens", "4", "--hidden", "64", "--stages", "2"])
            .args(["--iters", &(layers - 2).to_string(), "--warmup", "2"]);
        ranks.push(Proc::spawn(
            &format!("{role} {r} on host {host}"),
            h.on_own_shm(host, &c),
        ));
    }
    for p in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "{}:\n{}", p.name, p.output());
    }
    let out = dir.join("merged.json");
    let mut m = afmesh();
    m.args(["trace", "merge"]).arg(&dir).arg("-o").arg(&out);
    let mut p = Proc::spawn("merge", m);
    assert!(
        p.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        p.output()
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let clocks = v["otherData"]["afmesh_merge"]["clocks"].as_array().unwrap();
    assert_eq!(clocks.len(), 3, "{v}");
    for c in clocks {
        assert_eq!(c["rounds"], 8, "{c}");
    }
    // (pid, tid, stage, seq) -> (ts, dur) of every message span.
    let mut spans = std::collections::BTreeMap::new();
    for e in v["traceEvents"].as_array().unwrap() {
        if e["cat"] == "message" {
            let k = (
                e["pid"].as_u64().unwrap(),
                e["tid"].as_u64().unwrap(),
                e["args"]["stage"].as_u64().unwrap(),
                e["args"]["seq"].as_u64().unwrap(),
            );
            spans.insert(k, (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap()));
        }
    }
    assert_eq!(spans.len() as u64, layers * 2 * 2 * 2);
    for f in 0..2u64 {
        for stage in 0..2 {
            for seq in 0..layers {
                let (post, round) = spans[&(1, f + 1, stage, seq)];
                let (land, held) = spans[&(1_000_001 + f, 1, stage, seq)];
                assert!(
                    land >= post,
                    "F{f} stage {stage} seq {seq}: land {land} < post {post}"
                );
                assert!(
                    land + held <= post + round,
                    "F{f} stage {stage} seq {seq}: seen before answered"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
