//! One-pass decoder: every bound is checked as the runs are applied, with an undo log of
//! the page bytes overwritten so far; on error the log is written back, leaving the page
//! as it was.

use crate::uleb128;
use crate::XbzrleError;

/// Applies an XBZRLE-encoded page onto `page`, the destination's current content of that
/// page, turning it into the source's new content.
///
/// The input is parsed once: each run is checked, then applied, while the page bytes it
/// overwrites are saved in an undo log on the stack. If a later run breaks a rule, the
/// saved bytes are written back before the error is returned, so on error `page` is
/// untouched: a page is always either its old or its new content. An empty input is
/// valid and leaves the page unchanged. (Inputs longer than 4 KiB are validated
/// completely first and then applied, to keep the stack use bounded.)
///
/// Accepted inputs are exactly those QEMU's destination accepts (`load_xbzrle` +
/// `xbzrle_decode_buffer`), including non-minimal 2-byte lengths such as `80 00`.
///
/// # Errors
/// The first rule broken, scanning from the start of `encoded`; see [`XbzrleError`]:
/// [`InputTooLong`](XbzrleError::InputTooLong),
/// [`LengthTooLong`](XbzrleError::LengthTooLong),
/// [`TruncatedLength`](XbzrleError::TruncatedLength),
/// [`ZeroSkipRun`](XbzrleError::ZeroSkipRun), [`ZeroDataRun`](XbzrleError::ZeroDataRun),
/// [`RunPastPageEnd`](XbzrleError::RunPastPageEnd),
/// [`RunPastInputEnd`](XbzrleError::RunPastInputEnd).
///
/// # Examples
/// ```
/// let old = [0u8; 16];
/// let mut new = old;
/// new[3] = 7;
/// let mut out = [0u8; 16];
/// let len = qmig_xbzrle::encode(&old, &new, &mut out).unwrap();
/// assert_eq!(&out[..len], &[3, 1, 7]); // skip 3, then 1 literal byte
///
/// let mut page = old;
/// qmig_xbzrle::decode(&out[..len], &mut page).unwrap();
/// assert_eq!(page, new);
///
/// // A zero-length data run is rejected and leaves the page alone.
/// assert!(qmig_xbzrle::decode(&[3, 0], &mut page).is_err());
/// assert_eq!(page, new);
/// ```
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    let len = encoded.len();
    if len > page.len() {
        return Err(XbzrleError::InputTooLong {
            len,
            page_len: page.len(),
        });
    }
    // The undo log holds at most the input's literal bytes (< len), so a stack array of
    // the next size up is enough; the sizes keep zeroing it cheap for short inputs.
    match len {
        0 => Ok(()),
        1..=64 => decode_undo::<64>(encoded, page),
        65..=512 => decode_undo::<512>(encoded, page),
        513..=2048 => decode_undo::<2048>(encoded, page),
        2049..=4096 => decode_undo::<4096>(encoded, page),
        _ => decode_two_pass(encoded, page),
    }
}

/// [`validate`], then apply: the decoder for inputs above 4 KiB (pages above 4 KiB), and
/// the previous design, kept for comparison in benchmarks and tests.
///
/// # Errors
/// As for [`decode`].
pub fn decode_two_pass(encoded: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    validate(encoded, page.len())?;
    apply_validated(encoded, page);
    Ok(())
}

/// The one-pass decoder with an undo log of `N >= encoded.len()` bytes.
#[inline(always)]
fn decode_undo<const N: usize>(encoded: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    let mut undo = [0u8; N];
    let len = encoded.len();
    let page_len = page.len();
    let mut i = 0usize; // input position
    let mut d = 0usize; // page position
    let mut u = 0usize; // undo log length (literal bytes applied so far)
    while i < len {
        // Common case first: both lengths one byte, every rule satisfied.
        if let Some(&[z, n]) = encoded
            .get(i..i + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        {
            let (z, n) = (usize::from(z), usize::from(n));
            if z | n < 0x80
                && (z != 0 || i == 0)
                && n != 0
                && d + z + n <= page_len
                && i + 2 + n <= len
                && u + n <= N
            {
                d += z;
                let dst = &mut page[d..d + n];
                copy_run(&mut undo[u..u + n], dst);
                copy_run(dst, &encoded[i + 2..i + 2 + n]);
                i += 2 + n;
                d += n;
                u += n;
                continue;
            }
        }
        match check_pair(encoded, i, d, page_len) {
            Ok((data, zrun, nzrun)) => {
                d += zrun;
                let dst = &mut page[d..d + nzrun];
                // `u + nzrun <= data <= len <= N`: literal bytes are input bytes.
                copy_run(&mut undo[u..u + nzrun], dst);
                copy_run(dst, &encoded[data..data + nzrun]);
                i = data + nzrun;
                d += nzrun;
                u += nzrun;
            }
            Err(e) => {
                roll_back(encoded, i, page, &undo[..u]);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Writes the undo log back: re-walks the pairs before input position `end` (all valid,
/// they were applied) and restores the page bytes each data run overwrote.
#[cold]
#[inline(never)]
fn roll_back(encoded: &[u8], end: usize, page: &mut [u8], undo: &[u8]) {
    let (mut i, mut d, mut u) = (0usize, 0usize, 0usize);
    while i < end {
        let (zrun, w) = read_len_unchecked(encoded, i);
        i += w;
        d += zrun;
        let (nzrun, w) = read_len_unchecked(encoded, i);
        i += w + nzrun;
        page[d..d + nzrun].copy_from_slice(&undo[u..u + nzrun]);
        d += nzrun;
        u += nzrun;
    }
    debug_assert_eq!(u, undo.len());
}

/// Checks the run pair at input position `i` (page position `d`) with every rule, in the
/// order [`validate`] reports them. Returns the input position of its literal bytes and
/// the two run lengths.
#[inline(never)]
fn check_pair(
    encoded: &[u8],
    i: usize,
    d: usize,
    page_len: usize,
) -> Result<(usize, usize, usize), XbzrleError> {
    let len = encoded.len();
    let position = i;
    let (zrun, w) = read_len(encoded, i)?;
    if zrun == 0 && i != 0 {
        return Err(XbzrleError::ZeroSkipRun { position });
    }
    let i = i + w;
    let page_offset = d;
    let d = d + zrun;
    if d > page_len {
        return Err(XbzrleError::RunPastPageEnd {
            position,
            page_offset,
            end: d,
            page_len,
        });
    }
    let position = i;
    let (nzrun, w) = read_len(encoded, i)?;
    if nzrun == 0 {
        return Err(XbzrleError::ZeroDataRun { position });
    }
    let i = i + w;
    if d + nzrun > page_len {
        return Err(XbzrleError::RunPastPageEnd {
            position,
            page_offset: d,
            end: d + nzrun,
            page_len,
        });
    }
    if nzrun > len - i {
        return Err(XbzrleError::RunPastInputEnd {
            position,
            len: nzrun,
            available: len - i,
        });
    }
    Ok((i, zrun, nzrun))
}

/// Checks that `encoded` is a well-formed XBZRLE page for a page of `page_len` bytes,
/// without applying it.
///
/// # Errors
/// As for [`decode`].
pub fn validate(encoded: &[u8], page_len: usize) -> Result<(), XbzrleError> {
    let len = encoded.len();
    if len > page_len {
        return Err(XbzrleError::InputTooLong { len, page_len });
    }
    let mut i = 0usize;
    let mut d = 0usize;
    while i < len {
        // Common case first: both lengths one byte, every rule satisfied.
        if let Some(&[z, n]) = encoded
            .get(i..i + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        {
            let (z, n) = (usize::from(z), usize::from(n));
            if z | n < 0x80
                && (z != 0 || i == 0)
                && n != 0
                && d + z + n <= page_len
                && i + 2 + n <= len
            {
                i += 2 + n;
                d += z + n;
                continue;
            }
        }
        let (data, zrun, nzrun) = check_pair(encoded, i, d, page_len)?;
        i = data + nzrun;
        d += zrun + nzrun;
    }
    Ok(())
}

#[inline]
fn read_len(encoded: &[u8], i: usize) -> Result<(usize, usize), XbzrleError> {
    match uleb128::decode(&encoded[i..]) {
        Ok((v, w)) => Ok((v as usize, w)),
        Err(uleb128::DecodeError::Truncated) => Err(XbzrleError::TruncatedLength { position: i }),
        Err(uleb128::DecodeError::TooLong) => Err(XbzrleError::LengthTooLong { position: i }),
    }
}

/// Second phase of [`decode_two_pass`]: `encoded` has passed [`validate`] for
/// `page.len()`, so no check here can fail; the slice indexing that remains is only the
/// compiler's bounds checks.
#[inline]
fn apply_validated(encoded: &[u8], page: &mut [u8]) {
    let len = encoded.len();
    let mut i = 0usize;
    let mut d = 0usize;
    while i < len {
        if let Some(&[z, n]) = encoded
            .get(i..i + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        {
            if (z | n) < 0x80 {
                let (z, n) = (usize::from(z), usize::from(n));
                d += z;
                copy_run(&mut page[d..d + n], &encoded[i + 2..i + 2 + n]);
                i += 2 + n;
                d += n;
                continue;
            }
        }
        let (zrun, w) = read_len_unchecked(encoded, i);
        i += w;
        d += zrun;
        let (nzrun, w) = read_len_unchecked(encoded, i);
        i += w;
        copy_run(&mut page[d..d + nzrun], &encoded[i..i + nzrun]);
        i += nzrun;
        d += nzrun;
    }
}

/// Reads a length already known to be well formed.
#[inline(always)]
fn read_len_unchecked(encoded: &[u8], i: usize) -> (usize, usize) {
    let b0 = encoded[i];
    if b0 < 0x80 {
        (usize::from(b0), 1)
    } else {
        (
            usize::from(b0 & 0x7F) | (usize::from(encoded[i + 1]) << 7),
            2,
        )
    }
}

/// `dst.copy_from_slice(src)` with short runs done as two overlapping fixed-size moves
/// instead of a call into `memcpy`.
#[inline(always)]
fn copy_run(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    debug_assert_eq!(n, dst.len());
    if (8..=16).contains(&n) {
        dst[..8].copy_from_slice(&src[..8]);
        dst[n - 8..].copy_from_slice(&src[n - 8..]);
    } else if (17..=32).contains(&n) {
        dst[..16].copy_from_slice(&src[..16]);
        dst[n - 16..].copy_from_slice(&src[n - 16..]);
    } else if (4..8).contains(&n) {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else if (1..4).contains(&n) {
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    } else {
        dst.copy_from_slice(src);
    }
}
