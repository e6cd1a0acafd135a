//! The vmdesc trailer: after EOF, `u8 0x06, be32 len, JSON`.

use crate::error::{fail, PResult};
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u32, be_u8};

/// Default cap on the vmdesc JSON length.
pub const DEFAULT_MAX_VMDESC: u32 = 64 << 20;

/// Parses the vmdesc trailer (type byte included), returning the JSON bytes.
pub(crate) fn parse_vmdesc(i: &[u8], max: u32) -> PResult<'_, &[u8]> {
    let (i, _) = be_u8(i)?;
    let at = i;
    let (i, len) = be_u32(i)?;
    if len > max {
        fail!(
            at,
            TooLarge {
                what: "vmdesc JSON",
                len: len as u64,
                cap: max as u64
            }
        );
    }
    take(len as usize)(i)
}

/// Writes the vmdesc trailer; the JSON's length must fit the be32 field.
///
/// # Errors
/// [`crate::WireError::Unwritable`] (nothing is written).
pub fn write_vmdesc(out: &mut Vec<u8>, json: &[u8]) -> Result<(), crate::WireError> {
    let bad = |why: String| crate::names::unwritable(out.len(), "vmdesc", why);
    if json.len() > u32::MAX as usize {
        return Err(bad(format!(
            "{} bytes do not fit the be32 length",
            json.len()
        )));
    }
    out.push(crate::section::VMDESCRIPTION);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    Ok(())
}

/// Finds the vmdesc trailer at the end of a complete precopy stream held in
/// `tail`, whose last byte is the stream's last byte. Returns the position in
/// `tail` of the EOF byte (0x00) that precedes the trailer.
///
/// The trailer is recognised by `00 06 <be32 len> {` where `len` reaches
/// exactly the end of the stream and the JSON ends with `}`.
pub fn find_trailer(tail: &[u8]) -> Option<usize> {
    if tail.last() != Some(&b'}') {
        return None;
    }
    let n = tail.len();
    // Walk candidate positions from the end: the trailer header is 6 bytes
    // before the JSON.
    let mut q = n.checked_sub(2)?; // q = position of '{' at least one byte before '}'
    loop {
        if tail[q] == b'{' && q >= 6 {
            let h = q - 6;
            let len =
                u32::from_be_bytes([tail[h + 2], tail[h + 3], tail[h + 4], tail[h + 5]]) as usize;
            if tail[h] == crate::section::EOF
                && tail[h + 1] == crate::section::VMDESCRIPTION
                && len == n - q
            {
                return Some(h);
            }
        }
        if q == 0 {
            return None;
        }
        q -= 1;
    }
}
