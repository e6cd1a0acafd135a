//! Naive byte-at-a-time XBZRLE encoder: the test oracle.
//!
//! This is the specification written as plainly as possible. The fast
//! [`encode`](crate::encode) must return exactly what [`encode`] returns, including
//! the same output bytes and the same [`Overflow`] decisions, for every input and every
//! output limit; the property tests and the `xbzrle_roundtrip` fuzz target check that.

use crate::{uleb128, Overflow};

/// Encodes `new` against `old` into `out`, whose length is the output limit `dlen`.
///
/// Semantics (QEMU's generic encoder, `xbzrle_encode_buffer`):
///
/// ```text
/// d = 0, i = 0
/// while i < len:
///     if d + 2 > dlen: overflow                 # checked before every skip run
///     z = bytes from i on where old == new;  i += z
///     if i == len: return d                    # no trailing skip run (0 = unchanged)
///     write uleb(z)
///     if d + 2 > dlen: overflow
///     n = bytes from i on where old != new
///     write uleb(n)
///     if d + n > dlen: overflow
///     write new[i..i + n];  i += n
/// return d
/// ```
///
/// A run longer than [`uleb128::MAX`] (only possible for pages above 16 KiB) is reported
/// as [`Overflow`] too.
///
/// Bytes of `out` beyond the returned length are unspecified.
///
/// # Errors
/// [`Overflow`] when the encoding does not fit as described above.
///
/// # Panics
/// If `old` and `new` differ in length.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Overflow> {
    assert_eq!(old.len(), new.len(), "old and new pages differ in length");
    let len = new.len();
    let dlen = out.len();
    let mut d = 0usize;
    let mut i = 0usize;
    while i < len {
        if d + 2 > dlen {
            return Err(Overflow);
        }
        let zrun_start = i;
        while i < len && old[i] == new[i] {
            i += 1;
        }
        if i == len {
            return Ok(d);
        }
        let zrun = i - zrun_start;
        if zrun > uleb128::MAX as usize {
            return Err(Overflow);
        }
        d += uleb128::encode(zrun as u32, &mut out[d..]);
        if d + 2 > dlen {
            return Err(Overflow);
        }
        let nzrun_start = i;
        while i < len && old[i] != new[i] {
            i += 1;
        }
        let nzrun = i - nzrun_start;
        if nzrun > uleb128::MAX as usize {
            return Err(Overflow);
        }
        d += uleb128::encode(nzrun as u32, &mut out[d..]);
        if d + nzrun > dlen {
            return Err(Overflow);
        }
        out[d..d + nzrun].copy_from_slice(&new[nzrun_start..i]);
        d += nzrun;
    }
    Ok(d)
}

/// Naive decoder used as the oracle for [`decode`](crate::decode): applies runs one byte
/// at a time onto a copy of `page` and returns the result, or `None` where QEMU's
/// `xbzrle_decode_buffer` (plus the destination's "input longer than a page" check)
/// would fail.
#[must_use]
pub fn decode(encoded: &[u8], page: &[u8]) -> Option<Vec<u8>> {
    let mut out = page.to_vec();
    if encoded.len() > page.len() {
        return None;
    }
    let (mut i, mut d) = (0usize, 0usize);
    while i < encoded.len() {
        let (zrun, w) = uleb128::decode(&encoded[i..]).ok()?;
        if zrun == 0 && i != 0 {
            return None;
        }
        i += w;
        d += zrun as usize;
        if d > out.len() {
            return None;
        }
        let (nzrun, w) = uleb128::decode(&encoded[i..]).ok()?;
        if nzrun == 0 {
            return None;
        }
        i += w;
        for _ in 0..nzrun {
            *out.get_mut(d)? = *encoded.get(i)?;
            d += 1;
            i += 1;
        }
    }
    Some(out)
}
