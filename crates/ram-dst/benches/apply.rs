//! Applying a real capture held in memory to `Vec`-backed guest memory,
//! beside a plain memcpy of the same RAM bytes.
//!
//! The stream is `QMIG_BENCH_STREAM` if set (e.g. the >= 100 MiB capture made by
//! `scripts/bench_extract_vs_qemu.sh -k`), else the largest capture of
//! `tests/data`. Run: `cargo bench -p qmig-ram-dst --bench apply`.
// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qmig_ram_dst::{Config, Layout, LocalBlock, RamDst, VecMemory};
use qmig_wire::{Item, RamBody, SliceReader};

fn load() -> (String, Vec<u8>) {
    if let Some(p) = std::env::var_os("QMIG_BENCH_STREAM") {
        let p = PathBuf::from(p);
        return (
            p.display().to_string(),
            std::fs::read(&p).expect("QMIG_BENCH_STREAM"),
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data");
    let mut best: Option<(String, Vec<u8>)> = None;
    for e in std::fs::read_dir(&root).expect("tests/data").flatten() {
        let dir = e.path();
        let data = if dir.join("stream").exists() {
            std::fs::read(dir.join("stream")).ok()
        } else if dir.join("stream.gz").exists() {
            let raw = std::fs::read(dir.join("stream.gz")).expect("stream.gz");
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .expect("gunzip");
            Some(out)
        } else {
            None
        };
        if let Some(d) = data {
            if best.as_ref().is_none_or(|(_, b)| d.len() > b.len()) {
                best = Some((dir.display().to_string(), d));
            }
        }
    }
    best.expect("no capture in tests/data")
}

/// Replays `stream` onto `mem` (whose blocks already exist); returns the memory.
fn apply(stream: &[u8], layout: &[LocalBlock], mem: VecMemory) -> VecMemory {
    let cfg = Config {
        layout: Layout::Fixed(layout.to_vec()),
        ..Config::default()
    };
    let mut dst = RamDst::new(cfg, mem).expect("layout");
    let mut rd = SliceReader::new(stream);
    while let Some(r) = rd.next() {
        let (off, item) = r.expect("stream parses");
        let len = (rd.decoder().position() - off) as usize;
        dst.handle_item(off, len, &item).expect("stream applies");
        while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    }
    dst.into_memory()
}

/// Stream offsets of every PAGE payload (the RAM bytes a loader must copy).
fn page_payloads(stream: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for r in SliceReader::new(stream) {
        if let Ok((_, Item::Ram(rec))) = r {
            if let RamBody::Page(d) = rec.body {
                v.push((d.as_ptr() as usize - stream.as_ptr() as usize, d.len()));
            }
        }
    }
    v
}

fn memcpy_pages(stream: &[u8], pages: &[(usize, usize)], dst: &mut [u8]) {
    let mut at = 0;
    for &(off, len) in pages {
        dst[at..at + len].copy_from_slice(&stream[off..off + len]);
        at += len;
    }
}

fn bench(c: &mut Criterion) {
    let (name, stream) = load();
    // Layout from a first replay (adopt mode).
    let mut dst = RamDst::new(Config::default(), VecMemory::new()).expect("adopt");
    for r in SliceReader::new(&stream) {
        let (off, item) = r.expect("stream parses");
        dst.handle_item(off, 0, &item).expect("stream applies");
        while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    }
    let layout: Vec<LocalBlock> = dst
        .blocks()
        .iter()
        .map(|b| LocalBlock {
            page_size: b.page_size(),
            ..LocalBlock::fixed(b.name(), b.used_length())
        })
        .collect();
    let mut mem = dst.into_memory();
    let pages = page_payloads(&stream);
    let ram_bytes: usize = pages.iter().map(|p| p.1).sum();
    let mut flat = vec![1u8; ram_bytes];

    // One direct comparison, printed (criterion reports each separately).
    let reps = (256 << 20) / stream.len().max(1) + 3;
    let t = Instant::now();
    for _ in 0..reps {
        mem = apply(&stream, &layout, mem);
    }
    let t_apply = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        memcpy_pages(&stream, &pages, &mut flat);
        std::hint::black_box(&flat);
    }
    let t_copy = t.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "apply: {name}: {} bytes, {} PAGE records; apply {:.3} ms ({:.2} GB/s of stream), memcpy of the page bytes {:.3} ms; ratio apply/memcpy = {:.2}",
        stream.len(),
        pages.len(),
        t_apply * 1e3,
        stream.len() as f64 / t_apply / 1e9,
        t_copy * 1e3,
        t_apply / t_copy
    );

    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("ram_dst_vec", |b| {
        let mut m = Some(std::mem::take(&mut mem));
        b.iter(|| m = Some(apply(&stream, &layout, m.take().unwrap_or_default())));
    });
    g.bench_function("memcpy_pages", |b| {
        b.iter(|| memcpy_pages(&stream, &pages, &mut flat))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
