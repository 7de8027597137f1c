//! Whole M×N meshes on the simulated network, driven step by step from one
//! thread: shapes, interleaved stages, random token counts, delay and
//! reordering, duplicates and stale messages, link death.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{
    sim_mesh, sim_mesh_with_checksums, AttentionRank, DispatchHandle, Dtype, Error, FfnRank, Peer,
    RespondError, StageSpec,
};

const ROW: u32 = 16;
const OUT_ROW: u32 = 8; // two f32

fn spec(stages: u32, max_tokens: u32) -> StageSpec {
    StageSpec {
        stages,
        max_tokens,
        row_bytes: ROW,
        out_row_bytes: OUT_ROW,
        side_bytes: 8,
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Tokens attention rank `a` sends in (layer, stage): 0, the maximum, or
/// anything between.
fn token_count(seed: u64, a: u32, layer: u32, stage: u32, max: u32) -> u32 {
    match mix(seed ^ (u64::from(a) << 40) ^ (u64::from(layer) << 20) ^ u64::from(stage)) % 5 {
        0 => 0,
        1 => max,
        r => (r as u32 * 7919) % (max + 1),
    }
}

fn row_byte(a: u32, layer: u32, stage: u32, r: usize, k: usize) -> u8 {
    (mix((u64::from(a) << 48) ^ (u64::from(layer) << 24) ^ (u64::from(stage) << 16) ^ r as u64)
        as usize
        + k) as u8
}

fn tokens_for(a: u32, layer: u32, stage: u32, count: u32) -> Vec<u8> {
    (0..count as usize)
        .flat_map(|r| (0..ROW as usize).map(move |k| row_byte(a, layer, stage, r, k)))
        .collect()
}

fn side_for(a: u32, layer: u32) -> Vec<u8> {
    [layer.to_le_bytes(), a.to_le_bytes()].concat()
}

/// The FFN's deterministic function of one input row.
fn ffn_row(row: &[u8], f: u32, r: usize) -> [f32; 2] {
    [f32::from(row[0]) + f as f32, (r as f32) * (f as f32 + 1.0)]
}

/// The FFN's answer to attention rank `a`'s rows.
fn ffn_rows(input: &[u8], f: u32) -> Vec<u8> {
    input
        .chunks(ROW as usize)
        .enumerate()
        .flat_map(|(r, row)| ffn_row(row, f, r).into_iter().flat_map(f32::to_le_bytes))
        .collect()
}

/// Serves every complete batch on `f`, checking its inputs. Returns how many.
/// Odd sequences are answered in place (`respond_with`), even ones from
/// buffers (`respond`).
fn serve(f: &mut FfnRank, layer_of: &dyn Fn(u32, u32) -> u32) -> usize {
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
fn dispatch(a: &mut AttentionRank, layer: u32, stage: u32, count: u32) -> DispatchHandle {
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

fn check_combined(a: &mut AttentionRank, h: DispatchHandle, layer: u32, count: u32) -> bool {
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
fn run_mesh(m: u32, n: u32, stages: u32, layers: u32, seed: u64, faults: Faults) -> SimNetwork {
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

#[test]
fn shapes() {
    for (m, n) in [(1, 1), (2, 2), (4, 3), (1, 8), (8, 1)] {
        run_mesh(m, n, 3, 4, 42 + u64::from(m * 10 + n), Faults::default());
    }
}

#[test]
fn delay_and_reordering() {
    let net = run_mesh(
        4,
        3,
        3,
        5,
        7,
        Faults {
            delay_ns: 1_000,
            jitter_ns: 50_000,
            ..Faults::default()
        },
    );
    assert!(net.now() > 0);
}

#[test]
fn duplicates_are_rejected_and_counted() {
    let net = SimNetwork::new(3);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    net.set_faults_everywhere(Faults {
        duplicate_per_million: 1_000_000,
        ..Faults::default()
    });
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 2), &side_for(0, 0))
        .unwrap();
    net.deliver_all();
    assert_eq!(serve(&mut ffn[0], &|_, _| 0), 1);
    assert_eq!(
        ffn[0].stats().rejected(),
        1,
        "the duplicate dispatch is rejected"
    );
    net.deliver_all();
    assert!(check_combined(&mut attn[0], h, 0, 2));
    assert_eq!(
        attn[0].stats().rejected(),
        1,
        "the duplicate combine is rejected"
    );
    assert_eq!(net.stats().duplicated, 2);
}

#[test]
fn stale_message_is_rejected() {
    let net = SimNetwork::new(4);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 1), &side_for(0, 0))
        .unwrap();
    net.deliver_all();
    serve(&mut ffn[0], &|_, _| 0);
    net.deliver_all();
    assert!(check_combined(&mut attn[0], h, 0, 1));
    // Replay sequence 0's dispatch into F0's slot: the stage now expects 1.
    let hdr = afmesh::proto::Header {
        kind: afmesh::proto::Kind::Dispatch,
        stage: 0,
        sequence: 0,
        sender: 0,
        tokens: 0,
        row_bytes: ROW,
        side_len: 0,
        post_ns: 0,
        land_ns: 0,
        process_ns: 0,
        respond_ns: 0,
        checksum: None,
    };
    let imm = afmesh::proto::Imm::new(afmesh::proto::Kind::Dispatch, 0, 0).encode();
    // Endpoint 1 is F0, its link 0 leads to A0, region 0 holds the slots.
    net.inject(1, 0, 0, 0, hdr.encode().to_vec(), Some(imm));
    net.deliver_all();
    assert!(ffn[0].try_get_batch().unwrap().is_none());
    assert_eq!(ffn[0].stats().rejected(), 1);
    // The mesh goes on.
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 1, 0, 3), &side_for(0, 1))
        .unwrap();
    net.deliver_all();
    assert_eq!(serve(&mut ffn[0], &|_, _| 1), 1);
    net.deliver_all();
    assert!(check_combined(&mut attn[0], h, 1, 3));
}

#[test]
fn garbage_header_is_rejected_not_fatal() {
    let net = SimNetwork::new(5);
    let (_attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let imm = afmesh::proto::Imm::new(afmesh::proto::Kind::Dispatch, 0, 0).encode();
    net.inject(1, 0, 0, 0, vec![0xee; 64], Some(imm));
    net.deliver_all();
    assert!(ffn[0].try_get_batch().unwrap().is_none());
    assert_eq!(ffn[0].stats().rejected(), 1);
}

#[test]
fn killed_rank_is_peer_lost_without_hang() {
    let net = SimNetwork::new(6);
    let (mut attn, mut ffn) = sim_mesh(&net, 2, 2, spec(3, 4)).unwrap();
    let h0 = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 4), &side_for(0, 0))
        .unwrap();
    let h1 = attn[1]
        .dispatch(0, &tokens_for(1, 0, 0, 4), &side_for(1, 0))
        .unwrap();
    net.deliver_all();
    // F1 dies mid-layer, after the dispatch landed and before it responded.
    let f1_endpoint = 2 + 1;
    net.kill_endpoint(f1_endpoint);
    assert_eq!(serve(&mut ffn[0], &|_, _| 0), 1, "F0 still serves");
    net.deliver_all();
    for (a, h) in attn.iter_mut().zip([h0, h1]) {
        let t = std::time::Instant::now();
        match a.wait_combine(h, Duration::from_secs(5)) {
            Err(Error::PeerLost { peer, .. }) => assert_eq!(peer, Peer::Ffn(1)),
            other => panic!("expected PeerLost, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        // The stage was abandoned, and the lost peer blocks new dispatches.
        assert!(matches!(
            a.dispatch(0, &[], &[]),
            Err(Error::PeerLost { .. })
        ));
    }
    // F1's object stands for the dead process: what landed before the
    // death is there, but it cannot answer, and nothing more will come.
    let b = ffn[1].get_batch(Duration::from_secs(5)).unwrap();
    let outs = vec![vec![0u8; 4 * OUT_ROW as usize]; 2];
    let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
    assert!(matches!(
        ffn[1].respond(b, &refs),
        Err(RespondError {
            batch: None,
            error: Error::PeerLost { .. }
        })
    ));
    match ffn[1].get_batch(Duration::from_secs(5)) {
        Err(Error::PeerLost { peer, .. }) => assert!(matches!(peer, Peer::Attention(_))),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    // F0 needs both attention ranks, both alive: it times out, naming them.
    match ffn[0].get_batch(Duration::from_millis(20)) {
        Err(Error::Timeout { op, peer, .. }) => {
            assert_eq!((op, peer.as_str()), ("get_batch", "A0,A1"))
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[test]
fn a_failed_peer_is_named_before_one_that_left_in_order() {
    let net = SimNetwork::new(15);
    let (mut attn, ffn) = sim_mesh(&net, 1, 2, spec(1, 4)).unwrap();
    let h = attn[0].dispatch(0, &[], &side_for(0, 0)).unwrap();
    net.deliver_all();
    // F0 leaves in order (as it would after noticing the failure), then F1
    // dies; A0 sees both before it looks.
    let mut ffn = ffn.into_iter();
    ffn.next().unwrap().shutdown().unwrap();
    let f1_endpoint = 1 + 1;
    net.kill_endpoint(f1_endpoint);
    match attn[0].wait_combine(h, Duration::from_secs(1)) {
        Err(Error::PeerLost { peer, reason }) => {
            assert_eq!(peer, Peer::Ffn(1), "{reason}")
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
}

#[test]
fn stage_busy_and_limits() {
    let net = SimNetwork::new(8);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 2, spec(2, 4)).unwrap();
    let a = &mut attn[0];
    let too_many = tokens_for(0, 0, 0, 5);
    assert!(matches!(
        a.dispatch(0, &too_many, &[]),
        Err(Error::BufferSize { .. })
    ));
    assert!(matches!(
        a.dispatch(0, &[0; 17], &[]),
        Err(Error::BufferSize { .. })
    ));
    assert!(matches!(
        a.dispatch(0, &[], &[0; 9]),
        Err(Error::BufferSize { .. })
    ));
    assert!(matches!(
        a.dispatch(2, &[], &[]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        a.dispatch_with(0, usize::MAX, |_, _| 0),
        Err(Error::BufferSize { .. })
    ));
    assert!(matches!(
        a.dispatch_with(2, 0, |_, _| 0),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(net.pending(), 0, "nothing is sent on a refused dispatch");
    let h = a
        .dispatch(0, &tokens_for(0, 0, 0, 4), &side_for(0, 0))
        .unwrap();
    assert!(matches!(
        a.dispatch(0, &[], &[]),
        Err(Error::StageBusy { stage: 0 })
    ));
    net.deliver_all();
    for f in &mut ffn {
        serve(f, &|_, _| 0);
    }
    net.deliver_all();
    a.wait_all(&[h], Duration::from_secs(1)).unwrap();
    assert!(
        matches!(a.dispatch(0, &[], &[]), Err(Error::StageBusy { stage: 0 })),
        "combined but not taken is still busy"
    );
    let mut out = vec![0u8; 4 * OUT_ROW as usize];
    a.wait_combine_sum(h, Dtype::F32, &mut out, Duration::ZERO)
        .unwrap();
    assert!(
        matches!(
            a.wait_combine(h, Duration::ZERO),
            Err(Error::InvalidArgument(_))
        ),
        "a handle is redeemed once"
    );
    let _ = a.dispatch(0, &[], &[]).unwrap();
}

#[test]
fn lost_writes_time_out_naming_the_peer() {
    let net = SimNetwork::new(9);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 2, spec(1, 4)).unwrap();
    net.set_faults(
        2,
        0,
        Faults {
            drop_per_million: 1_000_000,
            ..Faults::default()
        },
    ); // F1 → A0 lost
    let h = attn[0].dispatch(0, &[], &side_for(0, 0)).unwrap();
    net.deliver_all();
    for f in &mut ffn {
        assert_eq!(serve(f, &|_, _| 0), 1);
    }
    net.deliver_all();
    match attn[0].wait_combine(h, Duration::from_millis(30)) {
        Err(Error::Timeout {
            op: "combine",
            peer,
            ..
        }) => assert_eq!(peer, "F1"),
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[test]
fn respond_checks_outputs() {
    let net = SimNetwork::new(10);
    let (mut attn, mut ffn) = sim_mesh(&net, 2, 1, spec(1, 4)).unwrap();
    for (i, a) in attn.iter_mut().enumerate() {
        let _ = a.dispatch(0, &tokens_for(i as u32, 0, 0, 2), &[]).unwrap();
    }
    net.deliver_all();
    let b = ffn[0].try_get_batch().unwrap().unwrap();
    let ok = vec![0u8; 2 * OUT_ROW as usize];
    let b = match ffn[0].respond(b, &[&ok]) {
        Err(RespondError {
            batch: Some(b),
            error: Error::InvalidArgument(_),
        }) => b,
        other => panic!("expected InvalidArgument with the batch back, got {other:?}"),
    };
    let b = match ffn[0].respond(b, &[&ok, &ok[..8]]) {
        Err(RespondError {
            batch: Some(b),
            error: Error::BufferSize { .. },
        }) => b,
        other => panic!("expected BufferSize with the batch back, got {other:?}"),
    };
    ffn[0].respond(b, &[&ok, &ok]).unwrap();
    // Answering a batch twice does not compile: respond consumes it (see
    // the compile_fail example on `FfnRank::respond`).
}

#[test]
fn respond_with_a_wrong_size_gives_the_batch_back_and_a_retry_succeeds() {
    let net = SimNetwork::new(12);
    let (mut attn, mut ffn) = sim_mesh(&net, 2, 2, spec(2, 4)).unwrap();
    let hs: Vec<_> = attn
        .iter_mut()
        .enumerate()
        .map(|(i, a)| {
            a.dispatch(1, &tokens_for(i as u32, 0, 1, 3), &side_for(i as u32, 0))
                .unwrap()
        })
        .collect();
    net.deliver_all();
    let b = ffn[0].get_batch(Duration::ZERO).unwrap();
    let good: Vec<Vec<u8>> = (0..2)
        .map(|a| vec![a as u8 + 1; 3 * OUT_ROW as usize])
        .collect();
    let short = &good[1][..3 * OUT_ROW as usize - 1];
    let sent_before = ffn[0].stats().peers[0].1.sent;
    let b = match ffn[0].respond(b, &[&good[0], short]) {
        Err(RespondError {
            batch: Some(b),
            error: Error::BufferSize { need, got, .. },
        }) => {
            assert_eq!((need, got), (24, 23));
            b
        }
        other => panic!("expected BufferSize with the batch back, got {other:?}"),
    };
    // Nothing was sent, the stage is as it was, the views still work.
    assert_eq!(ffn[0].stats().peers[0].1.sent, sent_before);
    assert_eq!(net.pending(), 0);
    assert_eq!(b.tokens(1), &tokens_for(1, 0, 1, 3)[..]);
    assert_eq!(b.side(0), &side_for(0, 0)[..]);
    assert!(
        ffn[0].try_get_batch().unwrap().is_none(),
        "not handed out twice"
    );
    // A batch of another FFN rank is refused and given back too.
    let other = ffn[1].get_batch(Duration::ZERO).unwrap();
    let other = match ffn[0].respond(other, &[&good[0], &good[1]]) {
        Err(RespondError {
            batch: Some(b),
            error: Error::InvalidArgument(_),
        }) => b,
        other => panic!("expected InvalidArgument with the batch back, got {other:?}"),
    };
    let refs: Vec<&[u8]> = good.iter().map(|v| &v[..]).collect();
    ffn[0].respond(b, &refs).unwrap();
    ffn[1].respond(other, &refs).unwrap();
    net.deliver_all();
    for (a, h) in attn.iter_mut().zip(hs) {
        let me = a.rank() as u8;
        let c = a.wait_combine(h, Duration::ZERO).unwrap();
        assert_eq!(c.partial(0).unwrap(), &vec![me + 1; 24][..]);
        assert_eq!(c.partial(1).unwrap(), &vec![me + 1; 24][..]);
    }
}

#[test]
fn wait_combine_sum_checks_the_output_before_taking_the_combine() {
    let net = SimNetwork::new(13);
    net.set_auto(true);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 2, spec(1, 4)).unwrap();
    let a = &mut attn[0];
    let mut layer = 0;
    let mut round = |a: &mut AttentionRank, ffn: &mut [FfnRank], count: u32| {
        let h = a
            .dispatch(0, &tokens_for(0, layer, 0, count), &side_for(0, layer))
            .unwrap();
        for f in ffn.iter_mut() {
            let l = layer;
            assert_eq!(serve(f, &|_, _| l), 1);
        }
        layer += 1;
        h
    };
    let h = round(a, &mut ffn, 3);
    let need = 3 * OUT_ROW as usize;
    let mut short = vec![0u8; need - 1];
    match a.wait_combine_sum(h, Dtype::F32, &mut short, Duration::from_secs(1)) {
        Err(Error::BufferSize { need: n, got, .. }) => assert_eq!((n, got), (need, need - 1)),
        other => panic!("expected BufferSize, got {other:?}"),
    }
    assert!(
        matches!(
            a.wait_combine_sum(h, Dtype::Bf16, &mut short, Duration::ZERO),
            Err(Error::BufferSize { .. })
        ),
        "still there after a refusal"
    );
    let mut out = vec![0u8; need];
    assert_eq!(
        a.wait_combine_sum(h, Dtype::F32, &mut out, Duration::from_secs(1))
            .unwrap(),
        need
    );
    let rows = tokens_for(0, 0, 0, 3);
    for (r, got) in out.chunks(8).enumerate() {
        let want0 = f32::from(rows[r * ROW as usize]) * 2.0 + 1.0;
        let want1 = r as f32 * 3.0;
        assert_eq!(f32::from_le_bytes(got[..4].try_into().unwrap()), want0);
        assert_eq!(f32::from_le_bytes(got[4..].try_into().unwrap()), want1);
    }
    assert!(matches!(
        a.wait_combine_sum(h, Dtype::F32, &mut out, Duration::ZERO),
        Err(Error::InvalidArgument(_))
    ));
    // A larger buffer is fine: only the first tokens × out_row_bytes bytes
    // are written.
    let h = round(a, &mut ffn, 2);
    let mut big = vec![0xabu8; 4 * OUT_ROW as usize];
    let used = a
        .wait_combine_sum(h, Dtype::F32, &mut big, Duration::from_secs(1))
        .unwrap();
    assert_eq!(used, 2 * OUT_ROW as usize);
    assert!(big[used..].iter().all(|&b| b == 0xab));
    let rows = tokens_for(0, 1, 0, 2);
    assert_eq!(
        f32::from_le_bytes(big[8..12].try_into().unwrap()),
        f32::from(rows[ROW as usize]) * 2.0 + 1.0
    );
}

#[test]
fn try_combine_sum_polls_without_consuming_and_the_last_trace_outlives_it() {
    let net = SimNetwork::new(17);
    net.set_auto(true);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 2, spec(1, 4)).unwrap();
    let a = &mut attn[0];
    let h = a
        .dispatch(0, &tokens_for(0, 0, 0, 3), &side_for(0, 0))
        .unwrap();
    let need = 3 * OUT_ROW as usize;
    let mut out = vec![0u8; need];
    assert_eq!(a.try_combine_sum(h, Dtype::F32, &mut out).unwrap(), None);
    assert_eq!(a.last_trace(0, 0), None, "the stage is in flight");
    let mut short = vec![0u8; need - 1];
    assert!(
        matches!(
            a.try_combine_sum(h, Dtype::F32, &mut short),
            Err(Error::BufferSize { .. })
        ),
        "a short output is refused before the combine is in"
    );
    assert_eq!(serve(&mut ffn[0], &|_, _| 0), 1);
    assert_eq!(
        a.try_combine_sum(h, Dtype::F32, &mut out).unwrap(),
        None,
        "one answer of two"
    );
    assert_eq!(serve(&mut ffn[1], &|_, _| 0), 1);
    assert_eq!(
        a.try_combine_sum(h, Dtype::F32, &mut out).unwrap(),
        Some(need)
    );
    let rows = tokens_for(0, 0, 0, 3);
    assert_eq!(
        f32::from_le_bytes(out[..4].try_into().unwrap()),
        f32::from(rows[0]) * 2.0 + 1.0
    );
    for f in 0..2 {
        let t = a.last_trace(0, f).unwrap();
        assert!(t.post_ns > 0 && t.back_ns >= t.post_ns, "{t:?}");
        assert!(
            t.respond_ns >= t.process_ns && t.process_ns >= t.land_ns,
            "{t:?}"
        );
    }
    assert_eq!(a.last_trace(0, 2), None, "no FFN rank 2");
    assert_eq!(a.last_trace(1, 0), None, "no stage 1");
    assert!(
        matches!(
            a.try_combine_sum(h, Dtype::F32, &mut out),
            Err(Error::InvalidArgument(_))
        ),
        "taken once"
    );
}

#[test]
fn messages_are_one_write_each_and_in_place_ones_copy_nothing() {
    let net = SimNetwork::new(14);
    let (mut attn, mut ffn) = sim_mesh(&net, 2, 2, spec(1, 4)).unwrap();
    let (t0, s0) = (tokens_for(0, 0, 0, 3), side_for(0, 0));
    let h0 = attn[0]
        .dispatch_with(0, 3, |rows, area| {
            rows.copy_from_slice(&t0);
            area[..8].copy_from_slice(&s0);
            8
        })
        .unwrap();
    assert_eq!(
        net.pending(),
        4,
        "one write per FFN rank (each a landing and its Sent)"
    );
    // A side block longer than side_bytes is refused after the fill:
    // nothing is sent and the stage stays idle.
    assert!(matches!(
        attn[1].dispatch_with(0, 1, |_, _| 9),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(net.pending(), 4);
    let h1 = attn[1]
        .dispatch(0, &tokens_for(1, 0, 0, 2), &side_for(1, 0))
        .unwrap();
    assert_eq!(net.deliver_all(), 8);
    assert_eq!(net.stats().delivered, 4);
    for f in &mut ffn {
        let b = f.get_batch(Duration::ZERO).unwrap();
        assert_eq!(b.tokens(0), &t0[..]);
        assert_eq!(b.side(0), &s0[..]);
        let me = f.rank();
        f.respond_with(b, |b, a, rows| {
            rows.copy_from_slice(&ffn_rows(b.tokens(a), me))
        })
        .unwrap();
    }
    assert_eq!(net.deliver_all(), 8, "landings and their Sents");
    assert_eq!(net.stats().delivered, 8, "one write per attention rank");
    assert!(check_combined(&mut attn[0], h0, 0, 3));
    assert!(check_combined(&mut attn[1], h1, 0, 2));
    // Header, side area (8 bytes rounded up to 64), the rows actually sent.
    let a0 = &attn[0].stats().peers[0].1;
    let a1 = &attn[1].stats().peers[0].1;
    assert_eq!((a0.sent, a0.sent_bytes), (1, 64 + 64 + 3 * 16));
    assert_eq!((a1.sent, a1.sent_bytes), (1, 64 + 64 + 2 * 16));
    // The simulated network copies every byte it moves; the copying
    // dispatch adds its copy into the send slot, the in-place one nothing.
    assert_eq!(a0.copied_bytes, a0.sent_bytes);
    assert_eq!(a1.copied_bytes, a1.sent_bytes + 2 * 16 + 8);
    let f0 = &ffn[0].stats().peers[0].1;
    assert_eq!((f0.sent, f0.sent_bytes), (1, 64 + 3 * 8));
    assert_eq!(f0.copied_bytes, f0.sent_bytes);
}

#[test]
fn threaded_ranks_with_blocking_waits() {
    let net = SimNetwork::new(11);
    net.set_auto(true);
    let (attn, ffn) = sim_mesh(&net, 2, 2, spec(3, 8)).unwrap();
    let layers = 20u32;
    let fs: Vec<_> = ffn
        .into_iter()
        .map(|mut f| {
            std::thread::spawn(move || {
                for _ in 0..layers * 3 {
                    let b = f.get_batch(Duration::from_secs(10)).unwrap();
                    let outs: Vec<Vec<u8>> = (0..b.senders())
                        .map(|a| vec![f.rank() as u8 + 1; b.token_count(a) * OUT_ROW as usize])
                        .collect();
                    let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
                    f.respond(b, &refs).unwrap();
                }
            })
        })
        .collect();
    let as_: Vec<_> = attn
        .into_iter()
        .map(|mut a| {
            std::thread::spawn(move || {
                for l in 0..layers {
                    let hs: Vec<_> = (0..3)
                        .map(|s| a.dispatch(s, &tokens_for(a.rank(), l, s, 8), &[]).unwrap())
                        .collect();
                    for h in hs {
                        let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
                        assert_eq!(c.partial(0).unwrap(), &[1u8; 64][..]);
                        assert_eq!(c.partial(1).unwrap(), &[2u8; 64][..]);
                    }
                }
            })
        })
        .collect();
    for t in as_.into_iter().chain(fs) {
        t.join().unwrap();
    }
}

#[test]
fn sent_before_the_peers_arrival() {
    // Every write is Sent 10 ns after it is posted and lands 20 µs later.
    let net = run_mesh(
        2,
        3,
        3,
        4,
        17,
        Faults {
            delay_ns: 20_000,
            jitter_ns: 5_000,
            sent_delay_ns: Some(10),
            ..Faults::default()
        },
    );
    assert_eq!(net.stats().sent, net.stats().delivered);
}

#[test]
fn sent_after_the_peers_arrival_and_combine() {
    let net = SimNetwork::new(21);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    // Writes land after 1 µs; their Sent comes 1 ms after the post.
    net.set_faults_everywhere(Faults {
        delay_ns: 1_000,
        sent_delay_ns: Some(1_000_000),
        ..Faults::default()
    });
    let a = &mut attn[0];
    let h = dispatch(a, 0, 0, 3);
    assert!(net.step(), "the dispatch lands");
    let b = ffn[0]
        .try_get_batch()
        .unwrap()
        .expect("the batch is complete");
    let out = ffn_rows(b.tokens(0), 0);
    ffn[0].respond(b, &[&out]).unwrap();
    assert!(net.step(), "the combine lands");
    // Both Sents are still pending, yet the combine is complete.
    assert_eq!(net.pending(), 2);
    assert!(check_combined(a, h, 0, 3));
    assert_eq!(net.pending(), 2);
    // The next dispatch of the stage waits for its slot's Sent: a thread
    // plays the network while it does.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stepper = {
        let (net, done) = (net.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if !net.step() {
                    std::thread::yield_now();
                }
            }
        })
    };
    let h = dispatch(a, 1, 0, 2);
    let b = ffn[0].get_batch(Duration::from_secs(5)).unwrap();
    assert_eq!(b.tokens(0), &tokens_for(0, 1, 0, 2)[..]);
    let out = ffn_rows(b.tokens(0), 0);
    ffn[0].respond(b, &[&out]).unwrap();
    let c = a.wait_combine(h, Duration::from_secs(5)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    stepper.join().unwrap();
    assert_eq!(net.stats().sent, 4);
}

#[test]
fn a_full_send_window_is_waited_out() {
    // One write in flight per link: the three stages' dispatches queue
    // behind each other's Sent, and every combine still arrives intact.
    let net = SimNetwork::new(23);
    net.set_auto(true);
    net.set_window(1);
    let (attn, ffn) = sim_mesh(&net, 2, 2, spec(3, 8)).unwrap();
    net.set_faults_everywhere(Faults {
        delay_ns: 500,
        jitter_ns: 2_000,
        sent_delay_ns: Some(3_000),
        ..Faults::default()
    });
    let layers = 10u32;
    let fs: Vec<_> = ffn
        .into_iter()
        .map(|mut f| {
            std::thread::spawn(move || {
                for _ in 0..layers * 3 {
                    let b = f.get_batch(Duration::from_secs(10)).unwrap();
                    let me = f.rank();
                    let outs: Vec<Vec<u8>> = (0..b.senders())
                        .map(|a| ffn_rows(b.tokens(a), me))
                        .collect();
                    let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
                    f.respond(b, &refs).unwrap();
                }
            })
        })
        .collect();
    let as_: Vec<_> = attn
        .into_iter()
        .map(|mut a| {
            std::thread::spawn(move || {
                for l in 0..layers {
                    let hs: Vec<_> = (0..3).map(|s| (s, dispatch(&mut a, l, s, 5))).collect();
                    for (s, h) in hs {
                        let rows = tokens_for(a.rank(), l, s, 5);
                        let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
                        for f in 0..2 {
                            assert_eq!(c.partial(f).unwrap(), &ffn_rows(&rows, f as u32)[..]);
                        }
                    }
                }
            })
        })
        .collect();
    for t in as_.into_iter().chain(fs) {
        t.join().unwrap();
    }
}

#[test]
fn interrupt_wakes_a_blocked_get_batch_on_another_thread() {
    let net = SimNetwork::new(21);
    net.set_auto(true);
    let (mut attn, ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let mut f = ffn.into_iter().next().unwrap();
    let stop = f.interrupter();
    let (ready, waiting) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        ready.send(()).unwrap();
        // No attention rank sends: only the interrupt ends this wait.
        let start = std::time::Instant::now();
        let r = f.get_batch(Duration::from_secs(30));
        (f, r.map(|b| b.stage()), start.elapsed())
    });
    waiting.recv().unwrap();
    stop.interrupt();
    let (mut f, r, took) = t.join().unwrap();
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert!(took < Duration::from_secs(1), "woke after {took:?}");
    // One interrupt, one wait: the rank is still usable and serves the
    // next batch.
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 2), &side_for(0, 0))
        .unwrap();
    let b = f.get_batch(Duration::from_secs(10)).unwrap();
    let out = vec![7u8; 2 * OUT_ROW as usize];
    f.respond(b, &[&out]).unwrap();
    let c = attn[0].wait_combine(h, Duration::from_secs(10)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
}

#[test]
fn interrupt_wakes_a_blocked_wait_combine_and_keeps_the_combine() {
    let net = SimNetwork::new(22);
    net.set_auto(true);
    let (attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let mut a = attn.into_iter().next().unwrap();
    let stop = a.interrupter();
    let h = a.dispatch(0, &tokens_for(0, 0, 0, 1), &[]).unwrap();
    let t = std::thread::spawn(move || {
        let r = a.wait_combine(h, Duration::from_secs(30)).map(|_| ());
        (a, r)
    });
    stop.interrupt();
    let (mut a, r) = t.join().unwrap();
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    // Nothing was consumed: the stage is still in flight and its combine
    // arrives once the FFN answers.
    let b = ffn[0].get_batch(Duration::from_secs(10)).unwrap();
    let out = vec![3u8; OUT_ROW as usize];
    ffn[0].respond(b, &[&out]).unwrap();
    let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
}

#[test]
fn a_pending_interrupt_does_not_hide_an_answer_that_is_there() {
    let net = SimNetwork::new(23);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let _h = attn[0].dispatch(0, &[], &[]).unwrap();
    net.deliver_all();
    let stop = ffn[0].interrupter();
    stop.interrupt();
    // The batch is there: it is returned, and the interrupt stays pending
    // for the next wait that would block.
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    ffn[0].respond(b, &[&[]]).unwrap();
    let r = ffn[0].get_batch(Duration::from_secs(30)).map(|_| ());
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
}

/// With checksums on, a mesh runs verified: every message carries a
/// CRC32C and every arrival checks it.
#[test]
fn checksummed_mesh_runs_verified() {
    let net = SimNetwork::new(11);
    let (mut attn, mut ffn) = sim_mesh_with_checksums(&net, 2, 3, spec(3, 4)).unwrap();
    for layer in 0..4 {
        let hs: Vec<Vec<DispatchHandle>> = attn
            .iter_mut()
            .map(|a| {
                (0..3)
                    .map(|s| dispatch(a, layer, s, 1 + (layer + s) % 4))
                    .collect()
            })
            .collect();
        net.deliver_all();
        for f in ffn.iter_mut() {
            assert_eq!(serve(f, &|_, _| layer), 3);
        }
        net.deliver_all();
        for (a, hs) in attn.iter_mut().zip(hs) {
            for (s, h) in hs.into_iter().enumerate() {
                assert!(check_combined(a, h, layer, 1 + (layer + s as u32) % 4));
            }
        }
    }
    for a in &attn {
        assert_eq!(a.stats().rejected(), 0);
    }
}

/// A flipped bit in a dispatch is `BadFrame` naming the sender at the FFN
/// rank (with checksums on), not a silently wrong batch.
#[test]
fn a_corrupt_dispatch_is_a_bad_frame_naming_the_sender() {
    let net = SimNetwork::new(12);
    let (mut attn, mut ffn) = sim_mesh_with_checksums(&net, 1, 1, spec(1, 4)).unwrap();
    net.set_faults_everywhere(Faults {
        corrupt_per_million: 1_000_000,
        ..Faults::default()
    });
    let _h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 2), &side_for(0, 0))
        .unwrap();
    net.deliver_all();
    assert_eq!(net.stats().corrupted, 1);
    match ffn[0].try_get_batch() {
        Err(Error::BadFrame { peer, reason }) => {
            assert_eq!(peer, "A0");
            assert!(reason.contains("CRC32C"), "{reason}");
        }
        other => panic!("expected BadFrame from A0, got {other:?}"),
    }
}

/// A flipped bit in a combine is `BadFrame` naming the FFN rank at the
/// attention rank.
#[test]
fn a_corrupt_combine_is_a_bad_frame_naming_the_ffn_rank() {
    let net = SimNetwork::new(13);
    let (mut attn, mut ffn) = sim_mesh_with_checksums(&net, 1, 2, spec(1, 4)).unwrap();
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 3), &side_for(0, 0))
        .unwrap();
    net.deliver_all();
    assert_eq!(serve(&mut ffn[0], &|_, _| 0), 1);
    // Only F1's combine is corrupted.
    net.set_faults_everywhere(Faults {
        corrupt_per_million: 1_000_000,
        ..Faults::default()
    });
    assert_eq!(serve(&mut ffn[1], &|_, _| 0), 1);
    net.deliver_all();
    match attn[0].try_combine(h) {
        Err(Error::BadFrame { peer, .. }) => assert_eq!(peer, "F1"),
        other => panic!(
            "expected BadFrame from F1, got {:?}",
            other.map(|c| c.is_some())
        ),
    }
}

/// Without checksums the same flipped bit reaches the caller unseen:
/// what the option is for.
#[test]
fn without_checksums_a_flipped_bit_goes_unseen() {
    let net = SimNetwork::new(14);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    net.set_faults_everywhere(Faults {
        corrupt_per_million: 1_000_000,
        ..Faults::default()
    });
    let sent = tokens_for(0, 0, 0, 2);
    let _h = attn[0].dispatch(0, &sent, &side_for(0, 0)).unwrap();
    net.deliver_all();
    let b = ffn[0].try_get_batch().unwrap().expect("the batch arrives");
    assert_ne!(b.tokens(0), &sent[..], "the corrupt row is handed over");
}
