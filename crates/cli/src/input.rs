//! Opening a stream argument: a regular file, a pipe or `-` (stdin), with
//! whatever wraps the QEMU stream (whole-file gzip, bzip2, xz or zstd, a
//! libvirt save image, nested) recognised by magic through `qmig-container`.
//!
//! A regular file whose QEMU stream is stored uncompressed (a plain capture,
//! or a raw libvirt image) is read through the file itself, positioned at the
//! stream's start: the vmdesc trailer is located first (certain delimiting of
//! the last device section) and `extract` maps it. Everything else is read
//! incrementally. Stream offsets are always relative to the QEMU stream.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qmig_container::{Layer, Limits as ContainerLimits};
use qmig_wire::{Decoder, Limits, StreamReader};

/// A stream source, positioned at the first byte of the QEMU stream.
pub enum Input {
    /// A regular file holding the stream uncompressed from byte `base` on.
    /// The file position is relative to the file, not to the stream
    /// (`StreamReader::new_seekable` measures from the position it starts at).
    Plain {
        /// The file, positioned at `base` when opened.
        file: File,
        /// File offset of the QEMU stream (0, or a raw libvirt image's
        /// payload offset).
        base: u64,
    },
    /// A pipe, stdin or decompressed bytes (not seekable).
    Stream(Box<dyn Read + Send>),
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Plain { file, .. } => file.read(buf),
            Input::Stream(r) => r.read(buf),
        }
    }
}

impl Seek for Input {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            Input::Plain { file, .. } => file.seek(pos),
            Input::Stream(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a pipe or compressed input is not seekable",
            )),
        }
    }
}

/// Counts the bytes read from the raw input (before decompression), for the
/// progress counter.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// An opened stream argument.
pub struct Opened {
    /// The QEMU stream.
    pub input: Input,
    /// Whether `input` is a seekable regular file.
    pub seekable: bool,
    /// The containers around the stream, outermost first.
    pub layers: Vec<Layer>,
    /// Bytes consumed from the raw input so far (file or pipe, before
    /// decompression).
    pub consumed: Arc<AtomicU64>,
}

/// Whether `path` names stdin.
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Whether `path` is a regular file (`-` is not).
pub fn is_regular_file(path: &Path) -> bool {
    !is_stdin(path) && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Opens a stream argument (`-` is stdin) and peels its containers off.
pub fn open(path: &Path) -> Result<Opened, String> {
    let err = |e: io::Error| format!("{}: {e}", path.display());
    let consumed = Arc::new(AtomicU64::new(0));
    let (raw, regular): (Box<dyn Read + Send>, bool) = if is_stdin(path) {
        (Box::new(io::stdin()), false)
    } else {
        let f = File::open(path).map_err(err)?;
        let regular = f.metadata().map_err(err)?.is_file();
        (Box::new(f), regular)
    };
    let counted = Box::new(Counting {
        inner: raw,
        n: consumed.clone(),
    });
    let o = qmig_container::open(counted, &ContainerLimits::default()).map_err(|e| {
        let e = if is_stdin(path) {
            e
        } else {
            e.with_file(&path.display().to_string())
        };
        format!("{}: {e}", path.display())
    })?;
    if regular {
        if let Some(base) = o.raw_offset() {
            // Stored uncompressed: read the file itself from the stream's start.
            let mut file = File::open(path).map_err(err)?;
            file.seek(SeekFrom::Start(base)).map_err(err)?;
            consumed.store(base, Ordering::Relaxed);
            return Ok(Opened {
                input: Input::Plain { file, base },
                seekable: true,
                layers: o.layers,
                consumed,
            });
        }
    }
    Ok(Opened {
        input: Input::Stream(o.reader),
        seekable: false,
        layers: o.layers,
        consumed,
    })
}

/// Opens the QEMU stream of `path` (see [`open`]).
/// Returns the source and whether it is a seekable regular file.
pub fn open_input(path: &Path) -> Result<(Input, bool), String> {
    let o = open(path)?;
    Ok((o.input, o.seekable))
}

/// The target page size given with `--target-page-size` (log2 bytes), for
/// streams that declare none or declare it wrongly.
static TARGET_PAGE_BITS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Records `--target-page-size` (bytes) for every reader this process opens.
///
/// # Errors
/// A size that is not a power of two from 1 KiB to 64 KiB.
pub fn set_target_page_size(size: u64) -> Result<(), String> {
    let bits = qmig_wire::target_page::page_bits_of(size).ok_or_else(|| {
        format!("--target-page-size {size}: not a power of two from 1 KiB to 64 KiB")
    })?;
    let _ = TARGET_PAGE_BITS.set(bits);
    Ok(())
}

/// The device-section lengths of `--vmdesc-from FILE`, for streams that
/// carry no vmdesc of their own (postcopy captures, `suppress-vmdesc`).
static VMDESC_FROM: std::sync::OnceLock<std::sync::Arc<qmig_wire::devices::DeviceTable>> =
    std::sync::OnceLock::new();

/// Records `--vmdesc-from FILE` (a bare vmdesc JSON, or another capture of
/// the same QEMU and machine type) for every reader this process opens.
///
/// # Errors
/// The file cannot be read or holds no valid vmdesc.
pub fn set_vmdesc_from(path: &Path) -> Result<(), crate::error::CliError> {
    let json = crate::inspect::file_vmdesc(path)?;
    let table = qmig_wire::devices::DeviceTable::from_vmdesc_json(&json).map_err(|e| {
        crate::error::CliError::data(format!("--vmdesc-from {}: {e}", path.display()))
    })?;
    let _ = VMDESC_FROM.set(std::sync::Arc::new(table));
    Ok(())
}

/// Gives a new reader's decoder the options of this process.
pub fn configure(dec: &mut Decoder) {
    if let Some(&bits) = TARGET_PAGE_BITS.get() {
        dec.set_page_bits(bits, qmig_wire::target_page::PageSizeSource::Override);
    }
    if let Some(t) = VMDESC_FROM.get() {
        // The stream's own vmdesc, when it has one, wins.
        if !dec.has_vmdesc() {
            if let Err(e) = dec.set_vmdesc(Some(t.clone())) {
                eprintln!("qmig: --vmdesc-from not used: {e}");
            }
        }
    }
}

/// Opens `path` for item-by-item reading; returns the reader and the input
/// size for progress display (0 when unknown).
pub fn open_stream(path: &Path) -> Result<(StreamReader<Input>, u64), String> {
    let (input, seekable) = open_input(path)?;
    reader_for(input, seekable, path)
}

/// A reader over an opened input (see [`open_input`]), and the stream's size
/// when known (else 0).
pub fn reader_for(
    input: Input,
    seekable: bool,
    path: &Path,
) -> Result<(StreamReader<Input>, u64), String> {
    match input {
        Input::Plain { ref file, base } if seekable => {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut r = StreamReader::new_seekable(input)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            configure(r.decoder_mut());
            Ok((r, len.saturating_sub(base)))
        }
        other => {
            let mut dec = Decoder::new(Limits::default());
            configure(&mut dec);
            Ok((StreamReader::with_decoder(other, dec), 0))
        }
    }
}

/// One line per container, for `inspect`'s text summary (empty for a plain
/// stream).
pub fn describe(layers: &[Layer]) -> Vec<String> {
    let mut out = Vec::new();
    let mut outermost = true;
    for l in layers {
        match l {
            Layer::Compressed(c) => out.push(format!("container: {}-compressed", c.name())),
            Layer::Libvirt(i) => {
                let h = &i.header;
                let whose = if outermost { "file" } else { "decompressed" };
                let payload = match i.payload {
                    Some(c) => format!("{}-compressed QEMU stream", c.name()),
                    None => "QEMU stream".into(),
                };
                out.push(format!(
                    "container: libvirt save image{}: version {}, {}, format {} ({}), was_running {}, \
                     data_len {}, domain XML {} bytes, {}; {payload} starts at {whose} offset {}",
                    if h.partial {
                        " (PARTIAL: magic LibvirtQemudPart, libvirt never finished this save)"
                    } else {
                        ""
                    },
                    h.version,
                    h.byte_order.name(),
                    h.format.code(),
                    h.format.name(),
                    h.was_running,
                    h.data_len,
                    i.data.xml.len(),
                    match &i.data.cookie {
                        Some(c) => format!("cookie {} bytes", c.len()),
                        None => "no cookie".into(),
                    },
                    i.payload_offset
                ));
            }
        }
        outermost = false;
    }
    out
}

/// The containers as JSON, outermost first.
pub fn layers_json(layers: &[Layer]) -> serde_json::Value {
    use serde_json::json;
    layers
        .iter()
        .map(|l| match l {
            Layer::Compressed(c) => json!({"kind": "compressed", "format": c.name()}),
            Layer::Libvirt(i) => {
                let h = &i.header;
                json!({
                    "kind": "libvirt",
                    "partial": h.partial,
                    "version": h.version,
                    "byte_order": h.byte_order.name(),
                    "format": h.format.name(),
                    "format_code": h.format.code(),
                    "was_running": h.was_running,
                    "data_len": h.data_len,
                    "cookie_offset": h.cookie_offset,
                    "xml_length": i.data.xml.len(),
                    "cookie_length": i.data.cookie.as_ref().map(String::len),
                    "payload_offset": i.payload_offset,
                    "payload_compression": i.payload.map(|c| c.name()),
                })
            }
        })
        .collect()
}
