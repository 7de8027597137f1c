//! Unit tests of the FFN rank on simulated meshes: checksums under the
//! matrix layout, and headers read from the region for peers without a
//! host mirror.

use std::sync::Arc;
use std::time::Duration;

use crate::api::mesh::sim_mesh_with;
use crate::transport::sim::{Faults, SimNetwork};
use crate::transport::{MemoryKind, Region};
use crate::{sim_mesh_in, StageLayout, StageSpec};

/// Checksums under the matrix layout cover the side area and the rows
/// where they landed (two places): a good message passes, a corrupted
/// row is caught and names the sender.
#[test]
fn checksums_cover_the_matrix_rows() {
    let spec = StageSpec {
        stages: 2,
        max_tokens: 4,
        row_bytes: 40,
        out_row_bytes: 8,
        side_bytes: 5,
    };
    let net = SimNetwork::new(12);
    net.set_ordered(true);
    let (mut attn, mut ffn) = sim_mesh_with(
        &net,
        2,
        1,
        spec,
        MemoryKind::Host,
        true,
        StageLayout::Matrix,
    )
    .unwrap();
    let h0 = attn[0].dispatch(1, &[3u8; 120], b"side0").unwrap();
    let h1 = attn[1].dispatch(1, &[4u8; 40], b"s1").unwrap();
    net.deliver_all();
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    assert_eq!(b.matrix().unwrap()[..120], [3u8; 120]);
    assert_eq!(b.matrix().unwrap()[160..200], [4u8; 40]);
    assert_eq!((b.side(0), b.side(1)), (&b"side0"[..], &b"s1"[..]));
    ffn[0].respond(b, &[&[0u8; 24], &[0u8; 8]]).unwrap();
    net.deliver_all();
    attn[0].wait_combine(h0, Duration::from_secs(1)).unwrap();
    attn[1].wait_combine(h1, Duration::from_secs(1)).unwrap();
    // Flip a bit of every write A1 (sim endpoint 1; its link 0 goes
    // to F0) sends from now on: the check over the matrix catches it.
    net.set_faults(
        1,
        0,
        Faults {
            corrupt_per_million: 1_000_000,
            ..Faults::default()
        },
    );
    let _h = attn[1].dispatch(0, &[5u8; 80], &[]).unwrap();
    net.deliver_all();
    ffn[0].progress().unwrap();
    let lost = ffn[0].engine.lost(1).unwrap_or("").to_string();
    assert!(lost.contains("CRC32C"), "{lost}");
}

/// A receive region with a host header mirror (what the cuda backend
/// sets up) can also be written by a backend that does not fill the
/// mirror (verbs with GPUDirect): those peers' headers are read from
/// the region itself, not from the (stale) mirror.
#[test]
fn headers_of_peers_without_a_mirror_are_read_from_the_region() {
    let net = SimNetwork::new(11);
    net.set_auto(true);
    net.set_device_stand_in(true);
    let spec = StageSpec {
        stages: 1,
        max_tokens: 2,
        row_bytes: 8,
        out_row_bytes: 8,
        side_bytes: 0,
    };
    let gpu = MemoryKind::Cuda { device: 0 };
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec, gpu).unwrap();
    let region = ffn[0].receive_region().clone();
    // An all-zero mirror: a header read from it would be refused.
    let mirror = Arc::new(Region::alloc(region.len()).unwrap());
    assert!(region.set_mirror(mirror));
    let h = attn[0].dispatch(0, &[9u8; 16], &[]).unwrap();
    let b = ffn[0].get_batch(Duration::from_secs(2)).unwrap();
    assert_eq!(b.token_count(0), 2);
    let mut rows = [0u8; 16];
    assert_eq!(b.copy_tokens(0, &mut rows).unwrap(), 16);
    assert_eq!(rows, [9u8; 16]);
    ffn[0].respond(b, &[&[1u8; 16]]).unwrap();
    attn[0].wait_combine(h, Duration::from_secs(2)).unwrap();
}
