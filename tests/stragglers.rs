//! Stragglers: for each stage the attention rank names the FFN rank that
//! answered last and by how much, and its stats rank them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{afmesh, Proc};

use afmesh::{sim_mesh, transport::sim::SimNetwork, Peer, StageSpec};

const T: Duration = Duration::from_secs(5);

#[test]
fn the_last_ffn_rank_to_answer_each_stage_is_named_with_its_lateness() {
    let net = SimNetwork::new(7);
    let spec = StageSpec {
        stages: 1,
        max_tokens: 1,
        row_bytes: 8,
        out_row_bytes: 8,
        side_bytes: 0,
    };
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 3, spec).unwrap();
    // Layer by layer, the FFN rank named here answers `late` after the
    // others' answers were seen.
    let plan = [(2, 3), (1, 1), (2, 3), (0, 2), (1, 1), (2, 3)];
    for (late, ms) in plan {
        let h = attn[0].dispatch(0, &[1; 8], &[]).unwrap();
        net.deliver_all();
        for (j, f) in ffn.iter_mut().enumerate() {
            if j != late {
                let b = f.get_batch(T).unwrap();
                f.respond(b, &[&[2; 8]]).unwrap();
            }
        }
        net.deliver_all();
        attn[0].progress().unwrap();
        // The straggler is slow by at least this much (a lower bound: the
        // clock only moves forward).
        std::thread::sleep(Duration::from_millis(ms));
        let b = ffn[late].get_batch(T).unwrap();
        ffn[late].respond(b, &[&[2; 8]]).unwrap();
        net.deliver_all();
        assert_eq!(
            attn[0].wait_combine(h, T).unwrap().len(),
            spec_ffn(&attn[0])
        );
    }
    let stats = attn[0].stats();
    let top = stats.stragglers();
    let named: Vec<(Peer, u64)> = top.iter().map(|s| (s.peer, s.count)).collect();
    assert_eq!(
        named,
        [(Peer::Ffn(2), 3), (Peer::Ffn(1), 2), (Peer::Ffn(0), 1)],
        "{top:?}"
    );
    // Lower bounds: a sleep may last longer, never shorter.
    assert!(top[0].mean_late_ns >= 3e6, "{top:?}");
    assert!(top[1].mean_late_ns >= 1e6, "{top:?}");
    assert!(top[2].mean_late_ns >= 2e6, "{top:?}");
    assert!(top[0].max_late_ns >= 3_000_000);
    // Every stage had one straggler.
    let total: u64 = stats.peers.iter().map(|(_, p)| p.late_ns.count()).sum();
    assert_eq!(total, plan.len() as u64);
    // FFN ranks keep no straggler record.
    assert!(ffn[0].stats().stragglers().is_empty());
}

#[test]
fn a_single_ffn_rank_is_never_a_straggler() {
    let net = SimNetwork::new(1);
    let spec = StageSpec {
        stages: 2,
        max_tokens: 1,
        row_bytes: 8,
        out_row_bytes: 8,
        side_bytes: 0,
    };
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec).unwrap();
    for _ in 0..3 {
        let h = attn[0].dispatch(1, &[1; 8], &[]).unwrap();
        net.deliver_all();
        let b = ffn[0].get_batch(T).unwrap();
        ffn[0].respond(b, &[&[2; 8]]).unwrap();
        net.deliver_all();
        assert_eq!(
            attn[0].wait_combine(h, T).unwrap().len(),
            spec_ffn(&attn[0])
        );
    }
    assert!(attn[0].stats().stragglers().is_empty());
}

/// The partials a combine holds: one per FFN rank.
fn spec_ffn(a: &afmesh::AttentionRank) -> usize {
    a.ffn_ranks()
}

#[test]
fn the_bench_reports_a_straggler_for_every_stage() {
    let mut cmd = afmesh();
    cmd.args(["bench", "--attention", "2", "--ffn", "2", "--stages", "2"])
        .args([
            "--tokens", "2", "--hidden", "64", "--iters", "20", "--warmup", "2",
        ])
        .arg("--json");
    let mut p = Proc::spawn("bench", cmd);
    assert!(
        p.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        p.output()
    );
    let out = p.output();
    let line = out.lines().find(|l| l.starts_with('{')).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let list = v["stragglers"].as_array().unwrap();
    // Both attention ranks, every layer and stage: one straggler each.
    let total: u64 = list.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2 * 22 * 2, "{v}");
    let counts: Vec<u64> = list.iter().map(|s| s["count"].as_u64().unwrap()).collect();
    assert!(
        counts.windows(2).all(|w| w[0] >= w[1]),
        "most often first: {v}"
    );
    for s in list {
        assert!(["F0", "F1"].contains(&s["peer"].as_str().unwrap()), "{v}");
        assert!(s["mean_late_us"].as_f64().unwrap() >= 0.0, "{v}");
    }
}
