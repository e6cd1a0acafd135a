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
//!  Header ─► [Config] ─► Top ◄──────────────────────────────┐
//!                      │ START/PART/END/FULL "ram"         │
//!                      ├─► RamPayload ─(EOS)─► Footer ─────┤
//!                      │ other section                     │
//!                      ├─► Device ─(vmdesc length)─► Footer┘
//!                      │ EOF
//!                      └─► AfterEof ─(vmdesc)─► Done
//! ```

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::command::{self, Command};
use crate::devices::DeviceTable;
use crate::error::{PErr, WireError};
use crate::header::{self, Configuration};
use crate::mapped_ram::{self, MappedRam, Region};
use crate::ram::{self, RamBody, RamContext, RamRecord};
use crate::section::{self, SectionHeader, SectionKind};
use crate::target_page::{self, PageSizeSource};

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
    /// Most sections (START/FULL) one stream may introduce.
    pub max_sections: usize,
    /// How many bytes a reader of a non-seekable input may buffer ahead,
    /// after the RAM, to reach the vmdesc trailer that delimits the device
    /// sections (bytes).
    pub max_vmdesc_lookahead: usize,
    /// Without a vmdesc, how far past a footer candidate (bytes) the
    /// decoder looks for a second reading of the same device section.
    pub ambiguity_window: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packaged: command::DEFAULT_MAX_PACKAGED,
            max_device_section: 64 << 20,
            max_vmdesc: crate::vmdesc::DEFAULT_MAX_VMDESC,
            max_bitmap: crate::return_path::DEFAULT_MAX_BITMAP,
            max_sections: 1 << 16,
            max_vmdesc_lookahead: 64 << 20,
            ambiguity_window: 64 << 10,
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
    /// A mapped-ram part of the RAM START section: the MEM_SIZE word, a
    /// block entry with its header, or a piece of a block's file region
    /// (bitmap, padding, pages) — see [`crate::mapped_ram`].
    MappedRam(MappedRam<'a>),
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
            Item::MappedRam(m) => m.write(out)?,
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
            Item::MappedRam(m) => m.kind_name(),
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
    /// A device section follows whose length only the vmdesc trailer can
    /// give: a reader of a non-seekable input should read ahead to the
    /// trailer and call [`Decoder::set_vmdesc`] (or
    /// [`Decoder::give_up_vmdesc`] if there is none, or
    /// [`Decoder::scan_next_section`] if the trailer is out of reach).
    NeedVmdesc,
    /// The target page size was worked out from the stream (no declared
    /// source): apply it with [`Decoder::set_page_bits`] and
    /// [`PageSizeSource::Inferred`], then decode again.
    PageSize {
        /// log2 of the target page size.
        bits: u32,
    },
}

/// What the decoder knows about device-section lengths.
#[derive(Debug, Clone)]
enum DeviceLengths {
    /// Not yet known: a vmdesc may still come.
    Unknown,
    /// From the vmdesc.
    Known(Arc<DeviceTable>),
    /// The stream has no vmdesc: device sections are delimited by their
    /// footer, with structural checks, and ambiguity is an error.
    Absent,
}

/// Where the RAM section is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RamSection {
    NotStarted,
    Open,
    Ended,
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
    /// A connection that carries RAM page records only, outside any
    /// section: the postcopy-preempt channel (wire-format §12). ZERO and
    /// PAGE records (with a block name or CONTINUE); an EOS ends it (QEMU
    /// 7.2 and machine types up to 7.2 write one last), and so does a clean
    /// end of input between records. See [`Decoder::preempt_channel`].
    RamChannel,
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
    postcopy_run: bool,
    page_source: Option<PageSizeSource>,
    devices: DeviceLengths,
    scan_once: bool,
    ended: HashSet<u32>,
    ram_section: RamSection,
    has_configuration: Option<bool>,
    section_kind: SectionKind,
    /// Footer scan progress kept across calls on a growing buffer
    /// (position of the payload, section id, bytes already ruled out), so
    /// input arriving in small pieces is scanned once: linear time.
    scan_resume: Cell<(u64, u32, usize)>,
    mapped: Option<MappedState>,
}

/// Where a mapped-ram MEM_SIZE list is: lengths so far, and the file region
/// being read, if any.
#[derive(Debug, Clone, Copy)]
struct MappedState {
    total: u64,
    sum: u64,
    region: Option<Region>,
}

/// Candidate target page bits tried, most common first, when the stream
/// declares none.
const INFER_CANDIDATES: [u32; 7] = [12, 10, 13, 14, 16, 11, 15];
/// Bytes of RAM records the page-size inference reads before it decides.
const INFER_WINDOW: usize = 1 << 20;

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
            postcopy_run: false,
            page_source: None,
            devices: DeviceLengths::Unknown,
            scan_once: false,
            ended: HashSet::new(),
            ram_section: RamSection::NotStarted,
            has_configuration: None,
            section_kind: SectionKind::Full,
            scan_resume: Cell::new((u64::MAX, 0, 0)),
            mapped: None,
        }
    }

    /// Gives the decoder the stream's vmdesc as a [`DeviceTable`]: device
    /// sections it describes are then delimited by their exact length, and
    /// its `page_size` becomes the target page size unless the
    /// configuration announced one. `None` says the stream has no vmdesc.
    ///
    /// # Errors
    /// [`WireError::PageSize`] when the vmdesc's page size is not one QEMU
    /// can have, or disagrees with the configuration's.
    pub fn set_vmdesc(&mut self, table: Option<Arc<DeviceTable>>) -> Result<(), WireError> {
        match table {
            None => self.devices = DeviceLengths::Absent,
            Some(t) => {
                if let Some(ps) = t.page_size() {
                    let Some(bits) = target_page::page_bits_of(ps) else {
                        return Err(WireError::PageSize {
                            offset: self.pos,
                            why: format!(
                                "vmdesc page_size {ps} is not a power of two from 1 KiB to 64 KiB"
                            ),
                        });
                    };
                    match self.page_source {
                        Some(PageSizeSource::Override) => {}
                        Some(PageSizeSource::Configuration) if bits != self.ram.page_bits => {
                            return Err(WireError::PageSize {
                                offset: self.pos,
                                why: format!(
                                    "vmdesc page_size {ps} disagrees with the configuration's target-page-bits ({})",
                                    1u64 << self.ram.page_bits
                                ),
                            });
                        }
                        Some(PageSizeSource::Configuration) => {}
                        // RAM already read (a pipe reaches the vmdesc last):
                        // it must have been read with the same size.
                        Some(_)
                            if self.ram_section != RamSection::NotStarted
                                && bits != self.ram.page_bits =>
                        {
                            return Err(WireError::PageSize {
                                offset: self.pos,
                                why: format!(
                                    "the RAM records were read with {}-byte pages but the vmdesc says page_size {ps}",
                                    1u64 << self.ram.page_bits
                                ),
                            });
                        }
                        _ => self.set_page_bits(bits, PageSizeSource::Vmdesc),
                    }
                }
                self.devices = DeviceLengths::Known(t);
            }
        }
        Ok(())
    }

    /// Says that the current (non-seekable) input has no vmdesc trailer:
    /// device sections are delimited by footers under structural checks.
    pub fn give_up_vmdesc(&mut self) {
        self.devices = DeviceLengths::Absent;
    }

    /// Delimits the next device section by its footer (with the structural
    /// and ambiguity checks) because the vmdesc is out of reach; later
    /// sections still wait for it.
    pub fn scan_next_section(&mut self) {
        self.scan_once = true;
    }

    /// Whether device sections are delimited by the vmdesc.
    pub fn has_vmdesc(&self) -> bool {
        matches!(self.devices, DeviceLengths::Known(_))
    }

    /// Sets the target page size (log2 bytes) and where it came from. An
    /// override is never replaced by a later source.
    pub fn set_page_bits(&mut self, bits: u32, source: PageSizeSource) {
        if self.page_source == Some(PageSizeSource::Override) && source != PageSizeSource::Override
        {
            return;
        }
        self.ram.page_bits = bits;
        self.page_source = Some(source);
    }

    /// Where the target page size in force came from (`None`: not decided
    /// yet; the decoder then assumes nothing and works it out at the first
    /// RAM record).
    pub fn page_size_source(&self) -> Option<PageSizeSource> {
        self.page_source
    }

    /// Whether the stream had a configuration section (`None` before the
    /// decoder got there).
    pub fn has_configuration(&self) -> Option<bool> {
        self.has_configuration
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

    /// Whether POSTCOPY_RUN has been seen (the destination runs the guest:
    /// from here on a broken connection pauses the migration instead of
    /// failing it, wire-format §11).
    pub fn postcopy_running(&self) -> bool {
        self.postcopy_run
    }

    /// A decoder for the next main connection of the same migration, after
    /// this one was cut: a postcopy recovery connection (wire-format §11),
    /// which starts with commands (RECV_BITMAP, POSTCOPY_RESUME) instead of
    /// a QEVM header. It keeps what the stream announced (sections, RAM
    /// context and page size, footers, device lengths, the postcopy state)
    /// and starts at offset 0 of the new connection, between sections. Its
    /// first page record must name its block: QEMU's source always does
    /// after a resume; its destination would also take a CONTINUE against
    /// the channel's last block, which qmig refuses
    /// ([`WireError::ContinueWithoutBlock`]) so that a reader applying
    /// several channels one after the other never resolves it against
    /// another channel's block. Sections ended on an earlier connection may
    /// continue (PART, END) on this one. Call it on the decoder of the previous connection, at the
    /// end of its last whole item; a partly read item is dropped, as QEMU's
    /// destination drops it.
    ///
    /// Only the caller knows that a connection continues another one: a
    /// stream is never read as a continuation because of what it holds.
    ///
    /// # Errors
    /// [`WireError::Recovery`] (offset: this decoder's position) when the
    /// connection was cut before POSTCOPY_RUN: QEMU pauses only in postcopy
    /// after RUN (`postcopy_pause_incoming`); before that the migration fails.
    pub fn continuation(&self) -> Result<Decoder, WireError> {
        if !self.postcopy_run {
            return Err(WireError::Recovery {
                offset: self.pos,
                why: "the connection ended before POSTCOPY_RUN, so QEMU would have failed the migration, not paused it: no later connection can continue it",
            });
        }
        if self.is_done() {
            return Err(WireError::Recovery {
                offset: self.pos,
                why: "the connection reached EOF: the migration was complete, no later connection can continue it",
            });
        }
        let mut d = self.new_connection(Phase::Top);
        // A source cut after its END section resumes by sending the pages
        // the destination lacks and the END section again (QEMU's
        // destination does not track ended sections, `qemu_loadvm_section_part_end`).
        d.ended.clear();
        Ok(d)
    }

    /// A decoder for a postcopy-preempt channel of this migration
    /// (wire-format §12): RAM page records only, from offset 0, with the
    /// RAM context of this (main channel) decoder and no last block yet
    /// (the channel names its first block). Only the caller knows that a
    /// connection is a preempt channel.
    pub fn preempt_channel(&self) -> Decoder {
        self.new_connection(Phase::RamChannel)
    }

    /// This decoder's migration state (announced sections, RAM context, postcopy
    /// state) at offset 0 of a new connection that starts in `phase`: no last block,
    /// no open packaged command, no scan or EOF state carried over.
    fn new_connection(&self, phase: Phase) -> Decoder {
        let mut d = self.clone();
        d.phase = phase;
        d.pos = 0;
        d.have_block = false;
        d.packages.clear();
        d.scan_once = false;
        d.scan_resume = Cell::new((u64::MAX, 0, 0));
        d.eof_hint = None;
        d
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
            Phase::RamPayload { .. } | Phase::RamChannel => "RAM record",
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
            Phase::Config => match buf.first() {
                None => Err(nom::Err::Incomplete(nom::Needed::new(1))),
                // send-configuration=off and Xen device-state files: the
                // sections follow the header directly.
                Some(&b) if b != header::CONFIGURATION => self.decode_top(buf, eof),
                Some(_) => {
                    let (r, c) = header::parse_configuration(buf)?;
                    self.check_config_page_size(buf, &c)?;
                    Ok(Step::Item {
                        item: Item::Configuration(c),
                        len: item_len(r),
                    })
                }
            },
            Phase::Top => self.decode_top(buf, eof),
            Phase::RamPayload { .. } => {
                if self.page_source.is_none() {
                    return self.infer_page_bits(buf, eof);
                }
                if self.ram.mapped_ram {
                    if let Some(step) = self.decode_mapped(buf, eof)? {
                        return Ok(step);
                    }
                }
                let (r, rec) = ram::parse_ram_record(buf, &self.ram, self.have_block)?;
                Ok(Step::Item {
                    item: Item::Ram(rec),
                    len: item_len(r),
                })
            }
            Phase::Device { section_id } => self.decode_device(buf, section_id, eof),
            Phase::RamChannel => {
                if buf.is_empty() {
                    return if eof {
                        Ok(Step::End)
                    } else {
                        Err(nom::Err::Incomplete(nom::Needed::new(1)))
                    };
                }
                if self.page_source.is_none() {
                    return self.infer_page_bits(buf, eof);
                }
                let (r, rec) = ram::parse_ram_record(buf, &self.ram, self.have_block)?;
                if !matches!(
                    rec.body,
                    RamBody::Zero { .. } | RamBody::Page(_) | RamBody::Eos
                ) {
                    return Err(PErr::at(
                        buf,
                        WireError::Structure {
                            offset: 0,
                            why: "a postcopy-preempt channel carries only ZERO and PAGE records (and a last EOS from QEMU 7.2)",
                        },
                    ));
                }
                Ok(Step::Item {
                    item: Item::Ram(rec),
                    len: item_len(r),
                })
            }
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
                if h.ident.is_none() && !self.sections.contains_key(&h.section_id) {
                    return Err(PErr::at(
                        buf,
                        WireError::SectionNotStarted {
                            offset: 0,
                            section_id: h.section_id,
                        },
                    ));
                }
                if let Err(why) = self.section_rule(&h) {
                    return Err(PErr::at(buf, WireError::Structure { offset: 0, why }));
                }
                if let Some(id) = h.ident {
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

    /// A mapped-ram stream's RAM payload: the MEM_SIZE word, block entries
    /// with their headers and file regions ([`crate::mapped_ram`]); `None`
    /// for a record read as usual (EOS). Page records are refused, as
    /// QEMU's `ram_load_precopy` does for mapped-ram.
    fn decode_mapped<'a>(
        &self,
        buf: &'a [u8],
        eof: bool,
    ) -> Result<Option<Step<'a>>, nom::Err<PErr>> {
        let item = |m: MappedRam<'a>, len: usize| {
            Ok(Some(Step::Item {
                item: Item::MappedRam(m),
                len,
            }))
        };
        let need = |n: usize| Err(nom::Err::Incomplete(nom::Needed::new(n)));
        match self.mapped {
            Some(MappedState {
                region: Some(r), ..
            }) => {
                let pos = self.pos;
                if pos < r.bitmap_end {
                    let n = (r.bitmap_end - pos) as usize;
                    if buf.len() < n {
                        return need(n - buf.len());
                    }
                    return item(MappedRam::Bitmap(&buf[..n]), n);
                }
                // Padding and pages are cut at fixed boundaries (1 MiB of
                // the file, 1 MiB of the page area), so every reader gives
                // the same items whatever it has buffered.
                let cut = |from: u64, limit: u64, chunk: u64| {
                    let next = ((pos - from) / chunk + 1).saturating_mul(chunk);
                    (from.saturating_add(next).min(limit) - pos) as usize
                };
                if pos < r.pages_offset {
                    let n = cut(0, r.pages_offset, mapped_ram::PADDING_CHUNK as u64);
                    if buf.len() < n {
                        return need(n - buf.len());
                    }
                    return item(MappedRam::Padding(&buf[..n]), n);
                }
                let n = cut(r.pages_offset, r.end, mapped_ram::PAGES_CHUNK as u64);
                if buf.len() < n {
                    return need(n - buf.len());
                }
                item(
                    MappedRam::Pages {
                        first: (pos - r.pages_offset) / r.page_size,
                        data: &buf[..n],
                    },
                    n,
                )
            }
            Some(st) if st.sum < st.total => {
                let (rest, (block, header)) =
                    mapped_ram::parse_block_entry(buf, self.ram.ignore_shared)?;
                let len = buf.len() - rest.len();
                let after = self.pos + len as u64;
                let input_end = match (self.eof_hint, eof) {
                    (Some(h), true) => Some(h.min(self.pos + buf.len() as u64)),
                    (Some(h), false) => Some(h),
                    (None, true) => Some(self.pos + buf.len() as u64),
                    (None, false) => None,
                };
                if let Err(why) = mapped_ram::check_block(
                    &block,
                    &header,
                    after,
                    self.ram.page_size() as u64,
                    st.total,
                    st.sum,
                    self.limits.max_device_section as u64,
                    input_end,
                ) {
                    return Err(PErr::at(
                        buf,
                        WireError::MappedRam {
                            offset: 0,
                            block: block.name.to_string(),
                            why,
                        },
                    ));
                }
                item(MappedRam::Block { block, header }, len)
            }
            _ => {
                let (_, word) = nom::number::streaming::be_u64::<_, PErr>(buf)?;
                let mask = (1u64 << self.ram.page_bits) - 1;
                let f = word & mask;
                if f == ram::flags::MEM_SIZE {
                    if self.mapped.is_some() {
                        return Err(PErr::at(
                            buf,
                            WireError::Structure {
                                offset: 0,
                                why: "a second MEM_SIZE record in a mapped-ram stream",
                            },
                        ));
                    }
                    return item(
                        MappedRam::MemSize {
                            total: word & !mask,
                        },
                        8,
                    );
                }
                let page_like = ram::flags::PAGE
                    | ram::flags::ZERO
                    | ram::flags::XBZRLE
                    | ram::flags::COMPRESS_PAGE
                    | ram::flags::HOOK
                    | ram::flags::MULTIFD_FLUSH;
                if f & page_like != 0 {
                    return Err(PErr::at(
                        buf,
                        WireError::Structure {
                            offset: 0,
                            why: "PAGE, ZERO, XBZRLE, COMPRESS_PAGE, HOOK or MULTIFD_FLUSH record in a mapped-ram stream (its pages live at file offsets; QEMU's ram_load_precopy refuses these)",
                        },
                    ));
                }
                Ok(None)
            }
        }
    }

    /// The configuration's page size must agree with the vmdesc's.
    fn check_config_page_size(
        &self,
        buf: &[u8],
        c: &Configuration<'_>,
    ) -> Result<(), nom::Err<PErr>> {
        let Some(bits) = c.target_page_bits() else {
            return Ok(());
        };
        let vm = match &self.devices {
            DeviceLengths::Known(t) => t.page_size(),
            _ => None,
        };
        match vm {
            Some(ps) if self.page_source != Some(PageSizeSource::Override) && ps != 1u64 << bits => {
                Err(PErr::at(
                    buf,
                    WireError::PageSize {
                        offset: 0,
                        why: format!(
                            "configuration target-page-bits {bits} ({} bytes) disagrees with the vmdesc page_size {ps}",
                            1u64 << bits
                        ),
                    },
                ))
            }
            _ => Ok(()),
        }
    }

    /// No source declared the target page size: try every size QEMU can
    /// have on the RAM records ahead (up to [`INFER_WINDOW`] bytes) and
    /// take the only one under which they all parse.
    fn infer_page_bits<'a>(&self, buf: &'a [u8], eof: bool) -> Result<Step<'a>, nom::Err<PErr>> {
        if buf.len() < INFER_WINDOW && !eof {
            return Err(nom::Err::Incomplete(nom::Needed::Unknown));
        }
        let window = &buf[..buf.len().min(INFER_WINDOW)];
        let window_eof = eof && window.len() == buf.len();
        let mut passed = Vec::new();
        let mut first_err = None;
        for bits in INFER_CANDIDATES {
            let mut d = self.clone();
            d.set_page_bits(bits, PageSizeSource::Inferred);
            let ok = loop {
                let at = (d.pos - self.pos) as usize;
                match d.decode(&window[at..], window_eof) {
                    Ok(Step::Item { item, len }) => {
                        d.commit(&item, len);
                    }
                    Ok(Step::NeedMore | Step::End | Step::NeedVmdesc | Step::PageSize { .. }) => {
                        break true
                    }
                    Err(e) if e.is_truncation() && !window_eof => break true,
                    Err(e) => {
                        if bits == 12 {
                            first_err = Some(e);
                        }
                        break false;
                    }
                }
            };
            if ok {
                passed.push(bits);
            }
        }
        let fail = |err: WireError| Err(PErr::at(buf, err));
        match passed[..] {
            [bits] => Ok(Step::PageSize { bits }),
            [] => fail(WireError::PageSize {
                offset: 0,
                why: format!(
                    "the stream declares none (no target-page-bits, no vmdesc, machine type unknown) and no size from 1 KiB to 64 KiB reads its RAM records{}; pass --target-page-size",
                    first_err.map(|e| format!(" (as 4 KiB: {e})")).unwrap_or_default()
                ),
            }),
            _ => fail(WireError::Ambiguous {
                offset: 0,
                why: format!(
                    "the stream declares no target page size and its RAM records read equally well with pages of {} bytes; pass --target-page-size",
                    passed.iter().map(|b| (1u64 << b).to_string()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// A [`WireError::DeviceSection`] for section `id` at the start of `buf`.
    fn device_error(&self, buf: &[u8], id: u32, why: &'static str) -> nom::Err<PErr> {
        PErr::at(
            buf,
            WireError::DeviceSection {
                offset: 0,
                section_id: id,
                idstr: self
                    .sections
                    .get(&id)
                    .map(|s| s.idstr.clone())
                    .unwrap_or_default(),
                why,
            },
        )
    }

    /// Delimits a device section payload: by the vmdesc's exact length when
    /// the section is described, else by its footer under structural and
    /// ambiguity checks.
    fn decode_device<'a>(
        &self,
        buf: &'a [u8],
        id: u32,
        eof: bool,
    ) -> Result<Step<'a>, nom::Err<PErr>> {
        let info = self.sections.get(&id);
        let dev_err = |why: &'static str| self.device_error(buf, id, why);
        if let Some(i) = info.filter(|i| i.iterative && crate::iterative::known(&i.idstr)) {
            let (r, ()) = crate::iterative::parse_payload(
                buf,
                &i.idstr,
                self.section_kind,
                self.ram.page_bits,
            )?;
            let n = buf.len() - r.len();
            return Ok(Step::Item {
                item: Item::DeviceData(&buf[..n]),
                len: n,
            });
        }
        let scan = match &self.devices {
            _ if self.scan_once => true,
            DeviceLengths::Known(t) => match info.and_then(|i| t.len_of(&i.idstr, i.instance)) {
                Some(n) => {
                    if n > self.limits.max_device_section as u64 {
                        return Err(PErr::at(
                            buf,
                            WireError::TooLarge {
                                offset: 0,
                                what: "device section (vmdesc length)",
                                len: n,
                                cap: self.limits.max_device_section as u64,
                            },
                        ));
                    }
                    let n = n as usize;
                    if buf.len() < n {
                        return Err(nom::Err::Incomplete(nom::Needed::new(n - buf.len())));
                    }
                    return Ok(Step::Item {
                        item: Item::DeviceData(&buf[..n]),
                        len: n,
                    });
                }
                // Iterative sections other than RAM are not in the vmdesc;
                // the known ones were decoded above. Cutting an unknown
                // one at footer-like bytes could be steered by its data.
                None if info.is_some_and(|i| i.iterative) => {
                    return Err(dev_err(
                        "an iterative section whose format qmig does not know (it reads ram, spapr/htab and s390-storage_attributes); the vmdesc does not describe iterative sections",
                    ))
                }
                None => return Err(dev_err("the vmdesc does not describe this section")),
            },
            // Postcopy packages never have a vmdesc; sections before or
            // between RAM sections would need the whole RAM read ahead.
            DeviceLengths::Unknown
                if self.packages.is_empty() && self.ram_section != RamSection::Open =>
            {
                return Ok(Step::NeedVmdesc)
            }
            DeviceLengths::Unknown | DeviceLengths::Absent => true,
        };
        debug_assert!(scan);
        match self.scan_device(buf, id, eof)? {
            Some(n) => Ok(Step::Item {
                item: Item::DeviceData(&buf[..n]),
                len: n,
            }),
            None => Ok(Step::NeedMore),
        }
    }

    /// Checks a section header against the stream's structure: what QEMU
    /// never sends is refused (savevm.c qemu_loadvm_state_main takes START
    /// and FULL once per section, PART/END only for a started iterative
    /// section, and a postcopy package holds only FULL device sections).
    fn section_rule(&self, h: &SectionHeader<'_>) -> Result<(), &'static str> {
        match h.ident {
            Some(id) => {
                if self.sections.contains_key(&h.section_id) {
                    return Err("a START or FULL section re-uses a section id already introduced");
                }
                if self.sections.len() >= self.limits.max_sections {
                    return Err("too many sections in one stream");
                }
                if id.idstr == "ram" {
                    if h.kind == SectionKind::Full {
                        return Err("RAM is never sent in a FULL section");
                    }
                    if self.ram_section != RamSection::NotStarted {
                        return Err("a second RAM section");
                    }
                }
                if !self.packages.is_empty() && h.kind != SectionKind::Full {
                    return Err("a PACKAGED stream holds only commands and FULL sections");
                }
            }
            None => {
                let Some(info) = self.sections.get(&h.section_id) else {
                    return Err("section continued but never started");
                };
                if !info.iterative {
                    return Err("PART or END for a FULL section");
                }
                if self.ended.contains(&h.section_id) {
                    return Err("PART or END after the section's END");
                }
                if !self.packages.is_empty() {
                    return Err("a PACKAGED stream holds only commands and FULL sections");
                }
            }
        }
        Ok(())
    }

    /// Finds the end of a device section payload: the first footer for this
    /// section id that is followed by something a QEMU source could send next.
    fn scan_device(&self, buf: &[u8], id: u32, eof: bool) -> Result<Option<usize>, nom::Err<PErr>> {
        let dev_err = |why: &'static str| self.device_error(buf, id, why);
        if self.footers == Some(false) {
            return Err(dev_err(
                "the stream has no section footers, so device sections cannot be delimited",
            ));
        }
        let idb = id.to_be_bytes();
        // Candidates before `from` were ruled out by an earlier call at this
        // position: a "no" never turns into "yes" when more bytes arrive.
        let (rp, rid, rfrom) = self.scan_resume.get();
        let mut from = if rp == self.pos && rid == id {
            rfrom.min(buf.len())
        } else {
            0
        };
        let pause = |at: usize| {
            self.scan_resume.set((self.pos, id, at));
            Ok(None)
        };
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
                return pause(cand);
            }
            if tail[..4] == idb {
                let next_abs = self.pos + cand as u64 + 5;
                match self.plausible_next(&buf[cand + 5..], next_abs, eof) {
                    Tri::Yes => {
                        let r = self.check_unambiguous(buf, id, cand, eof);
                        if let Ok(None) = r {
                            return pause(cand);
                        }
                        return r;
                    }
                    Tri::NeedMore => return pause(cand),
                    Tri::No => {}
                }
            }
            from = cand + 1;
        }
        if !eof {
            self.scan_resume.set((self.pos, id, buf.len()));
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

    /// A footer candidate at `cand` reads well. Without a vmdesc nothing
    /// says the guest did not write it: if a second candidate for the same
    /// section within [`Limits::ambiguity_window`] bytes also reads well,
    /// the stream has two readings and the decoder refuses to pick one.
    fn check_unambiguous(
        &self,
        buf: &[u8],
        id: u32,
        cand: usize,
        eof: bool,
    ) -> Result<Option<usize>, nom::Err<PErr>> {
        let wend = cand + 5 + self.limits.ambiguity_window;
        if buf.len() < wend && !eof {
            return Ok(None);
        }
        let w = &buf[..buf.len().min(wend)];
        let weof = eof && w.len() == buf.len();
        let idb = id.to_be_bytes();
        let mut from = cand + 1;
        while let Some(k) = w[from..].iter().position(|&b| b == section::FOOTER) {
            let c2 = from + k;
            if w.len() >= c2 + 5 && w[c2 + 1..c2 + 5] == idb {
                let abs = self.pos + c2 as u64 + 5;
                if let Tri::Yes = self.plausible_next(&w[c2 + 5..], abs, weof) {
                    return Err(PErr::at(
                        buf,
                        WireError::Ambiguous {
                            offset: 0,
                            why: format!(
                                "device section {id} has no vmdesc length and could end at offset {} or at offset {} (footer-like bytes inside device state); give the vmdesc of this QEMU and machine type",
                                self.pos + cand as u64,
                                self.pos + c2 as u64
                            ),
                        },
                    ));
                }
            }
            from = c2 + 1;
        }
        Ok(Some(cand))
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
                    if v <= 0xffff && self.section_rule(&h).is_ok() {
                        Tri::Yes
                    } else {
                        Tri::No
                    }
                }
            },
            section::PART | section::END => match section::parse_section_header(rest) {
                Err(nom::Err::Incomplete(_)) if !eof => Tri::NeedMore,
                Ok((_, h)) if self.section_rule(&h).is_ok() => Tri::Yes,
                _ => Tri::No,
            },
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

    /// Updates the mapped-ram state after `m` (already checked by decode).
    fn commit_mapped(&mut self, m: &MappedRam<'_>) {
        let pos = self.pos;
        match m {
            MappedRam::MemSize { total } => {
                self.mapped = Some(MappedState {
                    total: *total,
                    sum: 0,
                    region: None,
                })
            }
            MappedRam::Block { block, header } => {
                let ps = self.ram.page_size() as u64;
                let max = self.limits.max_device_section as u64;
                if let Some(st) = self.mapped.as_mut() {
                    let r = mapped_ram::check_block(
                        block, header, pos, ps, st.total, st.sum, max, None,
                    )
                    .ok();
                    st.sum = st.sum.saturating_add(block.used_length);
                    st.region = r.filter(|r| r.end > pos);
                }
            }
            MappedRam::Bitmap(_) | MappedRam::Padding(_) | MappedRam::Pages { .. } => {
                if let Some(st) = self.mapped.as_mut() {
                    if st.region.is_some_and(|r| pos >= r.end) {
                        st.region = None;
                    }
                }
            }
        }
    }

    /// The current mapped-ram file region (after a block entry, until its
    /// last byte is read), if any.
    pub fn mapped_ram_region(&self) -> Option<Region> {
        self.mapped.and_then(|m| m.region)
    }

    /// Moves past an item returned by [`Decoder::decode`] (with its length).
    pub fn commit(&mut self, item: &Item<'_>, len: usize) {
        let start = self.pos;
        self.pos += len as u64;
        // No configuration section: the header is followed by sections.
        if self.phase == Phase::Config {
            let has = matches!(item, Item::Configuration(_));
            self.has_configuration = Some(has);
            if !has {
                self.phase = Phase::Top;
            }
        }
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
                    self.set_page_bits(b, PageSizeSource::Configuration);
                } else if self.page_source.is_none() {
                    if let Some(b) = target_page::machine_page_bits(c.machine) {
                        self.set_page_bits(b, PageSizeSource::MachineType);
                    }
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
                self.scan_once = false;
                self.section_kind = h.kind;
                if h.kind == SectionKind::End {
                    self.ended.insert(h.section_id);
                }
                let is_ram = self
                    .sections
                    .get(&h.section_id)
                    .is_some_and(|s| s.idstr == "ram");
                if is_ram {
                    self.ram_section = if h.kind == SectionKind::End {
                        RamSection::Ended
                    } else {
                        RamSection::Open
                    };
                }
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
                    if self.phase == Phase::RamChannel {
                        self.phase = Phase::Done;
                    }
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
                self.scan_once = false;
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
                Command::PostcopyRun => self.postcopy_run = true,
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
            Item::MappedRam(m) => self.commit_mapped(m),
        }
    }
}
