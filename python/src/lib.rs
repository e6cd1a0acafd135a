//! `qmig._qmig`: the Python extension behind the `qmig` package.
//!
//! `open()` reads a whole QEMU migration stream (any container the CLI
//! reads: plain, gzip/bzip2/xz/zstd, libvirt save images) through the same
//! destination state machine as `qmig extract` (`qmig-ram-dst`), keeping the
//! final content of every RAM block in memory, every item's offset and kind,
//! and the vmdesc. Guest-physical addresses come from `qmig-phys`.
//!
//! Errors reach Python as `qmig.QmigError` subclasses carrying `.offset`
//! (byte offset in the QEMU stream, or `None`) and `.rule` (a short name of
//! the rule broken); no code path here panics on input.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyString, PyTuple};

use qmig_container::{Layer, Limits as ContainerLimits};
use qmig_ram_dst::multifd::MultifdError;
use qmig_ram_dst::multifd_offline::OfflineChannels;
use qmig_ram_dst::{Config, GuestMemory, Layout, Placement, RamDst, RamDstError, VecMemory};
use qmig_wire::connections::{Conn, Event, Plan, Role, WalkError};
use qmig_wire::{Decoder, Item, Limits, ReadItem, StreamReader, WireError};

create_exception!(
    _qmig,
    QmigError,
    PyException,
    "Base of every qmig error; `.offset` (int or None: byte offset in the QEMU stream) and `.rule` (str: the rule broken)."
);
create_exception!(
    _qmig,
    StreamError,
    QmigError,
    "The stream does not parse (truncated, bad magic, bad record...)."
);
create_exception!(
    _qmig,
    StateError,
    QmigError,
    "The stream parses but its RAM records break the destination's rules (unknown block, page outside a block...)."
);
create_exception!(
    _qmig,
    ContainerError,
    QmigError,
    "The container around the stream (compression, libvirt save image) is corrupt."
);
create_exception!(
    _qmig,
    PhysError,
    QmigError,
    "No guest-physical layout for this machine, or an address that is not RAM."
);
create_exception!(
    _qmig,
    InputError,
    QmigError,
    "The input could not be read (OS error, or a Python file object's read() failed)."
);

/// The snake_case name of an error enum's variant (its `Debug` head).
fn rule_of(debug: &str) -> String {
    let head: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut out = String::new();
    for (i, c) in head.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A Python exception of type `T` with `.offset` and `.rule` set.
fn raise<T: pyo3::PyTypeInfo>(
    py: Python<'_>,
    msg: String,
    offset: Option<u64>,
    rule: &str,
) -> PyErr {
    let e = PyErr::new::<T, _>(msg);
    let v = e.value(py);
    let _ = v.setattr("offset", offset);
    let _ = v.setattr("rule", rule);
    e
}

/// Everything that can stop `open()`.
enum OpenError {
    Wire(WireError),
    Dst(RamDstError),
    Container(qmig_container::ContainerError),
    Io(io::Error),
    Multifd(MultifdError),
    /// An error in one file of a capture set (named instead of the source).
    InFile(String, Box<OpenError>),
}

impl OpenError {
    fn into_py(self, py: Python<'_>, name: &str) -> PyErr {
        match self {
            OpenError::InFile(file, e) => e.into_py(py, &file),
            OpenError::Multifd(MultifdError::Wire { channel, source }) => raise::<StreamError>(
                py,
                format!("{name}: multifd channel {channel}: {source}"),
                Some(source.offset()),
                &rule_of(&format!("{source:?}")),
            ),
            OpenError::Multifd(MultifdError::Rule {
                rule: "--multifd-channel",
                why,
                ..
            }) => raise::<InputError>(py, format!("multifd channel {why}"), None, "io"),
            OpenError::Multifd(e) => {
                let rule = match &e {
                    MultifdError::Rule { rule, .. } => {
                        rule.trim_start_matches('-').replace('-', "_")
                    }
                    _ => rule_of(&format!("{e:?}")),
                };
                raise::<StateError>(py, format!("{name}: {e}"), Some(e.offset()), &rule)
            }
            OpenError::Wire(WireError::Io { offset, source }) => raise::<InputError>(
                py,
                format!("{name}: read error at stream offset {offset}: {source}"),
                Some(offset),
                "io",
            ),
            OpenError::Wire(e) => raise::<StreamError>(
                py,
                format!("{name}: {e}"),
                Some(e.offset()),
                &rule_of(&format!("{e:?}")),
            ),
            OpenError::Dst(e) => raise::<StateError>(
                py,
                format!("{name}: {e}"),
                Some(e.offset()),
                &rule_of(&format!("{e:?}")),
            ),
            OpenError::Container(e) => raise::<ContainerError>(
                py,
                format!("{name}: {e}"),
                Some(e.offset()),
                &rule_of(&format!("{e:?}")),
            ),
            OpenError::Io(e) => raise::<InputError>(py, format!("{name}: {e}"), None, "io"),
        }
    }
}

/// A Python binary file object read through its `read(n)` method.
struct PyReader(Py<PyAny>);

impl Read for PyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Python::with_gil(|py| {
            let r = self
                .0
                .bind(py)
                .call_method1("read", (buf.len(),))
                .map_err(|e| io::Error::other(format!("read() failed: {e}")))?;
            if r.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "read() returned None (non-blocking file)",
                ));
            }
            let n = if let Ok(b) = r.downcast::<PyBytes>() {
                let d = b.as_bytes();
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                n
            } else if let Ok(b) = r.downcast::<PyByteArray>() {
                let d = b.to_vec();
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                n
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "read() did not return bytes (open the file in binary mode)",
                ));
            };
            Ok(n)
        })
    }
}

/// The sources `open()` takes.
enum Source {
    Path(std::path::PathBuf),
    /// The connection files of one recovered postcopy migration.
    Set {
        mains: Vec<PathBuf>,
        preempt: Vec<PathBuf>,
    },
    Bytes(Vec<u8>),
    File(Py<PyAny>),
}

/// One item of the stream, kept for `records()`.
struct Rec {
    offset: u64,
    len: u64,
    kind: &'static str,
    /// Block index into `names` (RAM records that name or continue a block).
    block: Option<u32>,
    /// Offset in the block (RAM page records), or section id / command code.
    value: Option<u64>,
    /// Section idstr, command name.
    detail: Option<Arc<str>>,
    /// The connection of a capture set (`main-1`, `preempt-1`...).
    conn: Option<Arc<str>>,
}

/// The result of reading a stream.
struct Loaded {
    mem: VecMemory,
    blocks: Vec<(String, u64, u64)>,
    page_size: u64,
    machine: Option<String>,
    version: Option<u32>,
    vmdesc: Option<Vec<u8>>,
    records: Vec<Rec>,
    layers: Vec<String>,
}

fn layer_names(layers: &[Layer]) -> Vec<String> {
    layers
        .iter()
        .map(|l| match l {
            Layer::Compressed(c) => c.name().to_string(),
            Layer::Libvirt(i) => match i.payload {
                Some(c) => format!("libvirt+{}", c.name()),
                None => "libvirt".to_string(),
            },
        })
        .collect()
}

/// What `open()` keeps of the items while applying them.
#[derive(Default)]
struct Collector {
    machine: Option<String>,
    version: Option<u32>,
    vmdesc: Option<Vec<u8>>,
    records: Vec<Rec>,
    idstrs: std::collections::HashMap<u32, Arc<str>>,
    names: Vec<String>,
    /// The current block per connection (RAM records name it once).
    cur_block: std::collections::HashMap<Option<Arc<str>>, u32>,
}

impl Collector {
    /// Records one item of connection `conn` (None: a single stream).
    fn item(&mut self, ri: &ReadItem<'_>, conn: Option<&Arc<str>>) {
        let (kind, block, value, detail): (
            &'static str,
            Option<u32>,
            Option<u64>,
            Option<Arc<str>>,
        ) = match &ri.item {
            Item::Header { version: v } => {
                self.version = Some(*v);
                ("header", None, Some(u64::from(*v)), None)
            }
            Item::Configuration(c) => {
                self.machine = Some(c.machine.to_string());
                ("configuration", None, None, Some(Arc::from(c.machine)))
            }
            Item::Section(h) => {
                let id = ri
                    .decoder
                    .sections()
                    .get(&h.section_id)
                    .map(|s| s.idstr.as_str())
                    .unwrap_or("");
                let d = self
                    .idstrs
                    .entry(h.section_id)
                    .or_insert_with(|| Arc::from(id))
                    .clone();
                (
                    section_kind(h.kind.name()),
                    None,
                    Some(u64::from(h.section_id)),
                    Some(d),
                )
            }
            Item::Ram(r) => {
                if let Some(b) = r.block {
                    let i = match self.names.iter().position(|n| n == b) {
                        Some(i) => i,
                        None => {
                            self.names.push(b.to_string());
                            self.names.len() - 1
                        }
                    };
                    self.cur_block.insert(conn.cloned(), i as u32);
                }
                let k = ram_kind(r.kind());
                if r.is_page() {
                    (
                        k,
                        self.cur_block.get(&conn.cloned()).copied(),
                        Some(r.offset),
                        None,
                    )
                } else {
                    (k, None, Some(r.offset), None)
                }
            }
            Item::DeviceData(_) => ("device_data", None, None, None),
            Item::Footer(id) => ("footer", None, Some(u64::from(*id)), None),
            Item::Command(c) => ("command", None, None, Some(Arc::from(c.name()))),
            Item::PackageEnd => ("package_end", None, None, None),
            Item::Eof => ("eof", None, None, None),
            Item::Vmdesc(j) => {
                self.vmdesc = Some(j.to_vec());
                ("vmdesc", None, None, None)
            }
            Item::MappedRam(_) => ("mapped_ram", None, None, None),
        };
        self.records.push(Rec {
            offset: ri.offset,
            len: ri.len as u64,
            kind,
            block,
            value,
            detail,
            conn: conn.cloned(),
        });
    }

    /// The result, from the destination the items were applied to.
    fn finish(self, dst: RamDst<VecMemory>, layers: Vec<String>) -> Result<Loaded, OpenError> {
        let page_size = dst.page_size();
        let blocks = dst
            .blocks()
            .iter()
            .map(|b| (b.name().to_string(), b.used_length(), b.page_size()))
            .collect();
        let mut mem = dst.into_memory();
        mem.flush().map_err(OpenError::Io)?;
        let names = self.names;
        // Record block names by the destination's names (the same strings).
        let records = self
            .records
            .into_iter()
            .map(|mut r| {
                if let Some(i) = r.block {
                    let n = &names[i as usize];
                    r.block = mem
                        .blocks()
                        .iter()
                        .position(|(b, _)| b == n)
                        .map(|p| p as u32);
                }
                r
            })
            .collect();
        Ok(Loaded {
            mem,
            blocks,
            page_size,
            machine: self.machine,
            version: self.version,
            vmdesc: self.vmdesc,
            records,
            layers,
        })
    }
}

/// A fresh destination that adopts the stream's layout and applies pages.
fn new_dst(memory_limit: u64) -> Result<RamDst<VecMemory>, OpenError> {
    let cfg = Config {
        layout: Layout::Adopt,
        placement: Placement::Apply,
        ..Config::default()
    };
    RamDst::new(cfg, VecMemory::with_limit(memory_limit)).map_err(OpenError::Dst)
}

/// Multifd channel files opened with their containers peeled off.
type Channels = OfflineChannels<Box<dyn Read + Send>>;

/// The applier of multifd channel files (`open(..., multifd=[...])`).
fn offline_channels(paths: &[PathBuf]) -> Channels {
    OfflineChannels::new(paths, |p| {
        let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        qmig_container::open(Box::new(f), &ContainerLimits::default())
            .map(|o| o.reader)
            .map_err(|e| format!("{}: {e}", p.display()))
    })
}

/// Applies every item of `rd` into a fresh destination, with the multifd
/// channel files `multifd` applied at the stream's sync points.
fn apply<R: Read>(
    mut rd: StreamReader<R>,
    memory_limit: u64,
    layers: Vec<String>,
    multifd: &[PathBuf],
) -> Result<Loaded, OpenError> {
    let mut dst = new_dst(memory_limit)?;
    let mut col = Collector::default();
    let mut chans = (!multifd.is_empty()).then(|| offline_channels(multifd));
    while let Some(ri) = rd.next_item().map_err(OpenError::Wire)? {
        col.item(&ri, None);
        if let Some(c) = chans.as_mut() {
            c.before_item(&ri, &mut dst).map_err(OpenError::Multifd)?;
        }
        dst.handle_read_item(&ri).map_err(OpenError::Dst)?;
    }
    if let Some(c) = chans.as_mut() {
        c.finish(&mut dst).map_err(OpenError::Multifd)?;
    }
    col.finish(dst, layers)
}

/// A file of a capture set: seekable when it holds the stream uncompressed.
enum SetInput {
    Plain(File),
    Stream(Box<dyn Read + Send>),
}

impl Read for SetInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SetInput::Plain(f) => f.read(buf),
            SetInput::Stream(r) => r.read(buf),
        }
    }
}

impl Seek for SetInput {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            SetInput::Plain(f) => f.seek(pos),
            SetInput::Stream(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a compressed input is not seekable",
            )),
        }
    }
}

/// Opens one connection of a capture set (see `qmig_wire::connections::walk`):
/// containers peeled; the first main connection read seekably when stored
/// uncompressed in a regular file.
fn open_conn(
    conn: &Conn,
    dec: Option<Decoder>,
    layers: &mut Vec<String>,
) -> Result<StreamReader<SetInput>, OpenError> {
    let in_file = |e| OpenError::InFile(conn.path.display().to_string(), Box::new(e));
    let f = File::open(&conn.path).map_err(|e| in_file(OpenError::Io(e)))?;
    let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
    let o = qmig_container::open(Box::new(f), &ContainerLimits::default())
        .map_err(|e| in_file(OpenError::Container(e)))?;
    if conn.index == 1 && conn.role == Role::Main {
        *layers = layer_names(&o.layers);
    }
    match dec {
        Some(dec) => Ok(StreamReader::with_decoder(SetInput::Stream(o.reader), dec)),
        None => {
            if let (true, Some(base)) = (regular, o.raw_offset()) {
                let mut f = File::open(&conn.path).map_err(|e| in_file(OpenError::Io(e)))?;
                f.seek(SeekFrom::Start(base))
                    .map_err(|e| in_file(OpenError::Io(e)))?;
                return StreamReader::new_seekable(SetInput::Plain(f))
                    .map_err(|e| in_file(OpenError::Wire(e)));
            }
            Ok(StreamReader::with_decoder(
                SetInput::Stream(o.reader),
                Decoder::new(Limits::default()),
            ))
        }
    }
}

/// Applies the connections of one recovered postcopy migration (main
/// connections, then preempt channels) into a fresh destination, as
/// `qmig extract MAIN1 MAIN2... --preempt-channel P...` does: the recovery
/// handshake (RECV_BITMAP, POSTCOPY_RESUME) is checked by the walk and kept
/// as records, not applied.
fn apply_set(plan: &Plan<'_>, memory_limit: u64) -> Result<Loaded, OpenError> {
    plan.check()
        .map_err(|e| OpenError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut dst = new_dst(memory_limit)?;
    let mut col = Collector::default();
    let mut layers = Vec::new();
    let mut labels: std::collections::HashMap<String, Arc<str>> = Default::default();
    let r = qmig_wire::connections::walk(
        plan,
        |conn, dec| open_conn(conn, dec, &mut layers),
        |ev| -> Result<(), OpenError> {
            let Event::Item { conn, ri, recovery } = ev else {
                return Ok(());
            };
            let label = labels
                .entry(conn.label())
                .or_insert_with_key(|k| Arc::from(k.as_str()))
                .clone();
            col.item(ri, Some(&label));
            if recovery {
                return Ok(());
            }
            dst.handle_read_item(ri).map_err(|e| {
                OpenError::InFile(conn.path.display().to_string(), Box::new(OpenError::Dst(e)))
            })
        },
    );
    match r {
        Ok(_) => {}
        Err(WalkError::Open(e)) | Err(WalkError::Visit(e)) => return Err(e),
        Err(WalkError::Wire { file, err }) => {
            return Err(OpenError::InFile(file, Box::new(OpenError::Wire(err))))
        }
    }
    col.finish(dst, layers)
}

fn section_kind(name: &str) -> &'static str {
    match name {
        "START" => "section_start",
        "PART" => "section_part",
        "END" => "section_end",
        "FULL" => "section_full",
        _ => "section",
    }
}

fn ram_kind(k: qmig_wire::RamKind) -> &'static str {
    use qmig_wire::RamKind as K;
    match k {
        K::MemSize => "ram_mem_size",
        K::Zero => "ram_zero",
        K::Page => "ram_page",
        K::Xbzrle => "ram_xbzrle",
        K::Compressed => "ram_compressed",
        K::Eos => "ram_eos",
        K::Hook => "ram_hook",
        K::MultifdFlush => "ram_multifd_flush",
        #[allow(unreachable_patterns)]
        _ => "ram_other",
    }
}

/// Opens `src`: peels containers, then reads a stored-uncompressed stream
/// seekably (vmdesc located first) and anything else incrementally.
/// A capture set of several connections is walked in order (`apply_set`);
/// `multifd` channel files are applied with a single stream.
fn load(src: Source, memory_limit: u64, multifd: &[PathBuf]) -> Result<Loaded, OpenError> {
    let climits = ContainerLimits::default();
    match src {
        Source::Set { mains, preempt } => apply_set(
            &Plan {
                mains: &mains,
                preempt: &preempt,
            },
            memory_limit,
        ),
        Source::Path(p) => {
            let f = File::open(&p).map_err(OpenError::Io)?;
            let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
            let o = qmig_container::open(Box::new(f), &climits).map_err(OpenError::Container)?;
            let layers = layer_names(&o.layers);
            if regular {
                if let Some(base) = o.raw_offset() {
                    let mut f = File::open(&p).map_err(OpenError::Io)?;
                    f.seek(SeekFrom::Start(base)).map_err(OpenError::Io)?;
                    let rd = StreamReader::new_seekable(f).map_err(OpenError::Wire)?;
                    return apply(rd, memory_limit, layers, multifd);
                }
            }
            apply(
                StreamReader::with_decoder(o.reader, Decoder::new(Limits::default())),
                memory_limit,
                layers,
                multifd,
            )
        }
        Source::Bytes(b) => {
            let b: Arc<[u8]> = Arc::from(b);
            let o = qmig_container::open(Box::new(Cursor::new(ArcBytes(b.clone()))), &climits)
                .map_err(OpenError::Container)?;
            let layers = layer_names(&o.layers);
            if let Some(base) = o.raw_offset() {
                let mut c = Cursor::new(ArcBytes(b));
                c.set_position(base);
                let rd = StreamReader::new_seekable(c).map_err(OpenError::Wire)?;
                return apply(rd, memory_limit, layers, multifd);
            }
            apply(
                StreamReader::with_decoder(o.reader, Decoder::new(Limits::default())),
                memory_limit,
                layers,
                multifd,
            )
        }
        Source::File(f) => {
            let o = qmig_container::open(Box::new(PyReader(f)), &climits)
                .map_err(OpenError::Container)?;
            let layers = layer_names(&o.layers);
            apply(
                StreamReader::with_decoder(o.reader, Decoder::new(Limits::default())),
                memory_limit,
                layers,
                multifd,
            )
        }
    }
}

/// Shared bytes usable by `Cursor` (`AsRef<[u8]>`).
#[derive(Clone)]
struct ArcBytes(Arc<[u8]>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The total memory of this machine in bytes (`/proc/meminfo` MemTotal),
/// the default bound on RAM held for a capture.
fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024)
}

/// `repr()` of an optional int.
fn py_int(v: Option<u64>) -> String {
    v.map_or_else(|| "None".into(), |v| v.to_string())
}

/// `repr()` of an optional str.
fn py_str(v: Option<&str>) -> String {
    v.map_or_else(|| "None".into(), |v| format!("{v:?}"))
}

/// One RAM block of a capture.
#[pyclass(module = "qmig", frozen, get_all)]
struct Block {
    /// RAM block name (QEMU's `RAMBlock.idstr`, e.g. `pc.ram`).
    name: String,
    /// Used length in bytes.
    length: u64,
    /// Page size in bytes (the block's host page size when the stream gives
    /// one, else the target page size).
    page_size: u64,
    /// Guest-physical ranges backed by this block: (gpa, block offset,
    /// length), bytes; empty when the block is not machine RAM or the
    /// layout is unknown.
    phys_ranges: Vec<(u64, u64, u64)>,
}

#[pymethods]
impl Block {
    fn __repr__(&self) -> String {
        format!(
            "Block(name={:?}, length={}, page_size={}, phys_ranges={:?})",
            self.name, self.length, self.page_size, self.phys_ranges
        )
    }
}

/// One item of the stream.
#[pyclass(module = "qmig", frozen, get_all)]
struct Record {
    /// Byte offset of the item in the QEMU stream.
    offset: u64,
    /// Length of the item in bytes.
    length: u64,
    /// Kind: header, configuration, section_start/part/end/full, ram_zero,
    /// ram_page, ram_xbzrle, ram_compressed, ram_mem_size, ram_eos, ...,
    /// device_data, footer, command, vmdesc, eof.
    kind: &'static str,
    /// The RAM block of a page record.
    block: Option<String>,
    /// Page records: byte offset in the block; sections and footers: the
    /// section id; header: the stream version; ram_mem_size: total bytes.
    value: Option<u64>,
    /// Sections: the section's idstr; commands: the command name;
    /// configuration: the machine type.
    detail: Option<String>,
    /// The connection of a capture set the item was read from (`main-1`,
    /// `main-2`, `preempt-1`...; `offset` is in that file's stream), or
    /// None for a single stream.
    connection: Option<String>,
}

#[pymethods]
impl Record {
    fn __repr__(&self) -> String {
        format!(
            "Record(offset={}, length={}, kind={:?}, block={}, value={}, detail={}, connection={})",
            self.offset,
            self.length,
            self.kind,
            py_str(self.block.as_deref()),
            py_int(self.value),
            py_str(self.detail.as_deref()),
            py_str(self.connection.as_deref())
        )
    }
}

/// A migration stream read into memory: see `qmig.open`.
#[pyclass(module = "qmig", frozen)]
struct Capture {
    loaded: Loaded,
    map: Option<qmig_phys::PhysMap>,
    phys_error: Option<String>,
}

impl Capture {
    fn block_bytes(&self, name: &str) -> Option<&[u8]> {
        self.loaded.mem.block(name)
    }
}

#[pymethods]
impl Capture {
    /// The RAM blocks, in stream order (list of `Block`).
    #[getter]
    fn blocks(&self) -> Vec<Block> {
        self.loaded
            .blocks
            .iter()
            .map(|(name, length, ps)| Block {
                name: name.clone(),
                length: *length,
                page_size: if *ps > 0 { *ps } else { self.loaded.page_size },
                phys_ranges: self
                    .map
                    .as_ref()
                    .map(|m| {
                        m.ranges_of(name)
                            .map(|r| (r.gpa, r.offset, r.length))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The machine type of the configuration section (`pc-i440fx-10.0`), or None.
    #[getter]
    fn machine(&self) -> Option<String> {
        self.loaded.machine.clone()
    }

    /// The stream version of the header (3), or None.
    #[getter]
    fn version(&self) -> Option<u32> {
        self.loaded.version
    }

    /// Target page size in bytes.
    #[getter]
    fn page_size(&self) -> u64 {
        self.loaded.page_size
    }

    /// The containers peeled off the stream, outermost first (`gzip`,
    /// `libvirt`, `libvirt+xz`...).
    #[getter]
    fn containers(&self) -> Vec<String> {
        self.loaded.layers.clone()
    }

    /// The guest-physical layout used (`pc`, `q35`, `microvm`, `virt`,
    /// `flat`...), or None when there is none.
    #[getter]
    fn layout(&self) -> Option<&'static str> {
        self.map.as_ref().map(|m| m.layout.name())
    }

    /// Guest-physical RAM ranges, sorted: list of (gpa, length, block,
    /// block offset); bytes. Empty when no layout is known (see `phys_error`).
    #[getter]
    fn phys_ranges(&self) -> Vec<(u64, u64, String, u64)> {
        self.map
            .as_ref()
            .map(|m| {
                m.ranges
                    .iter()
                    .map(|r| (r.gpa, r.length, r.block.clone(), r.offset))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Why there is no guest-physical layout (str), or None.
    #[getter]
    fn phys_error(&self) -> Option<String> {
        self.phys_error.clone()
    }

    /// `size` bytes of RAM block `name` from byte `offset`, as bytes.
    /// Raises KeyError for an unknown block, ValueError past its end.
    fn read_block<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        offset: u64,
        size: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let b = self
            .block_bytes(name)
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_string()))?;
        let end = offset
            .checked_add(size)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err(format!(
                    "{name}: [{offset:#x}, +{size:#x}) is outside the block ({:#x} bytes)",
                    b.len()
                ))
            })?;
        Ok(PyBytes::new(py, &b[offset as usize..end as usize]))
    }

    /// `size` bytes of guest-physical memory from address `gpa`, as bytes.
    /// Raises PhysError (rule `unmapped`) when part of the range is not RAM,
    /// unless `pad` is true (then those bytes read as zero), and PhysError
    /// (rule `no_layout`) when no layout is known.
    #[pyo3(signature = (gpa, size, pad = false))]
    fn read_phys<'py>(
        &self,
        py: Python<'py>,
        gpa: u64,
        size: u64,
        pad: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let map = self.map.as_ref().ok_or_else(|| {
            raise::<PhysError>(
                py,
                self.phys_error.clone().unwrap_or_default(),
                None,
                "no_layout",
            )
        })?;
        let size_us = usize::try_from(size)
            .ok()
            .filter(|_| gpa.checked_add(size).is_some())
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("size too large"))?;
        let mut failed: Option<u64> = None;
        let out = PyBytes::new_with(py, size_us, |buf| {
            let mut done = 0usize;
            while done < size_us {
                let a = gpa + done as u64;
                match map.translate(a) {
                    Some((block, off, avail)) => {
                        let n = (avail.min((size_us - done) as u64)) as usize;
                        let src = self
                            .block_bytes(block)
                            .and_then(|b| b.get(off as usize..off as usize + n));
                        match src {
                            Some(s) => buf[done..done + n].copy_from_slice(s),
                            None => buf[done..done + n].fill(0),
                        }
                        done += n;
                    }
                    None if pad => {
                        let next = map
                            .ranges
                            .iter()
                            .map(|r| r.gpa)
                            .find(|&g| g > a)
                            .unwrap_or(u64::MAX);
                        let n = (next - a).min((size_us - done) as u64) as usize;
                        buf[done..done + n].fill(0);
                        done += n;
                    }
                    None => {
                        failed = Some(a);
                        return Ok(());
                    }
                }
            }
            Ok(())
        })?;
        if let Some(a) = failed {
            return Err(raise::<PhysError>(
                py,
                format!("guest-physical address {a:#x} is not RAM"),
                None,
                "unmapped",
            ));
        }
        Ok(out)
    }

    /// The items of the stream in order: an iterator of `Record`.
    fn records(slf: Py<Self>) -> RecordIter {
        RecordIter { cap: slf, next: 0 }
    }

    /// The vmdesc JSON trailer as bytes, or None when the stream has none.
    #[getter]
    fn vmdesc<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.loaded.vmdesc.as_ref().map(|v| PyBytes::new(py, v))
    }

    /// The device list of the vmdesc JSON (list of dicts as QEMU writes
    /// them: `name`, `instance_id`, `vmsd_name`, `version`, `fields`...),
    /// or None when the stream carries no vmdesc.
    fn devices<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(v) = &self.loaded.vmdesc else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(v);
        let doc = py
            .import("json")?
            .call_method1("loads", (text.as_ref(),))
            .map_err(|e| {
                let off = self
                    .loaded
                    .records
                    .iter()
                    .find(|r| r.kind == "vmdesc")
                    .map(|r| r.offset);
                raise::<StreamError>(py, format!("vmdesc is not JSON: {e}"), off, "vmdesc_json")
            })?;
        match doc.get_item("devices") {
            Ok(d) => Ok(Some(d)),
            Err(_) => Ok(Some(pyo3::types::PyList::empty(py).into_any())),
        }
    }

    /// Number of items in the stream.
    fn __len__(&self) -> usize {
        self.loaded.records.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<qmig.Capture machine={} blocks={} layout={}>",
            py_str(self.loaded.machine.as_deref()),
            self.loaded.blocks.len(),
            py_str(self.map.as_ref().map(|m| m.layout.name()))
        )
    }
}

/// Iterator over a capture's records.
#[pyclass(module = "qmig")]
struct RecordIter {
    cap: Py<Capture>,
    next: usize,
}

#[pymethods]
impl RecordIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> Option<Record> {
        let cap = self.cap.get();
        let r = cap.loaded.records.get(self.next)?;
        self.next += 1;
        let _ = py;
        Some(Record {
            offset: r.offset,
            length: r.len,
            kind: r.kind,
            block: r
                .block
                .and_then(|i| cap.loaded.mem.blocks().get(i as usize))
                .map(|(n, _)| n.clone()),
            value: r.value,
            detail: r.detail.as_deref().map(str::to_string),
            connection: r.conn.as_deref().map(str::to_string),
        })
    }
}

/// Reads a migration stream: see the `qmig.open` docstring in `qmig/__init__.py`.
#[pyfunction]
#[pyo3(signature = (source, *, preempt = None, multifd = None, max_ram_below_4g = None, machine_layout = None, memory_limit = None))]
#[allow(clippy::too_many_arguments)]
fn open(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    preempt: Option<Vec<PathBuf>>,
    multifd: Option<Vec<PathBuf>>,
    max_ram_below_4g: Option<u64>,
    machine_layout: Option<String>,
    memory_limit: Option<u64>,
) -> PyResult<Capture> {
    let preempt = preempt.unwrap_or_default();
    let multifd = multifd.unwrap_or_default();
    let is_path = |o: &Bound<'_, PyAny>| -> PyResult<bool> {
        Ok(o.is_instance_of::<PyString>() || o.hasattr("__fspath__")?)
    };
    let list: Option<Vec<PathBuf>> =
        if source.is_instance_of::<PyList>() || source.is_instance_of::<PyTuple>() {
            Some(source.extract().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(
                    "a list of connections holds paths (str or path-like)",
                )
            })?)
        } else if !preempt.is_empty() && is_path(source)? {
            Some(vec![source.extract()?])
        } else if !preempt.is_empty() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "preempt= takes the main connections as paths",
            ));
        } else {
            None
        };
    let (src, name) = if let Some(mut mains) = list {
        let plan = Plan {
            mains: &mains,
            preempt: &preempt,
        };
        plan.check()
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("open(): {e}")))?;
        if mains.len() == 1 && preempt.is_empty() {
            let p = mains.remove(0);
            let n = p.display().to_string();
            (Source::Path(p), n)
        } else {
            if !multifd.is_empty() {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "open(): multifd channels belong to one main connection (QEMU has no postcopy recovery or preempt channel with multifd)",
                ));
            }
            let n = mains
                .iter()
                .chain(&preempt)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ");
            (Source::Set { mains, preempt }, n)
        }
    } else if let Ok(b) = source.downcast::<PyBytes>() {
        (Source::Bytes(b.as_bytes().to_vec()), "<bytes>".to_string())
    } else if let Ok(b) = source.downcast::<PyByteArray>() {
        (Source::Bytes(b.to_vec()), "<bytearray>".to_string())
    } else if is_path(source)? {
        let p: std::path::PathBuf = source.extract()?;
        let n = p.display().to_string();
        (Source::Path(p), n)
    } else if source.hasattr("read")? {
        let n = source
            .getattr("name")
            .ok()
            .and_then(|n| n.extract::<String>().ok())
            .unwrap_or_else(|| "<file>".into());
        (Source::File(source.clone().unbind()), n)
    } else {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "open() takes a path, a list of paths, bytes or a binary file object",
        ));
    };
    let mut opts = qmig_phys::Options {
        max_ram_below_4g,
        ..Default::default()
    };
    if let Some(l) = &machine_layout {
        let (layout, blocks) = qmig_phys::parse_layout_arg(l)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("machine_layout: {e}")))?;
        opts.layout = Some(layout);
        opts.ram_blocks = blocks;
    }
    let limit = memory_limit.unwrap_or_else(mem_total);
    let is_file = matches!(src, Source::File(_));
    let loaded = if is_file {
        load(src, limit, &multifd)
    } else {
        py.allow_threads(|| load(src, limit, &multifd))
    }
    .map_err(|e| e.into_py(py, &name))?;
    let blocks: Vec<(&str, u64)> = loaded
        .blocks
        .iter()
        .map(|(n, l, _)| (n.as_str(), *l))
        .collect();
    let (map, phys_error) = match qmig_phys::map(loaded.machine.as_deref(), &blocks, &opts) {
        Ok(m) => (Some(m), None),
        Err(e) => {
            if machine_layout.is_some() || max_ram_below_4g.is_some() {
                return Err(raise::<PhysError>(
                    py,
                    e.to_string(),
                    None,
                    &rule_of(&format!("{e:?}")),
                ));
            }
            (None, Some(e.to_string()))
        }
    };
    Ok(Capture {
        loaded,
        map,
        phys_error,
    })
}

/// The Python module `qmig._qmig`.
#[pymodule]
fn _qmig(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_class::<Capture>()?;
    m.add_class::<Block>()?;
    m.add_class::<Record>()?;
    m.add_class::<RecordIter>()?;
    m.add("QmigError", py.get_type::<QmigError>())?;
    m.add("StreamError", py.get_type::<StreamError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("ContainerError", py.get_type::<ContainerError>())?;
    m.add("PhysError", py.get_type::<PhysError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    Ok(())
}
