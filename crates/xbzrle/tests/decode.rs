//! Decoder tests: every error with its position, the page left untouched on error, and
//! agreement with the naive reference decoder on arbitrary input.

use proptest::prelude::*;
use qmig_xbzrle::{decode, reference, validate, XbzrleError as E};

fn run(enc: &[u8], page_len: usize) -> Result<Vec<u8>, E> {
    let old: Vec<u8> = (0..page_len).map(|i| i as u8).collect();
    let mut page = old.clone();
    let r = decode(enc, &mut page);
    assert_eq!(r, validate(enc, page_len));
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
