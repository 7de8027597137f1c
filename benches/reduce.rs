//! The combine-side reduction: summing N = 2, 4, 8 partials of the reference
//! workload (128 tokens × 7168 hidden) in f32, f16 and bf16, each beside its
//! floor, a plain memcpy of the same N partials' bytes (one per element
//! width, so f16 and bf16 share theirs). Throughput is the partials' bytes.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use afmesh::api::reduce::sum_into;
use afmesh::Dtype;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const ELEMS: usize = 128 * 7168;

/// One partial of `dtype` values in the range activations have, so every
/// value is a normal number as in real combines.
fn partial(dtype: Dtype, seed: usize) -> Vec<u8> {
    (0..ELEMS)
        .flat_map(|i| {
            let x = ((i * 31 + seed * 17) % 1021) as f32 / 128.0 - 4.0;
            match dtype {
                Dtype::F32 => x.to_le_bytes().to_vec(),
                Dtype::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
                Dtype::Bf16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
            }
        })
        .collect()
}

fn reduce(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce");
    for n in [2usize, 4, 8] {
        for (bits, dtypes) in [
            (16, &[(Dtype::F16, "f16"), (Dtype::Bf16, "bf16")][..]),
            (32, &[(Dtype::F32, "f32")][..]),
        ] {
            let len = ELEMS * bits / 8;
            g.throughput(Throughput::Bytes((len * n) as u64));
            let src: Vec<Vec<u8>> = (0..n).map(|j| vec![j as u8; len]).collect();
            let mut out = vec![0u8; len];
            g.bench_with_input(
                BenchmarkId::new(format!("memcpy_floor_{bits}bit"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        for p in &src {
                            black_box(&mut out).copy_from_slice(black_box(p));
                        }
                    })
                },
            );
            for &(dt, name) in dtypes {
                let parts: Vec<Vec<u8>> = (0..n).map(|j| partial(dt, j)).collect();
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                g.bench_with_input(BenchmarkId::new(format!("sum_{name}"), n), &n, |b, _| {
                    b.iter(|| sum_into(dt, black_box(&refs), black_box(&mut out)).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, reduce);
criterion_main!(benches);
