//! ns per 4 KiB page for encode and decode, over a 4096-page-pair working set (16 MiB per
//! side) walked in order so it does not stay cache resident, with a page memcpy over the
//! same working set as the in-run baseline.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use qmig_xbzrle::{decode, decode_two_pass, encode, validate, variants};
use std::hint::black_box;

#[path = "support/scenarios.rs"]
mod scenarios;

use scenarios::{out_page, pack, pages, Rng, NAMES, PAGE, SEED};

struct Set {
    old: Vec<u8>,
    new: Vec<u8>,
}

impl Set {
    fn page(buf: &[u8], i: usize) -> &[u8] {
        &buf[i * PAGE..(i + 1) * PAGE]
    }
}

fn scenario(name: &str, rng: &mut Rng) -> Set {
    let (old, new) = scenarios::scenario(name, rng, pages());
    Set { old, new }
}

type Enc = fn(&[u8], &[u8], &mut [u8]) -> Result<usize, qmig_xbzrle::Overflow>;

fn bench(c: &mut Criterion) {
    let mut rng = Rng(SEED);
    let n_pages = pages();
    for name in NAMES {
        let set = scenario(name, &mut rng);
        let mut g = c.benchmark_group(name);
        let mut out_buf = vec![0u8; 3 * PAGE];
        let out = out_page(&mut out_buf, &set.new);

        g.bench_function("memcpy", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % n_pages;
                out.copy_from_slice(Set::page(&set.new, i));
                black_box(&mut *out);
            })
        });
        // `encode` (what callers get: the AVX-512 path where the CPU has it), then each
        // path this CPU has, called directly.
        let mut encoders: Vec<(String, Enc)> = vec![("encode".into(), encode)];
        for (path, f) in variants::available() {
            encoders.push((format!("encode-{path}"), f));
        }
        for (label, f) in encoders {
            let label = label.as_str();
            g.bench_function(label, |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % n_pages;
                    black_box(f(Set::page(&set.old, i), Set::page(&set.new, i), out)).ok()
                })
            });
        }
        if matches!(name, "sparse-2runs" | "scattered-64x8" | "dense-alt-words") {
            let (enc, spans) = pack(&set.old, &set.new, out);
            let mut dst = set.old.clone();
            for (i, &(a, b)) in spans.iter().enumerate() {
                decode(&enc[a..b], &mut dst[i * PAGE..(i + 1) * PAGE]).unwrap();
            }
            assert_eq!(dst, set.new, "decode(encode) roundtrip");
            // Phase 1 of decode alone: what validating before applying costs.
            g.bench_function("validate", |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % n_pages;
                    let (a, e) = spans[i];
                    black_box(validate(&enc[a..e], PAGE)).unwrap();
                })
            });
            type Dec = fn(&[u8], &mut [u8]) -> Result<(), qmig_xbzrle::XbzrleError>;
            let decoders: [(&str, Dec); 2] =
                [("decode", decode), ("decode-two-pass", decode_two_pass)];
            for (label, f) in decoders {
                g.bench_function(label, |b| {
                    let mut i = 0;
                    b.iter(|| {
                        i = (i + 1) % n_pages;
                        let (a, e) = spans[i];
                        f(&enc[a..e], &mut dst[i * PAGE..(i + 1) * PAGE]).unwrap();
                        black_box(&mut dst);
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
