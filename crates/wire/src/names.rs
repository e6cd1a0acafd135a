//! Counted strings (u8 length + bytes) as used for section idstrs, RAM block
//! names and configuration subsection names.

use crate::error::{fail, PResult};
use nom::bytes::streaming::take;
use nom::number::streaming::be_u8;

/// Parses a counted string and checks that it is a plausible QEMU name:
/// non-empty, printable ASCII (0x20..=0x7e).
pub(crate) fn counted_name<'a>(i: &'a [u8], what: &'static str) -> PResult<'a, &'a str> {
    let at = i;
    let (i, len) = be_u8(i)?;
    if len == 0 {
        fail!(
            at,
            BadName {
                what: what,
                why: "length is 0"
            }
        );
    }
    let (i, bytes) = take(len as usize)(i)?;
    match check_name(bytes) {
        Ok(s) => Ok((i, s)),
        Err(why) => fail!(
            at,
            BadName {
                what: what,
                why: why
            }
        ),
    }
}

/// Checks the bytes of a name, returning it as `&str`.
pub(crate) fn check_name(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.is_empty() {
        return Err("length is 0");
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err("contains a byte that is not printable ASCII");
    }
    // Printable ASCII is valid UTF-8.
    std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8")
}

/// Writes a counted string, refusing what [`counted_name`] would refuse
/// (empty, over 255 bytes, not printable ASCII) instead of truncating it.
/// `start` is the output offset of the item being written (for the error).
pub(crate) fn put_counted(
    out: &mut Vec<u8>,
    s: &str,
    what: &'static str,
    start: usize,
) -> Result<(), crate::WireError> {
    let b = s.as_bytes();
    let why = if b.len() > 255 {
        Some(format!(
            "{} bytes, the length field holds at most 255",
            b.len()
        ))
    } else {
        check_name(b).err().map(str::to_string)
    };
    if let Some(why) = why {
        return Err(unwritable(start, what, why));
    }
    out.push(b.len() as u8);
    out.extend_from_slice(b);
    Ok(())
}

/// A [`crate::WireError::Unwritable`] at output offset `start`.
pub(crate) fn unwritable(start: usize, what: &'static str, why: String) -> crate::WireError {
    crate::WireError::Unwritable {
        offset: start as u64,
        what,
        why,
    }
}
