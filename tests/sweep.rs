//! `afmesh sweep` as a process: every point reported and plotted as a
//! well-formed SVG, and an unknown key refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{afmesh, Proc};

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
