//! Encoding and checking the message header and the tcp frame header: the
//! per-message protocol cost.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use afmesh::proto::{Header, Imm, Kind, HEADER_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn header(c: &mut Criterion) {
    let h = Header {
        kind: Kind::Dispatch,
        stage: 1,
        sequence: 77,
        sender: 3,
        tokens: 128,
        row_bytes: 7168,
        side_len: 1024,
        post_ns: 1,
        land_ns: 2,
        process_ns: 3,
        respond_ns: 4,
        checksum: None,
    };
    let bytes = h.encode();
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Bytes(HEADER_LEN as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(black_box(&h).encode())));
    g.bench_function("decode", |b| b.iter(|| Header::decode(black_box(&bytes))));
    g.bench_function("imm_check", |b| {
        let imm = Imm::new(Kind::Dispatch, 1, 77).encode();
        b.iter(|| Imm::decode(black_box(imm)).matches(black_box(&h)))
    });
    g.finish();
}

criterion_group!(benches, header);
criterion_main!(benches);
