//! The page-pair scenarios timed by both `benches/xbzrle.rs` (criterion, mean) and
//! `examples/minbench.rs` (minimum over passes), in one place so both time the same pages:
//! the same xorshift seed, the same scenarios in the same order.
//!
//! Included by each with `#[path = ...] mod scenarios;` (a file in a subfolder of
//! `benches/` is not a bench target of its own).

/// Bytes in a page: QEMU's x86 `TARGET_PAGE_SIZE`, the unit XBZRLE encodes.
pub const PAGE: usize = 4096;

/// The xorshift seed both harnesses start from.
pub const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The scenarios in the order they are generated (one RNG runs through all of them, so
/// the order is part of what each scenario's pages are).
pub const NAMES: [&str; 5] = [
    "unchanged",
    "sparse-2runs",
    "scattered-64x8",
    "dense-alt-words",
    "random",
];

/// Working-set size in pages (4096: 16 MiB per side, walked in order so it does not stay
/// cache resident); `QMIG_BENCH_PAGES` overrides it for cache-resident runs.
pub fn pages() -> usize {
    std::env::var("QMIG_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096)
}

/// xorshift64: cheap, deterministic page contents.
pub struct Rng(pub u64);

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

/// `(old, new)`: `pages` random old pages and the new pages scenario `name` (one of
/// [`NAMES`]) makes of them.
pub fn scenario(name: &str, rng: &mut Rng, pages: usize) -> (Vec<u8>, Vec<u8>) {
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
            _ => unreachable!("unknown scenario {name}"),
        }
    }
    (old, new)
}

/// The page of `out_buf` (at least 3 pages long) at the same offset within a 4 KiB page
/// as `like`: glibc's memcpy (`rep movsb` on AMD EPYC) is 5x slower for some relative
/// offsets of source and destination, which made the memcpy baseline (and every ratio)
/// swing from run to run.
pub fn out_page<'a>(out_buf: &'a mut [u8], like: &[u8]) -> &'a mut [u8] {
    let shift = (like.as_ptr() as usize).wrapping_sub(out_buf.as_ptr() as usize) % PAGE;
    &mut out_buf[shift..shift + PAGE]
}

/// Every page pair encoded with `qmig_xbzrle::encode` (through `out`, one page) and
/// packed back to back as they follow each other in a stream, with each page's
/// `(start, end)` in the packed bytes.
pub fn pack(old: &[u8], new: &[u8], out: &mut [u8]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut enc = Vec::new();
    let mut spans = Vec::with_capacity(new.len() / PAGE);
    for (o, n) in old.chunks(PAGE).zip(new.chunks(PAGE)) {
        let len = qmig_xbzrle::encode(o, n, out).expect("a page's encoding fits a page");
        spans.push((enc.len(), enc.len() + len));
        enc.extend_from_slice(&out[..len]);
    }
    (enc, spans)
}
