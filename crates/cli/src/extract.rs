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

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qmig_ram_dst::{
    Action, Config, FileMemory, GuestMemory, ImageFile, Layout, MappedInput, MmapMemory, Placement,
    RamDst, RamDstError,
};
use qmig_wire::{Item, ReadItem, SectionKind, SliceReader, StreamReader, WireError};
use serde_json::{json, Value};

/// Why applying a stream stopped.
#[derive(Debug)]
pub(crate) enum StopError {
    /// The stream does not parse.
    Wire(WireError),
    /// The state machine refused an item.
    Dst(RamDstError),
    /// Writing output files failed.
    Io(String),
    /// The postcopy host (userfaultfd, fault handling) failed or refused
    /// the stream (e.g. a hugetlbfs-backed block).
    Postcopy(String),
}

impl std::fmt::Display for StopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopError::Wire(e) => write!(f, "{e}"),
            StopError::Dst(e) => write!(f, "{e}"),
            StopError::Io(e) => write!(f, "I/O: {e}"),
            StopError::Postcopy(e) => write!(f, "postcopy: {e}"),
        }
    }
}

impl StopError {
    pub(crate) fn offset(&self) -> Option<u64> {
        match self {
            StopError::Wire(e) => Some(e.offset()),
            StopError::Dst(e) => Some(e.offset()),
            StopError::Io(_) | StopError::Postcopy(_) => None,
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
    sections: Vec<Value>,
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
                self.sections.push(json!({
                    "kind": h.kind.name(),
                    "section_id": h.section_id,
                    "idstr": info.map(|s| s.idstr.clone()),
                    "instance": info.map(|s| s.instance),
                    "version": info.map(|s| s.version),
                    "stream_offset": ri.offset,
                    "file_offset": self.bytes,
                }));
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
}

impl Images for MmapMemory {
    fn images(&self) -> Vec<ImageFile> {
        self.files()
    }
}

impl Images for FileMemory {
    fn images(&self) -> Vec<ImageFile> {
        self.files()
    }
}

/// A stream being applied into a directory: block images, device state,
/// vmdesc, manifest. Shared by `extract` (pwrite'd images) and `recv` (mmap'd).
pub(crate) struct Session<M> {
    pub(crate) dst: RamDst<M>,
    outdir: PathBuf,
    source: String,
    device: DeviceState,
    vmdesc: bool,
}

impl<M: Images> Session<M> {
    /// Starts a session writing into `outdir` (which must exist) through `mem`.
    pub(crate) fn new(
        outdir: &Path,
        mem: M,
        layout: Layout,
        placement: Placement,
        source: String,
    ) -> Result<Self, String> {
        let cfg = Config {
            layout,
            placement,
            ..Config::default()
        };
        let dst = RamDst::new(cfg, mem).map_err(|e| e.to_string())?;
        let dpath = outdir.join("device-state.bin");
        let f = File::create(&dpath).map_err(|e| format!("{}: {e}", dpath.display()))?;
        let _ = fs::remove_file(outdir.join("vmdesc.json"));
        Ok(Session {
            dst,
            outdir: outdir.to_path_buf(),
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
            vmdesc: false,
        })
    }

    /// Applies one item; actions are handed to `on_action`.
    #[inline]
    pub(crate) fn handle(
        &mut self,
        ri: &ReadItem<'_>,
        mut on_action: impl FnMut(Action),
    ) -> Result<(), StopError> {
        match &ri.item {
            Item::Ram(_) => self.dst.handle_read_item(ri).map_err(StopError::Dst)?,
            Item::Vmdesc(j) => {
                fs::write(self.outdir.join("vmdesc.json"), j)
                    .map_err(|e| StopError::Io(format!("vmdesc.json: {e}")))?;
                self.vmdesc = true;
                self.dst.handle_read_item(ri).map_err(StopError::Dst)?;
            }
            _ => {
                self.dst.handle_read_item(ri).map_err(StopError::Dst)?;
                self.device
                    .handle(ri)
                    .map_err(|e| StopError::Io(format!("device-state.bin: {e}")))?;
            }
        }
        while let Some(a) = self.dst.poll_action() {
            on_action(a);
        }
        Ok(())
    }

    /// Flushes the images and the device state and writes `manifest.json`;
    /// returns `result`, or the flush error if the stream itself went fine.
    pub(crate) fn finish(
        &mut self,
        result: Result<(), StopError>,
        extra: Value,
    ) -> Result<Result<(), StopError>, String> {
        let flushed = self
            .dst
            .memory_mut()
            .flush()
            .map_err(|e| StopError::Io(format!("block images: {e}")))
            .and_then(|()| {
                self.device
                    .out
                    .flush()
                    .map_err(|e| StopError::Io(format!("device-state.bin: {e}")))
            });
        let result = result.and(flushed);
        let err = result.as_ref().err();
        let st = self.dst.stats();
        let mut manifest = json!({
            "blocks": self.dst.memory().images().iter().map(|i| json!({"name": i.name, "file": i.file_name, "length": i.length})).collect::<Vec<_>>(),
            "page_size": self.dst.page_size(),
            "source": self.source,
            "complete": err.is_none(),
            "applied_up_to": self.dst.applied_up_to(),
            "error": err.map(|e| e.to_string()),
            "error_offset": err.and_then(|e| e.offset()),
            "nonzero_fill_pages": st.nonzero_fill,
            "leniencies": leniencies(&self.dst),
            "records": {"zero": st.zero, "page": st.page, "xbzrle": st.xbzrle, "compressed": st.compressed},
            "postcopy_state": format!("{:?}", self.dst.postcopy_state()),
            "device_state": {"file": "device-state.bin", "bytes": self.device.bytes, "sections": self.device.sections, "sections_omitted": self.device.sections_omitted},
            "vmdesc": if self.vmdesc { Value::from("vmdesc.json") } else { Value::Null },
        });
        if let (Value::Object(m), Value::Object(x)) = (&mut manifest, extra) {
            m.extend(x);
        }
        fs::write(
            self.outdir.join("manifest.json"),
            serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n",
        )
        .map_err(|e| format!("manifest.json: {e}"))?;
        Ok(result)
    }
}

/// The manifest's `leniencies`: what was accepted that QEMU 10's loader
/// refuses, because the stream may come from an older QEMU (see
/// [`qmig_ram_dst::Leniency`]). Empty when qmig was as strict as QEMU 10.
pub(crate) fn leniencies<M: qmig_ram_dst::GuestMemory>(dst: &RamDst<M>) -> Value {
    let machine = dst
        .machine_version()
        .map(|(a, b)| format!("QEMU {a}.{b}"))
        .unwrap_or_else(|| "no versioned machine type".into());
    dst.leniencies()
        .iter()
        .map(|l| match l {
            qmig_ram_dst::Leniency::NonZeroFill => json!({
                "kind": "nonzero_zero_fill",
                "records": dst.stats().nonzero_fill,
                "qemu_rule": "ram_load_precopy/ram_load_postcopy: QEMU >= 8.2 refuses a ZERO record whose fill byte is not 0",
                "why_accepted": format!("the stream may predate QEMU 8.2 ({machine}); applied as fills"),
            }),
        })
        .collect::<Vec<_>>()
        .into()
}

pub fn run(path: &Path, outdir: &Path) -> Result<ExitCode, String> {
    fs::create_dir_all(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    let opened = crate::input::open(path)?;
    let (input, seekable, consumed) = (opened.input, opened.seekable, opened.consumed);
    // Images written with combined pwrites: faster than faulting pages into
    // mappings when the stream is read from a file.
    let mem = FileMemory::create(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    let mut s = Session::new(
        outdir,
        mem,
        Layout::Adopt,
        Placement::Apply,
        path.display().to_string(),
    )?;
    let result = match input {
        // A regular file is mapped: the records are applied straight from the
        // page cache, without a copy through read().
        // (A raw libvirt image's stream starts at `base`.)
        crate::input::Input::Plain { file, base } if seekable => {
            let map = MappedInput::new(file).map_err(|e| format!("{}: {e}", path.display()))?;
            apply_slice(&map, base, &mut s)
        }
        other => {
            let (rd, total) = crate::input::reader_for(other, false, path)?;
            apply_reader(rd, &mut s, total, consumed)
        }
    };
    finish(s, result, outdir)
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
    let pb = crate::progress::bytes(buf.len() as u64, "extract");
    let mut rd = SliceReader::new(buf);
    let mut n = 0u32;
    let r = loop {
        let (offset, item) = match rd.next() {
            Some(Ok(x)) => x,
            None => break Ok(()),
            Some(Err(e)) => break Err(StopError::Wire(e)),
        };
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            pb.set_position(offset);
            // Keep the resident set bounded: what is applied is not read again.
            if offset - released > RELEASE_STEP {
                map.release_prefix((base + offset) as usize);
                released = offset;
            }
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
    };
    pb.finish_and_clear();
    r
}

/// Applies every item read incrementally (pipes, gzip'd captures).
fn apply_reader<M: Images>(
    mut rd: StreamReader<crate::input::Input>,
    s: &mut Session<M>,
    total: u64,
    consumed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), StopError> {
    let pb = crate::progress::input(total, consumed, "extract");
    let mut n = 0u32;
    let r = loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) => break Ok(()),
            Err(e) => break Err(StopError::Wire(e)),
        };
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            pb.set_position(ri.offset);
        }
        if let Err(e) = s.handle(&ri, |_| {}) {
            break Err(e);
        }
    };
    pb.finish_and_clear();
    r
}

fn finish<M: Images>(
    mut s: Session<M>,
    result: Result<(), StopError>,
    outdir: &Path,
) -> Result<ExitCode, String> {
    let result = s.finish(result, json!({}))?;
    let applied_to = s.dst.applied_up_to();
    if let Err(e) = result {
        eprintln!(
            "qmig: extract stopped: {e}; images hold the stream applied up to offset {applied_to}"
        );
        return Ok(ExitCode::from(1));
    }
    let fills = s.dst.stats().nonzero_fill;
    if fills > 0 {
        eprintln!("qmig: note: {fills} ZERO records had a non-zero fill byte (applied as fills: leniency for QEMU < 8.2 streams; QEMU >= 8.2 refuses them)");
    }
    eprintln!(
        "extracted {} blocks to {}",
        s.dst.blocks().len(),
        outdir.display()
    );
    Ok(ExitCode::SUCCESS)
}
