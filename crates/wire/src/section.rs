//! Section headers (START/PART/END/FULL), footers, EOF and the section type
//! byte values.

use crate::error::{fail, PResult};
use crate::names::{counted_name, put_counted};
use nom::number::streaming::{be_u32, be_u8};

/// Section type byte: end of the device state.
pub const EOF: u8 = 0x00;
/// Section type byte: first part of an iterative (live) section.
pub const START: u8 = 0x01;
/// Section type byte: middle part of an iterative section.
pub const PART: u8 = 0x02;
/// Section type byte: last part of an iterative section.
pub const END: u8 = 0x03;
/// Section type byte: a whole (non-iterative) device section.
pub const FULL: u8 = 0x04;
/// Section type byte: the vmdesc JSON trailer after EOF.
pub const VMDESCRIPTION: u8 = 0x06;
/// Section type byte: a command.
pub const COMMAND: u8 = 0x08;
/// Section type byte: section footer.
pub const FOOTER: u8 = 0x7e;

/// Kind of a section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// START (0x01): carries idstr, instance and version.
    Start,
    /// PART (0x02).
    Part,
    /// END (0x03).
    End,
    /// FULL (0x04): carries idstr, instance and version.
    Full,
}

impl SectionKind {
    /// The type byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            SectionKind::Start => START,
            SectionKind::Part => PART,
            SectionKind::End => END,
            SectionKind::Full => FULL,
        }
    }

    /// Whether this kind introduces a section (carries the idstr).
    pub fn introduces(self) -> bool {
        matches!(self, SectionKind::Start | SectionKind::Full)
    }

    /// Short upper-case name.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Start => "START",
            SectionKind::Part => "PART",
            SectionKind::End => "END",
            SectionKind::Full => "FULL",
        }
    }
}

/// Identity of a section, carried by START and FULL headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionIdent<'a> {
    /// Device id string, e.g. `ram`, `timer`, `0000:00:01.3/piix4_pm`.
    pub idstr: &'a str,
    /// Instance id.
    pub instance: u32,
    /// VMState version id.
    pub version: u32,
}

/// A section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader<'a> {
    /// START, PART, END or FULL.
    pub kind: SectionKind,
    /// Section id (assigned by the source per registered handler).
    pub section_id: u32,
    /// Present for START and FULL.
    pub ident: Option<SectionIdent<'a>>,
}

impl<'a> SectionHeader<'a> {
    /// A START header (first part of an iterative section such as `ram`).
    pub fn start(section_id: u32, idstr: &'a str, instance: u32, version: u32) -> Self {
        SectionHeader {
            kind: SectionKind::Start,
            section_id,
            ident: Some(SectionIdent {
                idstr,
                instance,
                version,
            }),
        }
    }

    /// A FULL header (a whole device section).
    pub fn full(section_id: u32, idstr: &'a str, instance: u32, version: u32) -> Self {
        SectionHeader {
            kind: SectionKind::Full,
            section_id,
            ident: Some(SectionIdent {
                idstr,
                instance,
                version,
            }),
        }
    }

    /// A PART header.
    pub fn part(section_id: u32) -> Self {
        SectionHeader {
            kind: SectionKind::Part,
            section_id,
            ident: None,
        }
    }

    /// An END header.
    pub fn end(section_id: u32) -> Self {
        SectionHeader {
            kind: SectionKind::End,
            section_id,
            ident: None,
        }
    }

    /// Serializes the header. START and FULL carry an ident, PART and END
    /// none; the idstr must be a valid counted name.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (nothing is written).
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let start = out.len();
        if self.kind.introduces() != self.ident.is_some() {
            return Err(crate::names::unwritable(
                start,
                "section header",
                format!(
                    "{} {} an idstr/instance/version",
                    self.kind.name(),
                    if self.kind.introduces() {
                        "needs"
                    } else {
                        "cannot carry"
                    }
                ),
            ));
        }
        out.push(self.kind.byte());
        out.extend_from_slice(&self.section_id.to_be_bytes());
        if let Some(id) = &self.ident {
            if let Err(e) = put_counted(out, id.idstr, "section idstr", start) {
                out.truncate(start);
                return Err(e);
            }
            out.extend_from_slice(&id.instance.to_be_bytes());
            out.extend_from_slice(&id.version.to_be_bytes());
        }
        Ok(())
    }
}

/// Parses a section header whose type byte is START/PART/END/FULL.
pub(crate) fn parse_section_header(i: &[u8]) -> PResult<'_, SectionHeader<'_>> {
    let at = i;
    let (i, ty) = be_u8(i)?;
    let kind = match ty {
        START => SectionKind::Start,
        PART => SectionKind::Part,
        END => SectionKind::End,
        FULL => SectionKind::Full,
        _ => fail!(at, UnknownSectionType { byte: ty }),
    };
    let (i, section_id) = be_u32(i)?;
    if !kind.introduces() {
        return Ok((
            i,
            SectionHeader {
                kind,
                section_id,
                ident: None,
            },
        ));
    }
    let (i, idstr) = counted_name(i, "section idstr")?;
    let (i, instance) = be_u32(i)?;
    let (i, version) = be_u32(i)?;
    Ok((
        i,
        SectionHeader {
            kind,
            section_id,
            ident: Some(SectionIdent {
                idstr,
                instance,
                version,
            }),
        },
    ))
}

/// Writes a section footer.
pub fn write_footer(out: &mut Vec<u8>, section_id: u32) {
    out.push(FOOTER);
    out.extend_from_slice(&section_id.to_be_bytes());
}

/// Parses a footer and checks it closes `expected`.
pub(crate) fn parse_footer(i: &[u8], expected: u32) -> PResult<'_, u32> {
    let at = i;
    let (i, b) = be_u8(i)?;
    if b != FOOTER {
        fail!(
            at,
            MissingFooter {
                section_id: expected,
                byte: b
            }
        );
    }
    let (i, id) = be_u32(i)?;
    if id != expected {
        fail!(
            at,
            FooterMismatch {
                expected: expected,
                found: id
            }
        );
    }
    Ok((i, id))
}

/// Decodes a START/PART/END/FULL section header at the start of `buf`.
///
/// # Errors
/// [`crate::WireError`] with the absolute offset (`base` + position).
pub fn decode_section_header(
    buf: &[u8],
    base: u64,
) -> Result<(SectionHeader<'_>, usize), crate::WireError> {
    crate::error::finish(buf, base, "section header", parse_section_header(buf))
}
