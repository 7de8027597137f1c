//! Cross-memory attach into caller memory (the shm backend's path for
//! caller receive buffers) against its floor, a memcpy of the same bytes:
//! `process_vm_writev` into memory on 4 KiB pages and into memory on
//! transparent huge pages (what `Region::advise_huge_pages` asks for at
//! registration), at the reference workload's dispatch (917,576 B) and
//! combine (1,835,080 B) message sizes. The target is this process: the
//! kernel pins its pages exactly as it pins a peer's.

#![allow(clippy::unwrap_used)]

use afmesh::transport::shm::cma;
use afmesh::transport::Region;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// At least `len` bytes of caller memory. `huge`: whole huge pages on a
/// huge-page boundary, advised onto huge pages (as the docs advise callers
/// to allocate); else `len` bytes half a huge page off a boundary, not
/// advised, so (THP in `madvise` mode) on 4 KiB pages.
fn target(len: usize, huge: bool) -> Region {
    let page = Region::huge_page_size().max(4096);
    let size = len.next_multiple_of(page);
    let v = vec![1u8; size + 2 * page];
    let start = v.as_ptr() as usize;
    let aligned = start.next_multiple_of(page) - start;
    let r = if huge {
        Region::from_vec_part(v, aligned, size)
    } else {
        Region::from_vec_part(v, aligned + page / 2, len)
    }
    .unwrap();
    if huge {
        let got = r.advise_huge_pages();
        assert!(got.hinted || got.collapsed, "{got:?}");
    }
    r
}

fn cma(c: &mut Criterion) {
    let mut g = c.benchmark_group("cma");
    let pid = std::process::id();
    for len in [917_576usize, 1_835_080] {
        g.throughput(Throughput::Bytes(len as u64));
        let src = Region::alloc(len).unwrap();
        src.write_gather(0, &[&vec![7u8; len]]).unwrap();
        let floor = target(len, false);
        g.bench_with_input(BenchmarkId::new("memcpy", len), &len, |b, &len| {
            b.iter(|| src.copy_to(0, len as u64, &floor, 0).unwrap())
        });
        for (name, huge) in [("writev_4k", false), ("writev_huge", true)] {
            let dst = target(len, huge);
            g.bench_with_input(BenchmarkId::new(name, len), &len, |b, &len| {
                // SAFETY: `dst` is this process's own region of at least
                // `len` bytes, alive for the loop; its bytes are only reached
                // through raw pointers.
                b.iter(|| unsafe { cma::write_to(pid, dst.addr(), &src, 0, len) }.unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, cma);
criterion_main!(benches);
