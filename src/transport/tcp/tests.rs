//! Unit tests of the tcp backend.

use super::*;
use crate::transport::LocalKey;

struct Pair {
    a: TcpTransport,
    b: TcpTransport,
    src: Arc<Region>,
    dst: Arc<Region>,
    key: RegionKey,
}

fn pair() -> Pair {
    pair_with(DEFAULT_LIVENESS)
}

fn pair_with(liveness: Duration) -> Pair {
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut a = TcpTransport::new(ip, Duration::from_secs(5))
        .unwrap()
        .with_liveness(liveness);
    let mut b = TcpTransport::new(ip, Duration::from_secs(5))
        .unwrap()
        .with_liveness(liveness);
    let src = Arc::new(Region::alloc(1 << 20).unwrap());
    a.register(&src, Access::Local).unwrap();
    let dst = Arc::new(Region::alloc(1 << 20).unwrap());
    b.register(&dst, Access::RemoteWrite).unwrap();
    let spec = |blob, initiator| PeerSpec {
        label: "peer".into(),
        blob,
        initiator,
        peer_rank: 0,
        my_rank: 0,
        epoch: 3,
    };
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let t = std::thread::spawn(move || {
        b.connect(&[spec(ea, false)], Duration::from_secs(5))
            .unwrap();
        b
    });
    let c = a
        .connect(&[spec(eb, true)], Duration::from_secs(5))
        .unwrap();
    let b = t.join().unwrap();
    Pair {
        a,
        b,
        src,
        dst,
        key: c[0].remote[0],
    }
}

fn from(offset: u64, len: u64) -> [LocalSlice; 1] {
    [LocalSlice {
        key: LocalKey(0),
        offset,
        len,
    }]
}

fn wait(t: &mut TcpTransport, want: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < want && Instant::now() < deadline {
        t.progress(&mut out).unwrap();
        if let Wake::Fds { read, write } = t.wake() {
            let _ =
                crate::transport::shm::sys::poll_ready(&read, &write, Duration::from_millis(10));
        }
    }
    out
}

#[test]
fn write_with_imm_lands_and_is_sent() {
    let mut p = pair();
    let big = vec![0xabu8; 300_000];
    p.src.write_gather(0, &[b"head", &big]).unwrap();
    p.a.post_write(0, &from(0, 300_004), &p.key, 100, Some(7), 11)
        .unwrap();
    let mut a_out = Vec::new();
    let mut b_out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (a_out.is_empty() || b_out.is_empty()) && Instant::now() < deadline {
        p.a.progress(&mut a_out).unwrap();
        p.b.progress(&mut b_out).unwrap();
    }
    assert_eq!(
        b_out,
        vec![Completion::Arrival {
            link: 0,
            imm: 7,
            len: 300_004
        }]
    );
    assert_eq!(a_out, vec![Completion::Sent { token: 11 }]);
    assert_eq!(p.dst.slice(100, 4).unwrap(), b"head");
    assert!(p
        .dst
        .slice(104, big.len())
        .unwrap()
        .iter()
        .all(|&x| x == 0xab));
}

#[test]
fn unread_writes_fill_the_window_then_backpressure() {
    let mut p = pair();
    let mut refused = None;
    for i in 0..10_000u64 {
        if let Err(e) = p.a.post_write(0, &from(0, 1 << 20), &p.key, 0, Some(1), i) {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("the window filled");
    assert!(matches!(e, Error::Backpressure { .. }), "{e}");
    assert!(i >= TCP_WINDOW as u64, "{i}");
    // The receiver drains; everything queued is eventually sent, in order.
    let mut sent = Vec::new();
    let mut arrivals = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while (sent.len() < i as usize || arrivals < i as usize) && Instant::now() < deadline {
        let mut out = Vec::new();
        p.a.progress(&mut out).unwrap();
        p.b.progress(&mut out).unwrap();
        for c in out {
            match c {
                Completion::Sent { token } => sent.push(token),
                Completion::Arrival { .. } => arrivals += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(sent, (0..i).collect::<Vec<_>>());
    assert_eq!(arrivals, i as usize);
}

#[test]
fn sender_checks_bounds() {
    let mut p = pair();
    let k = p.key;
    let e =
        p.a.post_write(0, &from(0, 16), &k, k.len - 8, Some(1), 1)
            .unwrap_err();
    assert!(matches!(e, Error::BufferSize { .. }), "{e}");
}

#[test]
fn receiver_checks_bounds_and_closes() {
    let mut p = pair();
    // Lie about the region length to get past the sender's check.
    let lying = RegionKey {
        len: u64::MAX,
        ..p.key
    };
    p.a.post_write(0, &from(0, 16), &lying, p.key.len - 8, Some(1), 1)
        .unwrap();
    assert!(matches!(wait(&mut p.b, 1)[0], Completion::LinkError { .. }));
    let out = wait(&mut p.a, 2);
    assert!(
        matches!(out.last(), Some(Completion::LinkDown { .. })),
        "{out:?}"
    );
}

#[test]
fn peer_drop_is_an_orderly_close() {
    let p = pair();
    let mut b = p.b;
    drop(p.a);
    assert_eq!(wait(&mut b, 1), vec![Completion::LinkClosed { link: 0 }]);
}

/// A peer that is alive but busy — not reading for longer than the
/// liveness bound while megabytes wait for it — is not declared lost: its
/// kernel still acknowledges (a zero window), which is what liveness
/// watches. Then everything lands.
#[test]
fn a_busy_peer_outlives_the_liveness_bound() {
    let mut p = pair_with(Duration::from_secs(1));
    let writes = 24;
    let mut a_out = Vec::new();
    for i in 0..writes {
        p.a.post_write(0, &from(0, 1 << 20), &p.key, 0, Some(i), u64::from(i))
            .unwrap();
        p.a.progress(&mut a_out).unwrap();
    }
    // b computes for 2.5 liveness bounds; a keeps making progress.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        p.a.progress(&mut a_out).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !a_out
            .iter()
            .any(|c| matches!(c, Completion::LinkDown { .. })),
        "a busy peer was declared lost: {a_out:?}"
    );
    let arrivals = |v: &[Completion]| {
        v.iter()
            .filter(|c| matches!(c, Completion::Arrival { .. }))
            .count()
    };
    let mut b_out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrivals(&b_out) < writes as usize && Instant::now() < deadline {
        p.a.progress(&mut a_out).unwrap();
        p.b.progress(&mut b_out).unwrap();
    }
    assert_eq!(arrivals(&b_out), writes as usize, "{b_out:?}");
    assert!(!a_out
        .iter()
        .any(|c| matches!(c, Completion::LinkDown { .. })));
    let _ = &p.dst;
}
