//! Conversion of a captured migration stream into one single-pass precopy
//! stream that holds each page's final content once: [`Converter`].
//!
//! The input is any stream the destination state machine
//! ([`qmig_ram_dst::RamDst`]) applies: precopy or postcopy, several passes,
//! XBZRLE, COMPRESS_PAGE, postcopy discards. It is applied to a
//! [`GuestMemory`] (the final RAM image); everything that is not RAM is kept
//! byte for byte in spool files, so memory stays bounded by the RAM image.
//! [`Converter::finish`] then writes:
//!
//! ```text
//! header, configuration, [early device sections]      (as in the input)
//! ram START { MEM_SIZE, EOS } [footer]                 (section header as in the input)
//! [other iterative sections' items, in input order]
//! ram PART { ZERO | PAGE ..., EOS } [footer]  ×n        (each page once, in block order)
//! [SWITCHOVER_START]                                   (when the input had it)
//! ram END { EOS } [footer]
//! device sections, EOF, [vmdesc]                       (as in the input)
//! ```
//!
//! With [`Format::MappedRam`], [`Converter::finish_mapped_ram`] writes the
//! same items as a mapped-ram file instead (wire-format §14; the `ram`
//! START section carries each block's header, bitmap and page area, written
//! by [`crate::mapped::MappedRamWriter`], and no PART section), with
//! `mapped-ram` listed in the configuration. A mapped-ram input is read like
//! any other: every page of its page areas is applied (a clear bit as a
//! zero page), and for stream output its MEM_SIZE list is written without
//! the block headers and `mapped-ram` leaves the configuration.
//!
//! What changes, and why (QEMU 10's loader, `ram_load_precopy` and
//! `loadvm_process_command`, is the reference):
//! - Page records are ZERO (all-zero page; left out with
//!   [`ZeroPages::Skip`]) or PAGE, never XBZRLE or COMPRESS_PAGE (QEMU 9.1
//!   removed the latter). A MULTIFD_FLUSH record is refused (QEMU ≥ 8.2
//!   writes it only with multifd, whose pages are not in this stream)
//!   unless [`Options::multifd_channels`] says the caller applies the
//!   channels' pages (through [`Converter::dst_mut`]): it is then dropped,
//!   and the output is a plain precopy stream without multifd.
//! - A capture set of several connections is fed as the connection walk
//!   (`qmig_wire::connections::walk`) orders it: each recovery connection's
//!   items after its handshake (RECV_BITMAP, POSTCOPY_RESUME, which the
//!   caller leaves out) with [`Converter::handle`], preempt channels'
//!   records with [`Converter::handle_preempt`]. Every page the state
//!   machine marks received (multifd and preempt pages too) is written.
//! - Pages the input never sends nor discards are not written: the
//!   destination keeps its own content there, as it would loading the input
//!   (e.g. the shared blocks of `x-ignore-shared`, which QEMU refuses pages for).
//! - Commands of a live session are dropped: OPEN_RETURN_PATH and PING (a
//!   `file:` destination has no return path, and QEMU fails the load on
//!   OPEN_RETURN_PATH there), POSTCOPY_ADVISE, POSTCOPY_RAM_DISCARD
//!   (applied), POSTCOPY_LISTEN/RUN. A postcopy input's PACKAGED device
//!   sections become the precopy device sections after `ram` END, followed
//!   by EOF; such an input has no vmdesc and the output gets none.
//! - Without POSTCOPY_ADVISE, QEMU reads no page-size field in MEM_SIZE, so
//!   those fields are removed (the record is otherwise kept byte for byte).
//!
//! ```
//! use qmig_ram_dst::VecMemory;
//! use qmig_ram_src::convert::{Converter, Options};
//! use qmig_wire::StreamReader;
//! # let stream = qmig_ram_src::template::tests_support::tiny_template();
//! let dir = std::env::temp_dir().join(format!("qmig-convert-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let mut conv = Converter::new(VecMemory::new(), &dir, Options::default())?;
//! let mut rd = StreamReader::new(&stream[..]);
//! while let Some(ri) = rd.next_item()? {
//!     conv.handle(&ri)?;
//! }
//! let mut out = Vec::new();
//! let report = conv.finish(&mut out)?;
//! assert_eq!(report.output.zero, 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use qmig_ram_dst::{
    Config as DstConfig, Event, GuestMemory, Layout, PageBitmap, RamDst, RamDstError,
};
use qmig_wire::section::write_footer;
use qmig_wire::{
    Command, Item, MappedRam, MemBlock, RamBody, RamRecord, ReadItem, SectionHeader, SectionKind,
    WireError,
};

use crate::mapped::{BlockBytes, MappedRamWriter};
use crate::zero::is_zero;

/// What the output does with pages whose final content is all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPages {
    /// A ZERO record (QEMU's `zero-page-detection=legacy`): the destination
    /// ends with zeros whatever it held.
    #[default]
    Zero,
    /// No record: only right when the destination's RAM starts zeroed (a
    /// fresh QEMU `-incoming`, whose firmware blocks hold the same images).
    Skip,
}

/// The form of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// A record stream ([`Converter::finish`]): what `migrate file:`,
    /// `exec:` or a socket carry.
    #[default]
    Stream,
    /// A mapped-ram file ([`Converter::finish_mapped_ram`]; wire-format
    /// §14): the configuration lists `mapped-ram`, pages sit at fixed file
    /// offsets, and QEMU loads it with that capability on.
    MappedRam,
}

/// Options of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Zero pages: ZERO records or nothing (a mapped-ram file never holds
    /// them: their bit stays clear).
    pub zero_pages: ZeroPages,
    /// The output's form; it decides whether the configuration lists
    /// `mapped-ram`.
    pub format: Format,
    /// Largest `ram` PART section payload written, in bytes (QEMU's own
    /// sections are bounded by its rate limit; the loader has no limit).
    pub section_bytes: usize,
    /// The input's multifd channels are applied by the caller (through
    /// [`Converter::dst_mut`], e.g. with `qmig_ram_dst::multifd_offline::
    /// OfflineChannels::before_item` before each main-stream item): the main
    /// stream's MULTIFD_FLUSH records are then sync points, dropped from the
    /// output, instead of refused.
    pub multifd_channels: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            zero_pages: ZeroPages::Zero,
            format: Format::Stream,
            section_bytes: 16 << 20,
            multifd_channels: false,
        }
    }
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The input does not parse.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The destination state machine refused an input item.
    #[error(transparent)]
    Dst(#[from] RamDstError),
    /// The input is valid but cannot be converted (the rule is named).
    #[error("stream offset {offset}: cannot convert: {why}")]
    Unsupported {
        /// Stream offset of the item.
        offset: u64,
        /// What is not supported.
        why: String,
    },
    /// The input ended before its EOF byte: an incomplete migration.
    #[error(
        "the stream ends at offset {offset} without EOF (incomplete migration); nothing written"
    )]
    Incomplete {
        /// Stream offset where the input ended.
        offset: u64,
    },
    /// Writing the mapped-ram output failed.
    #[error(transparent)]
    MappedRam(#[from] crate::mapped::MappedRamWriteError),
    /// Reading or writing the spool files, the memory or the output failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        what: what.to_string(),
        source,
    }
}

/// Record counts of one side of the conversion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    /// ZERO records.
    pub zero: u64,
    /// PAGE records.
    pub page: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
}

impl Kinds {
    /// All page records.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.zero + self.page + self.xbzrle + self.compressed
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Page records of the input.
    pub input: Kinds,
    /// Page records written.
    pub output: Kinds,
    /// Target pages dropped by the input's postcopy discards.
    pub discarded_pages: u64,
    /// All-zero pages left out ([`ZeroPages::Skip`]).
    pub skipped_zero_pages: u64,
    /// Pages the input never sent nor discarded (not written).
    pub untouched_pages: u64,
    /// Input stream length in bytes (the QEMU stream, without containers).
    pub input_stream_bytes: u64,
    /// Output stream length in bytes (before any compression).
    pub output_stream_bytes: u64,
    /// Commands of the input left out, by QEMU name, with counts.
    pub dropped_commands: BTreeMap<&'static str, u64>,
    /// Whether the input was a postcopy stream (PACKAGED).
    pub postcopy: bool,
    /// Whether a vmdesc was copied.
    pub vmdesc: bool,
    /// RAM blocks: name, used length.
    pub blocks: Vec<(String, u64)>,
    /// Target page size in bytes.
    pub page_size: u64,
}

/// Non-RAM bytes kept in a file until the output is assembled.
#[derive(Debug)]
struct Spool {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
}

impl Spool {
    fn create(dir: &Path, name: &str) -> Result<Self, ConvertError> {
        let path = dir.join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| ConvertError::Io {
                what: path.display().to_string(),
                source,
            })?;
        Ok(Spool {
            path,
            out: BufWriter::with_capacity(1 << 16, f),
            bytes: 0,
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<(), ConvertError> {
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(io_err("spool file"))
    }

    /// Copies the spooled bytes to `out`; returns how many.
    fn copy_to(&mut self, out: &mut dyn Write) -> Result<u64, ConvertError> {
        self.out.flush().map_err(io_err("spool file"))?;
        let f = self.out.get_mut();
        f.seek(SeekFrom::Start(0)).map_err(io_err("spool file"))?;
        let mut r = BufReader::with_capacity(1 << 16, f.take(self.bytes));
        let n = io::copy(&mut r, out).map_err(io_err("output"))?;
        if n != self.bytes {
            return Err(ConvertError::Io {
                what: self.path.display().to_string(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "spool file shrank"),
            });
        }
        Ok(n)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the input is, relative to the `ram` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// Before `ram` START: items go to the prefix.
    Prefix,
    /// Between `ram` START and `ram` END: other items go to the middle.
    Middle,
    /// After the `ram` END section: items go to the tail.
    Tail,
}

/// The converter: feed it every item of the input with
/// [`handle`](Self::handle), then call [`finish`](Self::finish) once.
/// See the module documentation for what it writes.
#[derive(Debug)]
pub struct Converter<M> {
    dst: RamDst<M>,
    opts: Options,
    at: Where,
    /// Section id of `ram`.
    ram_id: Option<u32>,
    /// The `ram` START section header, as read.
    ram_start: Vec<u8>,
    /// The MEM_SIZE record to write.
    mem_size: Vec<u8>,
    /// The input's MEM_SIZE list: name, used length, guest address.
    mem_blocks: Vec<(String, u64, Option<u64>)>,
    /// The input is a mapped-ram file.
    mapped_input: bool,
    /// The input has a configuration section.
    configuration: bool,
    /// Block of the mapped-ram region being read.
    mapped_block: Option<usize>,
    /// Whether `ram` sections carry footers.
    footers: bool,
    /// Inside a `ram` section's payload (header seen, EOS not yet).
    in_ram_payload: bool,
    /// A `ram` section's EOS was seen: a footer with its id may follow.
    ram_footer_next: bool,
    /// The `ram` section being read is END.
    ram_end: bool,
    /// Inside a PACKAGED blob.
    in_package: bool,
    switchover_start: bool,
    prefix: Spool,
    middle: Spool,
    tail: Spool,
    /// Per block: pages the input sent or discarded.
    touched: Vec<PageBitmap>,
    /// Block of the previous page record (what CONTINUE refers to).
    last_block: Option<usize>,
    dropped: BTreeMap<&'static str, u64>,
    postcopy: bool,
    eof: bool,
    vmdesc: bool,
    end_offset: u64,
    scratch: Vec<u8>,
}

impl<M: GuestMemory> Converter<M> {
    /// A converter applying RAM to `memory` (it ends holding the final RAM
    /// image) and spooling non-RAM bytes to files in `spool_dir` (which must
    /// exist; the files are removed when the converter is dropped).
    ///
    /// # Errors
    /// [`ConvertError::Io`] when a spool file cannot be created;
    /// [`ConvertError::Dst`] from [`RamDst::new`].
    pub fn new(memory: M, spool_dir: &Path, opts: Options) -> Result<Self, ConvertError> {
        let cfg = DstConfig {
            layout: Layout::Adopt,
            ..DstConfig::default()
        };
        Ok(Converter {
            dst: RamDst::new(cfg, memory)?,
            opts,
            at: Where::Prefix,
            ram_id: None,
            ram_start: Vec::new(),
            mem_size: Vec::new(),
            mem_blocks: Vec::new(),
            mapped_input: false,
            configuration: false,
            mapped_block: None,
            footers: false,
            in_ram_payload: false,
            ram_footer_next: false,
            ram_end: false,
            in_package: false,
            switchover_start: false,
            prefix: Spool::create(spool_dir, "prefix.spool")?,
            middle: Spool::create(spool_dir, "middle.spool")?,
            tail: Spool::create(spool_dir, "tail.spool")?,
            touched: Vec::new(),
            last_block: None,
            dropped: BTreeMap::new(),
            postcopy: false,
            eof: false,
            vmdesc: false,
            end_offset: 0,
            scratch: Vec::new(),
        })
    }

    /// The destination state machine (memory, blocks, statistics).
    pub fn dst(&self) -> &RamDst<M> {
        &self.dst
    }

    /// The destination state machine, for applying what comes on other
    /// connections than the main one (multifd channels:
    /// [`RamDst::apply_multifd`]). Pages applied this way are written by
    /// [`finish`](Self::finish) like the main stream's: every page the
    /// state machine marks received is in the output.
    pub fn dst_mut(&mut self) -> &mut RamDst<M> {
        &mut self.dst
    }

    /// Takes one item of a postcopy-preempt channel (decoded with
    /// `Decoder::preempt_channel`; `ri.offset` is the offset in that
    /// connection), read where the connection walk
    /// (`qmig_wire::connections::walk`) places it: ZERO and PAGE records
    /// applied with the channel's own last block and host page
    /// ([`RamDst::handle_preempt_item`], QEMU's `ram_load_postcopy` for
    /// the preempt channel). Nothing of the channel is copied to the
    /// output but its pages.
    ///
    /// # Errors
    /// [`ConvertError::Dst`] when the state machine refuses the item
    /// (anything else than a RAM record, or outside postcopy).
    pub fn handle_preempt(&mut self, ri: &ReadItem<'_>) -> Result<(), ConvertError> {
        self.dst.handle_preempt_item(ri.offset, &ri.item)?;
        while let Some(a) = self.dst.poll_event() {
            if let Event::BlockResized { .. } = a {
                self.size_touched();
            }
        }
        Ok(())
    }

    /// Takes one input item, in stream order.
    ///
    /// # Errors
    /// [`ConvertError::Dst`] when the item breaks a rule of QEMU's loader
    /// (nothing is applied after that); [`ConvertError::Unsupported`] for
    /// input that cannot become a precopy stream (RAM records outside a
    /// `ram` section: preempt channel records go to
    /// [`handle_preempt`](Self::handle_preempt); MULTIFD_FLUSH without
    /// [`Options::multifd_channels`]; COLO; a recovery handshake command,
    /// which the caller checks and leaves out); [`ConvertError::Io`] when
    /// spooling fails.
    pub fn handle(&mut self, ri: &ReadItem<'_>) -> Result<(), ConvertError> {
        self.dst.handle_read_item(ri)?;
        while let Some(a) = self.dst.poll_event() {
            if let Event::BlockResized { .. } = a {
                self.size_touched();
            }
        }
        self.end_offset = ri.offset + ri.len as u64;
        let unsupported = |why: String| ConvertError::Unsupported {
            offset: ri.offset,
            why,
        };
        // The footer of a `ram` section.
        if self.ram_footer_next {
            self.ram_footer_next = false;
            let end = self.ram_end;
            if end {
                self.at = Where::Tail;
                self.ram_end = false;
            }
            if let Item::Footer(id) = ri.item {
                if Some(id) == self.ram_id {
                    self.footers = true;
                    return Ok(());
                }
            }
        }
        match &ri.item {
            Item::Section(h) => {
                let info = ri.decoder.sections().get(&h.section_id);
                if info.is_some_and(|s| s.idstr == "ram") {
                    match h.kind {
                        SectionKind::Start | SectionKind::Full => {
                            if self.ram_id.is_some() {
                                return Err(unsupported("a second ram START section".into()));
                            }
                            if h.kind == SectionKind::Full {
                                return Err(unsupported("ram as a FULL section".into()));
                            }
                            self.ram_id = Some(h.section_id);
                            self.ram_start.clear();
                            ri.item.write(&mut self.ram_start)?;
                            self.at = Where::Middle;
                        }
                        SectionKind::Part | SectionKind::End => {
                            if self.ram_id != Some(h.section_id) {
                                return Err(unsupported("ram PART/END before START".into()));
                            }
                            self.ram_end = h.kind == SectionKind::End;
                        }
                    }
                    self.in_ram_payload = true;
                    return Ok(());
                }
                self.keep(&ri.item)
            }
            Item::MappedRam(m) => {
                self.mapped_input = true;
                match m {
                    MappedRam::MemSize { .. } => self.mem_blocks.clear(),
                    MappedRam::Block { block, .. } => {
                        self.mem_blocks.push((
                            block.name.to_string(),
                            block.used_length,
                            block.addr,
                        ));
                        self.size_touched();
                        self.mapped_block = self.dst.block_index(block.name);
                    }
                    // Every page of the area is read: a clear bit is a
                    // page QEMU found zero (`duplicate`), as a ZERO record.
                    MappedRam::Pages { first, data } => {
                        let tps = self.dst.page_size().max(1);
                        if let Some(t) = self.mapped_block.and_then(|b| self.touched.get_mut(b)) {
                            t.set_range(*first, data.len() as u64 / tps);
                        }
                    }
                    MappedRam::Bitmap(_) | MappedRam::Padding(_) => {}
                }
                Ok(())
            }
            Item::Ram(rec) => {
                if !self.in_ram_payload {
                    return Err(unsupported(format!(
                        "{} record outside a ram section (postcopy-preempt or multifd channel data)",
                        rec.kind().name()
                    )));
                }
                match &rec.body {
                    RamBody::MemSize(blocks) => {
                        self.mem_blocks = blocks
                            .iter()
                            .map(|b| (b.name.to_string(), b.used_length, b.addr))
                            .collect();
                        self.mem_size.clear();
                        if blocks.iter().any(|b| b.page_size.is_some()) {
                            let list: Vec<MemBlock<'_>> = blocks
                                .iter()
                                .map(|b| MemBlock {
                                    page_size: None,
                                    ..*b
                                })
                                .collect();
                            RamRecord::mem_size(list).write(&mut self.mem_size)?;
                        } else {
                            rec.write(&mut self.mem_size)?;
                        }
                        self.size_touched();
                    }
                    RamBody::Eos => {
                        self.in_ram_payload = false;
                        self.ram_footer_next = true;
                    }
                    RamBody::Zero { .. }
                    | RamBody::Page(_)
                    | RamBody::Xbzrle(_)
                    | RamBody::Compressed(_) => {
                        if let Some(n) = rec.block {
                            self.last_block = self.dst.block_index(n);
                        }
                        let tps = self.dst.page_size().max(1);
                        if let Some(t) = self.last_block.and_then(|b| self.touched.get_mut(b)) {
                            t.set(rec.offset / tps);
                        }
                    }
                    RamBody::MultifdFlush if self.opts.multifd_channels => {
                        *self.dropped.entry("MULTIFD_FLUSH").or_default() += 1;
                    }
                    RamBody::MultifdFlush => {
                        // QEMU >= 8.2 writes it only with multifd, whose pages
                        // travel on other connections this stream lacks: a
                        // conversion would silently miss them.
                        return Err(unsupported(
                            "MULTIFD_FLUSH: a multifd migration (its pages are on other \
                             connections, not in this stream; QEMU 8.1 also writes it \
                             without multifd)"
                                .into(),
                        ));
                    }
                    RamBody::Hook => {}
                }
                Ok(())
            }
            Item::Command(c) => {
                match c {
                    Command::Packaged { .. } => {
                        self.postcopy = true;
                        self.in_package = true;
                    }
                    Command::SwitchoverStart => {
                        self.switchover_start = true;
                        return Ok(());
                    }
                    Command::RamDiscard(d) => {
                        if let Some(b) = self.dst.block_index(d.block) {
                            let tps = self.dst.page_size();
                            if let Some(t) = self.touched.get_mut(b) {
                                for r in &d.ranges {
                                    t.set_range(r.start / tps, r.len / tps);
                                }
                            }
                        }
                    }
                    Command::OpenReturnPath
                    | Command::Ping(_)
                    | Command::PostcopyAdvise(_)
                    | Command::PostcopyListen
                    | Command::PostcopyRun => {}
                    other => {
                        return Err(unsupported(format!(
                            "command {} has no place in a precopy file",
                            other.name()
                        )))
                    }
                }
                *self.dropped.entry(c.name()).or_default() += 1;
                Ok(())
            }
            Item::PackageEnd => {
                self.in_package = false;
                Ok(())
            }
            Item::Eof => {
                self.eof = true;
                self.tail_item(&ri.item)
            }
            Item::Vmdesc(_) => {
                self.vmdesc = true;
                self.tail_item(&ri.item)
            }
            Item::Configuration(c) => {
                self.configuration = true;
                let mapped = self.opts.format == Format::MappedRam;
                if c.has_capability("mapped-ram") == mapped {
                    return self.keep(&ri.item);
                }
                let mut c = c.clone();
                c.set_capability("mapped-ram", mapped);
                self.keep(&Item::Configuration(c))
            }
            Item::Header { .. } => self.keep(&ri.item),
            Item::DeviceData(_) | Item::Footer(_) => self.keep(&ri.item),
        }
    }

    /// Appends the end of the RAM section to `buf`: SWITCHOVER_START when the
    /// input had it, the RAM section's END header, its EOS record and (when the
    /// stream has footers) its footer.
    ///
    /// # Errors
    /// [`ConvertError::Wire`] if a record cannot be written.
    fn write_ram_end(&self, buf: &mut Vec<u8>, ram_id: u32) -> Result<(), ConvertError> {
        if self.switchover_start {
            Command::SwitchoverStart.write(buf)?;
        }
        SectionHeader {
            kind: SectionKind::End,
            section_id: ram_id,
            ident: None,
        }
        .write(buf)?;
        RamRecord::eos().write(buf)?;
        if self.footers {
            write_footer(buf, ram_id);
        }
        Ok(())
    }

    /// Writes the output stream to `out` (see the module documentation) and
    /// reports what was converted. The memory is left holding the final RAM
    /// image (as [`GuestMemory::read`] gives it: pages are read one at a
    /// time through it, so a memory may keep them elsewhere, e.g. in the
    /// mapped input).
    ///
    /// # Errors
    /// [`ConvertError::Incomplete`] when the input has not reached its EOF;
    /// [`ConvertError::Io`] when reading the memory or the spool files, or
    /// writing `out`, fails; [`ConvertError::Wire`] if a record cannot be
    /// written (not expected: every record is one the reader accepted).
    pub fn finish(&mut self, out: &mut dyn Write) -> Result<Report, ConvertError> {
        let mut report = self.start_report()?;
        if self.mapped_input {
            // The record-stream MEM_SIZE: the same list without headers.
            let list: Vec<MemBlock<'_>> = self
                .mem_blocks
                .iter()
                .map(|(name, used_length, addr)| MemBlock {
                    name,
                    used_length: *used_length,
                    page_size: None,
                    addr: *addr,
                })
                .collect();
            let mut m = Vec::new();
            RamRecord::mem_size(list).write(&mut m)?;
            self.mem_size = m;
        }
        let mut n = self.prefix.copy_to(out)?;
        let Some(ram_id) = self.ram_id else {
            // No RAM at all: the input's items, as they were.
            n += self.middle.copy_to(out)?;
            n += self.tail.copy_to(out)?;
            report.output_stream_bytes = n;
            return Ok(report);
        };
        let footer = |buf: &mut Vec<u8>| {
            if self.footers {
                write_footer(buf, ram_id);
            }
        };
        let mut buf = Vec::with_capacity(self.opts.section_bytes.min(64 << 20) + (1 << 16));
        buf.extend_from_slice(&self.ram_start);
        buf.extend_from_slice(&self.mem_size);
        RamRecord::eos().write(&mut buf)?;
        footer(&mut buf);
        write_all(out, &mut buf, &mut n)?;
        n += self.middle.copy_to(out)?;

        let part = SectionHeader {
            kind: SectionKind::Part,
            section_id: ram_id,
            ident: None,
        };
        let tps = self.dst.page_size();
        let page = usize::try_from(tps).map_err(|_| ConvertError::Unsupported {
            offset: 0,
            why: format!("target page size {tps}"),
        })?;
        let chunk = (1usize << 20).max(page);
        let names: Vec<(String, u64)> = report.blocks.clone();
        let mut last: Option<usize> = None;
        let mut open = false;
        for (b, (name, len)) in names.iter().enumerate() {
            let Some(touched) = self.touched.get(b) else {
                continue;
            };
            let mut off = 0u64;
            while off < *len {
                let n_bytes = ((*len - off).min(chunk as u64)) as usize;
                let first = off / tps;
                let pages = (n_bytes / page) as u64;
                if !touched.any_in_range(first, pages) {
                    report.untouched_pages += pages;
                    off += n_bytes as u64;
                    continue;
                }
                for i in 0..pages {
                    let p = first + i;
                    if !touched.get(p) {
                        report.untouched_pages += 1;
                        continue;
                    }
                    // One page at a time through `read`: a memory that refers
                    // to the input's pages gives them without a copy.
                    let pg = self
                        .dst
                        .memory_mut()
                        .read(b, p * tps, page)
                        .map_err(io_err("RAM image"))?;
                    let zero = is_zero(pg);
                    if zero && self.opts.zero_pages == ZeroPages::Skip {
                        report.skipped_zero_pages += 1;
                        continue;
                    }
                    if !open {
                        part.write(&mut buf)?;
                        open = true;
                    }
                    let block = (last != Some(b)).then_some(name.as_str());
                    last = Some(b);
                    if zero {
                        RamRecord::zero(p * tps, block).write(&mut buf)?;
                        report.output.zero += 1;
                    } else {
                        RamRecord::page(p * tps, block, pg).write(&mut buf)?;
                        report.output.page += 1;
                    }
                    if buf.len() >= self.opts.section_bytes {
                        RamRecord::eos().write(&mut buf)?;
                        footer(&mut buf);
                        open = false;
                        write_all(out, &mut buf, &mut n)?;
                    }
                }
                off += n_bytes as u64;
            }
        }
        if open {
            RamRecord::eos().write(&mut buf)?;
            footer(&mut buf);
        }
        self.write_ram_end(&mut buf, ram_id)?;
        write_all(out, &mut buf, &mut n)?;
        n += self.tail.copy_to(out)?;
        out.flush().map_err(io_err("output"))?;
        report.output_stream_bytes = n;
        Ok(report)
    }

    /// Writes the output as a mapped-ram file (wire-format §14) to `out`
    /// and reports what was converted; gives `out` back. The layout is the
    /// one QEMU 10 writes for `migrate file:` with `mapped-ram`: the
    /// prefix (header, configuration listing `mapped-ram`, early device
    /// sections), the `ram` START section whose MEM_SIZE entries each carry
    /// a block header, bitmap and page area ([`MappedRamWriter`]), EOS;
    /// other iterative sections' items; SWITCHOVER_START if the input had
    /// it; `ram` END with an EOS; device sections, EOF and vmdesc as for
    /// [`finish`](Self::finish). A page the input sent (or discarded) whose
    /// final content is not all zero is written with its bit set; zero
    /// pages and pages never sent keep their bit clear, as QEMU's loader
    /// then leaves them as the destination has them. Build the converter
    /// with [`Format::MappedRam`] so the configuration lists the capability.
    ///
    /// # Errors
    /// As [`finish`](Self::finish), plus [`ConvertError::MappedRam`] when
    /// the file cannot be laid out or written, and
    /// [`ConvertError::Unsupported`] for an input without a configuration
    /// section (nothing is written then).
    pub fn finish_mapped_ram<W: Write + Seek>(
        &mut self,
        out: W,
    ) -> Result<(Report, W), ConvertError> {
        let mut report = self.start_report()?;
        if !self.configuration {
            return Err(ConvertError::Unsupported {
                offset: 8,
                why: "the input has no configuration section (send-configuration=off), where a \
                      mapped-ram file must list the capability for QEMU and readers to find \
                      its layout"
                    .into(),
            });
        }
        let tps = self.dst.page_size();
        let mut w = MappedRamWriter::new(out, tps)?;
        self.prefix.copy_to(&mut w)?;
        let Some(ram_id) = self.ram_id else {
            self.middle.copy_to(&mut w)?;
            self.tail.copy_to(&mut w)?;
            report.output_stream_bytes = w.position();
            return Ok((report, w.finish()?));
        };
        let mut buf = Vec::new();
        let footer = |buf: &mut Vec<u8>| {
            if self.footers {
                write_footer(buf, ram_id);
            }
        };
        w.write_stream(&self.ram_start)?;
        let total = self.mem_blocks.iter().map(|b| b.1).sum();
        w.mem_size(total)?;
        for (name, used_length, addr) in &self.mem_blocks {
            let index = self
                .dst
                .block_index(name)
                .ok_or_else(|| ConvertError::Unsupported {
                    offset: w.position(),
                    why: format!("MEM_SIZE block \"{name}\" is not among the blocks loaded"),
                })?;
            let block = MemBlock {
                name,
                used_length: *used_length,
                page_size: None,
                addr: *addr,
            };
            let touched = self.touched.get(index);
            let keep = |p: u64| touched.is_some_and(|t| t.get(p));
            let mut src = MemBytes {
                mem: self.dst.memory_mut(),
                index,
            };
            let c = w.block(&block, &mut src, &keep)?;
            report.output.page += c.written;
            report.output.zero += c.zero;
            report.untouched_pages += c.left_out;
        }
        RamRecord::eos().write(&mut buf)?;
        footer(&mut buf);
        w.write_stream(&buf)?;
        buf.clear();
        self.middle.copy_to(&mut w)?;
        self.write_ram_end(&mut buf, ram_id)?;
        w.write_stream(&buf)?;
        self.tail.copy_to(&mut w)?;
        report.output_stream_bytes = w.position();
        Ok((report, w.finish()?))
    }

    /// Checks the input is complete, flushes the RAM image and fills in
    /// what the input was.
    fn start_report(&mut self) -> Result<Report, ConvertError> {
        if !self.eof {
            return Err(ConvertError::Incomplete {
                offset: self.end_offset,
            });
        }
        self.dst.memory_mut().flush().map_err(io_err("RAM image"))?;
        self.touch_received();
        let st = *self.dst.stats();
        Ok(Report {
            postcopy: self.postcopy,
            vmdesc: self.vmdesc,
            dropped_commands: self.dropped.clone(),
            input_stream_bytes: self.end_offset,
            page_size: self.dst.page_size(),
            input: Kinds {
                zero: st.zero,
                page: st.page,
                xbzrle: st.xbzrle,
                compressed: st.compressed,
            },
            discarded_pages: st.discarded_pages,
            blocks: self
                .dst
                .blocks()
                .iter()
                .map(|b| (b.name().to_string(), b.used_length()))
                .collect(),
            ..Report::default()
        })
    }

    /// Marks touched every page the state machine received: the pages of
    /// multifd and preempt channels, which the main stream's bookkeeping
    /// (`touched`) does not see.
    fn touch_received(&mut self) {
        self.size_touched();
        for (i, b) in self.dst.blocks().iter().enumerate() {
            let (Some(t), r) = (self.touched.get_mut(i), b.received()) else {
                continue;
            };
            let n = r.len().min(t.len());
            let mut p = 0;
            while let Some(q) = r.next_set(p, n) {
                t.set(q);
                p = q + 1;
            }
        }
    }

    /// Gives every block a touched bitmap of its current length.
    fn size_touched(&mut self) {
        let tps = self.dst.page_size().max(1);
        for (i, b) in self.dst.blocks().iter().enumerate() {
            let bits = b.used_length() / tps;
            match self.touched.get_mut(i) {
                Some(t) => {
                    if t.len() != bits {
                        t.resize(bits);
                    }
                }
                None => self.touched.push(PageBitmap::new(bits)),
            }
        }
    }

    /// Spools a non-RAM item where it belongs.
    fn keep(&mut self, item: &Item<'_>) -> Result<(), ConvertError> {
        self.scratch.clear();
        item.write(&mut self.scratch)?;
        let spool = if self.in_package {
            &mut self.tail
        } else {
            match self.at {
                Where::Prefix => &mut self.prefix,
                Where::Middle => &mut self.middle,
                Where::Tail => &mut self.tail,
            }
        };
        spool.write(&self.scratch)
    }

    fn tail_item(&mut self, item: &Item<'_>) -> Result<(), ConvertError> {
        self.scratch.clear();
        item.write(&mut self.scratch)?;
        self.tail.write(&self.scratch)
    }
}

/// One block of a [`GuestMemory`], for the mapped-ram writer.
struct MemBytes<'m, M> {
    mem: &'m mut M,
    index: usize,
}

impl<M: GuestMemory> BlockBytes for MemBytes<'_, M> {
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        self.mem.read(self.index, offset, len)
    }
}

/// Writes `buf` to `out`, counts it into `n` and clears it.
fn write_all(out: &mut dyn Write, buf: &mut Vec<u8>, n: &mut u64) -> Result<(), ConvertError> {
    out.write_all(buf).map_err(io_err("output"))?;
    *n += buf.len() as u64;
    buf.clear();
    Ok(())
}
