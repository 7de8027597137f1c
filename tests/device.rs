//! Device memory without a GPU: what CI can check of the CUDA path.
//!
//! * Every CUDA request on a host without the driver is
//!   `Error::Unsupported` naming CUDA (never a panic), from the regions, the
//!   mesh and the driver module; `AFMESH_CUDA_LIBRARY` pointing nowhere
//!   stands for a host without it where one is installed.
//! * The memory-kind plumbing of the API through whole sim meshes, with
//!   host memory standing in for a GPU's: which backends register what,
//!   what views say, the host-rows path of device ranks, and the device
//!   accessors (addresses and copies) returning the right bytes.
//!
//! The real device path (IPC, copy engines, streams) runs on the GPU
//! machine: `scripts/gpu-check`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use afmesh::transport::sim::SimNetwork;
use afmesh::transport::{MemoryKind, Region};
use afmesh::{sim_mesh_in, Error, Mesh, MeshConfig, StageSpec};

const GPU: MemoryKind = MemoryKind::Cuda { device: 0 };

fn spec() -> StageSpec {
    StageSpec {
        stages: 2,
        max_tokens: 4,
        row_bytes: 16,
        out_row_bytes: 8,
        side_bytes: 8,
    }
}

fn unsupported_naming_cuda<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::Unsupported(m)) => assert!(m.contains("CUDA"), "{what}: {m}"),
        other => panic!("{what}: expected Unsupported naming CUDA, got {other:?}"),
    }
}

#[test]
fn without_a_driver_device_requests_are_unsupported_naming_cuda() {
    if afmesh::cuda::available() {
        eprintln!("a CUDA driver is present here: scripts/gpu-check covers this host");
        return;
    }
    unsupported_naming_cuda(Region::alloc_device(0, 4096), "Region::alloc_device");
    // SAFETY: never dereferenced: the driver is asked about it first, and
    // there is none.
    unsupported_naming_cuda(
        unsafe { Region::from_device_ptr(0x7f00_0000_0000, 64) },
        "Region::from_device_ptr",
    );
    unsupported_naming_cuda(afmesh::cuda::device_count(), "device_count");
    unsupported_naming_cuda(afmesh::cuda::dmabuf(0x7f00_0000_0000, 64), "dmabuf");
    unsupported_naming_cuda(afmesh::cuda::DeviceMemory::alloc(1, 64), "DeviceMemory");
    // A rank on a GPU fails before the rendezvous: nothing listens at the
    // scheduler address, and the error is still CUDA's.
    let mut cfg = MeshConfig::new("127.0.0.1:9", 1, 1);
    cfg.setup_timeout = Duration::from_millis(200);
    let mesh = Mesh::new(cfg);
    unsupported_naming_cuda(mesh.attention_on_device(spec(), 0), "attention_on_device");
    unsupported_naming_cuda(mesh.ffn_on_device(spec(), 0), "ffn_on_device");
}

#[test]
fn device_kind_plumbing_through_sim_with_host_memory_standing_in() {
    let net = SimNetwork::new(7);
    net.set_auto(true);
    // A host-only network refuses memory it cannot move, by kind.
    match sim_mesh_in(&net, 1, 1, spec(), GPU) {
        Err(Error::Unsupported(m)) => assert!(m.contains("CUDA device 0 memory"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    net.set_device_stand_in(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 2, 1, spec(), GPU).unwrap();
    assert_eq!(attn[0].memory(), GPU);
    assert_eq!(ffn[0].memory(), GPU);
    // Device ranks take host rows through the copying path.
    let rows0: Vec<u8> = (0..48).collect();
    let rows1: Vec<u8> = (100..132).collect();
    let h0 = attn[0].dispatch(1, &rows0, b"side-a0").unwrap();
    let h1 = attn[1].dispatch(1, &rows1, b"a1").unwrap();
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    assert_eq!(b.memory(), GPU);
    assert_eq!((b.stage(), b.token_count(0), b.token_count(1)), (1, 3, 2));
    // Views are addresses and copies, never host slices of device memory
    // (here the address is the standing-in host memory's).
    let mut buf = [0u8; 64];
    assert_eq!(b.copy_tokens(0, &mut buf).unwrap(), 48);
    assert_eq!(&buf[..48], &rows0[..]);
    assert_eq!(b.copy_tokens(1, &mut buf).unwrap(), 32);
    assert_eq!(&buf[..32], &rows1[..]);
    assert_eq!(b.copy_side(0, &mut buf).unwrap(), 7);
    assert_eq!(&buf[..7], b"side-a0");
    assert!(matches!(
        b.copy_tokens(0, &mut [0u8; 10]),
        Err(Error::BufferSize { need: 48, .. })
    ));
    assert!(b.tokens_addr(0).unwrap() != 0 && b.tokens_addr(2).is_none());
    // Device output rows need CUDA: refused by name, the batch comes back.
    let b = if afmesh::cuda::available() {
        b
    } else {
        let e = ffn[0].respond_device(b, &[0x1000, 0x2000]).unwrap_err();
        assert!(
            matches!(&e.error, Error::Unsupported(m) if m.contains("CUDA")),
            "{e:?}"
        );
        e.batch.unwrap()
    };
    let out0 = [7u8; 24];
    let out1 = [9u8; 16];
    ffn[0].respond(b, &[&out0, &out1]).unwrap();
    let c = attn[0].wait_combine(h0, Duration::from_secs(1)).unwrap();
    assert_eq!(c.partial(0), None, "no host slice of device memory");
    let mut back = [0u8; 32];
    assert_eq!(c.copy_partial(0, &mut back).unwrap(), 24);
    assert_eq!(&back[..24], &out0);
    assert!(c.partial_addr(0).is_some() && c.partial_addr(1).is_none());
    // The sum of device partials is not computed on the host.
    assert!(matches!(
        c.sum_into(afmesh::Dtype::F32, &mut [0u8; 24]),
        Err(Error::Unsupported(_))
    ));
    let c = attn[1].wait_combine(h1, Duration::from_secs(1)).unwrap();
    assert_eq!(c.copy_partial(0, &mut back).unwrap(), 16);
    assert_eq!(&back[..16], &out1);
}

#[test]
fn host_ranks_refuse_the_device_entry_points() {
    let net = SimNetwork::new(3);
    net.set_auto(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec(), MemoryKind::Host).unwrap();
    assert_eq!(attn[0].memory(), MemoryKind::Host);
    assert!(matches!(
        attn[0].dispatch_device(0, 0x1000, 1, &[]),
        Err(Error::Unsupported(_))
    ));
    let h = attn[0].dispatch(0, &[1u8; 16], &[]).unwrap();
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    let e = ffn[0].respond_device(b, &[0x1000]).unwrap_err();
    assert!(matches!(e.error, Error::Unsupported(_)));
    ffn[0].respond(e.batch.unwrap(), &[&[2u8; 8]]).unwrap();
    assert_eq!(
        attn[0]
            .wait_combine(h, Duration::from_secs(1))
            .unwrap()
            .partial(0),
        Some(&[2u8; 8][..])
    );
}

/// Stream-enqueued waits (`wait_batch_on`, `wait_combine_on`): host ranks
/// refuse them by memory kind, device ranks without a driver by CUDA, and
/// bad arguments are named; the ranks go on working afterwards.
#[test]
fn stream_waits_are_refused_clearly_without_a_gpu() {
    let net = SimNetwork::new(5);
    net.set_auto(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec(), MemoryKind::Host).unwrap();
    let h = attn[0].dispatch(0, &[1u8; 16], &[]).unwrap();
    // SAFETY: refused before any stream is touched.
    match unsafe { ffn[0].wait_batch_on(0, 0) } {
        Err(Error::Unsupported(m)) => assert!(m.contains("host memory"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // SAFETY: as above.
    match unsafe { attn[0].wait_combine_on(h, 0) } {
        Err(Error::Unsupported(m)) => assert!(m.contains("wait_combine_on"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    ffn[0].respond(b, &[&[3u8; 8]]).unwrap();
    let c = attn[0].wait_combine(h, Duration::from_secs(1)).unwrap();
    assert_eq!(c.partial(0), Some(&[3u8; 8][..]));

    if afmesh::cuda::available() {
        return; // scripts/gpu-check runs them on a GPU
    }
    let net = SimNetwork::new(6);
    net.set_auto(true);
    net.set_device_stand_in(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec(), GPU).unwrap();
    let h = attn[0].dispatch(1, &[5u8; 16], &[]).unwrap();
    // SAFETY: refused before any stream is touched (no stage 9; no CUDA).
    match unsafe { ffn[0].wait_batch_on(9, 0) } {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("stage 9"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // SAFETY: as above.
    unsupported_naming_cuda(unsafe { ffn[0].wait_batch_on(1, 0) }, "wait_batch_on");
    // SAFETY: as above.
    unsupported_naming_cuda(unsafe { attn[0].wait_combine_on(h, 0) }, "wait_combine_on");
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    assert_eq!(b.stage(), 1);
    ffn[0].respond(b, &[&[4u8; 8]]).unwrap();
    let c = attn[0].wait_combine(h, Duration::from_secs(1)).unwrap();
    let mut back = [0u8; 8];
    assert_eq!(c.copy_partial(0, &mut back).unwrap(), 8);
    assert_eq!(back, [4u8; 8]);
}

/// Rows built in place in the send slots (`send_slot_device` +
/// `dispatch_device_in_place`, `reply_slot_device` +
/// `respond_device_in_place`), with host memory standing in for a GPU's:
/// the bytes written at the returned addresses are what the peer gets,
/// with no rows passed to the call; host ranks refuse the calls by kind.
#[test]
fn rows_written_in_place_in_the_send_slots_are_what_peers_get() {
    let net = SimNetwork::new(11);
    net.set_auto(true);
    net.set_device_stand_in(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec(), GPU).unwrap();
    let rows: Vec<u8> = (0..48).map(|i| i * 3).collect();
    for layer in 0..3u8 {
        let at = attn[0].send_slot_device(1).unwrap();
        let mine: Vec<u8> = rows.iter().map(|r| r ^ layer).collect();
        // SAFETY: the slot's 4 × 16 rows bytes at `at` are host memory
        // standing in for the device's, the rank's own and not being sent
        // (`send_slot_device` waited for that).
        unsafe { std::ptr::copy_nonoverlapping(mine.as_ptr(), at as *mut u8, mine.len()) };
        let h = attn[0]
            .dispatch_device_in_place(1, 3, &[b's', layer])
            .unwrap();
        let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(b.copy_tokens(0, &mut buf).unwrap(), 48);
        assert_eq!(&buf[..48], &mine[..], "layer {layer}");
        assert_eq!(b.copy_side(0, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], &[b's', layer]);
        let reply = ffn[0].reply_slot_device(&b, 0).unwrap();
        assert!(
            ffn[0].reply_slot_device(&b, 1).is_err(),
            "one attention rank"
        );
        let out = [layer + 40; 24];
        // SAFETY: as above, the reply slot's 3 × 8 bytes.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), reply as *mut u8, out.len()) };
        ffn[0].respond_device_in_place(b).unwrap();
        let c = attn[0].wait_combine(h, Duration::from_secs(1)).unwrap();
        let mut back = [0u8; 32];
        assert_eq!(c.copy_partial(0, &mut back).unwrap(), 24);
        assert_eq!(&back[..24], &out, "layer {layer}");
    }
    // Too many tokens and an unknown stage are refused before anything
    // is sent.
    assert!(matches!(
        attn[0].dispatch_device_in_place(0, 5, &[]),
        Err(Error::BufferSize { .. })
    ));
    assert!(matches!(
        attn[0].send_slot_device(7),
        Err(Error::InvalidArgument(_))
    ));

    let net = SimNetwork::new(12);
    net.set_auto(true);
    let (mut attn, mut ffn) = sim_mesh_in(&net, 1, 1, spec(), MemoryKind::Host).unwrap();
    assert!(matches!(
        attn[0].send_slot_device(0),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        attn[0].dispatch_device_in_place(0, 1, &[]),
        Err(Error::Unsupported(_))
    ));
    let h = attn[0].dispatch(0, &[1u8; 16], &[]).unwrap();
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    assert!(matches!(
        ffn[0].reply_slot_device(&b, 0),
        Err(Error::Unsupported(_))
    ));
    let e = ffn[0].respond_device_in_place(b).unwrap_err();
    assert!(matches!(e.error, Error::Unsupported(_)));
    ffn[0].respond(e.batch.unwrap(), &[&[2u8; 8]]).unwrap();
    let c = attn[0].wait_combine(h, Duration::from_secs(1)).unwrap();
    assert_eq!(c.partial(0), Some(&[2u8; 8][..]));
}
