//! The sim-mesh workload the `tests/sim*.rs` binaries share: a stage shape,
//! deterministic tokens, side data and FFN answers per (rank, layer, stage),
//! and `run_mesh`, which drives a whole M×N mesh pipelined from one thread
//! and checks every combine.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh, AttentionRank, DispatchHandle, Dtype, FfnRank, StageSpec};

pub const ROW: u32 = 16;
pub const OUT_ROW: u32 = 8; // two f32

pub fn spec(stages: u32, max_tokens: u32) -> StageSpec {
    StageSpec {
        stages,
        max_tokens,
        row_bytes: ROW,
        out_row_bytes: OUT_ROW,
        side_bytes: 8,
    }
}

pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Tokens attention rank `a` sends in (layer, stage): 0, the maximum, or
/// anything between.
pub fn token_count(seed: u64, a: u32, layer: u32, stage: u32, max: u32) -> u32 {
    match mix(seed ^ (u64::from(a) << 40) ^ (u64::from(layer) << 20) ^ u64::from(stage)) % 5 {
        0 => 0,
        1 => max,
        r => (r as u32 * 7919) % (max + 1),
    }
}

pub fn row_byte(a: u32, layer: u32, stage: u32, r: usize, k: usize) -> u8 {
    (mix((u64::from(a) << 48) ^ (u64::from(layer) << 24) ^ (u64::from(stage) << 16) ^ r as u64)
        as usize
        + k) as u8
}

pub fn tokens_for(a: u32, layer: u32, stage: u32, count: u32) -> Vec<u8> {
    (0..count as usize)
        .flat_map(|r| (0..ROW as usize).map(move |k| row_byte(a, layer, stage, r, k)))
        .collect()
}

pub fn side_for(a: u32, layer: u32) -> Vec<u8> {
    [layer.to_le_bytes(), a.to_le_bytes()].concat()
}

/// The FFN's deterministic function of one input row.
pub fn ffn_row(row: &[u8], f: u32, r: usize) -> [f32; 2] {
    [f32::from(row[0]) + f as f32, (r as f32) * (f as f32 + 1.0)]
}

/// The FFN's answer to attention rank `a`'s rows.
pub fn ffn_rows(input: &[u8], f: u32) -> Vec<u8> {
    input
        .chunks(ROW as usize)
        .enumerate()
        .flat_map(|(r, row)| ffn_row(row, f, r).into_iter().flat_map(f32::to_le_bytes))
        .collect()
}

/// Serves every complete batch on `f`, checking its inputs. Returns how many.
/// Odd sequences are answered in place (`respond_with`), even ones from
/// buffers (`respond`).
pub fn serve(f: &mut FfnRank, layer_of: &dyn Fn(u32, u32) -> u32) -> usize {
    let mut served = 0;
    while let Some(b) = f.try_get_batch().expect("get_batch") {
        for a in 0..b.senders() {
            let layer = layer_of(a as u32, b.stage());
            let t = b.tokens(a);
            assert_eq!(b.token_count(a) * ROW as usize, t.len());
            assert_eq!(
                t,
                &tokens_for(a as u32, layer, b.stage(), b.token_count(a) as u32)[..],
                "F{} A{a} stage {}",
                f.rank(),
                b.stage()
            );
            assert_eq!(b.side(a), &side_for(a as u32, layer)[..]);
        }
        let me = f.rank();
        if b.sequence() % 2 == 1 {
            f.respond_with(b, |b, a, rows| {
                for (r, (out, row)) in rows
                    .chunks_mut(OUT_ROW as usize)
                    .zip(b.tokens(a).chunks(ROW as usize))
                    .enumerate()
                {
                    let [x, y] = ffn_row(row, me, r);
                    out[..4].copy_from_slice(&x.to_le_bytes());
                    out[4..].copy_from_slice(&y.to_le_bytes());
                }
            })
            .expect("respond_with");
        } else {
            let outs: Vec<Vec<u8>> = (0..b.senders())
                .map(|a| ffn_rows(b.tokens(a), me))
                .collect();
            let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
            f.respond(b, &refs).expect("respond");
        }
        served += 1;
    }
    served
}

/// Dispatches attention rank `a`'s block for (layer, stage): from buffers
/// on even layer + stage, built in place (`dispatch_with`) on odd.
pub fn dispatch(a: &mut AttentionRank, layer: u32, stage: u32, count: u32) -> DispatchHandle {
    let me = a.rank();
    let tokens = tokens_for(me, layer, stage, count);
    let side = side_for(me, layer);
    if (layer + stage).is_multiple_of(2) {
        return a.dispatch(stage, &tokens, &side).unwrap();
    }
    a.dispatch_with(stage, count as usize, |rows, area| {
        assert_eq!((rows.len(), area.len()), (tokens.len(), 8));
        rows.copy_from_slice(&tokens);
        area[..side.len()].copy_from_slice(&side);
        side.len()
    })
    .unwrap()
}

pub fn check_combined(a: &mut AttentionRank, h: DispatchHandle, layer: u32, count: u32) -> bool {
    let me = a.rank();
    let n = a.ffn_ranks();
    let expect_rows = tokens_for(me, layer, h.stage(), count);
    let Some(c) = a.try_combine(h).expect("combine") else {
        return false;
    };
    assert_eq!(c.tokens(), count as usize);
    for f in 0..n {
        let p = c.partial(f).unwrap();
        let want = ffn_rows(&expect_rows, f as u32);
        assert_eq!(
            p,
            &want[..],
            "A{me} partial F{f} layer {layer} stage {}",
            h.stage()
        );
    }
    let mut sum = vec![0u8; count as usize * OUT_ROW as usize];
    c.sum_into(Dtype::F32, &mut sum).unwrap();
    for (r, got) in sum.chunks(8).enumerate() {
        let row0 = expect_rows[r * ROW as usize];
        let want0: f32 = (0..n).map(|f| f32::from(row0) + f as f32).sum();
        let want1: f32 = (0..n).map(|f| r as f32 * (f as f32 + 1.0)).sum();
        assert_eq!(f32::from_le_bytes(got[..4].try_into().unwrap()), want0);
        assert_eq!(f32::from_le_bytes(got[4..].try_into().unwrap()), want1);
    }
    true
}

/// Runs `layers` layers of every stage, pipelined: a stage is dispatched for
/// the next layer as soon as its previous combine is taken.
pub fn run_mesh(m: u32, n: u32, stages: u32, layers: u32, seed: u64, faults: Faults) -> SimNetwork {
    let net = SimNetwork::new(seed);
    let max = 9;
    let (mut attn, mut ffn) = sim_mesh(&net, m, n, spec(stages, max)).unwrap();
    net.set_faults_everywhere(faults);
    // next_layer[a][s]: the layer attention rank a dispatches next on stage s.
    let mut next_layer = vec![vec![0u32; stages as usize]; m as usize];
    let mut inflight: Vec<Vec<Option<(DispatchHandle, u32, u32)>>> =
        vec![vec![None; stages as usize]; m as usize];
    let mut done = 0;
    let total = m * stages * layers;
    let mut steps = 0u64;
    while done < total {
        let mut progressed = false;
        for (ai, a) in attn.iter_mut().enumerate() {
            for s in 0..stages as usize {
                match inflight[ai][s] {
                    None if next_layer[ai][s] < layers => {
                        let l = next_layer[ai][s];
                        let count = token_count(seed, ai as u32, l, s as u32, max);
                        let h = dispatch(a, l, s as u32, count);
                        inflight[ai][s] = Some((h, l, count));
                        next_layer[ai][s] += 1;
                        progressed = true;
                    }
                    Some((h, l, count)) if check_combined(a, h, l, count) => {
                        inflight[ai][s] = None;
                        done += 1;
                        progressed = true;
                    }
                    _ => {}
                }
            }
        }
        // The FFN knows which layer a stage is on from the attention side's
        // bookkeeping: every attention rank is on the same layer per stage.
        let layer_now: Vec<Vec<u32>> = inflight
            .iter()
            .map(|v| v.iter().map(|x| x.map_or(0, |(_, l, _)| l)).collect())
            .collect();
        let layer_of = |a: u32, s: u32| layer_now[a as usize][s as usize];
        for f in &mut ffn {
            if serve(f, &layer_of) > 0 {
                progressed = true;
            }
        }
        if !progressed {
            assert!(net.step(), "mesh stalled with {done}/{total} combines");
        }
        steps += 1;
        assert!(steps < 1_000_000, "runaway");
    }
    for a in &attn {
        assert_eq!(
            a.stats().rejected(),
            0,
            "no rejects without faults that cause them"
        );
    }
    // Every combine taken is one round trip per FFN rank on the attention
    // side, and one answered dispatch per attention rank on the FFN side.
    let per_peer = u64::from(stages * layers);
    for a in &attn {
        for (peer, s) in a.stats().peers {
            assert_eq!(s.round_trip_ns.count(), per_peer, "{peer}");
            assert!(s.ffn_ns.is_empty(), "{peer}");
        }
    }
    for f in &ffn {
        for (peer, s) in f.stats().peers {
            assert_eq!(s.ffn_ns.count(), per_peer, "{peer}");
            assert!(s.round_trip_ns.is_empty(), "{peer}");
        }
    }
    net
}
