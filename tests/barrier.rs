//! Barriers of a running mesh, through the scheduler
//! (`AttentionRank::barrier` / `FfnRank::barrier`): a 2A+1F mesh over tcp
//! in one process, one thread per rank, after traffic. A barrier of one
//! role waits for that role only; a missing rank times the barrier out,
//! and calling again resumes the same barrier; a rank the barrier leaves
//! out is refused by name.

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
