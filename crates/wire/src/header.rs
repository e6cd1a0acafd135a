//! The stream header (`QEVM`, version 3) and the configuration section that
//! follows it.

use crate::error::{fail, PResult};
use crate::names::{counted_name, put_counted};
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u32, be_u8};

/// `"QEVM"`, the first four bytes of every stream.
pub const MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU has written since 2010.
pub const VERSION: u32 = 3;
/// Section type byte of the configuration section.
pub const CONFIGURATION: u8 = 0x07;
/// Section type byte introducing a VMState subsection.
pub const SUBSECTION: u8 = 0x05;
/// Cap on the machine type name length (QEMU's are under 64 bytes).
pub const MAX_MACHINE_NAME: u32 = 4096;

/// Parses the 8-byte stream header, checking magic and version.
pub(crate) fn parse_header(i: &[u8]) -> PResult<'_, u32> {
    let at = i;
    let (i, magic) = be_u32(i)?;
    if magic != MAGIC {
        fail!(at, BadMagic { found: magic });
    }
    let at = i;
    let (i, version) = be_u32(i)?;
    if version != VERSION {
        fail!(at, BadVersion { found: version });
    }
    Ok((i, version))
}

/// Writes the stream header.
pub fn write_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
}

/// The configuration section: machine type plus optional subsections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// Machine type name, e.g. `pc-i440fx-10.0`.
    pub machine: &'a str,
    /// Subsections, in stream order.
    pub subsections: Vec<ConfigSubsection<'a>>,
}

/// One `configuration/...` subsection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSubsection<'a> {
    /// Full subsection name, e.g. `configuration/capabilities`.
    pub name: &'a str,
    /// Subsection version id.
    pub version: u32,
    /// Decoded payload.
    pub body: ConfigBody<'a>,
}

/// Payload of a configuration subsection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigBody<'a> {
    /// `configuration/target-page-bits`: log2 of the target page size.
    TargetPageBits(u32),
    /// `configuration/capabilities`: capability names that must match on both sides.
    Capabilities(Vec<&'a str>),
    /// `configuration/uuid`: the VM's UUID.
    Uuid([u8; 16]),
}

impl Configuration<'_> {
    /// The target page size announced, if any.
    pub fn target_page_bits(&self) -> Option<u32> {
        self.subsections.iter().find_map(|s| match s.body {
            ConfigBody::TargetPageBits(b) => Some(b),
            _ => None,
        })
    }

    /// Whether `configuration/capabilities` lists `cap`.
    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities().any(|c| c == cap)
    }

    /// Capabilities listed in `configuration/capabilities`.
    pub fn capabilities(&self) -> impl Iterator<Item = &str> + '_ {
        self.subsections
            .iter()
            .filter_map(|s| match &s.body {
                ConfigBody::Capabilities(c) => Some(c.iter().copied()),
                _ => None,
            })
            .flatten()
    }

    /// Serializes the configuration section (type byte included), checking
    /// what the reader checks: a printable machine name, each subsection's
    /// name matching its body (the reader picks the body by name), page bits
    /// in 10..=16, valid capability names.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (nothing is written).
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let start = out.len();
        let r = self.write_checked(out, start);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn write_checked(&self, out: &mut Vec<u8>, start: usize) -> Result<(), crate::WireError> {
        let bad = |why: String| crate::names::unwritable(start, "configuration section", why);
        if let Err(why) = crate::names::check_name(self.machine.as_bytes()) {
            return Err(bad(format!("machine type name: {why}")));
        }
        let Ok(mlen) = u32::try_from(self.machine.len()) else {
            return Err(bad("machine type name too long".into()));
        };
        out.push(CONFIGURATION);
        out.extend_from_slice(&mlen.to_be_bytes());
        out.extend_from_slice(self.machine.as_bytes());
        for s in &self.subsections {
            let want = match &s.body {
                ConfigBody::TargetPageBits(_) => "configuration/target-page-bits",
                ConfigBody::Capabilities(_) => "configuration/capabilities",
                ConfigBody::Uuid(_) => "configuration/uuid",
            };
            if s.name != want {
                return Err(bad(format!(
                    "subsection \"{}\" holds the body of \"{want}\"",
                    s.name
                )));
            }
            out.push(SUBSECTION);
            put_counted(out, s.name, "configuration subsection name", start)?;
            out.extend_from_slice(&s.version.to_be_bytes());
            match &s.body {
                ConfigBody::TargetPageBits(b) => {
                    if !(10..=16).contains(b) {
                        return Err(bad(format!("target-page-bits {b} outside 10..=16")));
                    }
                    out.extend_from_slice(&b.to_be_bytes())
                }
                ConfigBody::Capabilities(caps) => {
                    let Ok(n) = u32::try_from(caps.len()) else {
                        return Err(bad("too many capabilities".into()));
                    };
                    out.extend_from_slice(&n.to_be_bytes());
                    for c in caps {
                        put_counted(out, c, "capability name", start)?;
                    }
                }
                ConfigBody::Uuid(u) => out.extend_from_slice(u),
            }
        }
        Ok(())
    }
}

impl<'a> Configuration<'a> {
    /// Lists or unlists capability `cap` in `configuration/capabilities`,
    /// as QEMU's `vmstate_capabilites` would for a source with `cap` on or
    /// off: the subsection is created (version 1, after
    /// `configuration/target-page-bits`, before `configuration/uuid`, the
    /// order of `vmstate_configuration`'s subsections) when the first
    /// capability is listed and left out when none remains, since QEMU
    /// sends it only when a checked capability is on. Used to turn a stream
    /// into a mapped-ram file and back (wire-format §14): the destination
    /// refuses a stream whose list differs from its own capabilities.
    pub fn set_capability(&mut self, cap: &'a str, on: bool) {
        let pos = self
            .subsections
            .iter()
            .position(|s| matches!(s.body, ConfigBody::Capabilities(_)));
        match (pos, on) {
            (Some(i), _) => {
                if let ConfigBody::Capabilities(caps) = &mut self.subsections[i].body {
                    caps.retain(|c| *c != cap);
                    if on {
                        caps.push(cap);
                    }
                    if caps.is_empty() {
                        self.subsections.remove(i);
                    }
                }
            }
            (None, true) => {
                let at = self
                    .subsections
                    .iter()
                    .position(|s| matches!(s.body, ConfigBody::Uuid(_)))
                    .unwrap_or(self.subsections.len());
                self.subsections.insert(
                    at,
                    ConfigSubsection {
                        name: "configuration/capabilities",
                        version: 1,
                        body: ConfigBody::Capabilities(vec![cap]),
                    },
                );
            }
            (None, false) => {}
        }
    }
}

/// Parses the configuration section, type byte included. Subsections are
/// taken while the next byte is 0x05.
pub(crate) fn parse_configuration(i: &[u8]) -> PResult<'_, Configuration<'_>> {
    let at = i;
    let (i, ty) = be_u8(i)?;
    if ty != CONFIGURATION {
        fail!(
            at,
            Configuration {
                why: "stream header not followed by a configuration section (0x07)"
            }
        );
    }
    let at = i;
    let (i, len) = be_u32(i)?;
    if len == 0 || len > MAX_MACHINE_NAME {
        fail!(
            at,
            Configuration {
                why: "machine type name length is 0 or above 4096"
            }
        );
    }
    let (mut i, name) = take(len as usize)(i)?;
    let machine = match crate::names::check_name(name) {
        Ok(m) => m,
        Err(_) => fail!(
            at,
            Configuration {
                why: "machine type name is not printable ASCII"
            }
        ),
    };
    let mut subsections = Vec::new();
    loop {
        // A subsection follows only if the next byte says so; we need one
        // byte to decide (streaming: Incomplete if absent).
        let (_, next) = be_u8(i)?;
        if next != SUBSECTION {
            break;
        }
        let at = i;
        let (r, _) = be_u8(i)?;
        let (r, sname) = counted_name(r, "configuration subsection name")?;
        let (r, version) = be_u32(r)?;
        let (r, body) = match sname {
            "configuration/target-page-bits" => {
                let (r, bits) = be_u32(r)?;
                if !crate::target_page::valid_page_bits(bits) {
                    fail!(
                        r,
                        Configuration {
                            why: "target-page-bits outside QEMU's range 10..=16 (1 KiB to 64 KiB)"
                        }
                    );
                }
                (r, ConfigBody::TargetPageBits(bits))
            }
            "configuration/capabilities" => {
                let (mut r, count) = be_u32(r)?;
                // Each capability takes at least 2 bytes, so the count is
                // bounded by the input before anything is reserved.
                let mut caps = Vec::with_capacity((count as usize).min(r.len() / 2));
                for _ in 0..count {
                    let (r2, c) = counted_name(r, "capability name")?;
                    caps.push(c);
                    r = r2;
                }
                (r, ConfigBody::Capabilities(caps))
            }
            "configuration/uuid" => {
                let (r, u) = take(16usize)(r)?;
                let mut a = [0u8; 16];
                a.copy_from_slice(u);
                (r, ConfigBody::Uuid(a))
            }
            _ => {
                return Err(crate::error::PErr::at(
                    at,
                    crate::error::WireError::Unsupported {
                        offset: 0,
                        what: "unknown configuration subsection (cannot be delimited)",
                    },
                ))
            }
        };
        subsections.push(ConfigSubsection {
            name: sname,
            version,
            body,
        });
        i = r;
    }
    Ok((
        i,
        Configuration {
            machine,
            subsections,
        },
    ))
}

/// Decodes the configuration section (type byte included) at the start of
/// `buf`. It needs the byte after the last subsection to know the list ended.
///
/// # Errors
/// [`crate::WireError`] with the absolute offset (`base` + position).
pub fn decode_configuration(
    buf: &[u8],
    base: u64,
) -> Result<(Configuration<'_>, usize), crate::WireError> {
    crate::error::finish(buf, base, "configuration section", parse_configuration(buf))
}
