//! The benchmark's scenarios (same xorshift seed, same order, 4096 page pairs walked in
//! order, a page memcpy of the same working set as the baseline) timed as the *minimum*
//! over many passes instead of criterion's mean: on a shared, loaded machine a pass that
//! was never preempted still shows the code's own speed.
//!
//! `cargo run --release -p qmig-xbzrle --example minbench [PASSES]` (default 30). Prints
//! ns per page and the ratio to memcpy. `QMIG_BENCH_PAGES` sets the working set.

use std::hint::black_box;
use std::time::Instant;

#[path = "../benches/support/scenarios.rs"]
mod scenarios;

use scenarios::{out_page, pack, scenario, Rng, NAMES, PAGE, SEED};

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
    let pages = scenarios::pages();
    let page = |i: usize| i * PAGE..(i + 1) * PAGE;
    let mut rng = Rng(SEED);
    println!("scenario operation ns/page memcpy ratio");
    for name in NAMES {
        let (old, new) = scenario(name, &mut rng, pages);
        let mut out_buf = vec![0u8; 3 * PAGE];
        let out = out_page(&mut out_buf, &new);
        let m = time(pages, passes, |i| {
            out.copy_from_slice(&new[page(i)]);
            black_box(&mut *out);
        });
        let e = time(pages, passes, |i| {
            black_box(qmig_xbzrle::encode(&old[page(i)], &new[page(i)], &mut *out).ok());
        });
        println!("{name} encode {e:.0} {m:.0} {:.2}", e / m);
        if std::env::var_os("QMIG_BENCH_PATHS").is_some() {
            // Each encoder path this CPU has, called directly.
            for (path, f) in qmig_xbzrle::variants::available() {
                let e = time(pages, passes, |i| {
                    black_box(f(&old[page(i)], &new[page(i)], &mut *out).ok());
                });
                println!("{name} encode-{path} {e:.0} {m:.0} {:.2}", e / m);
            }
        }
        if matches!(name, "sparse-2runs" | "scattered-64x8" | "dense-alt-words") {
            let (enc, spans) = pack(&old, &new, out);
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
