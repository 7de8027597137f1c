//! The combine-side reduction: summing N partials of the reference
//! workload (128 tokens × 7168 hidden) per dtype, against a plain memcpy of
//! the same bytes as the floor.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use afmesh::api::reduce::sum_into;
use afmesh::Dtype;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce");
    for (dt, name) in [
        (Dtype::Bf16, "bf16"),
        (Dtype::F16, "f16"),
        (Dtype::F32, "f32"),
    ] {
        for n in [2usize, 4] {
            let len = 128 * 7168 * dt.size();
            let parts: Vec<Vec<u8>> = (0..n)
                .map(|j| (0..len).map(|i| ((i * 7 + j) % 61) as u8).collect())
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
            let mut out = vec![0u8; len];
            g.throughput(Throughput::Bytes((len * n) as u64));
            g.bench_with_input(BenchmarkId::new(format!("sum_{name}"), n), &n, |b, _| {
                b.iter(|| sum_into(dt, black_box(&refs), black_box(&mut out)))
            });
            g.bench_with_input(
                BenchmarkId::new(format!("memcpy_floor_{name}"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        for p in &refs {
                            out.copy_from_slice(black_box(p));
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, reduce);
criterion_main!(benches);
