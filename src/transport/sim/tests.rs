//! Unit tests of the sim backend.

use super::*;

struct Pair {
    net: SimNetwork,
    a: SimTransport,
    b: SimTransport,
    src: Arc<Region>,
    dst: Arc<Region>,
    key: RegionKey,
}

fn pair(seed: u64) -> Pair {
    let net = SimNetwork::new(seed);
    let mut a = net.endpoint();
    let mut b = net.endpoint();
    net.connect(&a, &b);
    let src = Arc::new(Region::alloc(64).unwrap());
    assert_eq!(a.register(&src, Access::Local).unwrap().local, LocalKey(0));
    let dst = Arc::new(Region::alloc(64).unwrap());
    let key = b.register(&dst, Access::RemoteWrite).unwrap().remote;
    Pair {
        net,
        a,
        b,
        src,
        dst,
        key,
    }
}

fn from(offset: u64, len: u64) -> [LocalSlice; 1] {
    [LocalSlice {
        key: LocalKey(0),
        offset,
        len,
    }]
}

fn drain(t: &mut SimTransport) -> Vec<Completion> {
    let mut out = Vec::new();
    t.progress(&mut out).unwrap();
    out
}

#[test]
fn write_lands_on_step_then_arrives_then_is_sent() {
    let mut p = pair(1);
    p.src.write_gather(0, &[b"hello"]).unwrap();
    p.a.post_write(0, &from(0, 5), &p.key, 3, Some(42), 7)
        .unwrap();
    assert!(drain(&mut p.b).is_empty(), "nothing lands before a step");
    assert!(p.net.step());
    assert_eq!(
        drain(&mut p.b),
        vec![Completion::Arrival {
            link: 0,
            imm: 42,
            len: 5
        }]
    );
    assert_eq!(p.dst.slice(3, 5).unwrap(), b"hello");
    assert!(drain(&mut p.a).is_empty(), "Sent trails the landing");
    assert!(p.net.step());
    assert_eq!(drain(&mut p.a), vec![Completion::Sent { token: 7 }]);
}

#[test]
fn early_sent_reads_the_source_then() {
    let mut p = pair(2);
    let faults = Faults {
        delay_ns: 1000,
        sent_delay_ns: Some(10),
        ..Faults::default()
    };
    p.net.set_faults(p.a.endpoint_id(), 0, faults);
    p.src.write_gather(0, &[b"old"]).unwrap();
    p.a.post_write(0, &from(0, 3), &p.key, 0, Some(1), 9)
        .unwrap();
    assert!(p.net.step());
    assert_eq!(drain(&mut p.a), vec![Completion::Sent { token: 9 }]);
    // The source may be reused once Sent: what lands is what left.
    p.src.write_gather(0, &[b"new"]).unwrap();
    p.net.deliver_all();
    assert_eq!(
        drain(&mut p.b),
        vec![Completion::Arrival {
            link: 0,
            imm: 1,
            len: 3
        }]
    );
    assert_eq!(p.dst.slice(0, 3).unwrap(), b"old");
}

#[test]
fn reuse_before_sent_corrupts_what_lands() {
    let mut p = pair(3);
    p.src.write_gather(0, &[b"old"]).unwrap();
    p.a.post_write(0, &from(0, 3), &p.key, 0, Some(1), 1)
        .unwrap();
    p.src.write_gather(0, &[b"new"]).unwrap();
    p.net.deliver_all();
    assert_eq!(p.dst.slice(0, 3).unwrap(), b"new");
}

#[test]
fn full_window_is_backpressure_until_sent() {
    let mut p = pair(4);
    p.net.set_window(2);
    p.a.post_write(0, &from(0, 1), &p.key, 0, Some(1), 1)
        .unwrap();
    p.a.post_write(0, &from(0, 1), &p.key, 1, Some(2), 2)
        .unwrap();
    let e =
        p.a.post_write(0, &from(0, 1), &p.key, 2, Some(3), 3)
            .unwrap_err();
    assert!(matches!(e, Error::Backpressure { window: 2, .. }), "{e}");
    // Nothing was posted by the refused call.
    assert_eq!(p.net.pending(), 4);
    p.net.deliver_all();
    assert_eq!(
        drain(&mut p.a),
        vec![Completion::Sent { token: 1 }, Completion::Sent { token: 2 }]
    );
    p.a.post_write(0, &from(0, 1), &p.key, 2, Some(3), 3)
        .unwrap();
}

#[test]
fn out_of_bounds_is_a_link_error() {
    let mut p = pair(5);
    // Lie about the region's length to get past the sender's check.
    let lying = RegionKey {
        len: 1 << 20,
        ..p.key
    };
    p.a.post_write(0, &from(0, 8), &lying, 60, Some(1), 1)
        .unwrap();
    p.net.deliver_all();
    assert!(matches!(drain(&mut p.b)[0], Completion::LinkError { .. }));
    assert!(p.a.post_write(0, &from(0, 1), &p.key, 0, None, 2).is_err());
    let local = p.a.post_write(0, &from(60, 8), &p.key, 0, None, 3);
    assert!(
        local.is_err(),
        "a source outside the local region is refused"
    );
}

#[test]
fn jitter_reorders_arrivals_and_sents_deterministically() {
    let order = |seed| {
        let mut p = pair(seed);
        let faults = Faults {
            jitter_ns: 1000,
            ..Faults::default()
        };
        p.net.set_faults(p.a.endpoint_id(), 0, faults);
        for i in 0..20u32 {
            p.a.post_write(0, &from(0, 1), &p.key, 0, Some(i), u64::from(i))
                .unwrap();
        }
        p.net.deliver_all();
        let imms: Vec<u32> = drain(&mut p.b)
            .iter()
            .map(|c| match c {
                Completion::Arrival { imm, .. } => *imm,
                _ => u32::MAX,
            })
            .collect();
        let sents: Vec<u64> = drain(&mut p.a)
            .iter()
            .map(|c| match c {
                Completion::Sent { token } => *token,
                _ => u64::MAX,
            })
            .collect();
        (imms, sents)
    };
    let (imms, sents) = order(7);
    assert_eq!((imms.clone(), sents.clone()), order(7));
    assert_eq!((imms.len(), sents.len()), (20, 20));
    assert_ne!(imms, (0..20).collect::<Vec<_>>(), "jitter reorders");
    assert_ne!(
        sents,
        (0..20).collect::<Vec<_>>(),
        "completions out of order"
    );
}

#[test]
fn kill_reports_down_on_both_ends_and_drops_sents() {
    let mut p = pair(6);
    p.a.post_write(0, &from(0, 1), &p.key, 0, Some(1), 1)
        .unwrap();
    p.net.kill_link(0, 0);
    assert_eq!(p.net.pending(), 0);
    assert!(matches!(drain(&mut p.a)[..], [Completion::LinkDown { .. }]));
    assert!(matches!(drain(&mut p.b)[..], [Completion::LinkDown { .. }]));
}

#[test]
fn endpoints_connect_both_ways_to_one_link() {
    let net = SimNetwork::new(8);
    let mut a = net.endpoint();
    let mut b = net.endpoint();
    let r = Arc::new(Region::alloc(16).unwrap());
    b.register(&r, Access::RemoteWrite).unwrap();
    let spec = |blob: Vec<u8>| PeerSpec {
        label: "peer".into(),
        blob,
        initiator: false,
        peer_rank: 0,
        my_rank: 0,
        epoch: 1,
    };
    let ca = a.connect(&[spec(b.endpoint())], Duration::ZERO).unwrap();
    let cb = b.connect(&[spec(a.endpoint())], Duration::ZERO).unwrap();
    assert_eq!((ca[0].link, cb[0].link), (0, 0));
    assert_eq!(ca[0].remote[0].len, 16);
    assert!(SimNetwork::new(9)
        .endpoint()
        .reaches(&a.endpoint())
        .is_err());
}

#[test]
fn abort_forgets_posted_writes_and_ends_the_link() {
    let mut p = pair(9);
    p.net.set_faults(
        p.a.endpoint_id(),
        0,
        Faults {
            delay_ns: 1_000,
            ..Faults::default()
        },
    );
    p.src.write_gather(0, &[b"old"]).unwrap();
    p.a.post_write(0, &from(0, 3), &p.key, 0, Some(1), 1)
        .unwrap();
    p.a.abort(0);
    assert_eq!(p.net.pending(), 0, "the write and its Sent are gone");
    // The source is the engine's again: nothing reads it any more.
    p.src.write_gather(0, &[b"new"]).unwrap();
    p.net.deliver_all();
    assert_eq!(p.dst.slice(0, 3).unwrap(), &[0, 0, 0]);
    assert!(matches!(drain(&mut p.b)[..], [Completion::LinkDown { .. }]));
    assert!(drain(&mut p.a).is_empty());
    assert!(p
        .a
        .post_write(0, &from(0, 3), &p.key, 0, Some(1), 2)
        .is_err());
}
