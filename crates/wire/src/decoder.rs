//! The stream decoder: a sans-IO state machine that turns bytes into
//! [`Item`]s, tracking what the stream announced so far (page size,
//! capabilities, postcopy advice, open sections, the current RAM block,
//! nested `PACKAGED` streams).
//!
//! Drive it with [`Decoder::decode`] on a buffer that starts at
//! [`Decoder::position`]; it answers with an item and its length, a request
//! for more bytes, or the end of the stream. [`Decoder::commit`] then moves
//! past the item. `decode` never changes the decoder, so a caller can retry
//! with a longer buffer after [`Step::NeedMore`].
//!
//! ```text
//!  Header ─► Config ─► Top ◄──────────────────────────────┐
//!                      │ START/PART/END/FULL "ram"         │
//!                      ├─► RamPayload ─(EOS)─► Footer ─────┤
//!                      │ other section                     │
//!                      ├─► Device ─(footer found)─► Footer ┘
//!                      │ EOF
//!                      └─► AfterEof ─(vmdesc)─► Done
//! ```

use std::collections::HashMap;

use crate::command::{self, Command};
use crate::error::{PErr, WireError};
use crate::header::{self, Configuration};
use crate::ram::{self, RamBody, RamContext, RamRecord};
use crate::section::{self, SectionHeader, SectionKind};

/// Caps applied while decoding, so hostile lengths cannot make the reader
/// buffer unbounded amounts of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest PACKAGED nested stream accepted.
    pub max_packaged: u32,
    /// Largest device (non-RAM) section payload accepted.
    pub max_device_section: usize,
    /// Largest vmdesc JSON accepted.
    pub max_vmdesc: u32,
    /// Largest received bitmap accepted (return path).
    pub max_bitmap: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packaged: command::DEFAULT_MAX_PACKAGED,
            max_device_section: 64 << 20,
            max_vmdesc: crate::vmdesc::DEFAULT_MAX_VMDESC,
            max_bitmap: crate::return_path::DEFAULT_MAX_BITMAP,
        }
    }
}

/// One decoded element of a stream. Serializing every item in order with
/// [`Item::write`] gives back the original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// `QEVM` + version.
    Header {
        /// Stream version (always 3).
        version: u32,
    },
    /// The configuration section.
    Configuration(Configuration<'a>),
    /// A section header.
    Section(SectionHeader<'a>),
    /// A record inside a RAM section.
    Ram(RamRecord<'a>),
    /// The opaque payload of a device (non-RAM) section.
    DeviceData(&'a [u8]),
    /// A section footer with its section id.
    Footer(u32),
    /// A command.
    Command(Command<'a>),
    /// End of a PACKAGED nested stream (no bytes on the wire).
    PackageEnd,
    /// The EOF byte.
    Eof,
    /// The vmdesc JSON trailer.
    Vmdesc(&'a [u8]),
}

impl Item<'_> {
    /// Serializes the item, with the checks of each part's writer.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (nothing is written), e.g. a header
    /// version other than 3, which readers refuse.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        match self {
            Item::Header { version } => {
                if *version != 3 {
                    return Err(crate::names::unwritable(
                        out.len(),
                        "stream header",
                        format!("version {version} (readers take only 3)"),
                    ));
                }
                out.extend_from_slice(&header::MAGIC.to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
            }
            Item::Configuration(c) => c.write(out)?,
            Item::Section(h) => h.write(out)?,
            Item::Ram(r) => r.write(out)?,
            Item::DeviceData(d) => out.extend_from_slice(d),
            Item::Footer(id) => section::write_footer(out, *id),
            Item::Command(c) => c.write(out)?,
            Item::PackageEnd => {}
            Item::Eof => out.push(section::EOF),
            Item::Vmdesc(j) => crate::vmdesc::write_vmdesc(out, j)?,
        }
        Ok(())
    }

    /// A short name of the item's kind, for listings.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Item::Header { .. } => "HEADER",
            Item::Configuration(_) => "CONFIGURATION",
            Item::Section(h) => h.kind.name(),
            Item::Ram(r) => r.kind().name(),
            Item::DeviceData(_) => "DEVICE_DATA",
            Item::Footer(_) => "FOOTER",
            Item::Command(c) => c.name(),
            Item::PackageEnd => "PACKAGE_END",
            Item::Eof => "EOF",
            Item::Vmdesc(_) => "VMDESC",
        }
    }
}

/// What [`Decoder::decode`] found.
#[derive(Debug)]
pub enum Step<'a> {
    /// An item of `len` bytes at the start of the buffer.
    Item {
        /// The item.
        item: Item<'a>,
        /// Its length in bytes.
        len: usize,
    },
    /// The buffer does not hold a whole item yet.
    NeedMore,
    /// The stream is complete.
    End,
}

/// Where the decoder is in the stream grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Expecting the 8-byte header.
    Header,
    /// Expecting the configuration section.
    Config,
    /// Between sections.
    Top,
    /// Inside a RAM section's payload.
    RamPayload {
        /// The section id.
        section_id: u32,
    },
    /// At the start of a device section's opaque payload.
    Device {
        /// The section id.
        section_id: u32,
    },
    /// Expecting the footer of a section.
    Footer {
        /// The section id.
        section_id: u32,
    },
    /// After EOF: a vmdesc trailer or the end.
    AfterEof,
    /// After the vmdesc: only the end.
    Done,
}

/// What a section id refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    /// The idstr.
    pub idstr: String,
    /// Instance id.
    pub instance: u32,
    /// Version id.
    pub version: u32,
    /// Whether it was introduced by START (iterative) rather than FULL.
    pub iterative: bool,
}

/// How the byte stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// A whole stream: header, configuration, sections.
    Full,
    /// Sections only (e.g. the contents of a PACKAGED command, or a stream
    /// picked up mid-way); the context must be set by the caller.
    Sections,
}

/// The sans-IO stream decoder. See the module documentation.
#[derive(Debug, Clone)]
pub struct Decoder {
    phase: Phase,
    pos: u64,
    limits: Limits,
    ram: RamContext,
    have_block: bool,
    footers: Option<bool>,
    sections: HashMap<u32, SectionInfo>,
    packages: Vec<u64>,
    eof_hint: Option<u64>,
    postcopy_listening: bool,
}

/// Maximum PACKAGED nesting depth.
const MAX_PACKAGE_DEPTH: usize = 4;

enum Tri {
    Yes,
    No,
    NeedMore,
}

impl Decoder {
    /// A decoder for a whole stream starting at offset 0.
    pub fn new(limits: Limits) -> Self {
        Self::with_start(StreamStart::Full, 0, limits)
    }

    /// A decoder starting at `pos` in the given grammar position.
    pub fn with_start(start: StreamStart, pos: u64, limits: Limits) -> Self {
        Decoder {
            phase: match start {
                StreamStart::Full => Phase::Header,
                StreamStart::Sections => Phase::Top,
            },
            pos,
            limits,
            ram: RamContext::default(),
            have_block: false,
            footers: None,
            sections: HashMap::new(),
            packages: Vec::new(),
            eof_hint: None,
            postcopy_listening: false,
        }
    }

    /// Tells the decoder where the EOF byte of a precopy stream is (found from
    /// the vmdesc trailer with [`crate::vmdesc::find_trailer`]); it makes
    /// delimiting the last device section certain.
    pub fn set_eof_hint(&mut self, eof_offset: u64) {
        self.eof_hint = Some(eof_offset);
    }

    /// Absolute offset of the next byte the decoder expects.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Current grammar position.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The RAM parsing context derived from the stream so far.
    pub fn ram_context(&self) -> &RamContext {
        &self.ram
    }

    /// Mutable RAM context, for streams that start mid-way.
    pub fn ram_context_mut(&mut self) -> &mut RamContext {
        &mut self.ram
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Sections introduced so far, by id.
    pub fn sections(&self) -> &HashMap<u32, SectionInfo> {
        &self.sections
    }

    /// Depth of PACKAGED nesting at the current position.
    pub fn package_depth(&self) -> usize {
        self.packages.len()
    }

    /// Whether POSTCOPY_LISTEN has been seen (the destination is in postcopy mode).
    pub fn postcopy_listening(&self) -> bool {
        self.postcopy_listening
    }

    /// Whether the stream is complete (vmdesc read, or EOF read and the input ended).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::AfterEof)
    }

    /// Decodes the item at the start of `buf`, which must begin at
    /// [`Decoder::position`]. `at_eof` says no more bytes will come.
    ///
    /// # Errors
    /// A [`WireError`] naming the absolute offset of the rule broken; a
    /// truncated item at the end of the input gives [`WireError::Truncated`].
    pub fn decode<'a>(&self, buf: &'a [u8], at_eof: bool) -> Result<Step<'a>, WireError> {
        // Inside a package, its end acts as the end of input.
        let (buf, eof) = match self.packages.last() {
            Some(&end) => {
                let limit = (end - self.pos) as usize;
                if limit == 0 {
                    return match self.phase {
                        Phase::Top => Ok(Step::Item {
                            item: Item::PackageEnd,
                            len: 0,
                        }),
                        _ => Err(WireError::Structure {
                            offset: self.pos,
                            why: "PACKAGED stream ends inside a section",
                        }),
                    };
                }
                if buf.len() >= limit {
                    (&buf[..limit], true)
                } else {
                    (buf, at_eof)
                }
            }
            None => (buf, at_eof),
        };
        let what = match self.phase {
            Phase::Header => "stream header",
            Phase::Config => "configuration section",
            Phase::Top => "section header or command",
            Phase::RamPayload { .. } => "RAM record",
            Phase::Device { .. } => "device section",
            Phase::Footer { .. } => "section footer",
            Phase::AfterEof | Phase::Done => "vmdesc trailer",
        };
        let r = self.decode_phase(buf, eof);
        match r {
            Ok(s) => Ok(s),
            Err(nom::Err::Incomplete(_)) => {
                if eof {
                    Err(WireError::Truncated {
                        offset: self.pos,
                        end: self.pos + buf.len() as u64,
                        what: if self.packages.is_empty() {
                            what
                        } else {
                            "item that crosses the end of its PACKAGED stream"
                        },
                    })
                } else {
                    Ok(Step::NeedMore)
                }
            }
            Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => {
                let rel = (buf.len() - e.remaining.min(buf.len())) as u64;
                Err(e.err.shifted(self.pos + rel))
            }
        }
    }

    fn decode_phase<'a>(&self, buf: &'a [u8], eof: bool) -> Result<Step<'a>, nom::Err<PErr>> {
        let item_len = |rest: &[u8]| buf.len() - rest.len();
        match self.phase {
            Phase::Header => {
                let (r, version) = header::parse_header(buf)?;
                Ok(Step::Item {
                    item: Item::Header { version },
                    len: item_len(r),
                })
            }
            Phase::Config => {
                let (r, c) = header::parse_configuration(buf)?;
                Ok(Step::Item {
                    item: Item::Configuration(c),
                    len: item_len(r),
                })
            }
            Phase::Top => self.decode_top(buf, eof),
            Phase::RamPayload { .. } => {
                let (r, rec) = ram::parse_ram_record(buf, &self.ram, self.have_block)?;
                Ok(Step::Item {
                    item: Item::Ram(rec),
                    len: item_len(r),
                })
            }
            Phase::Device { section_id } => match self.scan_device(buf, section_id, eof)? {
                Some(n) => Ok(Step::Item {
                    item: Item::DeviceData(&buf[..n]),
                    len: n,
                }),
                None => Ok(Step::NeedMore),
            },
            Phase::Footer { section_id } => {
                if self.footers == Some(false)
                    || (self.footers.is_none()
                        && buf.first().is_some_and(|&b| b != section::FOOTER))
                {
                    // Old machine types send no footers: the next section follows.
                    return self.decode_top(buf, eof);
                }
                let (r, id) = section::parse_footer(buf, section_id)?;
                Ok(Step::Item {
                    item: Item::Footer(id),
                    len: item_len(r),
                })
            }
            Phase::AfterEof | Phase::Done => {
                if buf.is_empty() {
                    return if eof {
                        Ok(Step::End)
                    } else {
                        Err(nom::Err::Incomplete(nom::Needed::new(1)))
                    };
                }
                if self.phase == Phase::Done || buf[0] != section::VMDESCRIPTION {
                    return Err(PErr::at(
                        buf,
                        WireError::Structure {
                            offset: 0,
                            why: "unexpected bytes after the end of the stream",
                        },
                    ));
                }
                let (r, j) = crate::vmdesc::parse_vmdesc(buf, self.limits.max_vmdesc)?;
                Ok(Step::Item {
                    item: Item::Vmdesc(j),
                    len: item_len(r),
                })
            }
        }
    }

    fn decode_top<'a>(&self, buf: &'a [u8], eof: bool) -> Result<Step<'a>, nom::Err<PErr>> {
        let Some(&ty) = buf.first() else {
            let _ = eof;
            return Err(nom::Err::Incomplete(nom::Needed::new(1)));
        };
        let item_len = |rest: &[u8]| buf.len() - rest.len();
        match ty {
            section::EOF => {
                if !self.packages.is_empty() {
                    return Err(PErr::at(
                        buf,
                        WireError::Structure {
                            offset: 0,
                            why: "EOF inside a PACKAGED stream",
                        },
                    ));
                }
                Ok(Step::Item {
                    item: Item::Eof,
                    len: 1,
                })
            }
            section::START | section::PART | section::END | section::FULL => {
                let (r, h) = section::parse_section_header(buf)?;
                match h.ident {
                    None => {
                        if !self.sections.contains_key(&h.section_id) {
                            return Err(PErr::at(
                                buf,
                                WireError::SectionNotStarted {
                                    offset: 0,
                                    section_id: h.section_id,
                                },
                            ));
                        }
                    }
                    Some(id) => {
                        if id.idstr == "ram" && id.version != 4 {
                            return Err(PErr::at(
                                buf,
                                WireError::Unsupported {
                                    offset: 0,
                                    what: "RAM section version other than 4",
                                },
                            ));
                        }
                    }
                }
                Ok(Step::Item {
                    item: Item::Section(h),
                    len: item_len(r),
                })
            }
            section::COMMAND => {
                let (r, c) = command::parse_command(buf, self.limits.max_packaged)?;
                if let Command::Packaged { .. } = c {
                    if self.packages.len() >= MAX_PACKAGE_DEPTH {
                        return Err(PErr::at(
                            buf,
                            WireError::Structure {
                                offset: 0,
                                why: "PACKAGED nested too deeply",
                            },
                        ));
                    }
                }
                Ok(Step::Item {
                    item: Item::Command(c),
                    len: item_len(r),
                })
            }
            section::VMDESCRIPTION => Err(PErr::at(
                buf,
                WireError::Structure {
                    offset: 0,
                    why: "vmdesc trailer before EOF",
                },
            )),
            section::FOOTER => Err(PErr::at(
                buf,
                WireError::Structure {
                    offset: 0,
                    why: "section footer outside a section",
                },
            )),
            header::SUBSECTION | header::CONFIGURATION => Err(PErr::at(
                buf,
                WireError::Structure {
                    offset: 0,
                    why: "subsection or configuration outside its place",
                },
            )),
            b => Err(PErr::at(
                buf,
                WireError::UnknownSectionType { offset: 0, byte: b },
            )),
        }
    }

    /// Finds the end of a device section payload: the first footer for this
    /// section id that is followed by something a QEMU source could send next.
    fn scan_device(&self, buf: &[u8], id: u32, eof: bool) -> Result<Option<usize>, nom::Err<PErr>> {
        let info = self.sections.get(&id);
        let dev_err = |why: &'static str| {
            PErr::at(
                buf,
                WireError::DeviceSection {
                    offset: 0,
                    section_id: id,
                    idstr: info.map(|s| s.idstr.clone()).unwrap_or_default(),
                    why,
                },
            )
        };
        if self.footers == Some(false) {
            return Err(dev_err(
                "the stream has no section footers, so device sections cannot be delimited",
            ));
        }
        let idb = id.to_be_bytes();
        let mut from = 0;
        while let Some(k) = buf[from..].iter().position(|&b| b == section::FOOTER) {
            let cand = from + k;
            if cand > self.limits.max_device_section {
                break;
            }
            let tail = &buf[cand + 1..];
            if tail.len() < 4 {
                if eof {
                    break;
                }
                return Ok(None);
            }
            if tail[..4] == idb {
                let next_abs = self.pos + cand as u64 + 5;
                match self.plausible_next(&buf[cand + 5..], next_abs, eof) {
                    Tri::Yes => return Ok(Some(cand)),
                    Tri::NeedMore => return Ok(None),
                    Tri::No => {}
                }
            }
            from = cand + 1;
        }
        if buf.len() > self.limits.max_device_section {
            return Err(PErr::at(
                buf,
                WireError::TooLarge {
                    offset: 0,
                    what: "device section (no footer found)",
                    len: buf.len() as u64,
                    cap: self.limits.max_device_section as u64,
                },
            ));
        }
        if eof {
            return Err(nom::Err::Incomplete(nom::Needed::Unknown));
        }
        Ok(None)
    }

    fn plausible_next(&self, rest: &[u8], abs: u64, eof: bool) -> Tri {
        if self.packages.last() == Some(&abs) {
            return Tri::Yes;
        }
        if let Some(h) = self.eof_hint {
            if abs == h {
                return Tri::Yes;
            }
            if abs > h {
                return Tri::No;
            }
        }
        let Some(&ty) = rest.first() else {
            return if eof { Tri::Yes } else { Tri::NeedMore };
        };
        let need = |n: usize| {
            if rest.len() >= n {
                None
            } else if eof {
                Some(Tri::No)
            } else {
                Some(Tri::NeedMore)
            }
        };
        match ty {
            section::EOF => {
                if !self.packages.is_empty() || self.eof_hint.is_some() {
                    return Tri::No;
                }
                if rest.len() == 1 && eof {
                    return Tri::Yes;
                }
                if let Some(t) = need(7) {
                    return t;
                }
                if rest[1] == section::VMDESCRIPTION && rest[6] == b'{' {
                    Tri::Yes
                } else {
                    Tri::No
                }
            }
            section::START | section::FULL => match section::parse_section_header(rest) {
                Err(nom::Err::Incomplete(_)) => {
                    if eof {
                        Tri::No
                    } else {
                        Tri::NeedMore
                    }
                }
                Err(_) => Tri::No,
                Ok((_, h)) => {
                    let v = h.ident.map(|i| i.version).unwrap_or(0);
                    if v <= 0xffff && !self.sections.contains_key(&h.section_id) {
                        Tri::Yes
                    } else {
                        Tri::No
                    }
                }
            },
            section::PART | section::END => {
                if let Some(t) = need(5) {
                    return t;
                }
                let id = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
                match self.sections.get(&id) {
                    Some(s) if s.iterative => Tri::Yes,
                    _ => Tri::No,
                }
            }
            section::COMMAND => {
                if let Some(t) = need(5) {
                    return t;
                }
                let c = u16::from_be_bytes([rest[1], rest[2]]);
                let l = u16::from_be_bytes([rest[3], rest[4]]);
                if command::plausible(c, l) {
                    Tri::Yes
                } else {
                    Tri::No
                }
            }
            _ => Tri::No,
        }
    }

    /// Moves past an item returned by [`Decoder::decode`] (with its length).
    pub fn commit(&mut self, item: &Item<'_>, len: usize) {
        let start = self.pos;
        self.pos += len as u64;
        // A footer-less stream: the footer phase decoded a top-level item.
        if let Phase::Footer { .. } = self.phase {
            if !matches!(item, Item::Footer(_)) {
                self.footers = Some(false);
                self.phase = Phase::Top;
            }
        }
        match item {
            Item::Header { .. } => self.phase = Phase::Config,
            Item::Configuration(c) => {
                if let Some(b) = c.target_page_bits() {
                    self.ram.page_bits = b;
                }
                self.ram.ignore_shared = c.has_capability("x-ignore-shared");
                self.ram.mapped_ram = c.has_capability("mapped-ram");
                self.phase = Phase::Top;
            }
            Item::Section(h) => {
                if let Some(id) = h.ident {
                    self.sections.insert(
                        h.section_id,
                        SectionInfo {
                            idstr: id.idstr.to_string(),
                            instance: id.instance,
                            version: id.version,
                            iterative: h.kind == SectionKind::Start,
                        },
                    );
                }
                let is_ram = self
                    .sections
                    .get(&h.section_id)
                    .is_some_and(|s| s.idstr == "ram");
                self.phase = if is_ram {
                    Phase::RamPayload {
                        section_id: h.section_id,
                    }
                } else {
                    Phase::Device {
                        section_id: h.section_id,
                    }
                };
            }
            Item::Ram(r) => {
                if r.block.is_some() {
                    self.have_block = true;
                }
                if let RamBody::Eos = r.body {
                    if let Phase::RamPayload { section_id } = self.phase {
                        self.phase = if self.footers == Some(false) {
                            Phase::Top
                        } else {
                            Phase::Footer { section_id }
                        };
                    }
                }
            }
            Item::DeviceData(_) => {
                if let Phase::Device { section_id } = self.phase {
                    self.phase = Phase::Footer { section_id };
                }
            }
            Item::Footer(_) => {
                self.footers = Some(true);
                self.phase = Phase::Top;
            }
            Item::Command(c) => match c {
                Command::PostcopyAdvise(a) => {
                    self.ram.postcopy_advised = Some(a.map(|a| a.page_size_summary));
                }
                Command::PostcopyListen => self.postcopy_listening = true,
                Command::Packaged { len: n } => {
                    self.packages.push(start + len as u64 + *n as u64);
                }
                _ => {}
            },
            Item::PackageEnd => {
                self.packages.pop();
            }
            Item::Eof => self.phase = Phase::AfterEof,
            Item::Vmdesc(_) => self.phase = Phase::Done,
        }
    }
}
