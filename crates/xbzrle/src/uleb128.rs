//! The "small" ULEB128 used for XBZRLE run lengths: 7 bits per byte, least significant
//! group first, 0x80 = more bytes follow, at most 2 bytes (values up to [`MAX`]).

/// Largest value the 2-byte form can carry (14 bits).
pub const MAX: u32 = 0x3FFF;

/// Number of bytes [`encode`] writes for `value` (1 below 0x80, else 2).
#[inline]
#[must_use]
pub fn encoded_len(value: u32) -> usize {
    1 + usize::from(value >= 0x80)
}

/// Writes `value` at the start of `out` and returns the number of bytes written (1 or 2).
///
/// # Panics
/// If `value > MAX`, or `out` is shorter than [`encoded_len`]`(value)`.
#[inline]
pub fn encode(value: u32, out: &mut [u8]) -> usize {
    assert!(value <= MAX, "ULEB128 run length {value:#x} exceeds 0x3FFF");
    if value < 0x80 {
        out[0] = value as u8;
        1
    } else {
        out[0] = (value as u8 & 0x7F) | 0x80;
        out[1] = (value >> 7) as u8;
        2
    }
}

/// Malformed or truncated small ULEB128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ends before the value does.
    Truncated,
    /// The second byte has the continuation bit set (value would need > 2 bytes).
    TooLong,
}

/// Reads a value from the start of `input`; returns it and the bytes consumed (1 or 2).
///
/// Like QEMU, a non-minimal 2-byte form (second byte 0, e.g. `80 00` for 0) is accepted.
///
/// # Errors
/// [`DecodeError::Truncated`] when `input` ends early, [`DecodeError::TooLong`] when the
/// second byte has the continuation bit.
#[inline]
pub fn decode(input: &[u8]) -> Result<(u32, usize), DecodeError> {
    match *input {
        [] => Err(DecodeError::Truncated),
        [b0, ..] if b0 < 0x80 => Ok((u32::from(b0), 1)),
        [_] => Err(DecodeError::Truncated),
        [_, b1, ..] if b1 >= 0x80 => Err(DecodeError::TooLong),
        [b0, b1, ..] => Ok((u32::from(b0 & 0x7F) | (u32::from(b1) << 7), 2)),
    }
}
