//! `PageBitmap::next_set`, `test_and_clear` and `merge_from` against a
//! plain `Vec<bool>` model, over sizes that need summary levels.

use proptest::prelude::*;
use qmig_wire::PageBitmap;

fn build(bits: u64, ones: &[u64]) -> (PageBitmap, Vec<bool>) {
    let mut b = PageBitmap::new(bits);
    let mut m = vec![false; bits as usize];
    for &i in ones {
        let i = i % bits;
        b.set(i);
        m[i as usize] = true;
    }
    (b, m)
}

proptest! {
    #[test]
    fn next_set_matches_model(
        bits in 1u64..300_000,
        ones in proptest::collection::vec(any::<u64>(), 0..40),
        clears in proptest::collection::vec(any::<u64>(), 0..20),
        queries in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..30),
    ) {
        let (mut b, mut m) = build(bits, &ones);
        for &c in &clears {
            let i = c % bits;
            prop_assert_eq!(b.test_and_clear(i), m[i as usize]);
            m[i as usize] = false;
        }
        for &(f, l) in &queries {
            let from = f % (bits + 70);
            let limit = l % (bits + 70);
            let want = (from..limit.min(bits)).find(|&i| m[i as usize]);
            prop_assert_eq!(b.next_set(from, limit), want, "from {} limit {}", from, limit);
        }
        // Walking with next_set visits exactly the set bits.
        let mut seen = Vec::new();
        let mut at = 0;
        while let Some(i) = b.next_set(at, bits) {
            seen.push(i);
            at = i + 1;
        }
        let want: Vec<u64> = (0..bits).filter(|&i| m[i as usize]).collect();
        prop_assert_eq!(seen, want);
    }

    #[test]
    fn merge_from_is_or_and_clears(
        bits in 1u64..200_000,
        a in proptest::collection::vec(any::<u64>(), 0..40),
        c in proptest::collection::vec(any::<u64>(), 0..40),
    ) {
        let (mut x, mx) = build(bits, &a);
        let (mut y, my) = build(bits, &c);
        let newly = x.merge_from(&mut y);
        let want_new = (0..bits as usize).filter(|&i| my[i] && !mx[i]).count() as u64;
        prop_assert_eq!(newly, want_new);
        prop_assert_eq!(y.count_ones(), 0);
        prop_assert_eq!(y.next_set(0, bits), None);
        for i in 0..bits as usize {
            prop_assert_eq!(x.get(i as u64), mx[i] || my[i]);
        }
        let first = (0..bits).find(|&i| mx[i as usize] || my[i as usize]);
        prop_assert_eq!(x.next_set(0, bits), first);
    }
}

#[test]
fn next_set_on_a_large_sparse_bitmap() {
    let bits = 1u64 << 26; // 256 GiB of 4 KiB pages: three summary levels
    let mut b = PageBitmap::new(bits);
    assert_eq!(b.next_set(0, bits), None);
    b.set(bits - 1);
    b.set(12345);
    assert_eq!(b.next_set(0, bits), Some(12345));
    assert_eq!(b.next_set(12346, bits), Some(bits - 1));
    assert_eq!(b.next_set(12346, bits - 1), None);
    assert!(b.test_and_clear(12345));
    assert!(!b.test_and_clear(12345));
    assert_eq!(b.next_set(0, bits), Some(bits - 1));
}
