//! The page bitmap every qmig crate uses: one bit per target page of a RAM
//! block (received pages on a destination, dirty or unsent pages on a
//! source, discarded ranges), and its little-endian wire form, the one the
//! return path's RECV_BITMAP message and mapped-ram files carry (QEMU's
//! `bitmap_to_le`, `ram_dirty_bitmap_reload` and `mapped_ram` layout).

use crate::error::WireError;
use crate::return_path::recv_bitmap_size;

/// A bitmap with one bit per target page of a block.
///
/// Besides the bits themselves (64-bit words) it keeps summary levels: in
/// level `k + 1`, bit `j` is set whenever word `j` of level `k` may be
/// non-zero. Range operations walk the summaries top-down, so clearing or
/// testing a range costs time in the number of non-zero words it touches
/// plus `range / 64^levels`, not in the length of the range: one
/// POSTCOPY_RAM_DISCARD of thousands of ranges over a terabyte block stays
/// cheap, and clearing never writes to words that are already zero (which
/// would also bring the untouched pages of a huge bitmap into memory).
#[derive(Debug, Clone, Default)]
pub struct PageBitmap {
    /// `levels[0]` holds the bits; `levels[k + 1]` summarises `levels[k]`.
    /// The last level has at most [`TOP_WORDS`] words.
    levels: Vec<Vec<u64>>,
    bits: u64,
}

/// The top summary level is scanned word by word: at most this many words.
const TOP_WORDS: usize = 64;

impl PartialEq for PageBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.bits == other.bits && self.words() == other.words()
    }
}

impl Eq for PageBitmap {}

/// Summary levels above `words` words of bits (each level's length).
fn summary_lens(words: usize) -> Vec<usize> {
    let mut lens = vec![words];
    let mut n = words;
    while n > TOP_WORDS {
        n = n.div_ceil(64);
        lens.push(n);
    }
    lens
}

/// Calls `f(index, word)` for every word of `levels[0]` with index in
/// `lo..hi` that the summaries say may be non-zero and that is non-zero; stops
/// when `f` returns true (and returns true). Summary bits found stale are
/// cleared on the way.
fn walk(
    levels: &mut [Vec<u64>],
    lo: usize,
    hi: usize,
    f: &mut dyn FnMut(usize, &mut u64) -> bool,
) -> bool {
    if lo >= hi {
        return false;
    }
    let Some((cur, up)) = levels.split_first_mut() else {
        return false;
    };
    if up.is_empty() {
        for (j, w) in cur[lo..hi].iter_mut().enumerate() {
            if *w != 0 && f(lo + j, w) {
                return true;
            }
        }
        return false;
    }
    walk(up, lo / 64, (hi - 1) / 64 + 1, &mut |sj, sw| {
        let base = sj * 64;
        let mut m = *sw;
        if base < lo {
            m &= u64::MAX << (lo - base);
        }
        if hi < base + 64 {
            m &= (1u64 << (hi - base)) - 1;
        }
        while m != 0 {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            let j = base + b;
            if cur[j] != 0 && f(j, &mut cur[j]) {
                return true;
            }
            if cur[j] == 0 {
                *sw &= !(1u64 << b);
            }
        }
        false
    })
}

/// Mask of bits `lo..hi` (`hi <= 64`, `lo < hi`) of a word.
#[inline]
fn mask(lo: u64, hi: u64) -> u64 {
    if hi - lo == 64 {
        u64::MAX
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

impl PageBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        let lens = summary_lens(bits.div_ceil(64) as usize);
        PageBitmap {
            levels: lens.into_iter().map(|n| vec![0; n]).collect(),
            bits,
        }
    }

    fn words(&self) -> &[u64] {
        self.levels.first().map_or(&[], |v| v.as_slice())
    }

    /// Marks word `w` of the bits as possibly non-zero in every summary.
    #[inline]
    fn mark(&mut self, w: usize) {
        let mut j = w;
        for lvl in self.levels.iter_mut().skip(1) {
            let (i, b) = (j / 64, j % 64);
            if lvl[i] >> b & 1 == 1 {
                return;
            }
            lvl[i] |= 1 << b;
            j = i;
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Bit `i` (false past the end).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.levels[0][(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets bit `i` (ignored past the end).
    #[inline]
    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            let w = (i / 64) as usize;
            let old = self.levels[0][w];
            self.levels[0][w] = old | 1 << (i % 64);
            if old == 0 {
                self.mark(w);
            }
        }
    }

    /// Clears bit `i` (ignored past the end).
    #[inline]
    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            let w = (i / 64) as usize;
            self.levels[0][w] &= !(1 << (i % 64));
            if self.levels[0][w] == 0 {
                // Keep the summaries exact: clear the chain of now-empty words.
                let mut j = w;
                for lvl in self.levels.iter_mut().skip(1) {
                    let (s, b) = (j / 64, j % 64);
                    lvl[s] &= !(1 << b);
                    if lvl[s] != 0 {
                        break;
                    }
                    j = s;
                }
            }
        }
    }

    /// The word range and the masks of its first and last word for bits
    /// `start..start + n` clipped to the bitmap, or `None` when empty.
    fn span(&self, start: u64, n: u64) -> Option<(usize, usize, u64, u64)> {
        let end = start.saturating_add(n).min(self.bits);
        if start >= end {
            return None;
        }
        let (lo, hi) = (start / 64, (end - 1) / 64);
        let first = mask(start % 64, if lo == hi { (end - 1) % 64 + 1 } else { 64 });
        let last = mask(if lo == hi { start % 64 } else { 0 }, (end - 1) % 64 + 1);
        Some((lo as usize, hi as usize + 1, first, last))
    }

    /// Sets bits `start..start + n` (clipped to the bitmap). Costs time in
    /// the number of words of the range.
    pub fn set_range(&mut self, start: u64, n: u64) {
        let Some((lo, hi, first, last)) = self.span(start, n) else {
            return;
        };
        for w in lo..hi {
            let mut m = u64::MAX;
            if w == lo {
                m &= first;
            }
            if w + 1 == hi {
                m &= last;
            }
            self.levels[0][w] |= m;
            self.mark(w);
        }
    }

    /// Clears bits `start..start + n` (clipped to the bitmap) and returns
    /// whether any of them was set. Costs time in the number of non-zero words
    /// in the range, plus the range over 64^levels; words already zero are
    /// not written.
    pub fn clear_range(&mut self, start: u64, n: u64) -> bool {
        let Some((lo, hi, first, last)) = self.span(start, n) else {
            return false;
        };
        let mut any = false;
        walk(&mut self.levels, lo, hi, &mut |w, word| {
            let mut m = u64::MAX;
            if w == lo {
                m &= first;
            }
            if w + 1 == hi {
                m &= last;
            }
            any |= *word & m != 0;
            *word &= !m;
            false
        });
        any
    }

    /// Whether any bit of `start..start + n` is set. Costs as [`PageBitmap::clear_range`].
    pub fn any_in_range(&self, start: u64, n: u64) -> bool {
        let Some((lo, hi, first, last)) = self.span(start, n) else {
            return false;
        };
        let w = self.words();
        if w[lo] & first != 0 || w[hi - 1] & last != 0 {
            return true;
        }
        if hi - lo <= 2 {
            return false;
        }
        // Inner words are wholly inside the range: any non-zero one answers.
        // `walk` needs `&mut` for its stale-bit clean-up; a read-only copy of
        // the summaries would cost their size, so walk the levels by hand.
        self.first_word(self.levels.len() - 1, lo + 1, hi - 1)
            .is_some()
    }

    /// The first set bit in `from..limit` (`limit` clamped to the length), or
    /// `None`. Skips zero words through the summaries, so a search over a
    /// mostly clean bitmap costs time in the number of non-zero words it
    /// passes, not in the range (QEMU's `find_next_bit` over the migration
    /// bitmap, as `migration_bitmap_find_dirty` uses it).
    #[must_use]
    pub fn next_set(&self, from: u64, limit: u64) -> Option<u64> {
        let limit = limit.min(self.bits);
        let (lo, hi, first, last) = self.span(from, limit.saturating_sub(from))?;
        let w = self.words();
        let m = w[lo] & first & if lo + 1 == hi { last } else { u64::MAX };
        if m != 0 {
            return Some(lo as u64 * 64 + u64::from(m.trailing_zeros()));
        }
        if hi - lo < 2 {
            return None;
        }
        let j = self.first_word(self.levels.len() - 1, lo + 1, hi)?;
        let m = if j + 1 == hi { w[j] & last } else { w[j] };
        (m != 0).then(|| j as u64 * 64 + u64::from(m.trailing_zeros()))
    }

    /// The index of the first non-zero word of `levels[0][lo..hi]`, using
    /// level `k`'s summary of the words below.
    fn first_word(&self, k: usize, lo: usize, hi: usize) -> Option<usize> {
        if lo >= hi {
            return None;
        }
        if k == 0 {
            return self.levels[0][lo..hi]
                .iter()
                .position(|&w| w != 0)
                .map(|p| lo + p);
        }
        // Indices at level k - 1 are lo..hi scaled down k - 1 times.
        let shift = 6 * (k as u32 - 1);
        let (llo, lhi) = (lo >> shift, ((hi - 1) >> shift) + 1);
        let (slo, shi) = (llo / 64, (lhi - 1) / 64 + 1);
        for sj in slo..shi {
            let mut m = self.levels[k][sj];
            let base = sj * 64;
            if base < llo {
                m &= u64::MAX << (llo - base);
            }
            if lhi < base + 64 {
                m &= (1u64 << (lhi - base)) - 1;
            }
            while m != 0 {
                let b = m.trailing_zeros() as usize;
                m &= m - 1;
                let j = base + b;
                let (clo, chi) = ((j << shift).max(lo), ((j + 1) << shift).min(hi));
                if let Some(x) = self.first_word(k - 1, clo, chi) {
                    return Some(x);
                }
            }
        }
        None
    }

    /// Clears bit `i` and says whether it was set (false past the end).
    #[inline]
    pub fn test_and_clear(&mut self, i: u64) -> bool {
        let was = self.get(i);
        if was {
            self.clear(i);
        }
        was
    }

    /// ORs `other` into `self` and clears `other` (QEMU's dirty-bitmap sync:
    /// the dirty log moves into the migration bitmap). Returns how many bits
    /// became set in `self`. Bits of `other` past `self`'s length are
    /// dropped.
    pub fn merge_from(&mut self, other: &mut PageBitmap) -> u64 {
        let mut n = 0;
        let hi = other.words().len().min(self.words().len());
        let mut newly = Vec::new();
        walk(&mut other.levels, 0, hi, &mut |w, word| {
            newly.push((w, *word));
            *word = 0;
            false
        });
        for (w, word) in newly {
            let old = self.levels[0][w];
            n += u64::from((word & !old).count_ones());
            self.levels[0][w] = old | word;
            if old == 0 {
                self.mark(w);
            }
        }
        // Words of `other` past `self`'s end.
        let rest = other.words().len();
        if rest > hi {
            other.clear_range(hi as u64 * 64, (rest - hi) as u64 * 64);
        }
        n
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words().iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Rebuilds the summary levels from the bits.
    fn rebuild(&mut self) {
        let lens = summary_lens(self.levels[0].len());
        self.levels.truncate(1);
        for &n in &lens[1..] {
            self.levels.push(vec![0; n]);
        }
        let nz: Vec<usize> = self.levels[0]
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .map(|(i, _)| i)
            .collect();
        for w in nz {
            self.mark(w);
        }
    }

    /// Changes the number of bits; new bits are clear, dropped bits are forgotten.
    pub fn resize(&mut self, bits: u64) {
        if self.levels.is_empty() {
            *self = PageBitmap::new(bits);
            return;
        }
        self.levels[0].resize(bits.div_ceil(64) as usize, 0);
        self.bits = bits;
        if !bits.is_multiple_of(64) {
            if let Some(last) = self.levels[0].last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
        self.rebuild();
    }

    /// The wire form: `ceil(bits / 8)` bytes rounded up to a multiple of 8,
    /// bit `i` in byte `i / 8` at position `i % 8` (little-endian 64-bit words).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let size = recv_bitmap_size(self.bits) as usize;
        let mut out = Vec::with_capacity(size);
        for w in self.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(size, 0);
        out
    }

    /// Parses the wire form of a bitmap of `bits` bits.
    ///
    /// # Errors
    /// [`WireError::Bitmap`] (offset 0 within `bytes`) if the length is not
    /// the rounded size for `bits` (`recv_bitmap_size`), or if a bit past
    /// `bits` is set.
    pub fn from_le_bytes(bytes: &[u8], bits: u64) -> Result<Self, WireError> {
        let want = recv_bitmap_size(bits);
        if bytes.len() as u64 != want {
            return Err(WireError::Bitmap {
                offset: 0,
                why: format!("{} bytes for {bits} pages, expected {want}", bytes.len()),
            });
        }
        let mut words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        words.truncate(bits.div_ceil(64) as usize);
        let tail_ok = bits.is_multiple_of(64)
            || words
                .last()
                .is_none_or(|&w| w & !((1u64 << (bits % 64)) - 1) == 0);
        if !tail_ok {
            return Err(WireError::Bitmap {
                offset: 0,
                why: format!("bits set past the last of {bits} pages"),
            });
        }
        let mut bm = PageBitmap {
            levels: vec![words],
            bits,
        };
        bm.rebuild();
        Ok(bm)
    }

    /// Indices of the set bits, in order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words().iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    //! Moved from qmig-ram-dst with the type.
    use super::PageBitmap;

    #[test]
    fn bitmap_sizes_round_up_to_8_bytes() {
        assert_eq!(PageBitmap::new(0).to_le_bytes().len(), 0);
        assert_eq!(PageBitmap::new(1).to_le_bytes().len(), 8);
        assert_eq!(PageBitmap::new(64).to_le_bytes().len(), 8);
        assert_eq!(PageBitmap::new(65).to_le_bytes().len(), 16);
        let mut b = PageBitmap::new(10);
        b.set(9);
        let bytes = b.to_le_bytes();
        assert_eq!(bytes, vec![0, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PageBitmap::from_le_bytes(&bytes, 10).unwrap(), b);
        // A bit past the end.
        assert!(PageBitmap::from_le_bytes(&bytes, 9).is_err());
        assert!(PageBitmap::from_le_bytes(&bytes[..4], 10).is_err());
    }

    #[test]
    fn bitmap_ranges() {
        let mut b = PageBitmap::new(200);
        b.set_range(3, 130);
        assert_eq!(b.count_ones(), 130);
        assert!(b.any_in_range(132, 5) && !b.any_in_range(133, 50));
        b.clear_range(64, 64);
        assert_eq!(b.count_ones(), 66);
        b.set_range(190, 100);
        assert_eq!(b.count_ones(), 76);
        b.resize(195);
        assert_eq!(b.count_ones(), 71);
        b.resize(300);
        assert!(!b.get(196));
    }

    proptest::proptest! {
        /// The summarised bitmap agrees with a plain `Vec<bool>` under any mix of
        /// operations, at sizes that need one to three summary levels.
        #[test]
        fn bitmap_matches_a_plain_model(
            bits in proptest::prop_oneof![0u64..200, 4000u64..5000, 262_000u64..263_000],
            ops in proptest::collection::vec((0u8..6, 0u64..263_000, 0u64..70_000), 0..60),
        ) {
            let mut b = PageBitmap::new(bits);
            let mut m = vec![false; bits as usize];
            for (op, start, n) in ops {
                let start = start % (bits + 2);
                let end = start.saturating_add(n).min(bits);
                match op {
                    0 => { b.set(start); if start < bits { m[start as usize] = true; } }
                    1 => { b.clear(start); if start < bits { m[start as usize] = false; } }
                    2 => { b.set_range(start, n); for i in start..end { m[i as usize] = true; } }
                    3 => {
                        let want = (start..end).any(|i| m[i as usize]);
                        proptest::prop_assert_eq!(b.clear_range(start, n), want);
                        for i in start..end { m[i as usize] = false; }
                    }
                    4 => {
                        let want = (start..end).any(|i| m[i as usize]);
                        proptest::prop_assert_eq!(b.any_in_range(start, n), want);
                    }
                    _ => {
                        let want = (start.min(bits)..bits).filter(|&i| m[i as usize]).count() as u64;
                        proptest::prop_assert_eq!(b.count_ones() - (0..start.min(bits)).filter(|&i| m[i as usize]).count() as u64, want);
                    }
                }
            }
            let ones: Vec<u64> = (0..bits).filter(|&i| m[i as usize]).collect();
            proptest::prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), ones);
            let round = PageBitmap::from_le_bytes(&b.to_le_bytes(), bits).unwrap();
            proptest::prop_assert_eq!(&round, &b);
            for probe in [0, bits / 3, bits / 2, bits.saturating_sub(70)] {
                let want = (probe..bits).any(|i| m[i as usize]);
                proptest::prop_assert_eq!(round.any_in_range(probe, bits), want);
            }
        }
    }
}
