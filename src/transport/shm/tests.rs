//! Unit tests of the shm backend.

use super::*;
use crate::transport::LocalKey;
use std::sync::atomic::Ordering;

struct Pair {
    a: ShmTransport,
    b: ShmTransport,
    src: Arc<Region>,
    rb: Arc<Region>,
    kb: RegionKey,
}

fn spec(blob: Vec<u8>) -> PeerSpec {
    PeerSpec {
        label: "peer".into(),
        blob,
        initiator: false,
        peer_rank: 0,
        my_rank: 0,
        epoch: 1,
    }
}

fn pair(job: &str) -> Pair {
    let mut a = ShmTransport::create(job, "h", 1, 4096).unwrap();
    let mut b = ShmTransport::create(job, "h", 1, 4096).unwrap();
    let ra = a.region().unwrap();
    a.register(&ra, Access::RemoteWrite).unwrap();
    let src = Arc::new(Region::alloc(4096).unwrap());
    assert_eq!(a.register(&src, Access::Local).unwrap().local, LocalKey(1));
    let rb = b.region().unwrap();
    b.register(&rb, Access::RemoteWrite).unwrap();
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let kb = a.connect(&[spec(eb)], Duration::ZERO).unwrap()[0].remote[0];
    b.connect(&[spec(ea)], Duration::ZERO).unwrap();
    Pair { a, b, src, rb, kb }
}

fn from(offset: u64, len: u64) -> [LocalSlice; 1] {
    [LocalSlice {
        key: LocalKey(1),
        offset,
        len,
    }]
}

fn wait(t: &mut ShmTransport) -> Vec<Completion> {
    let mut out = Vec::new();
    let d = Instant::now() + Duration::from_secs(5);
    while out.is_empty() && Instant::now() < d {
        t.progress(&mut out).unwrap();
        std::thread::yield_now();
    }
    out
}

#[test]
fn write_lands_then_arrives_and_is_sent() {
    let mut p = pair("shm-unit-1");
    p.src.write_gather(0, &[b"abcdef"]).unwrap();
    p.a.post_write(0, &from(0, 6), &p.kb, 10, Some(99), 5)
        .unwrap();
    assert_eq!(
        wait(&mut p.b),
        vec![Completion::Arrival {
            link: 0,
            imm: 99,
            len: 6
        }]
    );
    assert_eq!(wait(&mut p.a), vec![Completion::Sent { token: 5 }]);
    assert_eq!(p.rb.slice(10, 6).unwrap(), b"abcdef");
    assert!(matches!(
        p.a.post_write(0, &from(0, 8), &p.kb, 4090, None, 6),
        Err(Error::BufferSize { .. })
    ));
    drop(p.a);
    assert_eq!(wait(&mut p.b), vec![Completion::LinkClosed { link: 0 }]);
}

#[test]
fn parked_receiver_is_woken() {
    let mut p = pair("shm-unit-2");
    let bell = p.b.doorbell();
    let mut b = p.b;
    let t = std::thread::spawn(move || {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.is_empty() && Instant::now() < deadline {
            bell.park(
                || {
                    b.progress(&mut out).unwrap();
                    !out.is_empty()
                },
                Duration::from_secs(5),
            );
        }
        out
    });
    // Write only once the receiver has parked (its sleeping flag, seen
    // through our mapping of its segment).
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.a.links[0].peer.sleeping().load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "receiver never parked");
        std::thread::yield_now();
    }
    p.a.post_write(0, &from(0, 1), &p.kb, 0, Some(5), 1)
        .unwrap();
    assert_eq!(
        t.join().unwrap(),
        vec![Completion::Arrival {
            link: 0,
            imm: 5,
            len: 1
        }]
    );
}

#[test]
fn bad_notice_is_a_link_error() {
    let mut p = pair("shm-unit-3");
    // A notice pointing past the region, as a broken peer would post.
    assert!(p.a.links[0].out.push(
        &Notice {
            region: 0,
            len: 16,
            offset: 4090,
            imm: Some(1),
            close: false,
        }
        .encode()
    ));
    assert!(matches!(wait(&mut p.b)[0], Completion::LinkError { .. }));
}

#[test]
fn notice_with_unknown_flags_is_a_link_error() {
    let mut p = pair("shm-unit-6");
    let mut bad = Notice::CLOSE.encode();
    bad[0] |= 0x80;
    assert!(p.a.links[0].out.push(&bad));
    match &wait(&mut p.b)[..] {
        [Completion::LinkError { reason, .. }] => {
            assert!(reason.contains("unknown bits"), "{reason}")
        }
        other => panic!("want one link error, got {other:?}"),
    }
}

/// Caller receive memory of a rank in this same process is not reached by
/// cross-memory writes (the rank may free it before a write's poster sees
/// it leave): the link is refused, naming why, so auto selection takes tcp.
/// (Cross-process writes into caller memory: `tests/processes.rs`,
/// `caller_buffers_move_over_shm_verified`.)
#[test]
fn caller_memory_of_a_rank_in_this_process_is_refused() {
    let mut a = ShmTransport::create("shm-unit-4", "h", 1, 4096).unwrap();
    let src = Arc::new(Region::alloc(64).unwrap());
    a.register(&src, Access::Local).unwrap();
    let mut b = ShmTransport::create("shm-unit-4", "h", 1, 4096).unwrap();
    let caller = Arc::new(Region::from_vec(vec![0u8; 100]));
    b.register(&caller, Access::RemoteWrite).unwrap();
    let eb = b.endpoint();
    // Library memory is reachable the other way.
    b.reaches(&a.endpoint()).unwrap();
    let e = a.reaches(&eb).unwrap_err();
    assert!(e.contains("same process"), "{e}");
    let e = a.connect(&[spec(eb)], Duration::ZERO).unwrap_err();
    assert!(e.to_string().contains("same process"), "{e}");
}

/// Caller receive memory on huge-page boundaries is put on huge pages when
/// registered, so a peer's cross-memory write pins one page per 2 MiB.
#[test]
fn caller_memory_is_registered_on_huge_pages() {
    let page = Region::huge_page_size();
    if page == 0 {
        eprintln!("skipped: this kernel has no transparent huge pages");
        return;
    }
    let len = 2 * page;
    let mut b = ShmTransport::create("shm-unit-7", "h", 1, 4096).unwrap();
    let v = vec![0u8; len + page];
    let offset = (v.as_ptr() as usize).next_multiple_of(page) - v.as_ptr() as usize;
    let caller = Arc::new(Region::from_vec_part(v, offset, len).unwrap());
    b.register(&caller, Access::RemoteWrite).unwrap();
    let huge = crate::transport::region::huge_bytes_at(caller.addr()).unwrap_or(0);
    // Refused only by kernels without MADV_COLLAPSE/MADV_POPULATE_WRITE.
    assert!(
        huge >= len,
        "{huge} bytes on huge pages after registration, want {len}"
    );
}

/// The blob of a decoded endpoint, edited.
fn encode(p: &PeerEndpoint) -> Vec<u8> {
    let mut w = blob::writer(MAGIC);
    w.str(&p.host);
    w.str(&p.segment);
    w.u32(p.pid);
    w.u64(p.nonce);
    w.u64(p.nonce_addr);
    blob::put_keys(&mut w, &p.keys);
    w.finish()
}

/// Reachability is the segment, found by name with the nonce the blob
/// names; host ids are only mentioned.
#[test]
fn reachability_is_the_shared_segment_not_the_host_id() {
    let a = ShmTransport::create("shm-unit-7", "h", 1, 4096).unwrap();
    let c = ShmTransport::create("shm-unit-7", "another-name", 1, 4096).unwrap();
    c.reaches(&a.endpoint()).unwrap();
    let mut p = decode(&a.endpoint()).unwrap();
    p.nonce ^= 1;
    let e = c.reaches(&encode(&p)).unwrap_err();
    assert!(
        e.contains("not the one it published") && e.contains("\"h\""),
        "{e}"
    );
    p.segment = "afmesh.shm-unit-7.0.nowhere".into();
    let e = c.reaches(&encode(&p)).unwrap_err();
    assert!(e.contains("not in this /dev/shm"), "{e}");
}

/// A peer whose pid does not name it from here is watched through its
/// segment's lock, which shows its death as well as a pidfd would.
#[test]
fn a_peer_with_a_foreign_pid_is_watched_by_its_lock() {
    let mut a = ShmTransport::create("shm-unit-8", "h", 1, 4096).unwrap();
    let b = ShmTransport::create("shm-unit-8", "h", 1, 4096).unwrap();
    let mut p = decode(&b.endpoint()).unwrap();
    p.pid = 0x7fff_fff0;
    a.connect(&[spec(encode(&p))], Duration::ZERO).unwrap();
    assert!(matches!(a.links[0].watch, Watch::Lock));
    let mut out = Vec::new();
    a.check_liveness(&mut out, true);
    assert!(out.is_empty(), "{out:?}");
    drop(b);
    a.check_liveness(&mut out, true);
    match &out[..] {
        [Completion::LinkDown { reason, .. }] => {
            assert!(reason.contains("lock on its segment"), "{reason}")
        }
        other => panic!("want one link down, got {other:?}"),
    }
}

#[test]
fn a_wrong_pid_is_not_attached_to() {
    let mut b = ShmTransport::create("shm-unit-5", "h", 1, 4096).unwrap();
    b.register(
        &Arc::new(Region::from_vec(vec![0u8; 8])),
        Access::RemoteWrite,
    )
    .unwrap();
    // The blob names our pid but a nonce address that holds another
    // value: as if the pid named another process.
    let mut p = decode(&b.endpoint()).unwrap();
    let decoy = 0u64;
    p.nonce_addr = &decoy as *const u64 as u64;
    let a = ShmTransport::create("shm-unit-5", "h", 1, 4096).unwrap();
    let e = a.reaches(&encode(&p)).unwrap_err();
    assert!(e.contains("pid namespace"), "{e}");
}

/// A peer whose pid the nonce probe verifies is watched by its pidfd.
#[test]
fn a_verified_peer_is_watched_by_its_pidfd() {
    let p = pair("shm-unit-9");
    assert!(matches!(p.a.links[0].watch, Watch::Process(_)));
    assert!(matches!(p.b.links[0].watch, Watch::Process(_)));
}

/// `prepare_write` is a hint: on the peer's bytes, past its region's end,
/// on a link or region that does not exist, it changes nothing and never
/// faults; the write after it lands as usual.
#[test]
fn prepare_write_changes_nothing() {
    let mut p = pair("shm-unit-prepare");
    p.src.write_gather(0, &[b"xyz"]).unwrap();
    p.a.prepare_write(0, &p.kb, 0, 4096);
    p.a.prepare_write(0, &p.kb, 4000, 1 << 20);
    p.a.prepare_write(0, &p.kb, u64::MAX, u64::MAX);
    p.a.prepare_write(7, &p.kb, 0, 64);
    let elsewhere = RegionKey { id: 9, ..p.kb };
    p.a.prepare_write(0, &elsewhere, 0, 64);
    assert_eq!(p.rb.slice(0, 3).unwrap(), [0, 0, 0]);
    p.a.post_write(0, &from(0, 3), &p.kb, 0, Some(1), 1)
        .unwrap();
    assert_eq!(
        wait(&mut p.b),
        vec![Completion::Arrival {
            link: 0,
            imm: 1,
            len: 3
        }]
    );
    assert_eq!(p.rb.slice(0, 3).unwrap(), b"xyz");
}
