//! The benchmark's scenarios (same xorshift seed, same order, 4096 page pairs walked in
//! order, a page memcpy of the same working set as the baseline) timed as the *minimum*
//! over many passes instead of criterion's mean: on a shared, loaded machine a pass that
//! was never preempted still shows the code's own speed.
//!
//! `cargo run --release -p qmig-xbzrle --example minbench [PASSES]` (default 30). Prints
//! ns per page and the ratio to memcpy. `QMIG_BENCH_PAGES` sets the working set.

use std::hint::black_box;
use std::time::Instant;

const PAGE: usize = 4096;

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
    fn nonzero(&mut self) -> u8 {
        1 + (self.next() % 255) as u8
    }
}

/// The same page pairs as `benches/xbzrle.rs`.
fn scenario(name: &str, rng: &mut Rng, pages: usize) -> (Vec<u8>, Vec<u8>) {
    let mut old = vec![0u8; PAGE * pages];
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
    (old, new)
}

/// Minimum over `passes` of the mean ns per call of `f(0..pages)`.
fn time(pages: usize, passes: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        for i in 0..pages {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / pages as f64);
    }
    best
}

fn main() {
    let passes: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let pages: usize = std::env::var("QMIG_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let page = |i: usize| i * PAGE..(i + 1) * PAGE;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    println!("scenario operation ns/page memcpy ratio");
    for name in [
        "unchanged",
        "sparse-2runs",
        "scattered-64x8",
        "dense-alt-words",
        "random",
    ] {
        let (old, new) = scenario(name, &mut rng, pages);
        // The output page at the same offset within a 4 KiB page as the input pages:
        // glibc's memcpy (`rep movsb` on this CPU) is 5x slower for some relative
        // offsets of source and destination, which made the baseline swing.
        let mut out_buf = vec![0u8; 3 * PAGE];
        let shift = (new.as_ptr() as usize).wrapping_sub(out_buf.as_ptr() as usize) % PAGE;
        let out = &mut out_buf[shift..shift + PAGE];
        let m = time(pages, passes, |i| {
            out.copy_from_slice(&new[page(i)]);
            black_box(&mut *out);
        });
        let e = time(pages, passes, |i| {
            black_box(qmig_xbzrle::encode(&old[page(i)], &new[page(i)], &mut *out).ok());
        });
        println!("{name} encode {e:.0} {m:.0} {:.2}", e / m);
        if matches!(name, "sparse-2runs" | "scattered-64x8" | "dense-alt-words") {
            let mut enc = Vec::new();
            let mut spans = Vec::new();
            for i in 0..pages {
                let n = qmig_xbzrle::encode(&old[page(i)], &new[page(i)], out).expect("fits");
                spans.push((enc.len(), enc.len() + n));
                enc.extend_from_slice(&out[..n]);
            }
            let mut dst = old.clone();
            type Dec = fn(&[u8], &mut [u8]) -> Result<(), qmig_xbzrle::XbzrleError>;
            let decoders: [(&str, Dec); 2] = [
                ("decode", qmig_xbzrle::decode),
                ("decode-two-pass", qmig_xbzrle::decode_two_pass),
            ];
            for (label, f) in decoders {
                let d = time(pages, passes, |i| {
                    let (a, b) = spans[i];
                    f(&enc[a..b], &mut dst[i * PAGE..(i + 1) * PAGE]).expect("valid");
                    black_box(&mut dst);
                });
                println!("{name} {label} {d:.0} {m:.0} {:.2}", d / m);
            }
            assert_eq!(dst, new, "decode(encode) roundtrip");
        }
    }
}
