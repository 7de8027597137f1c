//! Verbs checks that run inside a child of this test binary with softverbs
//! preloaded: GPUDirect registration errors named, and a parked rank woken
//! on either rail.

#![allow(clippy::unwrap_used)]

#[path = "common/cdylib.rs"]
mod cdylib;
mod common;
#[path = "common/verbs_mesh.rs"]
mod verbs_mesh;

use std::time::Duration;

use common::Proc;
use verbs_mesh::*;

/// GPUDirect RDMA registration (device memory with verbs) has no NIC or
/// GPU here, so its error paths are what CI runs: the parent spawns this
/// test binary's `gpudirect_child` with softverbs preloaded.
#[test]
fn gpudirect_registration_errors_are_named() {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "gpudirect_child",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    let _fabric = FabricFile::new("gpudirect");
    for (k, v) in fabric_env("gpudirect") {
        cmd.env(k, v);
    }
    cmd.env("AFMESH_TEST_GPUDIRECT_CHILD", "1");
    let mut p = Proc::spawn("gpudirect", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    assert!(st.success(), "{out}");
    // The child really ran its checks (it prints this after them).
    assert!(out.contains("gpudirect checks passed"), "{out}");
}

/// Run by [`gpudirect_registration_errors_are_named`] under softverbs; a
/// no-op in the ordinary test run.
#[test]
fn gpudirect_child() {
    use afmesh::transport::sim::SimNetwork;
    use afmesh::transport::verbs::VerbsTransport;
    use afmesh::transport::{Access, Backend, MemoryKind, Mux, PollPolicy, Region, Transport};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    if std::env::var_os("AFMESH_TEST_GPUDIRECT_CHILD").is_none() {
        return;
    }
    let device =
        || Arc::new(Region::host_standing_in_for(MemoryKind::Cuda { device: 0 }, 4096).unwrap());
    let mut t = VerbsTransport::new(1).unwrap();
    assert!(t.caps().moves(MemoryKind::Cuda { device: 0 }));

    // ibv_reg_dmabuf_mr: softverbs answers EOPNOTSUPP, as providers
    // without dma-buf support do; the error names the verb and errno.
    let fd = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: softverbs refuses every dma-buf without reading the fd.
    let e = unsafe { t.register_dmabuf(fd.as_raw_fd(), 0, 4096, 0x10000, Access::RemoteWrite) }
        .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("ibv_reg_dmabuf_mr"), "{m}");
    assert!(
        m.contains(&std::io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string()),
        "{m}"
    );

    if !afmesh::cuda::available() {
        // CUDA memory without a CUDA driver: CUDA's error, never a
        // fallback to ibv_reg_mr on what is not device memory.
        let e = t.register(&device(), Access::RemoteWrite).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("CUDA") && m.contains("verbs"), "{m}");
        assert!(matches!(e, afmesh::Error::Unsupported(_)), "{e:?}");

        // In a mux, a backend that cannot register device memory leaves
        // it (logged), and its links go to the others ...
        let net = SimNetwork::new(1);
        net.set_device_stand_in(true);
        let verbs = VerbsTransport::new(1).unwrap();
        let mut mux = Mux::new(
            vec![Backend::Verbs(verbs), Backend::Sim(net.endpoint())],
            PollPolicy::default(),
        );
        mux.register(&device(), Access::RemoteWrite).unwrap();
        mux.register(&device(), Access::Local).unwrap();
        let names: Vec<&str> = mux.backends().iter().map(|b| b.name()).collect();
        assert_eq!(names, ["sim"]);
        // ... and when it is the only one, its error is the rank's.
        let mut alone = Mux::new(
            vec![Backend::Verbs(VerbsTransport::new(1).unwrap())],
            PollPolicy::default(),
        );
        let m = alone
            .register(&device(), Access::RemoteWrite)
            .unwrap_err()
            .to_string();
        assert!(m.contains("CUDA") && m.contains("GPUDirect"), "{m}");
    }
    println!("gpudirect checks passed");
}

/// A rank that parks waits on every rail's completion channel in one
/// wait: with two rails, a link on rail 1 (ranks 1 and 0 meet there)
/// wakes a parked rank through the fds `wake()` hands the mux. The parent
/// runs [`rails_child`] in-process under softverbs with two devices.
#[test]
fn a_parked_rank_wakes_on_either_rail() {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["rails_child", "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in fabric_env("railwake") {
        cmd.env(k, v);
    }
    cmd.env("SOFTVERBS_DEVICES", "2");
    cmd.env("AFMESH_IB_DEVICE", "softverbs0,softverbs1");
    cmd.env("AFMESH_TEST_RAILS_CHILD", "1");
    let mut p = Proc::spawn("rails", cmd);
    let st = p.wait_exit(Duration::from_secs(20));
    let out = p.output();
    // The child's fabric outlives it (one process, no peer to remove it).
    let _ = std::fs::remove_file(format!(
        "/dev/shm/softverbs.afmesh-railwake-{}.fabric",
        std::process::id()
    ));
    assert!(st.success(), "{out}");
    assert!(out.contains("rail checks passed"), "{out}");
}

/// Run by [`a_parked_rank_wakes_on_either_rail`]; a no-op otherwise.
#[test]
fn rails_child() {
    use afmesh::transport::verbs::VerbsTransport;
    use afmesh::transport::{Access, Completion, LocalSlice, PeerSpec, Region, Transport, Wake};
    use std::sync::Arc;
    use std::time::Instant;

    if std::env::var_os("AFMESH_TEST_RAILS_CHILD").is_none() {
        return;
    }
    let spec = |label: &str, blob: Vec<u8>, initiator: bool, me: u32, peer: u32| PeerSpec {
        label: label.into(),
        blob,
        initiator,
        peer_rank: peer,
        my_rank: me,
        epoch: 1,
    };
    // A1 of 2 attention ranks, F0 of 1 FFN rank.
    let mut a = VerbsTransport::new(1).unwrap();
    let mut f = VerbsTransport::new(2).unwrap();
    assert_eq!((a.rail_count(), f.rail_count()), (2, 2));
    assert_eq!(a.device(), "softverbs0:1,softverbs1:1");
    let send = Arc::new(Region::alloc(4096).unwrap());
    let recv_a = Arc::new(Region::alloc(4096).unwrap());
    let recv_f = Arc::new(Region::alloc(4096).unwrap());
    let key = a.register(&send, Access::Local).unwrap().local;
    a.register(&recv_a, Access::RemoteWrite).unwrap();
    f.register(&recv_f, Access::RemoteWrite).unwrap();
    let (ea, ef) = (a.endpoint(), f.endpoint());
    // A1 and F0: (1 + 0) mod 2, rail 1 at both ends.
    let remote = a
        .connect(&[spec("F0", ef, true, 1, 0)], Duration::from_secs(5))
        .unwrap()[0]
        .remote[0];
    f.connect(&[spec("A1", ea, false, 0, 1)], Duration::from_secs(5))
        .unwrap();

    // F parks: its CQs armed, one fd per rail to wait on.
    let mut out = Vec::new();
    f.arm(&mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    let Wake::Fds { read, .. } = f.wake() else {
        panic!("verbs waits on fds")
    };
    assert_eq!(read.len(), 2, "one completion channel per rail");
    let src = [LocalSlice {
        key,
        offset: 0,
        len: 64,
    }];
    a.post_write(0, &src, &remote, 0, Some(7), 7).unwrap();
    // The write lands on rail 1: one of F's fds turns readable.
    let mut fds: Vec<libc::pollfd> = read
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfds for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5000) };
    assert_eq!(n, 1, "the parked rank woke within 5 s");
    assert!(
        fds[1].revents & libc::POLLIN != 0,
        "rail 1's channel: {fds:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut arrived = false;
    while !arrived && Instant::now() < deadline {
        out.clear();
        f.progress(&mut out).unwrap();
        a.progress(&mut out).unwrap();
        arrived |= out.iter().any(|c| {
            matches!(
                c,
                Completion::Arrival {
                    imm: 7,
                    len: 64,
                    ..
                }
            )
        });
        std::thread::yield_now();
    }
    assert!(arrived, "the write arrived");
    let c = f.counters();
    assert_eq!(c.rails, 2);
    let c = a.counters();
    assert_eq!((c.rail_messages[0], c.rail_messages[1]), (0, 1), "{c:?}");
    assert_eq!(c.rail_bytes[1], 64, "{c:?}");
    println!("rail checks passed");
}
