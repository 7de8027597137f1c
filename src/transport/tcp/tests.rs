//! Unit tests of the tcp backend.

use super::*;
use crate::transport::LocalKey;
use std::io::Write;

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

/// A receiving transport with one link whose other end is a raw stream
/// the test writes frame bytes into by hand.
fn raw_link() -> (TcpTransport, TcpStream, Arc<Region>) {
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut b = TcpTransport::new(ip, Duration::from_secs(5)).unwrap();
    let dst = Arc::new(Region::alloc(1 << 16).unwrap());
    b.register(&dst, Access::RemoteWrite).unwrap();
    let l = TcpListener::bind((ip, 0)).unwrap();
    let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    raw.set_nodelay(true).unwrap();
    let (s, _) = l.accept().unwrap();
    b.add_link(s, "raw").unwrap();
    (b, raw, dst)
}

/// A frame writing `body` at `offset` of region 0 with `imm`.
fn frame_bytes(offset: u64, imm: u32, body: &[u8]) -> Vec<u8> {
    let mut v = frame::encode(&Notice {
        region: 0,
        offset,
        len: body.len() as u32,
        imm: Some(imm),
        close: false,
    })
    .to_vec();
    v.extend_from_slice(body);
    v
}

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Progress until `done` says so, or 5 s; returns what was reported.
fn progress_until(
    b: &mut TcpTransport,
    mut done: impl FnMut(&TcpTransport, &[Completion]) -> bool,
) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(b, &out) && Instant::now() < deadline {
        b.progress(&mut out).unwrap();
    }
    out
}

/// A frame cut by the stream at any byte — inside the header, at its
/// end, inside the body, across the inbox's size — lands once, whole,
/// after its last byte and not before.
#[test]
fn a_frame_cut_at_every_byte_lands_once() {
    let (mut b, mut raw, dst) = raw_link();
    // A small frame at every cut; a large one (body read straight into
    // the region, header read alone) at the cuts around its boundaries.
    let small = frame_bytes(64, 5, &body(200, 1));
    let large_body = body(3 * rx::INBOX, 2);
    let large = frame_bytes(1024, 6, &large_body);
    let edges = [1, 31, 32, 33, rx::INBOX - 1, rx::INBOX, rx::INBOX + 1];
    let cases = (1..small.len())
        .map(|k| (&small, k))
        .chain(edges.iter().map(|&k| (&large, k)));
    for (i, (f, k)) in cases.enumerate() {
        let imm = if std::ptr::eq(f, &small) { 5 } else { 6 };
        raw.write_all(&f[..k]).unwrap();
        let early = progress_until(&mut b, |b, _| b.links[0].rx.pending() == k as u64);
        assert_eq!(b.links[0].rx.pending(), k as u64, "case {i}: cut at {k}");
        assert!(early.is_empty(), "case {i}: cut at {k}: {early:?}");
        raw.write_all(&f[k..]).unwrap();
        let out = progress_until(&mut b, |_, o| !o.is_empty());
        assert_eq!(
            out,
            vec![Completion::Arrival {
                link: 0,
                imm,
                len: (f.len() - FRAME_LEN) as u32
            }],
            "case {i}: cut at {k}"
        );
        let off = if imm == 5 { 64 } else { 1024 };
        let mut got = vec![0u8; f.len() - FRAME_LEN];
        dst.copy_out(off, &mut got).unwrap();
        assert_eq!(got, f[FRAME_LEN..], "case {i}: cut at {k}");
        assert_eq!(b.links[0].rx.pending(), 0);
        got.fill(0);
        dst.write_gather(off as u64, &[&got]).unwrap();
    }
}

/// Several frames in one read — small, large, empty, small again — each
/// land in order, one arrival per progress pass, with nothing lost from
/// the inbox between passes.
#[test]
fn frames_read_together_land_in_order() {
    let (mut b, mut raw, dst) = raw_link();
    let bodies = [
        (0u64, body(100, 3)),
        (200, body(2 * rx::INBOX, 4)),
        (20_000, Vec::new()),
        (30_000, body(7, 5)),
        (40_000, body(rx::INBOX - FRAME_LEN, 6)),
        (50_000, body(1, 7)),
    ];
    let mut all = Vec::new();
    for (i, (off, b)) in bodies.iter().enumerate() {
        all.extend(frame_bytes(*off, i as u32, b));
    }
    // Twice: the second time the link starts in bulk mode (its last frame
    // was large... then small), and all of it is in one write.
    for round in 0..2 {
        raw.write_all(&all).unwrap();
        let mut arrivals = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while arrivals.len() < bodies.len() && Instant::now() < deadline {
            let mut out = Vec::new();
            b.progress(&mut out).unwrap();
            assert!(out.len() <= 1, "one arrival per pass: {out:?}");
            arrivals.extend(out);
        }
        let want: Vec<Completion> = bodies
            .iter()
            .enumerate()
            .map(|(i, (_, b))| Completion::Arrival {
                link: 0,
                imm: i as u32,
                len: b.len() as u32,
            })
            .collect();
        assert_eq!(arrivals, want, "round {round}");
        for (off, b) in &bodies {
            let mut got = vec![0u8; b.len()];
            dst.copy_out(*off as usize, &mut got).unwrap();
            assert_eq!(&got, b, "round {round}: body at {off}");
        }
    }
}

/// A close frame behind a message in the same read ends the link in
/// order after the message lands.
#[test]
fn a_close_behind_a_message_ends_the_link_after_it() {
    let (mut b, mut raw, _dst) = raw_link();
    let mut bytes = frame_bytes(0, 9, &body(50, 8));
    bytes.extend(frame::encode(&Notice::CLOSE));
    raw.write_all(&bytes).unwrap();
    let out = progress_until(&mut b, |_, o| o.len() >= 2);
    assert_eq!(
        out,
        vec![
            Completion::Arrival {
                link: 0,
                imm: 9,
                len: 50
            },
            Completion::LinkClosed { link: 0 }
        ]
    );
}

/// Garbage behind a good frame is a protocol error on the link, after
/// the good frame landed.
#[test]
fn garbage_behind_a_frame_is_a_link_error() {
    let (mut b, mut raw, _dst) = raw_link();
    let mut bytes = frame_bytes(0, 1, &body(10, 9));
    bytes.extend([0xffu8; FRAME_LEN]);
    raw.write_all(&bytes).unwrap();
    let out = progress_until(&mut b, |_, o| o.len() >= 2);
    assert!(
        matches!(out[..], [Completion::Arrival { imm: 1, .. }, Completion::LinkError { ref reason, .. }] if reason.contains("bad frame")),
        "{out:?}"
    );
}
