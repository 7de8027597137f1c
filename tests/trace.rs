//! Traces: a 2A2F bench writes one Chrome/Perfetto trace per rank with one
//! span per message of every layer, and `afmesh trace merge` puts them on
//! one clock, causally consistent across ranks.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{afmesh, Proc};
use serde_json::Value;

const LAYERS: u64 = 3 + 15; // --warmup + --iters
const STAGES: u64 = 2;

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (pid, tid, stage, seq) → (ts, dur) of every message span.
type Spans = BTreeMap<(u64, u64, u64, u64), (f64, f64)>;

fn spans(v: &Value) -> Spans {
    let mut out = Spans::new();
    for e in v["traceEvents"].as_array().unwrap() {
        if e["cat"] != "message" {
            continue;
        }
        let key = (
            e["pid"].as_u64().unwrap(),
            e["tid"].as_u64().unwrap(),
            e["args"]["stage"].as_u64().unwrap(),
            e["args"]["seq"].as_u64().unwrap(),
        );
        let val = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        assert!(out.insert(key, val).is_none(), "a message twice: {e}");
    }
    out
}

#[test]
fn a_2a2f_bench_traces_every_message_and_merges_on_one_clock() {
    let dir = std::env::temp_dir().join(format!("afmesh-trace-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = afmesh();
    cmd.args(["bench", "--attention", "2", "--ffn", "2", "--stages", "2"])
        .args([
            "--tokens", "4", "--hidden", "64", "--iters", "15", "--warmup", "3",
        ])
        .arg("--trace")
        .arg(&dir);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "{}", p.output());

    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for (f, rank) in files.iter().zip(["A0", "A1", "F0", "F1"]) {
        let v = read(f);
        let info = &v["otherData"]["afmesh"];
        assert_eq!(info["rank"], rank);
        assert_eq!(info["clock"]["rounds"], 8, "{info}");
        assert!(info["clock"]["error_ns"].as_u64().unwrap() > 0, "{info}");
        // One span per message: every layer, stage and peer, once.
        let s = spans(&v);
        assert_eq!(s.len() as u64, LAYERS * STAGES * 2, "{rank}");
        for tid in 1..=2 {
            for stage in 0..STAGES {
                for seq in 0..LAYERS {
                    let key = (
                        v["otherData"]["afmesh"]["pid"].as_u64().unwrap(),
                        tid,
                        stage,
                        seq,
                    );
                    assert!(s.contains_key(&key), "{rank}: no span {key:?}");
                }
            }
        }
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
    let v = read(&out);
    let events = v["traceEvents"].as_array().unwrap();
    // Sorted: metadata, then by time.
    let ts: Vec<f64> = events
        .iter()
        .filter(|e| e["ph"] != "M")
        .map(|e| e["ts"].as_f64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "events out of order");
    assert!(ts[0] >= 0.0);
    let s = spans(&v);
    assert_eq!(s.len() as u64, LAYERS * STAGES * 2 * 4);
    // An arrow from every dispatch's post to its landing.
    for ph in ["s", "f"] {
        let flows = events.iter().filter(|e| e["ph"] == ph).count() as u64;
        assert_eq!(flows, LAYERS * STAGES * 4, "flow events {ph}");
    }
    // Across ranks: A_i's span for F_j runs from the post to the combine
    // seen; F_j's span for A_i from the land to the respond. A land is
    // never before its post, and a combine is never seen before it left.
    let (a_pid, f_pid) = (|i: u64| 1 + i, |j: u64| 1_000_001 + j);
    for i in 0..2 {
        for j in 0..2 {
            for stage in 0..STAGES {
                for seq in 0..LAYERS {
                    let (post, round) = s[&(a_pid(i), j + 1, stage, seq)];
                    let (land, held) = s[&(f_pid(j), i + 1, stage, seq)];
                    assert!(
                        land >= post,
                        "A{i}->F{j} stage {stage} seq {seq}: landed at {land} before its post at {post}"
                    );
                    assert!(
                        land + held <= post + round,
                        "A{i}<-F{j} stage {stage} seq {seq}: seen before it was answered"
                    );
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merging_a_directory_without_traces_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("afmesh-trace-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut m = afmesh();
    m.args(["trace", "merge"])
        .arg(&dir)
        .arg("-o")
        .arg(dir.join("x.json"));
    let mut p = Proc::spawn("merge", m);
    assert!(!p.wait_exit(Duration::from_secs(30)).success());
    assert!(
        p.output().contains("no afmesh rank traces"),
        "{}",
        p.output()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
