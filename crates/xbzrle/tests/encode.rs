//! Encoder tests: hand-checked vectors of QEMU's rules, fast encoders against the
//! reference oracle (every output limit around the encoded length), roundtrips, and page
//! pairs engineered to land within 2 bytes of the overflow limit.

mod util;

use proptest::prelude::*;
use qmig_xbzrle::{encode, reference, Overflow};
use util::{check, unbounded_len, Rng};

fn enc(old: &[u8], new: &[u8], dlen: usize) -> Result<Vec<u8>, Overflow> {
    let mut out = vec![0u8; dlen];
    let n = check(old, new, dlen)?;
    let m = encode(old, new, &mut out)?;
    assert_eq!(n, m);
    out.truncate(n);
    Ok(out)
}

fn with_changed(len: usize, changed: impl Fn(usize) -> bool) -> (Vec<u8>, Vec<u8>) {
    let old: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let new = old
        .iter()
        .enumerate()
        .map(|(i, &b)| if changed(i) { !b } else { b })
        .collect();
    (old, new)
}

#[test]
fn hand_checked_vectors() {
    // Unchanged page: nothing to send.
    let (o, n) = with_changed(8, |_| false);
    assert_eq!(enc(&o, &n, 8), Ok(vec![]));
    // One changed byte.
    let (o, n) = with_changed(8, |i| i == 3);
    assert_eq!(enc(&o, &n, 8), Ok(vec![3, 1, n[3]]));
    // Leading change: first skip run is 0.
    let (o, n) = with_changed(8, |i| i < 2);
    assert_eq!(enc(&o, &n, 8), Ok(vec![0, 2, n[0], n[1]]));
    // Two runs.
    let (o, n) = with_changed(16, |i| i == 1 || (5..7).contains(&i));
    assert_eq!(enc(&o, &n, 16), Ok(vec![1, 1, n[1], 3, 2, n[5], n[6]]));
    // Whole page changed: 2 + 8 > 8.
    let (o, n) = with_changed(8, |_| true);
    assert_eq!(enc(&o, &n, 8), Err(Overflow));
    // Ends exactly at the limit with a data run that reaches the page end: accepted.
    let (o, n) = with_changed(8, |i| i >= 2);
    assert_eq!(enc(&o, &n, 8), Ok([&[2u8, 6][..], &n[2..]].concat()));
    // 8 bytes written but a (trailing, never sent) skip run follows: QEMU's check before
    // each skip run (d + 2 > dlen) fires anyway.
    let (o, n) = with_changed(8, |i| i < 6);
    assert_eq!(enc(&o, &n, 8), Err(Overflow));
    let (o, n) = with_changed(8, |i| i < 5);
    assert_eq!(enc(&o, &n, 8), Err(Overflow));
    let (o, n) = with_changed(8, |i| i < 4);
    assert_eq!(enc(&o, &n, 8).map(|v| v.len()), Ok(6));
    // A limit below 2 overflows even for an unchanged page (the check comes first).
    let (o, n) = with_changed(8, |_| false);
    assert_eq!(enc(&o, &n, 1), Err(Overflow));
    assert_eq!(enc(&o, &n, 2), Ok(vec![]));
    // Empty page.
    assert_eq!(enc(&[], &[], 0), Ok(vec![]));
    // 2-byte lengths.
    let (o, n) = with_changed(4096, |i| i == 200 || (1000..1300).contains(&i));
    let e = enc(&o, &n, 4096).unwrap();
    assert_eq!(e[..4], [0xC8, 0x01, 0x01, n[200]]);
    assert_eq!(e[4..8], [0x9F, 0x06, 0xAC, 0x02]); // skip 799, 300 bytes
    assert_eq!(e.len(), 8 + 300);
}

#[test]
fn runs_longer_than_14_bits_overflow() {
    // Only pages above 16 KiB can need them; QEMU would abort on an assertion.
    let (o, n) = with_changed(65536, |i| i == 0x3FFF);
    assert_eq!(enc(&o, &n, 65536).map(|v| v.len()), Ok(4));
    let (o, n) = with_changed(65536, |i| i == 0x4000);
    assert_eq!(enc(&o, &n, 65536), Err(Overflow));
    let (o, n) = with_changed(65536, |i| (100..100 + 0x3FFF).contains(&i));
    assert_eq!(enc(&o, &n, 65536).map(|v| v.len()), Ok(1 + 2 + 0x3FFF));
    let (o, n) = with_changed(65536, |i| (100..100 + 0x4000).contains(&i));
    assert_eq!(enc(&o, &n, 65536), Err(Overflow));
}

#[test]
fn every_limit_for_small_pages() {
    let mut rng = Rng(0x1234_5678);
    for len in (8..=256).step_by(8) {
        for density in [1usize, 4, 16, 50, 90, 100] {
            for _ in 0..4 {
                let old = rng.bytes(len);
                let mut new = old.clone();
                for b in new.iter_mut() {
                    if rng.below(100) < density {
                        *b = rng.other(*b);
                    }
                }
                let l = unbounded_len(&old, &new).unwrap();
                for dlen in 0..=l + 3 {
                    check(&old, &new, dlen).ok();
                }
            }
        }
    }
}

/// Builds page pairs by flipping bytes one at a time and keeps every pair whose encoding
/// (without a limit) is within 2 bytes of the page size; checks them at limit = page
/// size. Returns which (distance, ends-with-data-run) combinations were hit.
fn near_limit_search(
    len: usize,
    seed: u64,
    rounds: usize,
) -> std::collections::BTreeSet<(i64, bool)> {
    let mut rng = Rng(seed);
    let mut hit = std::collections::BTreeSet::new();
    for round in 0..rounds {
        let old = rng.bytes(len);
        let mut new = old.clone();
        // Alternate structures: isolated bytes, short runs, long runs.
        let max_run = [1usize, 3, 8, 64, 700][round % 5].min(len);
        let mut last = 0usize;
        loop {
            // Runs over 0x3FFF (64 KiB pages) cannot be encoded at all: keep changing.
            let (l, dist) = match unbounded_len(&old, &new) {
                Ok(l) => (l, l as i64 - len as i64),
                Err(Overflow) => (0, -(len as i64)),
            };
            if dist > 2 || old.iter().zip(&new).all(|(a, b)| a != b) {
                break;
            }
            if dist >= -2 && l > 0 {
                let ends_in_data = old[len - 1] != new[len - 1];
                hit.insert((dist, ends_in_data));
                let r = check(&old, &new, len);
                // Anything whose unlimited encoding is longer than the page overflows.
                if dist > 0 {
                    assert_eq!(r, Err(Overflow));
                } else if ends_in_data {
                    assert_eq!(r, Ok(l), "a final data run may end exactly at the limit");
                } else {
                    // A skip run follows the last data run: needs d + 2 <= dlen.
                    assert_eq!(r.is_ok(), dist <= -2, "dist {dist}");
                }
                // Also the limits right around it.
                for dlen in l.saturating_sub(3)..=l + 3 {
                    check(&old, &new, dlen).ok();
                }
            }
            // Change more bytes: each change of `step` bytes adds at most step + 4 encoded
            // bytes, so batch changes while far from the limit, then go one at a time.
            let batch = ((-dist - 3).max(0) as usize / (max_run + 4)).max(1);
            for _ in 0..batch {
                let step = 1 + rng.below(max_run);
                let pos = match round % 3 {
                    0 => (last + 1 + rng.below(3)) % (len - step + 1),
                    1 => len - step,
                    _ => rng.below(len - step + 1),
                };
                let pos = if round % 3 == 1 && rng.below(2) == 0 {
                    rng.below(len - step + 1)
                } else {
                    pos
                };
                last = pos + step;
                for i in pos..pos + step {
                    if new[i] == old[i] {
                        new[i] = rng.other(old[i]);
                    }
                }
            }
        }
    }
    hit
}

#[test]
fn near_the_overflow_limit_4k() {
    let hit = near_limit_search(4096, 7, 60);
    for dist in -2..=2 {
        for ends in [false, true] {
            assert!(
                hit.contains(&(dist, ends)),
                "never reached distance {dist}, ends in data {ends}: {hit:?}"
            );
        }
    }
}

#[test]
fn near_the_overflow_limit_64k() {
    let hit = near_limit_search(65536, 11, 10);
    assert!(hit.len() >= 6, "{hit:?}");
}

#[test]
fn near_the_overflow_limit_small() {
    for len in (8..=512).step_by(8) {
        near_limit_search(len, len as u64, 20);
    }
}

/// A page pair: random old page, new page = old with random ranges XORed by a pattern
/// (zero pattern bytes leave bytes equal, giving all kinds of run structures).
fn page_pair(len: impl Strategy<Value = usize>) -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    len.prop_flat_map(|len| {
        (
            proptest::collection::vec(any::<u8>(), len),
            proptest::collection::vec(
                (0..len, 1..=len.min(600), any::<u8>(), any::<bool>()),
                0..40,
            ),
        )
    })
    .prop_map(|(old, edits)| {
        let mut new = old.clone();
        let len = old.len();
        for (pos, run, x, sparse) in edits {
            let end = (pos + run).min(len);
            for (k, b) in new[pos..end].iter_mut().enumerate() {
                let xor = if sparse {
                    x & (k as u8).wrapping_mul(37)
                } else {
                    x
                };
                *b ^= xor;
            }
        }
        (old, new)
    })
}

fn small_len() -> impl Strategy<Value = usize> {
    (1usize..=64).prop_map(|k| 8 * k)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fast_equals_reference_small((old, new) in page_pair(small_len())) {
        let len = new.len();
        let l = unbounded_len(&old, &new).unwrap();
        for dlen in 0..=l.max(len) + 3 {
            check(&old, &new, dlen).ok();
        }
    }

    #[test]
    fn fast_equals_reference_4k((old, new) in page_pair(Just(4096))) {
        let l = unbounded_len(&old, &new).unwrap();
        for dlen in [4096, 0, 1, 2, 3, l / 2, l.saturating_sub(2), l.saturating_sub(1), l, l + 1, l + 2] {
            check(&old, &new, dlen).ok();
        }
    }

    #[test]
    fn roundtrip_4k((old, new) in page_pair(Just(4096))) {
        let mut out = vec![0u8; 4096];
        if let Ok(n) = encode(&old, &new, &mut out) {
            let mut page = old.clone();
            qmig_xbzrle::decode(&out[..n], &mut page).unwrap();
            prop_assert_eq!(page, new);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn fast_equals_reference_64k((old, new) in page_pair(Just(65536))) {
        let mut big = vec![0u8; 2 * 65536 + 16];
        let r = reference::encode(&old, &new, &mut big);
        check(&old, &new, 65536).ok();
        if let Ok(l) = r {
            for dlen in [l.saturating_sub(2), l.saturating_sub(1), l, l + 1, l + 2] {
                check(&old, &new, dlen).ok();
            }
        }
    }
}

#[test]
fn random_pages_overflow() {
    let mut rng = Rng(99);
    for len in [4096usize, 65536] {
        let old = rng.bytes(len);
        let new = rng.bytes(len);
        assert_eq!(check(&old, &new, len), Err(Overflow));
    }
}

/// The paths `check` runs include the AVX-512 encoder on a CPU that has it (so the
/// property tests above exercise it), and always the portable fallback.
#[test]
fn every_cpu_path_is_checked() {
    let names: Vec<&str> = qmig_xbzrle::variants::available()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert!(names.contains(&"portable"), "{names:?}");
    #[cfg(target_arch = "x86_64")]
    {
        assert!(names.contains(&"sse2"), "{names:?}");
        let avx512 = ["avx512f", "avx512bw", "avx512vbmi", "avx512vbmi2", "bmi2"]
            .iter()
            .all(|f| {
                std::fs::read_to_string("/proc/cpuinfo")
                    .map(|c| {
                        c.split_whitespace().any(|w| {
                            w == *f
                                || (*f == "avx512vbmi" && w == "avx512_vbmi")
                                || (*f == "avx512vbmi2" && w == "avx512_vbmi2")
                        })
                    })
                    .unwrap_or(false)
            });
        if avx512 {
            assert!(names.contains(&"avx512"), "{names:?}");
        }
    }
}
