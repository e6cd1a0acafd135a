//! Decoder tests: every error with its position, the page left untouched on error, and
//! agreement with the naive reference decoder on arbitrary input.

use proptest::prelude::*;
use qmig_xbzrle::{decode, decode_two_pass, encode, reference, validate, XbzrleError as E};

fn run(enc: &[u8], page_len: usize) -> Result<Vec<u8>, E> {
    let old: Vec<u8> = (0..page_len).map(|i| i as u8).collect();
    let mut page = old.clone();
    let r = decode(enc, &mut page);
    assert_eq!(r, validate(enc, page_len));
    let mut page2 = old.clone();
    assert_eq!(decode_two_pass(enc, &mut page2), r);
    assert_eq!(page2, page, "one-pass and two-pass decoders disagree");
    assert_eq!(r.is_ok(), reference::decode(enc, &old).is_some());
    match r {
        Ok(()) => {
            assert_eq!(Some(&page), reference::decode(enc, &old).as_ref());
            Ok(page)
        }
        Err(e) => {
            assert_eq!(page, old, "page modified on error");
            Err(e)
        }
    }
}

#[test]
fn valid_inputs() {
    let p = run(&[], 16).unwrap();
    assert_eq!(p, (0..16).collect::<Vec<u8>>());
    let p = run(&[0, 2, 0xAA, 0xBB, 3, 1, 0xCC], 16).unwrap();
    assert_eq!(p[..7], [0xAA, 0xBB, 2, 3, 4, 0xCC, 6]);
    // Data run ending exactly at the page end.
    let p = run(&[14, 2, 1, 2], 16).unwrap();
    assert_eq!(p[14..], [1, 2]);
    // Non-minimal 2-byte lengths are accepted, like QEMU (0x80 0x00 = 0, 0x83 0x00 = 3).
    let p = run(&[0x80, 0x00, 0x83, 0x00, 9, 9, 9], 16).unwrap();
    assert_eq!(p[..4], [9, 9, 9, 3]);
    // 2-byte skip in a 4 KiB page.
    let p = run(&[0xC8, 0x01, 0x01, 0x77], 4096).unwrap();
    assert_eq!(p[200], 0x77);
}

#[test]
fn errors_name_position_and_rule() {
    assert_eq!(
        run(&[0; 17], 16),
        Err(E::InputTooLong {
            len: 17,
            page_len: 16
        })
    );
    assert_eq!(
        run(&[0x80, 0x80, 1, 0], 16),
        Err(E::LengthTooLong { position: 0 })
    );
    assert_eq!(
        run(&[0, 0xFF, 0x81, 1], 16),
        Err(E::LengthTooLong { position: 1 })
    );
    assert_eq!(run(&[0x80], 16), Err(E::TruncatedLength { position: 0 }));
    assert_eq!(run(&[3], 16), Err(E::TruncatedLength { position: 1 }));
    assert_eq!(run(&[3, 0x81], 16), Err(E::TruncatedLength { position: 1 }));
    assert_eq!(
        run(&[0, 1, 5, 0, 1, 5], 16),
        Err(E::ZeroSkipRun { position: 3 })
    );
    assert_eq!(
        run(&[0, 1, 5, 0x80, 0x00, 1, 5], 16),
        Err(E::ZeroSkipRun { position: 3 })
    );
    assert_eq!(run(&[2, 0, 1], 16), Err(E::ZeroDataRun { position: 1 }));
    assert_eq!(
        run(&[2, 0x80, 0x00], 16),
        Err(E::ZeroDataRun { position: 1 })
    );
    assert_eq!(
        run(&[17, 1, 0], 16),
        Err(E::RunPastPageEnd {
            position: 0,
            page_offset: 0,
            end: 17,
            page_len: 16
        })
    );
    assert_eq!(
        run(&[15, 2, 1, 2], 16),
        Err(E::RunPastPageEnd {
            position: 1,
            page_offset: 15,
            end: 17,
            page_len: 16
        })
    );
    assert_eq!(
        run(&[1, 1, 9, 14, 2, 1, 2], 16),
        Err(E::RunPastPageEnd {
            position: 4,
            page_offset: 16,
            end: 18,
            page_len: 16
        })
    );
    // A skip to exactly the page end is fine by itself; the data run after it is not.
    assert_eq!(
        run(&[16, 1, 1], 16),
        Err(E::RunPastPageEnd {
            position: 1,
            page_offset: 16,
            end: 17,
            page_len: 16
        })
    );
    assert_eq!(
        run(&[1, 3, 9, 9], 16),
        Err(E::RunPastInputEnd {
            position: 1,
            len: 3,
            available: 2
        })
    );
    // Valid prefix followed by garbage: still untouched.
    assert_eq!(
        run(&[0, 1, 5, 2, 1, 7, 0, 1], 16),
        Err(E::ZeroSkipRun { position: 6 })
    );
}

#[test]
fn error_messages_say_what_broke() {
    let e = run(&[0, 1, 5, 0, 1, 5], 16).unwrap_err();
    assert_eq!(
        e.to_string(),
        "zero-length skip run at input position 3 (only the first may be 0)"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_input_agrees_with_reference(
        enc in proptest::collection::vec(any::<u8>(), 0..40),
        page_len in 0usize..48,
    ) {
        run(&enc, page_len).ok();
    }

    /// Mostly well-formed inputs: small run lengths, so many of them decode.
    #[test]
    fn structured_input_agrees_with_reference(
        runs in proptest::collection::vec((0u8..6, 0u8..5, any::<u8>()), 0..12),
        page_len in 0usize..64,
    ) {
        let mut enc = Vec::new();
        for (z, n, b) in runs {
            enc.push(z);
            enc.push(n);
            enc.extend(std::iter::repeat_n(b, usize::from(n)));
        }
        run(&enc, page_len).ok();
    }
}

/// A valid encoding of `new` against `old`, for pages whose delta fits one page.
fn encoding(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; new.len()];
    let n = encode(old, new, &mut out).expect("delta fits");
    out.truncate(n);
    out
}

/// `new`: `old` with the bytes at `changes` (page offsets) flipped.
fn changed(old: &[u8], changes: &[usize]) -> Vec<u8> {
    let mut new = old.to_vec();
    for &c in changes {
        new[c % old.len()] ^= 0x5A;
    }
    new
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Real encodings of pages from 1 byte to 8 KiB (every undo-log size and the two-pass
    /// path above 4 KiB of input) with one byte replaced anywhere: when the damage makes
    /// the input invalid, however late, the runs already applied are rolled back and the
    /// page is left as it was; when it stays valid, the result is the reference's.
    #[test]
    fn damaged_real_encoding_rolls_back(
        page_len in 1usize..8192,
        runs in proptest::collection::vec((any::<usize>(), 1usize..48), 1..200),
        at in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let old: Vec<u8> = (0..page_len).map(|i| (i * 7 + i / 251) as u8).collect();
        let changes: Vec<usize> = runs.iter().flat_map(|&(at, n)| at..at + n).collect();
        let new = changed(&old, &changes);
        let mut out = vec![0u8; page_len];
        let Ok(n) = encode(&old, &new, &mut out) else { return Ok(()) };
        let mut enc = out[..n].to_vec();
        if !enc.is_empty() {
            let at = at % enc.len();
            if cut {
                enc.truncate(at);
            } else {
                enc[at] = byte;
            }
        }
        // `run` checks the one-pass decoder against the two-pass one, `validate` and the
        // reference, and the page left untouched on error, over its own page content.
        run(&enc, page_len).ok();
        // Over the real old page too: an intact encoding gives `new`.
        let mut page = old.clone();
        let r = decode(&enc, &mut page);
        match reference::decode(&enc, &old) {
            Some(want) => prop_assert_eq!(page, want),
            None => prop_assert!(r.is_err() && page == old),
        }
        if enc == out[..n] {
            prop_assert!(r.is_ok());
        }
    }
}

#[test]
fn late_error_after_many_runs_leaves_page_untouched() {
    // 400 one-byte data runs applied, then a zero-length skip run: all 400 rolled back.
    let old: Vec<u8> = (0..4096).map(|i| (i % 253) as u8).collect();
    let changes: Vec<usize> = (0..400).map(|k| 10 * k + 3).collect();
    let new = changed(&old, &changes);
    let mut enc = encoding(&old, &new);
    assert!(enc.len() > 1024, "input uses the 2048-byte undo log");
    let bad = enc.len();
    enc.extend_from_slice(&[0, 1, 9]);
    let mut page = old.clone();
    assert_eq!(
        decode(&enc, &mut page),
        Err(E::ZeroSkipRun { position: bad })
    );
    assert_eq!(page, old);
    // Same input without the bad pair: applied.
    decode(&enc[..bad], &mut page).unwrap();
    assert_eq!(page, new);
}

#[test]
fn long_runs_and_large_pages_roll_back() {
    // A 2-byte data run of 3000 bytes in a 16 KiB page (two-pass path above 4 KiB of
    // input is not reached: 3000 + a few bytes), then a run past the page end.
    let old = vec![0x11u8; 16384];
    let mut new = old.clone();
    new[100..3100].fill(0x22);
    let mut enc = encoding(&old, &new);
    let bad = enc.len();
    enc.extend_from_slice(&[0xFF, 0x7F, 1, 0]); // skip 0x3FFF: past the page end
    let mut page = old.clone();
    assert_eq!(
        decode(&enc, &mut page),
        Err(E::RunPastPageEnd {
            position: bad,
            page_offset: 3100,
            end: 3100 + 0x3FFF,
            page_len: 16384
        })
    );
    assert_eq!(page, old);
    // Input above 4 KiB (two-pass path), damaged at its end.
    new[5000..10000].fill(0x33);
    let mut enc = encoding(&old, &new);
    assert!(enc.len() > 4096);
    let last = enc.len() - 1;
    enc.truncate(last);
    let mut page = old.clone();
    assert!(decode(&enc, &mut page).is_err());
    assert_eq!(page, old);
}
