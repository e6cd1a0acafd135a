//! Parse throughput of qmig-wire on real QEMU captures held in memory, beside a
//! memcpy of the same bytes measured in the same run.
//!
//! Streams: the largest committed `tests/data/*/stream`, plus the file named by
//! `QMIG_BENCH_STREAM` when set (e.g. one made by `scripts/big_capture.py`).
//!
//! Benchmarks per stream (criterion group `parse/<name>`, `Throughput::Bytes`):
//! - `memcpy`: copy the stream into a preallocated, already-touched buffer;
//! - `slice_reader`: iterate every item with [`SliceReader`];
//! - `slice_reader+write`: iterate and re-serialize every item into a reused buffer;
//! - `stream_reader`: iterate every item with the incremental [`StreamReader`]
//!   over an in-memory `&[u8]` (1 MiB read chunks, one extra copy per byte).
//!
//! After criterion has run, the ratio (mean time per iteration / memcpy's) of each
//! benchmark is printed; the means are taken over all of criterion's timed
//! iterations (warm-up included) through `iter_custom`.
//!
//! Run: `cargo bench -p qmig-wire --bench parse -- --warm-up-time 1 --measurement-time 3`
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use qmig_wire::{SliceReader, StreamReader};

/// (total time, total iterations) per "stream/bench".
type Totals = BTreeMap<(String, &'static str), (Duration, u64)>;

thread_local! {
    static TOTALS: RefCell<Totals> = const { RefCell::new(BTreeMap::new()) };
}

fn record(stream: &str, bench: &'static str, d: Duration, iters: u64) {
    TOTALS.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry((stream.to_string(), bench)).or_default();
        e.0 += d;
        e.1 += iters;
    });
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The largest committed `tests/data/*/stream` (uncompressed only).
fn largest_committed() -> Option<(String, PathBuf)> {
    let dir = repo_root().join("tests/data");
    let mut best: Option<(u64, String, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let p = e.path().join("stream");
        if let Ok(m) = std::fs::metadata(&p) {
            let name = e.file_name().to_string_lossy().into_owned();
            // Ties broken by name so the choice is stable.
            let better = match &best {
                None => true,
                Some((len, n, _)) => m.len() > *len || (m.len() == *len && name < *n),
            };
            if better {
                best = Some((m.len(), name, p));
            }
        }
    }
    best.map(|(_, n, p)| (n, p))
}

fn streams() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some((name, p)) = largest_committed() {
        out.push((name, std::fs::read(&p).expect("read committed capture")));
    } else {
        eprintln!("parse bench: no tests/data/*/stream found");
    }
    if let Some(p) = std::env::var_os("QMIG_BENCH_STREAM") {
        let p = PathBuf::from(p);
        let bytes =
            std::fs::read(&p).unwrap_or_else(|e| panic!("QMIG_BENCH_STREAM={}: {e}", p.display()));
        let name = format!(
            "env-{}",
            p.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        out.push((name, bytes));
    }
    out
}

/// Parses the whole stream once, checking it is valid; returns the item count.
fn count_items(bytes: &[u8]) -> usize {
    let mut n = 0;
    for it in SliceReader::new(bytes) {
        it.expect("stream parses");
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    for (name, bytes) in streams() {
        let items = count_items(&bytes);
        let mib = bytes.len() as f64 / f64::from(1 << 20);
        println!(
            "stream {name}: {} bytes ({mib:.1} MiB), {items} items",
            bytes.len()
        );
        let mut g = c.benchmark_group(format!("parse/{name}"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        if bytes.len() > 16 << 20 {
            g.sample_size(10);
        }
        let src = bytes.as_slice();

        let mut dst = vec![0xA5u8; src.len()];
        g.bench_function("memcpy", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    dst.copy_from_slice(black_box(src));
                    black_box(&mut dst);
                }
                let d = t.elapsed();
                record(&name, "memcpy", d, iters);
                d
            });
        });

        g.bench_function("slice_reader", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut n = 0usize;
                    for it in SliceReader::new(black_box(src)) {
                        black_box(it.expect("parse"));
                        n += 1;
                    }
                    assert_eq!(n, items);
                }
                let d = t.elapsed();
                record(&name, "slice_reader", d, iters);
                d
            });
        });

        let mut out = Vec::with_capacity(src.len());
        g.bench_function("slice_reader+write", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    out.clear();
                    for it in SliceReader::new(black_box(src)) {
                        it.expect("parse").1.write(&mut out).unwrap();
                    }
                    black_box(&out);
                }
                let d = t.elapsed();
                record(&name, "slice_reader+write", d, iters);
                d
            });
        });
        assert!(out == src, "{name}: re-serialized bytes differ");

        g.bench_function("stream_reader", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut r = StreamReader::new(black_box(src));
                    let mut n = 0usize;
                    while let Some(it) = r.next_item().expect("parse") {
                        black_box(&it.item);
                        n += 1;
                    }
                    assert_eq!(n, items);
                }
                let d = t.elapsed();
                record(&name, "stream_reader", d, iters);
                d
            });
        });
        g.finish();
    }
}

fn report() {
    TOTALS.with(|t| {
        let t = t.borrow();
        let streams: Vec<&String> = {
            let mut v: Vec<&String> = t.keys().map(|(s, _)| s).collect();
            v.dedup();
            v
        };
        println!("\nratio = mean time per iteration / memcpy's (all timed iterations):");
        for s in streams {
            let mean = |b: &'static str| {
                t.get(&(s.clone(), b))
                    .filter(|(_, n)| *n > 0)
                    .map(|(d, n)| d.as_secs_f64() / *n as f64)
            };
            let Some(m) = mean("memcpy") else { continue };
            for b in [
                "memcpy",
                "slice_reader",
                "slice_reader+write",
                "stream_reader",
            ] {
                if let Some(x) = mean(b) {
                    println!(
                        "  {s:24} {b:20} {:10.3} ms/iter  ratio {:6.2}",
                        x * 1e3,
                        x / m
                    );
                }
            }
        }
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    report();
}
