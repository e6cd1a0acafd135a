//! `qmig extract`: replay the RAM records of a stream into raw block images,
//! through the same destination state machine (`qmig-ram-dst`) that `qmig recv`
//! uses on a live stream.
//!
//! Every record is applied whole or not at all (the state machine checks it
//! before memory is touched), so a corrupt stream leaves each page with either
//! its old or its new content. The manifest records how far the stream was
//! applied. Non-RAM state is kept beside the images: `device-state.bin` (the
//! bytes of every non-RAM section, and everything after the RAM END section up
//! to and including the EOF byte) and `vmdesc.json`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qmig_phys::image::ImageFormat;
use qmig_ram_dst::{
    Config, Event, FileMemory, GuestMemory, ImageFile, Layout, MappedInput, Placement, RamDst,
    RamDstError,
};
use qmig_wire::{Item, ReadItem, SectionKind, SliceReader, StreamReader, WireError};

use crate::error::{CliError, CliResult};
use crate::manifest::{
    self, BlockEntry, DeviceSection, Leniency, Manifest, RecordCounts, RecvInfo,
};

/// Why applying a stream stopped.
#[derive(Debug)]
pub(crate) enum StopError {
    /// The stream does not parse.
    Wire(WireError),
    /// The state machine refused an item (or the images could not be written).
    Dst(RamDstError),
    /// Writing an output file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Stream offset of the item being handled.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer misbehaved (sent nothing, or read nothing on the return
    /// path, for `--idle-timeout`).
    Peer {
        /// What the peer did, naming the option.
        message: String,
        /// Stream offset reached.
        offset: u64,
    },
    /// SIGINT or SIGTERM.
    Interrupted(i32),
    /// The postcopy host (userfaultfd, fault handling) failed or refused
    /// the stream.
    Postcopy(String),
    /// A multifd channel broke a rule (its offset is in that channel, or
    /// in the main stream for the sync pairing).
    Multifd(qmig_ram_dst::multifd::MultifdError),
}

impl std::fmt::Display for StopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopError::Wire(e) => write!(f, "{e}"),
            StopError::Dst(e) => write!(f, "{e}"),
            StopError::Io {
                path,
                op,
                offset,
                source,
            } => write!(
                f,
                "{}: {op} at stream offset {offset}: {source}",
                path.display()
            ),
            StopError::Peer { message, .. } => write!(f, "{message}"),
            StopError::Interrupted(sig) => {
                write!(f, "interrupted by {}", crate::error::signal_name(*sig))
            }
            StopError::Postcopy(e) => write!(f, "postcopy: {e}"),
            StopError::Multifd(e) => write!(f, "{e}"),
        }
    }
}

impl StopError {
    pub(crate) fn offset(&self) -> Option<u64> {
        match self {
            StopError::Wire(e) => Some(e.offset()),
            StopError::Dst(e) => Some(e.offset()),
            StopError::Multifd(e) => Some(e.offset()),
            StopError::Io { offset, .. } | StopError::Peer { offset, .. } => Some(*offset),
            StopError::Interrupted(_) | StopError::Postcopy(_) => None,
        }
    }

    /// The CLI error for this stop: `input` names the stream, `applied`
    /// says how far the images got.
    pub(crate) fn into_cli(self, input: &str, outdir: &Path, applied: u64) -> CliError {
        let detail = format!(
            "images in {} hold the stream applied up to offset {applied}",
            outdir.display()
        );
        match self {
            StopError::Wire(qmig_wire::WireError::Io { offset, source }) => CliError::Io {
                path: input.to_string(),
                op: "read",
                offset: Some(offset),
                source,
            },
            StopError::Wire(e) => CliError::Data {
                message: format!("{input}: {e}; {detail}"),
                offset: Some(e.offset()),
            },
            StopError::Dst(RamDstError::Memory { offset, source }) => CliError::Io {
                path: outdir.display().to_string(),
                op: "writing block images",
                offset: Some(offset),
                source,
            },
            StopError::Dst(e) => CliError::Data {
                message: format!("{input}: {e}; {detail}"),
                offset: Some(e.offset()),
            },
            StopError::Io {
                path,
                op,
                offset,
                source,
            } => CliError::Io {
                path: path.display().to_string(),
                op,
                offset: Some(offset),
                source,
            },
            StopError::Peer { message, offset } => CliError::Data {
                message: format!("{input}: {message}; {detail}"),
                offset: Some(offset),
            },
            StopError::Postcopy(e) => CliError::Data {
                message: format!("{input}: postcopy: {e}; {detail}"),
                offset: None,
            },
            StopError::Multifd(e) => CliError::Data {
                message: format!("{input}: {e}; {detail}"),
                offset: Some(e.offset()),
            },
            StopError::Interrupted(signal) => CliError::Interrupted {
                signal,
                detail: Some(format!(
                    "{detail}; manifest.json says \"interrupted\": true"
                )),
            },
        }
    }
}

/// How many device sections the manifest lists (the rest are counted): a
/// stream of millions of sections must not grow the manifest without bound.
const MAX_LISTED_SECTIONS: usize = 1000;

/// Non-RAM bytes of the stream, written to `device-state.bin` as they pass.
struct DeviceState {
    out: BufWriter<File>,
    bytes: u64,
    /// The first [`MAX_LISTED_SECTIONS`] device sections, for the manifest.
    sections: Vec<DeviceSection>,
    /// Device sections past those, only counted.
    sections_omitted: u64,
    /// Inside a non-RAM section (header seen, footer not yet).
    in_section: bool,
    /// The RAM END section was seen and its footer not yet.
    ram_end_pending: bool,
    /// Past the RAM END section: every item is device state.
    after_ram_end: bool,
    scratch: Vec<u8>,
}

impl DeviceState {
    fn write_item(&mut self, item: &Item<'_>) -> std::io::Result<()> {
        self.scratch.clear();
        item.write(&mut self.scratch)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.out.write_all(&self.scratch)?;
        self.bytes += self.scratch.len() as u64;
        Ok(())
    }

    fn handle(&mut self, ri: &ReadItem<'_>) -> std::io::Result<()> {
        let item = &ri.item;
        if self.ram_end_pending && !matches!(item, Item::Ram(_)) {
            self.ram_end_pending = false;
            self.after_ram_end = true;
            if matches!(item, Item::Footer(_)) {
                return Ok(());
            }
        }
        match item {
            Item::Section(h) => {
                self.in_section = false;
                let info = ri.decoder.sections().get(&h.section_id);
                let is_ram = info.is_some_and(|s| s.idstr == "ram");
                if is_ram {
                    if h.kind == SectionKind::End {
                        self.ram_end_pending = true;
                    }
                    return Ok(());
                }
                self.in_section = true;
                if self.sections.len() >= MAX_LISTED_SECTIONS {
                    self.sections_omitted += 1;
                    return self.write_item(item);
                }
                self.sections.push(DeviceSection {
                    kind: h.kind.name().to_string(),
                    section_id: h.section_id,
                    idstr: info.map(|s| s.idstr.clone()),
                    instance: info.map(|s| s.instance),
                    version: info.map(|s| s.version),
                    stream_offset: ri.offset,
                    file_offset: self.bytes,
                });
                self.write_item(item)
            }
            Item::DeviceData(_) | Item::Footer(_) if self.in_section => {
                if matches!(item, Item::Footer(_)) {
                    self.in_section = false;
                }
                self.write_item(item)
            }
            Item::Vmdesc(_) | Item::Header { .. } | Item::Configuration(_) => Ok(()),
            _ if self.after_ram_end => self.write_item(item),
            _ => Ok(()),
        }
    }
}

/// Guest memory kept as image files in a directory.
pub(crate) trait Images: GuestMemory {
    /// The images so far.
    fn images(&self) -> Vec<ImageFile>;

    /// Writes what is pending and fsyncs the images.
    fn sync_images(&mut self) -> std::io::Result<()>;
}

impl Images for FileMemory {
    fn images(&self) -> Vec<ImageFile> {
        self.files()
    }

    fn sync_images(&mut self) -> std::io::Result<()> {
        self.sync_all()
    }
}

/// A stream being applied into a directory: block images, device state,
/// vmdesc, manifest. Shared by `extract` and `recv`.
pub(crate) struct Session<M> {
    pub(crate) dst: RamDst<M>,
    outdir: PathBuf,
    writer: &'static str,
    source: String,
    device: DeviceState,
    device_path: PathBuf,
    vmdesc: bool,
    /// Recorded multifd channels applied with the stream (`extract`).
    pub(crate) multifd: Option<crate::multifd_apply::OfflineChannels>,
    /// The machine type of the configuration section, once seen.
    pub(crate) machine: Option<String>,
}

impl<M: Images> Session<M> {
    /// Starts a session writing into `outdir`: marks the directory
    /// incomplete ([`manifest::begin`]) before creating any output.
    pub(crate) fn new(
        outdir: &Path,
        mem: M,
        layout: Layout,
        placement: Placement,
        writer: &'static str,
        source: String,
    ) -> Result<Self, CliError> {
        let cfg = Config {
            layout,
            placement,
            ..Config::default()
        };
        let dst = RamDst::new(cfg, mem).map_err(|e| CliError::Usage(e.to_string()))?;
        manifest::begin(outdir, writer, &source)?;
        let device_path = outdir.join("device-state.bin");
        let f = crate::files::create_fresh(&device_path)?;
        Ok(Session {
            dst,
            outdir: outdir.to_path_buf(),
            writer,
            source,
            device: DeviceState {
                out: BufWriter::with_capacity(1 << 16, f),
                bytes: 0,
                sections: Vec::new(),
                sections_omitted: 0,
                in_section: false,
                ram_end_pending: false,
                after_ram_end: false,
                scratch: Vec::new(),
            },
            device_path,
            vmdesc: false,
            multifd: None,
            machine: None,
        })
    }

    /// Applies one item; events are handed to `on_event`. Placements and
    /// return-path bytes stay queued in `dst` for the caller (with
    /// [`Placement::Apply`] there are none).
    #[inline]
    pub(crate) fn handle(
        &mut self,
        ri: &ReadItem<'_>,
        mut on_event: impl FnMut(Event),
    ) -> Result<(), StopError> {
        if let Some(m) = &mut self.multifd {
            m.before_item(ri, &mut self.dst)
                .map_err(StopError::Multifd)?;
        }
        match &ri.item {
            Item::Ram(_) => self.dst.handle_read_item(ri).map_err(StopError::Dst)?,
            Item::Vmdesc(j) => {
                crate::files::write_atomic(&self.outdir, "vmdesc.json", j).map_err(|e| {
                    let (op, source) = match e {
                        CliError::Io { op, source, .. } => (op, source),
                        other => ("write", std::io::Error::other(other.to_string())),
                    };
                    StopError::Io {
                        path: self.outdir.join("vmdesc.json"),
                        op,
                        offset: ri.offset,
                        source,
                    }
                })?;
                self.vmdesc = true;
                self.dst.handle_read_item(ri).map_err(StopError::Dst)?;
            }
            _ => {
                if let Item::Configuration(c) = &ri.item {
                    self.machine = Some(c.machine.to_string());
                }
                self.dst.handle_read_item(ri).map_err(StopError::Dst)?;
                self.device.handle(ri).map_err(|source| StopError::Io {
                    path: self.device_path.clone(),
                    op: "write",
                    offset: ri.offset,
                    source,
                })?;
            }
        }
        while let Some(e) = self.dst.poll_event() {
            on_event(e);
        }
        Ok(())
    }

    /// Flushes the images and the device state and writes `manifest.json`
    /// (atomically). The first error wins: a stop error is reported before
    /// a flush error, and either before a manifest error. An interrupted
    /// run removes `device-state.bin` (it would hold a cut-off device
    /// state). Returns the error to report, with `input` naming the stream.
    pub(crate) fn finish(
        &mut self,
        result: Result<(), StopError>,
        recv: Option<RecvInfo>,
        input: &str,
    ) -> Result<(), CliError> {
        let at = self.dst.applied_up_to();
        // With `--sync` (Durability::All) the images and the device state
        // reach the disk before the manifest that describes them.
        let sync = crate::files::durability() == crate::files::Durability::All;
        let mem = self.dst.memory_mut();
        let flushed = if sync { mem.sync_images() } else { mem.flush() }
            .map_err(|source| StopError::Dst(RamDstError::Memory { offset: at, source }))
            .and_then(|()| {
                let out = &mut self.device.out;
                out.flush()
                    .and_then(|()| {
                        if sync {
                            out.get_ref().sync_all()
                        } else {
                            Ok(())
                        }
                    })
                    .map_err(|source| StopError::Io {
                        path: self.device_path.clone(),
                        op: "write",
                        offset: at,
                        source,
                    })
            });
        let result = result.and(flushed);
        let err = result.as_ref().err();
        let interrupted = matches!(err, Some(StopError::Interrupted(_)));
        let mut device_state = Some(manifest::DeviceState {
            file: "device-state.bin".into(),
            bytes: self.device.bytes,
            sections: std::mem::take(&mut self.device.sections),
            sections_omitted: self.device.sections_omitted,
        });
        if interrupted && crate::files::remove_if_present(&self.device_path).is_ok() {
            device_state = None;
        }
        let st = self.dst.stats();
        let m = Manifest {
            blocks: self
                .dst
                .memory()
                .images()
                .into_iter()
                .map(|i| BlockEntry {
                    name: i.name,
                    file: Some(i.file_name),
                    length: i.length,
                    max_length: None,
                    page_size: None,
                    resizable: None,
                })
                .collect(),
            writer: Some(self.writer.to_string()),
            source: Some(self.source.clone()),
            complete: err.is_none(),
            in_progress: false,
            interrupted,
            page_size: Some(self.dst.page_size()),
            applied_up_to: Some(at),
            error: err.map(|e| e.to_string()),
            error_offset: err.and_then(|e| e.offset()),
            nonzero_fill_pages: Some(st.nonzero_fill),
            leniencies: Some(leniencies(&self.dst)),
            records: Some(RecordCounts {
                zero: st.zero,
                page: st.page,
                xbzrle: st.xbzrle,
                compressed: st.compressed,
            }),
            postcopy_state: Some(self.dst.postcopy_state().name().to_string()),
            device_state,
            vmdesc: self.vmdesc.then(|| "vmdesc.json".to_string()),
            recv,
        };
        let written = manifest::write(&self.outdir, &m);
        match (result, written) {
            (Ok(()), w) => w,
            (Err(e), Ok(())) => Err(e.into_cli(input, &self.outdir, at)),
            (Err(e), Err(w)) => Err(e
                .into_cli(input, &self.outdir, at)
                .with_note(&format!("the manifest could not be updated: {w}"))),
        }
    }
}

/// The manifest's `leniencies`: what was accepted that QEMU 10's loader
/// refuses, because the stream may come from an older QEMU (see
/// [`qmig_ram_dst::Leniency`]). Empty when qmig was as strict as QEMU 10.
pub(crate) fn leniencies<M: qmig_ram_dst::GuestMemory>(dst: &RamDst<M>) -> Vec<Leniency> {
    let machine = dst
        .machine_version()
        .map(|(a, b)| format!("QEMU {a}.{b}"))
        .unwrap_or_else(|| "no versioned machine type".into());
    dst.leniencies()
        .iter()
        .map(|l| match l {
            qmig_ram_dst::Leniency::NonZeroFill => Leniency {
                kind: "nonzero_zero_fill".into(),
                records: dst.stats().nonzero_fill,
                qemu_rule: "ram_load_precopy/ram_load_postcopy: QEMU >= 8.2 refuses a ZERO record whose fill byte is not 0".into(),
                why_accepted: format!("the stream may predate QEMU 8.2 ({machine}); applied as fills"),
            },
        })
        .collect()
}

/// `extract --format`: a guest-physical image written beside the block
/// images, and the machine facts the stream does not carry.
#[derive(Debug, Default, Clone)]
pub struct PhysArgs {
    /// The image format (`None`: block images only).
    pub format: Option<ImageFormat>,
    /// `--max-ram-below-4g`, bytes.
    pub max_ram_below_4g: Option<u64>,
    /// `--machine-layout LAYOUT[:BLOCK,...]`.
    pub machine_layout: Option<String>,
}

/// Parses `--format`.
pub fn parse_format(s: &str) -> Result<ImageFormat, String> {
    match s {
        "raw" => Ok(ImageFormat::Raw),
        "elf" => Ok(ImageFormat::Elf),
        "lime" => Ok(ImageFormat::Lime),
        other => Err(format!("unknown format {other:?} (raw, elf or lime)")),
    }
}

/// Writes `outdir/physical.<ext>` from the block images just extracted.
fn write_physical<M: Images>(
    s: &Session<M>,
    outdir: &Path,
    format: ImageFormat,
    phys: &PhysArgs,
) -> Result<(), CliError> {
    let mut opts = qmig_phys::Options {
        max_ram_below_4g: phys.max_ram_below_4g,
        ..Default::default()
    };
    if let Some(l) = &phys.machine_layout {
        let (layout, blocks) = qmig_phys::parse_layout_arg(l)
            .map_err(|e| CliError::Usage(format!("--machine-layout: {e}")))?;
        opts.layout = Some(layout);
        opts.ram_blocks = blocks;
    }
    let images = s.dst.memory().images();
    let blocks: Vec<(&str, u64)> = images.iter().map(|i| (i.name.as_str(), i.length)).collect();
    let map = qmig_phys::map(s.machine.as_deref(), &blocks, &opts)
        .map_err(|e| CliError::data(format!("--format {}: {e}", format.extension())))?;
    let path = outdir.join(format!("physical.{}", format.extension()));
    let mut out = crate::files::create_fresh(&path)?;
    let mut files: std::collections::HashMap<&str, File> = std::collections::HashMap::new();
    let read = |block: &str, offset: u64, buf: &mut [u8]| -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let img = images
            .iter()
            .find(|i| i.name == block)
            .ok_or_else(|| std::io::Error::other(format!("no image for block {block}")))?;
        if !files.contains_key(img.name.as_str()) {
            files.insert(img.name.as_str(), File::open(outdir.join(&img.file_name))?);
        }
        files[img.name.as_str()].read_exact_at(buf, offset)
    };
    let n = qmig_phys::image::write_image(format, &map, &mut out, read)
        .map_err(|e| CliError::io(&path, "write", e))?;
    if crate::files::durability() != crate::files::Durability::None {
        out.sync_all().map_err(|e| CliError::io(&path, "sync", e))?;
    }
    if !crate::progress::quiet() {
        eprintln!(
            "wrote {} ({} layout, {} ranges, {n} bytes; RAM below 4 GiB {:#x}, above {:#x})",
            path.display(),
            map.layout,
            map.ranges.len(),
            map.below_4g,
            map.above_4g
        );
    }
    Ok(())
}

/// `qmig extract STREAM -o OUTDIR`: block images, device state, manifest;
/// `channels` are recorded multifd channel connections of the stream.
#[cfg_attr(not(test), allow(dead_code))]
pub fn run(path: &Path, outdir: &Path, channels: &[PathBuf]) -> CliResult {
    run_with(path, outdir, channels, &PhysArgs::default())
}

/// `qmig extract`, with a guest-physical image when `phys.format` is set.
pub fn run_with(path: &Path, outdir: &Path, channels: &[PathBuf], phys: &PhysArgs) -> CliResult {
    let opened = crate::input::open(path)?;
    let (input, seekable) = (opened.input, opened.seekable);
    let consumed = opened.consumed;
    crate::files::output_dir(outdir)?;
    crate::signals::install();
    // Images written with combined pwrites: faster than faulting pages into
    // mappings when the stream is read from a file.
    let mem = FileMemory::create(outdir).map_err(|e| CliError::io(outdir, "create", e))?;
    let name = path.display().to_string();
    let mut s = Session::new(
        outdir,
        mem,
        Layout::Adopt,
        Placement::Apply,
        "extract",
        name.clone(),
    )?;
    if !channels.is_empty() {
        s.multifd = Some(crate::multifd_apply::offline_channels(channels));
    }
    let result = match input {
        // A regular file is mapped: the records are applied straight from the
        // page cache, without a copy through read().
        // (A raw libvirt image's stream starts at `base`.)
        crate::input::Input::Plain { file, base } if seekable => {
            // mapped-ram pages are copied from the file to the images in
            // the kernel (`copy_file_range`), not through the mapping.
            if let Ok(src) = file.try_clone() {
                s.dst.set_mapped_ram_source(src, base);
            }
            let map = MappedInput::new(file).map_err(|e| CliError::io(path, "map", e))?;
            // PAGE data is written to the images straight from the mapping
            // (pwritev), without a copy through a buffer.
            let map = std::sync::Arc::new(map);
            s.dst
                .memory_mut()
                .refer_to_input(Some(map.clone()))
                .map_err(|e| CliError::io(outdir, "write", e))?;
            apply_slice(&map, base, &mut s)
        }
        other => {
            let mut dec = qmig_wire::Decoder::new(qmig_wire::Limits::default());
            crate::input::configure(&mut dec);
            let rd = StreamReader::with_decoder(SignalAware(other), dec);
            apply_reader(rd, &mut s, 0, consumed)
        }
    };
    let result = match s.multifd.take() {
        Some(mut m) if result.is_ok() => {
            let r = m.finish(&mut s.dst).map_err(StopError::Multifd);
            crate::multifd_apply::report(&m.stats());
            r
        }
        _ => result,
    };
    s.finish(result, None, &name)?;
    if let Some(format) = phys.format {
        write_physical(&s, outdir, format, phys)?;
    }
    let fills = s.dst.stats().nonzero_fill;
    if fills > 0 {
        eprintln!(
            "qmig: extract: note: {fills} ZERO records had a non-zero fill byte (applied as fills: leniency for QEMU < 8.2 streams; QEMU >= 8.2 refuses them)"
        );
    }
    if !crate::progress::quiet() {
        eprintln!(
            "extracted {} blocks to {}",
            s.dst.blocks().len(),
            outdir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
/// A pipe or decompressed input whose blocking reads give up when SIGINT
/// or SIGTERM arrived (the stream reader retries plain `EINTR`).
struct SignalAware<R>(R);

impl<R: std::io::Read> std::io::Read for SignalAware<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                match crate::signals::pending() {
                    Some(sig) => Err(std::io::Error::other(format!(
                        "interrupted by {}",
                        crate::error::signal_name(sig)
                    ))),
                    None => Err(e),
                }
            }
            r => r,
        }
    }
}

/// How much of a mapped input is applied before its pages are released.
const RELEASE_STEP: u64 = 32 << 20;

/// Applies every item of a mapped stream.
/// The stream starts at file offset `base` (0, or a raw libvirt image's payload).
fn apply_slice<M: Images>(
    map: &MappedInput,
    base: u64,
    s: &mut Session<M>,
) -> Result<(), StopError> {
    let buf = map.as_slice();
    let buf = buf.get(base as usize..).unwrap_or(&[]);
    let mut released = 0u64;
    // Page tables for the first window at once, then one window ahead of
    // each release.
    map.populate(base as usize, (base + RELEASE_STEP) as usize);
    let pb = crate::progress::bytes(buf.len() as u64, "extract");
    let mut rd = SliceReader::new(buf);
    crate::input::configure(rd.decoder_mut());
    let mut n = 0u32;
    let mut rp = Vec::new();
    let r = loop {
        let (offset, item) = match rd.next() {
            Some(Ok(x)) => x,
            None => break Ok(()),
            Some(Err(e)) => break Err(StopError::Wire(e)),
        };
        if let Some(sig) = crate::signals::pending() {
            break Err(StopError::Interrupted(sig));
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            pb.set_position(offset);
        }
        // Keep the resident set bounded: what is applied is not read again.
        // (Checked at every item: mapped-ram page items are 1 MiB each.)
        if offset - released > RELEASE_STEP {
            // Pending writes that point into the mapping go out first, so
            // that they do not fault the released pages in again.
            if let Err(source) = s.dst.memory_mut().flush() {
                break Err(StopError::Dst(RamDstError::Memory { offset, source }));
            }
            map.release_prefix((base + offset) as usize);
            map.populate(
                (base + offset) as usize,
                (base + offset + RELEASE_STEP) as usize,
            );
            released = offset;
        }
        let decoder = rd.decoder();
        let len = (decoder.position() - offset) as usize;
        if let Err(e) = s.handle(
            &ReadItem {
                offset,
                len,
                item,
                decoder,
            },
            |_| {},
        ) {
            break Err(e);
        }
        // Offline: no return path to answer on (PONGs of a capture are dropped).
        rp.clear();
        s.dst.poll_transmit(&mut rp);
    };
    pb.finish_and_clear();
    r
}

/// Applies every item read incrementally (pipes, gzip'd captures).
fn apply_reader<M: Images, R: std::io::Read>(
    mut rd: StreamReader<R>,
    s: &mut Session<M>,
    total: u64,
    consumed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), StopError> {
    let pb = crate::progress::input(total, consumed, "extract");
    let mut n = 0u32;
    let mut rp = Vec::new();
    let r = loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) => break Ok(()),
            Err(e) => {
                break Err(
                    crate::signals::pending().map_or(StopError::Wire(e), StopError::Interrupted)
                )
            }
        };
        if let Some(sig) = crate::signals::pending() {
            break Err(StopError::Interrupted(sig));
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            pb.set_position(ri.offset);
        }
        if let Err(e) = s.handle(&ri, |_| {}) {
            break Err(e);
        }
        // Offline: no return path to answer on (PONGs of a capture are dropped).
        rp.clear();
        s.dst.poll_transmit(&mut rp);
    };
    pb.finish_and_clear();
    r
}
