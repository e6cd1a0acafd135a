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

/// Writes a counted string. Names longer than 255 bytes are a caller bug;
/// they are truncated to keep the output parseable.
pub(crate) fn put_counted(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}
