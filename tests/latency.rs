//! The per-link latency histograms as the bench prints them: every link of
//! a 2A2F mesh with its round trip, dispatch arrival, FFN processing and
//! combine arrival percentiles, each ordered p50 ≤ p99.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{afmesh, Proc};

#[test]
fn the_bench_prints_each_links_latency_histograms() {
    let mut cmd = afmesh();
    cmd.args(["bench", "--attention", "2", "--ffn", "2"]).args([
        "--tokens", "4", "--hidden", "64", "--iters", "50", "--warmup", "5",
    ]);
    let mut p = Proc::spawn("bench", cmd);
    let st = p.wait_exit(Duration::from_secs(60));
    let out = p.output();
    assert!(st.success(), "{out}");
    assert!(out.contains("per link"), "{out}");
    let mut seen = Vec::new();
    for l in out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('A') && l.contains("->"))
    {
        let (link, rest) = l.split_once(' ').unwrap();
        let legs: Vec<(f64, f64)> = rest
            .split('|')
            .map(|leg| {
                let (p50, p99) = leg.trim().split_once('/').unwrap_or_else(|| panic!("{l}"));
                (p50.parse().unwrap(), p99.parse().unwrap())
            })
            .collect();
        assert_eq!(legs.len(), 4, "{l}");
        for (p50, p99) in legs {
            assert!(p50 > 0.0 && p50 <= p99, "{l}");
        }
        seen.push(link.to_string());
    }
    seen.sort();
    assert_eq!(seen, ["A0->F0", "A0->F1", "A1->F0", "A1->F1"], "{out}");
}
