//! Zero-page detection.

/// Whether every byte of `page` is zero.
///
/// Checks the first word first (most non-zero pages differ there), then the
/// whole buffer in 256-byte chunks folded with OR, which the compiler turns
/// into wide vector loads; a non-zero chunk ends the scan early.
///
/// ```
/// use qmig_ram_src::is_zero;
/// let mut page = vec![0u8; 4096];
/// assert!(is_zero(&page));
/// page[4095] = 1;
/// assert!(!is_zero(&page));
/// ```
#[must_use]
pub fn is_zero(page: &[u8]) -> bool {
    if let Some(head) = page.get(..8) {
        if head.iter().any(|&b| b != 0) {
            return false;
        }
    }
    let mut chunks = page.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_naive(len in 0usize..9000, pos in any::<prop::sample::Index>(), v in 1u8..) {
            let mut p = vec![0u8; len];
            prop_assert!(is_zero(&p));
            if len > 0 {
                let i = pos.index(len);
                p[i] = v;
                prop_assert!(!is_zero(&p));
            }
        }
    }
}
