//! Shared test helpers.
#![allow(dead_code)]

use qmig_xbzrle::{decode, encode, reference, variants, Overflow};

/// xorshift64* — deterministic, no dependencies.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A byte different from `b`.
    pub fn other(&mut self, b: u8) -> u8 {
        b ^ (1 + (self.next() % 255) as u8)
    }
}

/// Encoding length without an output limit (page sizes whose runs fit 0x3FFF).
pub fn unbounded_len(old: &[u8], new: &[u8]) -> Result<usize, Overflow> {
    let mut out = vec![0u8; 2 * new.len() + 16];
    reference::encode(old, new, &mut out)
}

/// Every encoder equals the reference for limit `dlen`; a successful encoding decodes
/// back to `new`. Returns the reference result.
pub fn check(old: &[u8], new: &[u8], dlen: usize) -> Result<usize, Overflow> {
    let mut want = vec![0xA5u8; dlen];
    let r = reference::encode(old, new, &mut want);
    let mut encoders: Vec<(&str, variants::Encoder)> = vec![("encode", encode)];
    // Every path this CPU has (AVX-512, AVX2, SSE2) plus the portable fallback, each
    // called directly so that the fallback is checked even where `encode` would not
    // pick it.
    encoders.extend(variants::available());
    for (name, f) in encoders {
        let mut got = vec![0x5Au8; dlen];
        let g = f(old, new, &mut got);
        assert_eq!(
            g,
            r,
            "{name}: result differs (len {}, dlen {dlen})",
            new.len()
        );
        if let Ok(n) = r {
            assert_eq!(
                got[..n],
                want[..n],
                "{name}: bytes differ (len {}, dlen {dlen})",
                new.len()
            );
        }
    }
    if let Ok(n) = r {
        let mut page = old.to_vec();
        if n <= page.len() {
            decode(&want[..n], &mut page).expect("own encoding decodes");
            assert_eq!(page, new, "roundtrip");
        }
        assert_eq!(
            reference::decode(&want[..n], old).as_deref().unwrap_or(new),
            new
        );
    }
    r
}
