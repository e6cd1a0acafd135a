//! The bare userfaultfd round trip, the baseline of
//! `scripts/bench_postcopy_latency.py`: a reader thread touches N missing
//! pages one after another; the fault thread reports each; the main thread
//! places it with UFFDIO_COPY. Prints one JSON line with the p50/p99 (µs) of
//! the same span `qmig recv` reports as `request_latency_us` (fault read →
//! placement done), and of the whole round trip seen by the reader.
//!
//! usage: `cargo run --release -p qmig-uffd-host --example uffd_round_trip [PAGES]`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use qmig_uffd_host::{Blocktime, Latency, Region};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pages: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let ps = 4096;
    let region = Region::new(pages * ps)?;
    let (tx, rx) = mpsc::channel();
    let ft = region.spawn_fault_thread(0, Blocktime::new(1), tx)?;
    let reader = {
        let r = region.clone();
        std::thread::spawn(move || {
            let mut l = Latency::default();
            let mut b = [0u8; 1];
            for p in 0..pages {
                let t = Instant::now();
                r.read(p * ps, &mut b).expect("in range");
                l.record(t.elapsed());
            }
            l
        })
    };
    let page = vec![0x5Au8; ps];
    let mut placed = Latency::default();
    for _ in 0..pages {
        let f = rx.recv_timeout(Duration::from_secs(10))?;
        region.place_page(f.offset as usize, &page)?;
        placed.record(f.seen.elapsed());
    }
    let touched = reader.join().map_err(|_| "reader panicked")?;
    ft.stop()?;
    println!(
        "{{\"pages\":{pages},\"user_mode_only\":{},\"fault_to_placed_us\":{{\"p50\":{},\"p99\":{}}},\
         \"reader_round_trip_us\":{{\"p50\":{},\"p99\":{}}}}}",
        region.features().user_mode_only,
        placed.quantile_us(0.5).unwrap_or(0),
        placed.quantile_us(0.99).unwrap_or(0),
        touched.quantile_us(0.5).unwrap_or(0),
        touched.quantile_us(0.99).unwrap_or(0),
    );
    Ok(())
}
