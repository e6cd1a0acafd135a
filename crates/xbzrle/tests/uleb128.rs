//! Exhaustive tests of the 2-byte ULEB128 run lengths.

use qmig_xbzrle::uleb128::{self, DecodeError};

#[test]
fn every_value_roundtrips() {
    for v in 0..=uleb128::MAX {
        let mut buf = [0xEEu8; 3];
        let n = uleb128::encode(v, &mut buf);
        assert_eq!(n, uleb128::encoded_len(v));
        assert_eq!(n, if v < 0x80 { 1 } else { 2 });
        assert_eq!(buf[2], 0xEE, "wrote past the value");
        // Canonical bytes, as QEMU writes them.
        if v < 0x80 {
            assert_eq!(buf[0], v as u8);
        } else {
            assert_eq!(buf[..2], [(v & 0x7F) as u8 | 0x80, (v >> 7) as u8]);
        }
        assert_eq!(uleb128::decode(&buf[..n]), Ok((v, n)));
        assert_eq!(
            uleb128::decode(&buf),
            Ok((v, n)),
            "trailing bytes are not consumed"
        );
    }
}

#[test]
#[should_panic(expected = "exceeds 0x3FFF")]
fn encode_rejects_values_above_14_bits() {
    uleb128::encode(0x4000, &mut [0u8; 2]);
}

#[test]
fn every_one_and_two_byte_form() {
    assert_eq!(uleb128::decode(&[]), Err(DecodeError::Truncated));
    for b0 in 0..=255u8 {
        if b0 < 0x80 {
            assert_eq!(uleb128::decode(&[b0]), Ok((u32::from(b0), 1)));
        } else {
            assert_eq!(uleb128::decode(&[b0]), Err(DecodeError::Truncated));
        }
        for b1 in 0..=255u8 {
            let got = uleb128::decode(&[b0, b1]);
            let want = if b0 < 0x80 {
                Ok((u32::from(b0), 1))
            } else if b1 >= 0x80 {
                Err(DecodeError::TooLong)
            } else {
                // Includes non-minimal forms (b1 == 0), which QEMU accepts too.
                Ok((u32::from(b0 & 0x7F) | u32::from(b1) << 7, 2))
            };
            assert_eq!(got, want, "{b0:#04x} {b1:#04x}");
        }
    }
}
