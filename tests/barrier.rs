//! Barriers of a running mesh, through the scheduler
//! (`AttentionRank::barrier` / `FfnRank::barrier`): a 2A+1F mesh over tcp
//! in one process, one thread per rank, after traffic. A barrier of one
//! role waits for that role only; a missing rank times the barrier out,
//! and calling again resumes the same barrier; a rank the barrier leaves
//! out is refused by name. A job of two instance groups: a barrier of
//! every group waits for the other group, one of a group does not.

#![allow(clippy::unwrap_used)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use afmesh::{Error, Mesh, MeshConfig, Roles, StageSpec, TransportKind};

const T: Duration = Duration::from_secs(10);
const BOTH: Roles = Roles {
    attention: true,
    ffn: true,
};
const ATTENTION: Roles = Roles {
    attention: true,
    ffn: false,
};

fn spec() -> StageSpec {
    StageSpec {
        stages: 1,
        max_tokens: 1,
        row_bytes: 8,
        out_row_bytes: 8,
        side_bytes: 0,
    }
}

fn mesh(addr: &str, rank: u32, embed: bool) -> Mesh {
    let mut c = MeshConfig::new(addr, 2, 1);
    c.transport = TransportKind::Tcp;
    c.rank = Some(rank);
    c.embed_scheduler = embed;
    c.job = format!("barrier-{}", std::process::id());
    c.setup_timeout = T;
    Mesh::new(c)
}

#[test]
fn barriers_of_a_running_mesh() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // The FFN rank tells the test when it has answered, then waits for
    // the go before entering the barrier of both roles.
    let (answered, answered_rx) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let ffn = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut f = mesh(&addr, 0, false).ffn(spec()).unwrap();
            let b = f.get_batch(T).unwrap();
            assert_eq!(b.senders(), 2);
            let rows: Vec<Vec<u8>> = (0..2).map(|a| b.tokens(a).to_vec()).collect();
            let outs: Vec<&[u8]> = rows.iter().map(|r| &r[..]).collect();
            f.respond(b, &outs).unwrap();
            answered.send(()).unwrap();
            let e = f.barrier(ATTENTION, T).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("ffn rank"),
                "{e}"
            );
            go_rx.recv_timeout(T).unwrap();
            f.barrier(BOTH, T).unwrap();
            f.shutdown().unwrap();
        })
    };
    let attention = |rank: u32| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut a = mesh(&addr, rank, rank == 0).attention(spec()).unwrap();
            let h = a.dispatch(0, &[rank as u8; 8], &[]).unwrap();
            let got = a.wait_combine(h, T).unwrap().partial(0).map(<[u8]>::to_vec);
            assert_eq!(got, Some(vec![rank as u8; 8]));
            // Attention ranks only, twice (numbered per role set).
            a.barrier(ATTENTION, T).unwrap();
            a.barrier(ATTENTION, T).unwrap();
            a
        })
    };
    let a0 = attention(0);
    let a1 = attention(1);
    let mut a0 = a0.join().unwrap();
    let mut a1 = a1.join().unwrap();
    answered_rx.recv_timeout(T).unwrap();
    // Both roles: the FFN rank has not entered, so it times out, bounded.
    let t0 = Instant::now();
    let e = a0.barrier(BOTH, Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    // Still inside: another set of roles is refused until it is released.
    let e = a0.barrier(ATTENTION, T).unwrap_err();
    assert!(e.to_string().contains("still inside"), "{e}");
    go.send(()).unwrap();
    let a1t = std::thread::spawn(move || {
        a1.barrier(BOTH, T).unwrap();
        a1
    });
    // Calling again resumes the same barrier, which the others release.
    a0.barrier(BOTH, T).unwrap();
    let a1 = a1t.join().unwrap();
    ffn.join().unwrap();
    a1.shutdown().unwrap();
    a0.shutdown().unwrap();
}

/// One rank of a job of two instance groups, each a 1A+1F mesh (StepMesh's
/// node of two processes, `DMLC_GROUP_SIZE=2`): group `g`, embedding the
/// scheduler in group 0's attention rank.
fn grouped(addr: &str, group: u32, embed: bool) -> Mesh {
    let mut c = MeshConfig::new(addr, 1, 1);
    c.transport = TransportKind::Tcp;
    c.rank = Some(0);
    c.group_size = 2;
    c.group = group;
    c.embed_scheduler = embed;
    c.job = format!("xbarrier-{}", std::process::id());
    c.setup_timeout = T;
    Mesh::new(c)
}

/// Either side of a mesh, for barriers.
enum Side {
    A(afmesh::AttentionRank),
    F(afmesh::FfnRank),
}

impl Side {
    fn barrier(&mut self, roles: Roles, all_groups: bool, t: Duration) -> afmesh::Result<()> {
        match (self, all_groups) {
            (Side::A(a), false) => a.barrier(roles, t),
            (Side::A(a), true) => a.barrier_all_groups(roles, t),
            (Side::F(f), false) => f.barrier(roles, t),
            (Side::F(f), true) => f.barrier_all_groups(roles, t),
        }
    }
    fn shutdown(self) {
        match self {
            Side::A(a) => a.shutdown().unwrap(),
            Side::F(f) => f.shutdown().unwrap(),
        }
    }
}

/// What one rank saw: `(group, attention?, step, entered, left)`.
type Seen = (u32, bool, &'static str, Instant, Instant);

/// Barriers of a job of two instance groups, one thread per rank. An
/// all-groups barrier (StepMesh's `instance_barrier=True`) holds every
/// rank of both groups until the slowest rank of the other group enters;
/// a group barrier (`False`) releases a group without waiting for the
/// other; an all-groups barrier of one role times out, bounded, while the
/// other group's rank of that role is missing, and calling again resumes
/// it.
#[test]
fn barriers_across_instance_groups() {
    const SLOW: Duration = Duration::from_millis(500);
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (seen, seen_rx) = mpsc::channel::<Seen>();
    let mut threads = Vec::new();
    for group in [0u32, 1] {
        for attention in [true, false] {
            let (addr, seen) = (addr.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                let mesh = grouped(&addr, group, group == 0 && attention);
                let mut r = if attention {
                    Side::A(mesh.attention(spec()).unwrap())
                } else {
                    Side::F(mesh.ffn(spec()).unwrap())
                };
                let step =
                    |r: &mut Side, name: &'static str, all: bool, slow: bool, roles: Roles| {
                        if slow {
                            std::thread::sleep(SLOW);
                        }
                        let entered = Instant::now();
                        r.barrier(roles, all, T).unwrap();
                        seen.send((group, attention, name, entered, Instant::now()))
                            .unwrap();
                    };
                // Every rank of both groups in step; then group 1's FFN
                // rank comes late to an all-groups barrier.
                step(&mut r, "align", true, false, BOTH);
                step(&mut r, "all", true, group == 1 && !attention, BOTH);
                // Group 1 comes late to a barrier of its own group.
                step(&mut r, "group", false, group == 1, BOTH);
                if attention {
                    if group == 0 {
                        // Group 1's attention rank is not there yet.
                        let t0 = Instant::now();
                        let e = r
                            .barrier(ATTENTION, true, Duration::from_millis(100))
                            .unwrap_err();
                        assert!(
                            matches!(e, Error::Timeout { .. })
                                && e.to_string().contains("every instance group"),
                            "{e}"
                        );
                        assert!(t0.elapsed() < SLOW);
                        // Still inside: the group barrier is refused.
                        let e = r.barrier(ATTENTION, false, T).unwrap_err();
                        assert!(e.to_string().contains("still inside"), "{e}");
                        step(&mut r, "resumed", true, false, ATTENTION);
                    } else {
                        step(&mut r, "resumed", true, true, ATTENTION);
                    }
                }
                // Everyone leaves together.
                step(&mut r, "end", true, false, BOTH);
                r.shutdown();
            }));
        }
    }
    drop(seen);
    for t in threads {
        t.join().unwrap();
    }
    let got: Vec<Seen> = seen_rx.iter().collect();
    assert_eq!(got.len(), 4 * 4 + 2, "{got:?}");
    let at = |step: &'static str| got.iter().filter(move |s| s.2 == step);
    // The all-groups barrier held every rank of both groups until the
    // slow one entered.
    let late = at("all").find(|s| s.0 == 1 && !s.1).unwrap().3;
    for s in at("all") {
        assert!(s.4 >= late, "{s:?} left before group 1's ffn rank entered");
    }
    // The group barrier released group 0 before group 1 entered it.
    let g1_entered = at("group").filter(|s| s.0 == 1).map(|s| s.3).min().unwrap();
    for s in at("group").filter(|s| s.0 == 0) {
        assert!(s.4 < g1_entered, "group 0 waited for group 1: {s:?}");
    }
    // The resumed barrier of attention ranks waited for group 1's.
    let late = at("resumed").find(|s| s.0 == 1).unwrap().3;
    let g0 = at("resumed").find(|s| s.0 == 0).unwrap();
    assert!(g0.4 >= late, "{g0:?}");
}

/// A barrier keeps the transport moving: an attention rank dispatches a
/// message of 16 MiB over tcp (more than the socket buffer takes at once,
/// so most of it is still queued in the rank) and enters a barrier of both
/// roles at once. The FFN rank can only enter that barrier after it has
/// taken and answered the batch, so a barrier that left the transport
/// alone would hold both until the FFN rank's `get_batch` timed out; one
/// that pumps while it waits lets the batch through and is released in
/// well under that.
#[test]
fn a_barrier_flushes_a_large_dispatch() {
    const ROW: usize = 16 << 10;
    const TOKENS: usize = 1024;
    const SHORT: Duration = Duration::from_secs(3);
    let spec = StageSpec {
        stages: 1,
        max_tokens: TOKENS as u32,
        row_bytes: ROW as u32,
        out_row_bytes: 8,
        side_bytes: 0,
    };
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let one = |rank_embed: bool| {
        let mut c = MeshConfig::new(&addr, 1, 1);
        c.transport = TransportKind::Tcp;
        c.rank = Some(0);
        c.embed_scheduler = rank_embed;
        c.job = format!("barpump-{}", std::process::id());
        c.setup_timeout = T;
        Mesh::new(c)
    };
    let tokens: Vec<u8> = (0..TOKENS * ROW).map(|i| (i % 251) as u8).collect();
    let want = tokens.clone();
    let fm = one(false);
    let ffn = std::thread::spawn(move || {
        let mut f = fm.ffn(spec).unwrap();
        let t0 = Instant::now();
        let b = f.get_batch(SHORT);
        let took = t0.elapsed();
        let b = b.unwrap_or_else(|e| panic!("get_batch behind a barrier: {e} after {took:?}"));
        assert!(b.tokens(0) == &want[..], "the batch's rows differ");
        let out = vec![7u8; TOKENS * 8];
        f.respond(b, &[&out]).unwrap();
        f.barrier(BOTH, SHORT).unwrap();
        f
    });
    let mut a = one(true).attention(spec).unwrap();
    let h = a.dispatch(0, &tokens, &[]).unwrap();
    let t0 = Instant::now();
    let r = a.barrier(BOTH, SHORT + Duration::from_secs(2));
    let took = t0.elapsed();
    let f = ffn.join();
    r.unwrap();
    let f = f.unwrap();
    assert!(took < SHORT, "the barrier took {took:?}");
    let got = a.wait_combine(h, T).unwrap();
    assert_eq!(got.partial(0), Some(&[7u8; TOKENS * 8][..]));
    f.shutdown().unwrap();
    a.shutdown().unwrap();
}

/// The rank's `Interrupter` ends a barrier's wait within a few
/// milliseconds, leaving the rank inside: calling again resumes the same
/// barrier, which the FFN rank then releases.
#[test]
fn an_interrupt_ends_a_barrier_wait_and_it_resumes() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let one = |embed: bool| {
        let mut c = MeshConfig::new(&addr, 1, 1);
        c.transport = TransportKind::Tcp;
        c.rank = Some(0);
        c.embed_scheduler = embed;
        c.job = format!("barint-{}", std::process::id());
        c.setup_timeout = T;
        Mesh::new(c)
    };
    let (go, go_rx) = mpsc::channel::<()>();
    let fm = one(false);
    let ffn = std::thread::spawn(move || {
        let mut f = fm.ffn(spec()).unwrap();
        go_rx.recv_timeout(T).unwrap();
        f.barrier(BOTH, T).unwrap();
        f
    });
    let mut a = one(true).attention(spec()).unwrap();
    let stop = a.interrupter();
    let poke = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stop.interrupt();
        Instant::now()
    });
    let e = a.barrier(BOTH, T).unwrap_err();
    let ended = Instant::now();
    let poked = poke.join().unwrap();
    assert!(matches!(e, Error::Interrupted), "{e}");
    assert!(ended.duration_since(poked) < Duration::from_secs(1));
    // Still inside the same barrier.
    let e = a.barrier(ATTENTION, T).unwrap_err();
    assert!(e.to_string().contains("still inside"), "{e}");
    go.send(()).unwrap();
    a.barrier(BOTH, T).unwrap();
    let f = ffn.join().unwrap();
    f.shutdown().unwrap();
    a.shutdown().unwrap();
}
