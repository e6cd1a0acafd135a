//! Payloads of iterative (START/PART/END) sections other than RAM whose
//! format qmig knows, so they are delimited by decoding rather than by
//! looking for a footer (the vmdesc does not describe iterative sections).
//!
//! - `spapr/htab` (ppc64 `pseries`, QEMU's hw/ppc/spapr.c
//!   `htab_save_setup` / `htab_save_iterate` / `htab_save_complete`):
//!   START carries `be32 htab_shift` (`0xFFFFFFFF` when the guest has no
//!   hash page table); PART and END carry `be32 0` followed by chunks
//!   `be32 index, be16 n_valid, be16 n_invalid, n_valid × 16 bytes` and an
//!   all-zero chunk header, or just `be32 0xFFFFFFFF`.
//! - `s390-storage_attributes` (hw/s390x/s390-stattrib.c `cmma_save`):
//!   `be64` words whose bits below the target page size are flags: EOS
//!   (0x01) ends the payload, MORE (0x02) is followed by `be64 len` and
//!   `len` bytes, ERROR (0x04) is fatal, DONE (0x08) marks completion.

use nom::bytes::streaming::take;
use nom::number::streaming::{be_u16, be_u32, be_u64};

use crate::error::{fail, PResult};
use crate::section::SectionKind;

/// Cap on one storage-attribute run (bytes): QEMU sends at most one byte
/// per page of a 2^30-page window.
const MAX_STATTR_RUN: u64 = 1 << 30;

/// Whether qmig decodes the payloads of iterative section `idstr`.
pub fn known(idstr: &str) -> bool {
    matches!(idstr, "spapr/htab" | "s390-storage_attributes")
}

/// Parses one payload of iterative section `idstr` in a section of `kind`,
/// returning the bytes it took. `page_bits` is the target page size (log2).
pub(crate) fn parse_payload<'a>(
    i: &'a [u8],
    idstr: &str,
    kind: SectionKind,
    page_bits: u32,
) -> PResult<'a, ()> {
    match idstr {
        "spapr/htab" => htab(i, kind),
        _ => stattr(i, page_bits),
    }
}

fn htab(i: &[u8], kind: SectionKind) -> PResult<'_, ()> {
    let at = i;
    let (mut i, head) = be_u32(i)?;
    if kind == SectionKind::Start || head == u32::MAX {
        return Ok((i, ()));
    }
    if head != 0 {
        fail!(
            at,
            Structure {
                why: "spapr/htab iteration header is neither 0 nor 0xFFFFFFFF"
            }
        );
    }
    loop {
        let (r, index) = be_u32(i)?;
        let (r, n_valid) = be_u16(r)?;
        let (r, n_invalid) = be_u16(r)?;
        if index == 0 && n_valid == 0 && n_invalid == 0 {
            return Ok((r, ()));
        }
        let (r, _) = take(n_valid as usize * 16)(r)?;
        i = r;
    }
}

fn stattr(mut i: &[u8], page_bits: u32) -> PResult<'_, ()> {
    const EOS: u64 = 0x01;
    const MORE: u64 = 0x02;
    const ERROR: u64 = 0x04;
    const DONE: u64 = 0x08;
    let mask = (1u64 << page_bits) - 1;
    loop {
        let at = i;
        let (r, w) = be_u64(i)?;
        let f = w & mask;
        if f & !(EOS | MORE | ERROR | DONE) != 0 || f & ERROR != 0 {
            fail!(
                at,
                Structure {
                    why: "s390-storage_attributes record has the ERROR flag or unknown flags"
                }
            );
        }
        i = r;
        if f & MORE != 0 {
            let at = i;
            let (r, len) = be_u64(i)?;
            if len > MAX_STATTR_RUN {
                fail!(
                    at,
                    TooLarge {
                        what: "s390-storage_attributes run",
                        len: len,
                        cap: MAX_STATTR_RUN
                    }
                );
            }
            let (r, _) = take(len as usize)(r)?;
            i = r;
        }
        if f & EOS != 0 {
            return Ok((i, ()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htab_payloads() {
        assert_eq!(
            htab(&[0, 0, 0, 0x15, 0x7e], SectionKind::Start).unwrap().0,
            &[0x7e]
        );
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&[0, 0, 0, 5, 0, 1, 0, 0]);
        p.extend_from_slice(&[0x7e; 16]); // an entry that looks like a footer
        p.extend_from_slice(&[0; 8]);
        p.push(0xAA);
        assert_eq!(htab(&p, SectionKind::Part).unwrap().0, &[0xAA]);
        assert!(htab(&[0, 0, 0, 1], SectionKind::End).is_err());
        assert!(matches!(
            htab(&p[..20], SectionKind::Part),
            Err(nom::Err::Incomplete(_))
        ));
    }

    #[test]
    fn stattr_payloads() {
        let mut p = Vec::new();
        p.extend_from_slice(&((5u64 << 12) | 2).to_be_bytes());
        p.extend_from_slice(&3u64.to_be_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        p.extend_from_slice(&8u64.to_be_bytes());
        p.extend_from_slice(&1u64.to_be_bytes());
        p.push(0xAA);
        assert_eq!(stattr(&p, 12).unwrap().0, &[0xAA]);
        assert!(stattr(&4u64.to_be_bytes(), 12).is_err());
    }
}
