//! ns per 4 KiB page for encode and decode, over a 4096-page-pair working set (16 MiB per
//! side) walked in order so it does not stay cache resident, with a page memcpy over the
//! same working set as the in-run baseline.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use qmig_xbzrle::{decode, decode_two_pass, encode, encode_portable, validate, variants};
use std::hint::black_box;

const PAGE: usize = 4096;
const DEFAULT_PAGES: usize = 4096;

/// Working-set size in pages; `QMIG_BENCH_PAGES` overrides it for cache-resident runs.
fn pages() -> usize {
    std::env::var("QMIG_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A random non-zero byte: XORing with it always changes a byte.
    fn nonzero(&mut self) -> u8 {
        1 + (self.next() % 255) as u8
    }
}

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
    let mut old = vec![0u8; PAGE * pages()];
    old.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next().to_le_bytes()));
    let mut new = old.clone();
    for p in new.chunks_mut(PAGE) {
        match name {
            "unchanged" => {}
            "sparse-2runs" => {
                p[0] = p[0].wrapping_add(1);
                let off = 4 + 4 * (rng.next() as usize % (PAGE / 4 - 1));
                p[off..off + 4].iter_mut().for_each(|b| *b = !*b);
            }
            "scattered-64x8" => {
                for k in 0..PAGE / 64 {
                    for b in &mut p[64 * k..64 * k + 8] {
                        *b ^= rng.nonzero();
                    }
                }
            }
            "dense-alt-words" => {
                for k in (8..PAGE).step_by(16) {
                    for b in &mut p[k..k + 8] {
                        *b ^= rng.nonzero();
                    }
                }
            }
            "random" => p
                .chunks_mut(8)
                .for_each(|c| c.copy_from_slice(&rng.next().to_le_bytes())),
            _ => unreachable!(),
        }
    }
    Set { old, new }
}

type Enc = fn(&[u8], &[u8], &mut [u8]) -> Result<usize, qmig_xbzrle::Overflow>;

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let n_pages = pages();
    for name in [
        "unchanged",
        "sparse-2runs",
        "scattered-64x8",
        "dense-alt-words",
        "random",
    ] {
        let set = scenario(name, &mut rng);
        let mut g = c.benchmark_group(name);
        // The output page at the same offset within a 4 KiB page as the input pages:
        // glibc's memcpy (`rep movsb` on AMD EPYC) is 5x slower for some relative
        // offsets of source and destination, which made the baseline (and every ratio)
        // swing from run to run.
        let mut out_buf = vec![0u8; 3 * PAGE];
        let shift = (set.new.as_ptr() as usize).wrapping_sub(out_buf.as_ptr() as usize) % PAGE;
        let out = &mut out_buf[shift..shift + PAGE];

        g.bench_function("memcpy", |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % n_pages;
                out.copy_from_slice(Set::page(&set.new, i));
                black_box(&mut *out);
            })
        });
        let encoders: [(&str, Enc); 3] = [
            ("encode", encode),
            ("encode-sse2", variants::encode_sse2),
            ("encode-portable", encode_portable),
        ];
        for (label, f) in encoders {
            g.bench_function(label, |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % n_pages;
                    black_box(f(Set::page(&set.old, i), Set::page(&set.new, i), out)).ok()
                })
            });
        }
        if matches!(name, "sparse-2runs" | "scattered-64x8" | "dense-alt-words") {
            // Encoded pages packed back to back, as they follow each other in a stream.
            let mut enc = Vec::new();
            let mut spans = Vec::with_capacity(n_pages);
            for i in 0..n_pages {
                let n = encode(Set::page(&set.old, i), Set::page(&set.new, i), out).expect("fits");
                spans.push((enc.len(), enc.len() + n));
                enc.extend_from_slice(&out[..n]);
            }
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
