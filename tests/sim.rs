//! Whole M×N meshes on the simulated network, driven step by step from one
//! thread: shapes, delay and reordering, duplicates and stale messages,
//! garbage headers, link death, stage limits and lost writes. The
//! workload is `tests/common/sim_mesh.rs`; the rest of the sim tests are
//! `tests/sim_{respond,threads,checksums}.rs`.

#![allow(clippy::unwrap_used)]

#[path = "common/sim_mesh.rs"]
mod sim_mesh;

use std::time::Duration;

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh, Dtype, Error, Peer, RespondError};
use sim_mesh::*;

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
