//! Checksummed sim meshes: a clean run verified, a corrupt dispatch or
//! combine a `BadFrame` naming the sender, and without checksums a flipped
//! bit going unseen.

#![allow(clippy::unwrap_used)]

#[path = "common/sim_mesh.rs"]
mod sim_mesh;

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh, sim_mesh_with_checksums, DispatchHandle, Error};
use sim_mesh::*;

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
