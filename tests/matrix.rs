//! The matrix stage layout (issue 12, point 3): every stage's dispatched
//! rows are one `[M × max_tokens, row_bytes]` matrix on each FFN rank.
//! On the simulated network (ordered links, jitter, varying token counts,
//! checksums) and across processes over shm and tcp; unordered links and
//! mismatched layouts are clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh_with_layout, Batch, Dtype, Error, StageLayout, StageSpec};
use common::{bench_json, json_field, rank_env, scheduler};

const ROW: u32 = 24; // not a multiple of 64: senders' blocks are unaligned
const OUT_ROW: u32 = 8; // two f32
const T: Duration = Duration::from_secs(2);

fn spec(stages: u32, max_tokens: u32) -> StageSpec {
    StageSpec {
        stages,
        max_tokens,
        row_bytes: ROW,
        out_row_bytes: OUT_ROW,
        side_bytes: 12,
    }
}

fn row_byte(a: u32, layer: u32, stage: u32, r: usize, k: usize) -> u8 {
    (a as usize * 131 + layer as usize * 31 + stage as usize * 17 + r * 7 + k) as u8
}

fn tokens_for(a: u32, layer: u32, stage: u32, count: u32) -> Vec<u8> {
    (0..count as usize)
        .flat_map(|r| (0..ROW as usize).map(move |k| row_byte(a, layer, stage, r, k)))
        .collect()
}

/// Tokens attention rank `a` sends in (layer, stage): 0, the most, or
/// something between, so blocks are full, empty and part-filled.
fn count(a: u32, layer: u32, stage: u32, max: u32) -> u32 {
    match (a * 7 + layer * 3 + stage) % 4 {
        0 => max,
        1 => 0,
        r => (r * 5 + layer) % (max + 1),
    }
}

/// The batch's matrix against its per-sender views: the same bytes, at
/// the same addresses, each sender's rows at row `a × max_tokens`.
fn check_matrix(b: &Batch, m: usize) {
    let mx = b.matrix().expect("a matrix under the matrix layout");
    let row = b.row_bytes();
    assert_eq!(mx.len(), m * b.max_tokens() * row);
    assert_eq!(b.matrix_len(), mx.len());
    assert_eq!(b.matrix_addr(), Some(mx.as_ptr() as u64));
    assert_eq!(mx.as_ptr() as usize % 64, 0, "the matrix is 64-aligned");
    for a in 0..m {
        let rows = b.sender_rows(a).unwrap();
        assert_eq!(rows.start, a * b.max_tokens());
        assert_eq!(rows.len(), b.token_count(a));
        let mine = &mx[rows.start * row..rows.end * row];
        assert_eq!(mine, b.tokens(a), "sender {a}'s rows");
        if !mine.is_empty() {
            assert_eq!(mine.as_ptr(), b.tokens(a).as_ptr(), "a view, not a copy");
            assert_eq!(b.tokens_addr(a), Some(mine.as_ptr() as u64));
        }
    }
    assert_eq!(b.sender_rows(m), None);
}

/// Every rank of an M×N mesh on the simulated network, several layers of
/// all stages with varying token counts; the FFN ranks read the matrix.
fn run_sim(net: &SimNetwork, m: u32, n: u32, stages: u32, max: u32, layers: u32, f: Faults) {
    let (mut attn, mut ffn) =
        sim_mesh_with_layout(net, m, n, spec(stages, max), StageLayout::Matrix).unwrap();
    net.set_faults_everywhere(f);
    for layer in 0..layers {
        let mut handles = Vec::new();
        for s in 0..stages {
            for (a, r) in attn.iter_mut().enumerate() {
                let a = a as u32;
                let c = count(a, layer, s, max);
                let side = [layer.to_le_bytes(), a.to_le_bytes(), s.to_le_bytes()].concat();
                handles.push(r.dispatch(s, &tokens_for(a, layer, s, c), &side).unwrap());
            }
        }
        net.deliver_all();
        for (f, r) in ffn.iter_mut().enumerate() {
            for _ in 0..stages {
                let b = r.get_batch(T).unwrap();
                let s = b.stage();
                check_matrix(&b, m as usize);
                let mx = b.matrix().unwrap();
                let mut outs = Vec::new();
                for a in 0..m {
                    let want = count(a, layer, s, max);
                    assert_eq!(b.token_count(a as usize), want as usize);
                    let rows = b.sender_rows(a as usize).unwrap();
                    let got = &mx[rows.start * ROW as usize..rows.end * ROW as usize];
                    assert_eq!(got, tokens_for(a, layer, s, want), "L{layer} s{s} A{a}");
                    let side = [layer.to_le_bytes(), a.to_le_bytes(), s.to_le_bytes()].concat();
                    assert_eq!(b.side(a as usize), side);
                    // Each output row: (first input byte, this F) as f32s.
                    let out: Vec<u8> = got
                        .chunks(ROW as usize)
                        .flat_map(|row| {
                            [f32::from(row[0]), f as f32]
                                .iter()
                                .flat_map(|v| v.to_le_bytes())
                                .collect::<Vec<u8>>()
                        })
                        .collect();
                    outs.push(out);
                }
                let refs: Vec<&[u8]> = outs.iter().map(|o| o.as_slice()).collect();
                r.respond(b, &refs).unwrap();
            }
        }
        net.deliver_all();
        for (i, h) in handles.into_iter().enumerate() {
            let a = (i % m as usize) as u32;
            let s = (i / m as usize) as u32;
            let c = count(a, layer, s, max) as usize;
            let mut sum = vec![0u8; c * OUT_ROW as usize];
            attn[a as usize]
                .wait_combine_sum(h, Dtype::F32, &mut sum, T)
                .unwrap();
            let want: Vec<u8> = (0..c)
                .flat_map(|r| {
                    let first = f32::from(row_byte(a, layer, s, r, 0)) * n as f32;
                    let fs = (0..n).map(|f| f as f32).sum::<f32>();
                    [first, fs]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>()
                })
                .collect();
            assert_eq!(sum, want, "combine L{layer} s{s} A{a}");
        }
    }
    for r in &attn {
        assert_eq!(r.stats().rejected(), 0);
    }
    for r in &ffn {
        assert_eq!(r.stats().rejected(), 0);
    }
}

#[test]
fn sim_2a2f_matrix_layout_verified() {
    let net = SimNetwork::new(7);
    net.set_ordered(true);
    run_sim(&net, 2, 2, 3, 5, 6, Faults::default());
}

/// Jitter would reorder writes; an ordered network delays them instead,
/// so the head still lands after the rows.
#[test]
fn sim_3a2f_matrix_layout_with_jitter_verified() {
    let net = SimNetwork::new(9);
    net.set_ordered(true);
    let jitter = Faults {
        delay_ns: 1_000,
        jitter_ns: 20_000,
        ..Faults::default()
    };
    run_sim(&net, 3, 2, 2, 4, 5, jitter);
}

/// The batch is handed out the moment its last head lands, one network
/// event at a time: by then every sender's rows are in the matrix (the
/// rows' write went first on the same ordered link).
#[test]
fn a_batch_counted_as_soon_as_its_heads_land_has_all_its_rows() {
    let net = SimNetwork::new(5);
    net.set_ordered(true);
    let (mut attn, mut ffn) =
        sim_mesh_with_layout(&net, 3, 1, spec(1, 6), StageLayout::Matrix).unwrap();
    net.set_faults_everywhere(Faults {
        delay_ns: 500,
        jitter_ns: 10_000,
        ..Faults::default()
    });
    for layer in 0..8 {
        let mut hs = Vec::new();
        for (a, r) in attn.iter_mut().enumerate() {
            let rows = tokens_for(a as u32, layer, 0, 6);
            hs.push(r.dispatch(0, &rows, &[]).unwrap());
        }
        let b = loop {
            if let Some(b) = ffn[0].try_get_batch().unwrap() {
                break b;
            }
            assert!(net.step(), "the network ran dry before the batch completed");
        };
        check_matrix(&b, 3);
        for a in 0..3 {
            assert_eq!(
                b.tokens(a),
                tokens_for(a as u32, layer, 0, 6),
                "L{layer} A{a}"
            );
        }
        ffn[0]
            .respond(b, &[&[0u8; 48], &[0u8; 48], &[0u8; 48]])
            .unwrap();
        net.deliver_all();
        for (a, h) in hs.into_iter().enumerate() {
            attn[a].wait_combine(h, T).unwrap();
        }
    }
}

#[test]
fn the_matrix_layout_on_an_unordered_network_is_a_clear_error() {
    let net = SimNetwork::new(3);
    match sim_mesh_with_layout(&net, 2, 2, spec(1, 4), StageLayout::Matrix) {
        Err(Error::Config(msg)) => {
            assert!(msg.contains("matrix stage layout"), "{msg}");
            assert!(msg.contains("in order") && msg.contains("sim"), "{msg}");
        }
        other => panic!("expected a Config error, got {:?}", other.map(|_| ())),
    }
}

/// Under the slots layout there is no matrix: the views say so.
#[test]
fn the_slots_layout_offers_no_matrix() {
    let net = SimNetwork::new(4);
    let (mut attn, mut ffn) =
        sim_mesh_with_layout(&net, 1, 1, spec(1, 4), StageLayout::Slots).unwrap();
    let h = attn[0].dispatch(0, &tokens_for(0, 0, 0, 2), &[]).unwrap();
    net.deliver_all();
    let b = ffn[0].get_batch(T).unwrap();
    assert_eq!(
        (b.matrix(), b.matrix_addr(), b.sender_rows(0)),
        (None, None, None)
    );
    ffn[0].respond(b, &[&[0u8; 16]]).unwrap();
    net.deliver_all();
    attn[0].wait_combine(h, T).unwrap();
}

/// `afmesh bench` 2A2F with the matrix layout: the FFN ranks read their
/// input from the matrix and, in warm-up layers, compare it with each
/// sender's view; every byte is verified.
fn bench_2a2f_matrix(transport: &str) {
    let line = bench_json(&[
        "--attention",
        "2",
        "--ffn",
        "2",
        "--transport",
        transport,
        "--layout",
        "matrix",
        "--tokens",
        "32",
        "--hidden",
        "1000",
        "--vary-tokens",
        "--iters",
        "6",
        "--warmup",
        "4",
    ]);
    let line = line.as_str();
    assert_eq!(json_field(line, "layout"), "\"matrix\"", "{line}");
    assert_eq!(json_field(line, "transport"), format!("\"{transport}\""));
}

#[test]
fn shm_bench_2a2f_matrix_layout_verified() {
    bench_2a2f_matrix("shm");
}

#[test]
fn tcp_bench_2a2f_matrix_layout_verified() {
    bench_2a2f_matrix("tcp");
}

/// A rank whose layout differs from the job's is refused by the
/// scheduler, which names both layouts (whichever rank came first set the
/// job's).
#[test]
fn a_layout_mismatch_is_refused_naming_both() {
    let (mut sched, addr) = scheduler(&[]);
    let job = format!("matrix-mismatch-{}", std::process::id());
    let env = |layout| {
        vec![
            ("AFMESH_TRANSPORT", "tcp"),
            ("AFMESH_JOB", job.as_str()),
            ("AFMESH_LAYOUT", layout),
            ("AFMESH_SETUP_TIMEOUT_MS", "5000"),
        ]
    };
    let args = [
        "--iters", "1", "--warmup", "0", "--tokens", "2", "--hidden", "8",
    ];
    let mut ranks = [
        rank_env("ffn", 0, &addr, 1, 1, &args, &env("slots")),
        rank_env("attention", 0, &addr, 1, 1, &args, &env("matrix")),
    ];
    let mut outs = String::new();
    for p in &mut ranks {
        let st = p.wait_exit(Duration::from_secs(20));
        assert!(!st.success(), "{}", p.output());
        outs.push_str(&p.output());
    }
    assert!(
        outs.contains("asked for the matrix stage layout, the job has slots")
            || outs.contains("asked for the slots stage layout, the job has matrix"),
        "{outs}"
    );
    sched.kill();
}
