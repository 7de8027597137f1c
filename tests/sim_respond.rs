//! The FFN's respond and the attention side's combine on the simulated
//! network: outputs checked before anything is sent or taken, a wrong size
//! giving the batch back, polling without consuming, and one write per
//! message (none copied when built in place).

#![allow(clippy::unwrap_used)]

#[path = "common/sim_mesh.rs"]
mod sim_mesh;

use std::time::Duration;

use afmesh::transport::sim::SimNetwork;
use afmesh::{sim_mesh, AttentionRank, Dtype, Error, FfnRank, RespondError};
use sim_mesh::*;

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

/// Each arrival names the slot its rank writes next to that peer (a cache
/// hint, `prepare_write`): the FFN rank's answer to the stage, the
/// attention rank's next dispatch of the stage. Every hint but the last
/// layer's is used by exactly that write.
#[test]
fn each_arrival_names_the_slot_the_next_write_to_that_peer_goes_to() {
    let (m, n, stages, layers) = (2u32, 2u32, 2u32, 4u32);
    let net = SimNetwork::new(14);
    let (mut attn, mut ffn) = sim_mesh(&net, m, n, spec(stages, 4)).unwrap();
    for layer in 0..layers {
        let mut hs = Vec::new();
        for s in 0..stages {
            for (i, a) in attn.iter_mut().enumerate() {
                let t = tokens_for(i as u32, layer, s, 1 + (layer + s) % 3);
                hs.push((i, a.dispatch(s, &t, &side_for(i as u32, layer)).unwrap()));
            }
        }
        net.deliver_all();
        for f in ffn.iter_mut() {
            for _ in 0..stages {
                let b = f.get_batch(Duration::ZERO).unwrap();
                let outs: Vec<Vec<u8>> = (0..m as usize)
                    .map(|a| vec![7u8; b.token_count(a) * OUT_ROW as usize])
                    .collect();
                let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
                f.respond(b, &refs).unwrap();
            }
        }
        net.deliver_all();
        for (i, h) in hs {
            attn[i].wait_combine(h, Duration::ZERO).unwrap();
        }
    }
    let st = net.stats();
    let per_layer = u64::from(m * n * stages);
    // One hint per arrival, both ways.
    assert_eq!(st.hints, 2 * per_layer * u64::from(layers), "{st:?}");
    // All used but the attention ranks' hints from the last combines.
    assert_eq!(st.hints_used, st.hints - per_layer, "{st:?}");
}
