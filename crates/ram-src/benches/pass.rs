//! Pass throughput: a whole bulk pass (setup, PART payloads, completion) over
//! guest memory with a mix of zero and non-zero pages, beside a plain memcpy
//! of the same bytes. Sizes: 64 MiB and 256 MiB (`QMIG_BENCH_GIB=1` adds 1 GiB).

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qmig_ram_src::{Config, Progress, RamSrc, SrcBlock};

const PS: usize = 4096;

/// Memory where about half the pages are zero (as in a freshly booted guest).
fn memory(bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    let mut x = 0x1234_5678_u64;
    for (i, page) in v.chunks_mut(PS).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(2) {
            let b = (i as u8) | 1;
            page.iter_mut().step_by(7).for_each(|p| *p = b);
        }
    }
    v
}

fn pass(c: &mut Criterion) {
    let mut sizes = vec![64usize << 20, 256 << 20];
    if std::env::var_os("QMIG_BENCH_GIB").is_some() {
        sizes.push(1 << 30);
    }
    let mut g = c.benchmark_group("pass");
    g.sample_size(10);
    for size in sizes {
        let mem = vec![memory(size)];
        let mut out = Vec::with_capacity(size + (size / PS) * 16 + (1 << 20));
        g.throughput(Throughput::Elements((size / PS) as u64));
        g.bench_with_input(BenchmarkId::new("ram-src", size >> 20), &mem, |b, mem| {
            b.iter(|| {
                let blocks = SrcBlock::sequential([("pc.ram", size as u64)]);
                let mut src = RamSrc::new(blocks, Config::default()).unwrap();
                out.clear();
                src.poll_setup(&mut out).unwrap();
                while src.poll_iterate(mem, 16 << 20, &mut out).unwrap() == Progress::Budget {}
                src.poll_complete(mem, &mut out).unwrap();
                assert_eq!(src.remaining_pages(), 0);
                out.len()
            })
        });
        let mut dst = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("memcpy", size >> 20), &mem, |b, mem| {
            b.iter(|| {
                dst.copy_from_slice(&mem[0]);
                dst[size / 2]
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pass);
criterion_main!(benches);
