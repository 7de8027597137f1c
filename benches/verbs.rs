//! The verbs post path's own CPU cost per message: `post_write` of the
//! verbs transport against the same write-with-imm posted by plain verbs
//! calls (`transport::verbs::plain`), both through the same provider, in
//! one process (two endpoints linked to each other). Only the post is
//! timed; completions are reaped outside the timing. The difference is
//! what afmesh's code adds per message.
//!
//! Needs a verbs provider: `LD_PRELOAD=target/release/libsoftverbs.so
//! cargo bench --bench verbs` (or a NIC); without one it says so and
//! measures nothing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use afmesh::transport::verbs::plain::{Event, PlainEndpoint};
use afmesh::transport::verbs::VerbsTransport;
use afmesh::transport::{Access, Completion, LocalSlice, PeerSpec, Region, Transport};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Bytes per message: a header and one 8-byte row.
const LEN: u64 = 72;

fn spec(label: &str, blob: Vec<u8>, initiator: bool) -> PeerSpec {
    PeerSpec {
        label: label.into(),
        blob,
        initiator,
        peer_rank: 0,
        my_rank: 0,
        epoch: 1,
    }
}

/// Until the write's `Sent` and `Arrival` are both in.
fn reap(a: &mut VerbsTransport, f: &mut VerbsTransport, out: &mut Vec<Completion>) {
    let (mut sent, mut landed) = (false, false);
    while !(sent && landed) {
        out.clear();
        a.progress(out).unwrap();
        f.progress(out).unwrap();
        for c in out.iter() {
            match c {
                Completion::Sent { .. } => sent = true,
                Completion::Arrival { .. } => landed = true,
                other => panic!("{other:?}"),
            }
        }
    }
}

/// The same for the plain endpoints (reposting the receive).
fn reap_plain(a: &mut PlainEndpoint, f: &mut PlainEndpoint, ev: &mut Vec<Event>) {
    let (mut sent, mut landed) = (false, false);
    while !(sent && landed) {
        ev.clear();
        a.poll(ev).unwrap();
        sent |= ev.iter().any(|e| matches!(e, Event::Sent { .. }));
        ev.clear();
        f.poll(ev).unwrap();
        if ev.iter().any(|e| matches!(e, Event::Landed { .. })) {
            landed = true;
            f.post_recv(0).unwrap();
        }
    }
}

fn post_path(c: &mut Criterion) {
    let (mut a, mut f) = match (VerbsTransport::new(1), VerbsTransport::new(1)) {
        (Ok(a), Ok(f)) => (a, f),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("verbs bench skipped: {e}");
            return;
        }
    };
    let send = Arc::new(Region::alloc(4096).unwrap());
    let recv_a = Arc::new(Region::alloc(4096).unwrap());
    let recv_f = Arc::new(Region::alloc(4096).unwrap());
    let key = a.register(&send, Access::Local).unwrap().local;
    a.register(&recv_a, Access::RemoteWrite).unwrap();
    f.register(&recv_f, Access::RemoteWrite).unwrap();
    let (ea, ef) = (a.endpoint(), f.endpoint());
    let remote = a
        .connect(&[spec("F0", ef, true)], Duration::from_secs(5))
        .unwrap()[0]
        .remote[0];
    f.connect(&[spec("A0", ea, false)], Duration::from_secs(5))
        .unwrap();
    let src = [LocalSlice {
        key,
        offset: 0,
        len: LEN,
    }];

    let mut plain_a = PlainEndpoint::new(4096, 1, 64).unwrap();
    let mut plain_f = PlainEndpoint::new(4096, 1, 64).unwrap();
    let (ia, i_f) = (plain_a.info(0), plain_f.info(0));
    plain_a.connect(0, &i_f).unwrap();
    plain_f.connect(0, &ia).unwrap();

    // The provider's post (softverbs does the write inside it) dominates
    // and is noisy on a shared machine: interleaved medians isolate what
    // afmesh adds better than means do.
    let mut out = Vec::new();
    let mut ev = Vec::new();
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for i in 0..20_000u64 {
        let t = Instant::now();
        a.post_write(0, &src, &remote, 0, Some(i as u32), i)
            .unwrap();
        ours.push(t.elapsed().as_nanos() as u64);
        reap(&mut a, &mut f, &mut out);
        let t = Instant::now();
        plain_a.write(0, 0, LEN as usize, 0, i as u32).unwrap();
        plain.push(t.elapsed().as_nanos() as u64);
        reap_plain(&mut plain_a, &mut plain_f, &mut ev);
    }
    ours.sort_unstable();
    plain.sort_unstable();
    let (mo, mp) = (ours[ours.len() / 2], plain[plain.len() / 2]);
    println!(
        "verbs post path, interleaved medians of 20000: afmesh post_write {mo} ns, plain ibv_post_send {mp} ns: afmesh's own code {} ns per message",
        mo as i64 - mp as i64
    );

    let mut g = c.benchmark_group("verbs_post");
    g.throughput(Throughput::Elements(1));
    g.bench_function("afmesh_post_write", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for i in 0..iters {
                let t = Instant::now();
                a.post_write(0, &src, &remote, 0, Some(i as u32), i)
                    .unwrap();
                spent += t.elapsed();
                reap(&mut a, &mut f, &mut out);
            }
            spent
        })
    });
    g.bench_function("plain_ibv_post_send", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for i in 0..iters {
                let t = Instant::now();
                plain_a.write(0, 0, LEN as usize, 0, i as u32).unwrap();
                spent += t.elapsed();
                reap_plain(&mut plain_a, &mut plain_f, &mut ev);
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, post_path);
criterion_main!(benches);
