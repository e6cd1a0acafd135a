//! `qmig convert`: rewrite any stream qmig reads as one single-pass precopy
//! stream holding each page's final content once, with records QEMU 10
//! loads (see `qmig_ram_src::convert`).
//!
//! The final RAM image is held in anonymous memory (`AnonImage`: pages
//! never written cost nothing) and the non-RAM bytes in spool files in a temporary
//! directory next to OUT; the output is written to a temporary name next to
//! OUT and renamed only when complete. A libvirt save image stays one: its
//! header and data (domain XML, cookie, padding) are kept and its `format`
//! field set to the payload's compression.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use qmig_container::libvirt::{encode_image_prefix, SaveFormat};
use qmig_container::Layer;
use qmig_ram_dst::MappedInput;
use qmig_ram_src::convert::{ConvertError, Converter, Format, Options, Report, ZeroPages};
use qmig_wire::{ReadItem, SliceReader};
use serde_json::json;

/// What `--zero-pages` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZeroArg {
    /// A ZERO record for every all-zero page.
    Zero,
    /// No record: only for a destination whose RAM starts zeroed.
    Skip,
}

/// What `--format` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// One single-pass record stream (`-incoming file:OUT`).
    Stream,
    /// A mapped-ram file (`migrate-set-capabilities mapped-ram on`,
    /// `migrate-incoming file:OUT`): pages at fixed offsets, zero pages as holes.
    MappedRam,
}

/// What `--compress-output` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutCompression {
    /// gzip (`gzip -dc`, libvirt format 1).
    Gzip,
    /// Zstandard (libvirt format 5).
    Zstd,
    /// xz (libvirt format 3).
    Xz,
}

/// Options of `qmig convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// `IN... OUT`: the input, then the output file (written under a
    /// temporary name, renamed when complete). The input is any stream qmig
    /// reads (`-` for stdin) or a libvirt save image; several inputs: the
    /// main connections of one recovered postcopy migration, in order
    /// (`main-1.bin main-2.bin OUT`).
    #[arg(required = true, num_args = 1.., value_name = "IN... OUT")]
    pub paths: Vec<PathBuf>,
    /// A recorded postcopy-preempt channel (page records only); the k-th
    /// belongs to the k-th main connection (repeatable).
    #[arg(long, value_name = "FILE")]
    pub preempt_channel: Vec<PathBuf>,
    /// A recorded multifd channel connection (repeatable): its pages are
    /// applied at the main stream's sync points; the output has none of
    /// multifd (a plain precopy stream).
    #[arg(long, value_name = "FILE")]
    pub multifd_channel: Vec<PathBuf>,
    /// The input as named in messages (from `paths`).
    #[arg(skip)]
    pub input: PathBuf,
    /// The output (the last of `paths`).
    #[arg(skip)]
    pub output: PathBuf,
    /// The output's form: a record stream, or a mapped-ram file (QEMU 9.0+,
    /// loaded with the mapped-ram capability on).
    #[arg(long, value_enum, default_value_t = FormatArg::Stream)]
    pub format: FormatArg,
    /// All-zero pages: ZERO records, or none (`skip`: only for a destination
    /// whose RAM starts zeroed).
    #[arg(long, value_enum, default_value_t = ZeroArg::Zero)]
    pub zero_pages: ZeroArg,
    /// Compress the output stream (a libvirt image's payload, with its format field set).
    #[arg(long, value_enum)]
    pub compress_output: Option<OutCompression>,
    /// Print sizes, pages per kind before and after, and the compaction ratio.
    #[arg(long)]
    pub report: bool,
    /// With --report: print it as one JSON object.
    #[arg(long)]
    pub json: bool,
}

type Error = Box<dyn std::error::Error>;

/// Removes the temporary directory and the unfinished output on every exit.
struct Temp {
    dir: PathBuf,
    part: PathBuf,
    keep_part: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        if !self.keep_part {
            let _ = fs::remove_file(&self.part);
        }
    }
}

impl Temp {
    /// Moves the finished output file into place as `output`; the temporary
    /// directory goes when `self` drops, on success or error.
    fn finish(self, output: &std::path::Path) -> Result<(), Error> {
        fs::rename(&self.part, output).map_err(|e| {
            format!(
                "cannot rename {} to {}: {e}",
                self.part.display(),
                output.display()
            )
        })?;
        Ok(())
    }
}

/// A writer that counts the bytes written through it.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Runs `qmig convert`: one input (with its `--multifd-channel`s), or a
/// connection list (several main connections, `--preempt-channel`s).
pub fn run(a: &ConvertArgs) -> Result<ExitCode, Error> {
    let mut a = a.clone();
    let Some((output, mains)) = a.paths.split_last().filter(|(_, m)| !m.is_empty()) else {
        return Err("give the input(s), then the output: qmig convert IN... OUT".into());
    };
    a.output = output.clone();
    let mains = mains.to_vec();
    if mains.len() > 1 || !a.preempt_channel.is_empty() {
        if !a.multifd_channel.is_empty() {
            return Err(
                "--multifd-channel takes one main connection: QEMU does not combine \
                        multifd with postcopy recovery or preempt"
                    .into(),
            );
        }
        a.input = PathBuf::from(
            mains
                .iter()
                .chain(&a.preempt_channel)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
        );
        return run_set(&a, &mains);
    }
    a.input = mains[0].clone();
    run_one(&a)
}

/// The output's temporary names next to OUT.
fn temp_for(output: &std::path::Path) -> Result<Temp, Error> {
    let name = output
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", output.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pid = std::process::id();
    let tmp = Temp {
        dir: parent.join(format!(".{name}.qmig-convert-{pid}.d")),
        part: parent.join(format!(".{name}.qmig-convert-{pid}.part")),
        keep_part: false,
    };
    fs::create_dir_all(&tmp.dir).map_err(|e| format!("{}: {e}", tmp.dir.display()))?;
    Ok(tmp)
}

fn options(a: &ConvertArgs) -> Options {
    Options {
        zero_pages: match a.zero_pages {
            ZeroArg::Zero => ZeroPages::Zero,
            ZeroArg::Skip => ZeroPages::Skip,
        },
        format: if a.format == FormatArg::MappedRam {
            Format::MappedRam
        } else {
            Format::Stream
        },
        multifd_channels: !a.multifd_channel.is_empty(),
        ..Options::default()
    }
}

/// Total bytes of regular files among `paths` (`None` if any is not one).
fn files_bytes<'p>(paths: impl IntoIterator<Item = &'p PathBuf>) -> Option<u64> {
    let mut n = 0;
    for p in paths {
        if !crate::input::is_regular_file(p) {
            return None;
        }
        n += fs::metadata(p).ok()?.len();
    }
    Some(n)
}

/// `qmig convert MAIN1 MAIN2... [--preempt-channel P]... OUT`: the
/// connections of a recovered postcopy migration read as one
/// ([`crate::connections::walk`], the order `extract` applies them in):
/// each recovery connection's handshake (RECV_BITMAP, POSTCOPY_RESUME) is
/// checked and left out, preempt channels' pages are applied with their
/// own channel context; the output is one precopy stream (or mapped-ram
/// file) of the first connection's header, configuration and device state.
fn run_set(a: &ConvertArgs, mains: &[PathBuf]) -> Result<ExitCode, Error> {
    use crate::connections::{Event, Plan, WalkError};
    use qmig_wire::connections::Role;
    let plan = Plan {
        mains,
        preempt: &a.preempt_channel,
    };
    plan.check()?;
    if let Some(p) = mains
        .iter()
        .chain(&a.preempt_channel)
        .find(|p| crate::input::is_stdin(p))
    {
        return Err(format!(
            "{}: stdin cannot be one of several connections; give files",
            p.display()
        )
        .into());
    }
    if a.format == FormatArg::MappedRam && a.compress_output.is_some() {
        return Err("--format mapped-ram cannot be compressed; leave out --compress-output".into());
    }
    let input_bytes = files_bytes(mains.iter().chain(&a.preempt_channel));
    let tmp = temp_for(&a.output)?;
    let mut conv = Converter::new(AnonImage::new(None), &tmp.dir, options(a))?;
    let mut current = mains[0].display().to_string();
    let mut stream_bytes = 0u64;
    let r = crate::connections::walk(&plan, |ev| -> Result<(), ConvertError> {
        match ev {
            Event::Item { conn, ri, recovery } => {
                current = conn.path.display().to_string();
                if recovery {
                    Ok(())
                } else if conn.role == Role::Preempt {
                    conv.handle_preempt(ri)
                } else {
                    conv.handle(ri)
                }
            }
            // The QEMU stream bytes of every connection (past any container).
            Event::Cut { end, .. } | Event::End { end, .. } => {
                stream_bytes += end;
                Ok(())
            }
        }
    });
    match r {
        Ok(_) => {}
        Err(WalkError::Open(e)) => return Err(format!("{e}; nothing written").into()),
        Err(WalkError::Wire { file, err }) => {
            return Err(format!("{file}: {err}; nothing written").into())
        }
        Err(WalkError::Visit(e)) => return Err(format!("{current}: {e}; nothing written").into()),
    }
    write_output(
        a,
        conv,
        tmp,
        input_bytes,
        None,
        Adjust {
            stream_bytes: Some(stream_bytes),
            ..Adjust::default()
        },
    )
}

/// One input (`qmig convert IN [--multifd-channel F]... OUT`).
fn run_one(a: &ConvertArgs) -> Result<ExitCode, Error> {
    let opened = crate::input::open(&a.input)?;
    let libvirt = opened.layers.iter().find_map(|l| match l {
        Layer::Libvirt(i) => Some((**i).clone()),
        Layer::Compressed(_) => None,
    });
    let mapped = a.format == FormatArg::MappedRam;
    if mapped && a.compress_output.is_some() {
        return Err("--format mapped-ram: a mapped-ram file is read at fixed offsets \
                    (QEMU loads it only from file:), so it cannot be compressed; leave out --compress-output"
            .into());
    }
    if mapped && libvirt.is_some() {
        return Err(format!(
            "{}: --format mapped-ram: the input is a libvirt save image, and its \"sparse\" format \
             (mapped-ram inside the image) is not written; convert to a stream, or from the bare QEMU stream",
            a.input.display()
        )
        .into());
    }
    let input_bytes = files_bytes(std::iter::once(&a.input).chain(&a.multifd_channel));
    let tmp = temp_for(&a.output)?;
    // A regular file is mapped, and the image refers to the mapping's pages
    // instead of copying them (see `AnonImage`): it lives until the output
    // is written.
    let (map, other_input) = match opened.input {
        crate::input::Input::Plain { file, base } if opened.seekable => {
            let map = MappedInput::new(file).map_err(|e| format!("{}: {e}", a.input.display()))?;
            (Some((map, base)), None)
        }
        other => (None, Some(other)),
    };
    let mem = AnonImage::new(map.as_ref().map(|(m, _)| m));
    let mut conv = Converter::new(mem, &tmp.dir, options(a))?;
    // Multifd channels: applied at the main stream's sync points, as
    // `extract` applies them (`OfflineChannels`).
    let mut multifd = (!a.multifd_channel.is_empty())
        .then(|| crate::multifd_apply::offline_channels(&a.multifd_channel));

    let apply = match (&map, other_input) {
        (Some((map, base)), _) => apply_slice(map, *base, &mut conv, multifd.as_mut()),
        (None, None) => Ok(()),
        (None, Some(other)) => {
            let (mut rd, _) = crate::input::reader_for(other, false, &a.input)?;
            let mut r = Ok(());
            loop {
                match rd.next_item() {
                    Ok(Some(ri)) => {
                        if let Err(e) = apply_item(&mut conv, multifd.as_mut(), &ri) {
                            r = Err(e);
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        r = Err(ApplyError::Convert(e.into()));
                        break;
                    }
                }
            }
            r
        }
    };
    let mut adjust = Adjust::default();
    let apply = apply.and_then(|()| match multifd.as_mut() {
        Some(m) => {
            let r = m.finish(conv.dst_mut()).map_err(ApplyError::Multifd);
            let stats = m.stats();
            crate::multifd_apply::report(&stats);
            for (_, s) in &stats {
                adjust.multifd.page += s.normal_pages;
                adjust.multifd.zero += s.zero_pages;
            }
            r
        }
        None => Ok(()),
    });
    apply.map_err(|e| format!("{}: {e}; nothing written", a.input.display()))?;
    write_output(a, conv, tmp, input_bytes, libvirt, adjust)
}

/// What the report of the main stream's converter lacks.
#[derive(Debug, Default)]
struct Adjust {
    /// The QEMU stream bytes of every connection (a connection list).
    stream_bytes: Option<u64>,
    /// Pages of the multifd channels (normal as `page`, zero as `zero`).
    multifd: qmig_ram_src::convert::Kinds,
}

impl Adjust {
    fn apply(&self, r: &mut Report) {
        if let Some(n) = self.stream_bytes {
            r.input_stream_bytes = n;
        }
        r.input.page += self.multifd.page;
        r.input.zero += self.multifd.zero;
    }
}

/// Why applying an input failed.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    /// The main stream.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A multifd channel (its offset is in that channel, or in the main
    /// stream for the sync pairing).
    #[error("multifd: {0}")]
    Multifd(qmig_ram_dst::multifd::MultifdError),
}

/// Applies one main-stream item, after the multifd channels' pages up to
/// the sync point it is (if it is one).
fn apply_item<M: qmig_ram_dst::GuestMemory>(
    conv: &mut Converter<M>,
    multifd: Option<&mut crate::multifd_apply::OfflineChannels>,
    ri: &ReadItem<'_>,
) -> Result<(), ApplyError> {
    if let Some(m) = multifd {
        m.before_item(ri, conv.dst_mut())
            .map_err(ApplyError::Multifd)?;
    }
    conv.handle(ri)?;
    Ok(())
}

/// Writes the output of a converter fed its whole input (stream or
/// mapped-ram, compressed or in a libvirt image) and moves it into place.
fn write_output(
    a: &ConvertArgs,
    mut conv: Converter<AnonImage<'_>>,
    tmp: Temp,
    input_bytes: Option<u64>,
    libvirt: Option<qmig_container::LibvirtImage>,
    adjust: Adjust,
) -> Result<ExitCode, Error> {
    let mapped = a.format == FormatArg::MappedRam;
    let file = File::create(&tmp.part).map_err(|e| format!("{}: {e}", tmp.part.display()))?;
    if mapped {
        let (mut report, w) = conv.finish_mapped_ram(BufWriter::with_capacity(1 << 20, file))?;
        adjust.apply(&mut report);
        let file = w.into_inner().map_err(|e| e.into_error())?;
        let meta = file.metadata()?;
        drop(file);
        tmp.finish(&a.output)?;
        finish_message(a, &report, input_bytes, meta.len(), false);
        {
            use std::os::unix::fs::MetadataExt;
            if a.report && !a.json {
                println!(
                    "mapped-ram file: {} bytes apparent, {} bytes allocated on disk (sparse)",
                    meta.len(),
                    meta.blocks() * 512
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = Counted {
        inner: BufWriter::with_capacity(1 << 20, file),
        n: 0,
    };
    if let Some(img) = &libvirt {
        let mut h = img.header.clone();
        h.format = match a.compress_output {
            None => SaveFormat::Raw,
            Some(OutCompression::Gzip) => SaveFormat::Gzip,
            Some(OutCompression::Xz) => SaveFormat::Xz,
            Some(OutCompression::Zstd) => SaveFormat::Zstd,
        };
        let used = img.data.xml.len() as u64
            + 1
            + img.data.cookie.as_ref().map_or(0, |c| c.len() as u64 + 1);
        let padding = u64::from(img.header.data_len).saturating_sub(used);
        let prefix = encode_image_prefix(
            &mut h,
            &img.data,
            u32::try_from(padding).unwrap_or(0),
            u32::MAX,
        )?;
        out.write_all(&prefix)?;
    }
    let report = {
        let w: &mut dyn Write = &mut out;
        match a.compress_output {
            None => conv.finish(w)?,
            Some(OutCompression::Gzip) => {
                let mut e = flate2::write::GzEncoder::new(w, flate2::Compression::default());
                let r = conv.finish(&mut e)?;
                e.finish()?;
                r
            }
            Some(OutCompression::Zstd) => {
                let mut e = zstd::stream::write::Encoder::new(w, 3)?;
                let r = conv.finish(&mut e)?;
                e.finish()?;
                r
            }
            Some(OutCompression::Xz) => {
                let mut e = liblzma::write::XzEncoder::new(w, 6);
                let r = conv.finish(&mut e)?;
                e.finish()?;
                r
            }
        }
    };
    let mut report = report;
    adjust.apply(&mut report);
    out.flush()?;
    let out_bytes = out.n;
    drop(out);
    tmp.finish(&a.output)?;
    finish_message(a, &report, input_bytes, out_bytes, libvirt.is_some());
    Ok(ExitCode::SUCCESS)
}

/// The report (`--report`), or one line on stderr.
fn finish_message(
    a: &ConvertArgs,
    report: &Report,
    input_bytes: Option<u64>,
    out_bytes: u64,
    libvirt: bool,
) {
    if a.report || a.json {
        print_report(a, report, input_bytes, out_bytes, libvirt);
    } else {
        eprintln!(
            "qmig: converted {} ({} page records) to {} ({} pages once, {} bytes)",
            a.input.display(),
            report.input.total(),
            a.output.display(),
            report.output.total(),
            out_bytes
        );
    }
}

/// Applies every item of a mapped stream (which starts at file offset
/// `base`), releasing applied pages of the mapping as it goes.
fn apply_slice(
    map: &MappedInput,
    base: u64,
    conv: &mut Converter<AnonImage<'_>>,
    mut multifd: Option<&mut crate::multifd_apply::OfflineChannels>,
) -> Result<(), ApplyError> {
    const RELEASE_STEP: u64 = 32 << 20;
    let buf = map.as_slice();
    let buf = buf.get(base as usize..).unwrap_or(&[]);
    let pb = crate::progress::bytes(buf.len() as u64, "convert");
    let mut rd = SliceReader::new(buf);
    crate::input::configure(rd.decoder_mut());
    let mut released = 0u64;
    let mut n = 0u32;
    let r = loop {
        let (offset, item) = match rd.next() {
            Some(Ok(x)) => x,
            None => break Ok(()),
            Some(Err(e)) => break Err(ApplyError::Convert(e.into())),
        };
        n = n.wrapping_add(1);
        if n.is_multiple_of(4096) {
            pb.set_position(offset);
            if offset - released > RELEASE_STEP {
                map.release_prefix((base + offset) as usize);
                released = offset;
            }
        }
        let decoder = rd.decoder();
        let len = (decoder.position() - offset) as usize;
        let ri = ReadItem {
            offset,
            len,
            item,
            decoder,
        };
        if let Err(e) = apply_item(conv, multifd.as_deref_mut(), &ri) {
            break Err(e);
        }
    };
    pb.finish_and_clear();
    r
}

fn print_report(
    a: &ConvertArgs,
    r: &Report,
    input_bytes: Option<u64>,
    output_bytes: u64,
    libvirt: bool,
) {
    let in_bytes = input_bytes.unwrap_or(r.input_stream_bytes);
    let ratio = if output_bytes > 0 {
        in_bytes as f64 / output_bytes as f64
    } else {
        0.0
    };
    let kinds = |k: &qmig_ram_src::convert::Kinds| json!({"zero": k.zero, "page": k.page, "xbzrle": k.xbzrle, "compressed": k.compressed, "total": k.total()});
    if a.json {
        let v = json!({
            "input": a.input.display().to_string(),
            "output": a.output.display().to_string(),
            "input_bytes": in_bytes,
            "input_stream_bytes": r.input_stream_bytes,
            "output_bytes": output_bytes,
            "output_stream_bytes": r.output_stream_bytes,
            "compaction_ratio": ratio,
            "pages_before": kinds(&r.input),
            "pages_after": kinds(&r.output),
            "discarded_pages": r.discarded_pages,
            "skipped_zero_pages": r.skipped_zero_pages,
            "untouched_pages": r.untouched_pages,
            "page_size": r.page_size,
            "blocks": r.blocks.iter().map(|(n, l)| json!({"name": n, "length": l})).collect::<Vec<_>>(),
            "dropped_commands": r.dropped_commands,
            "postcopy": r.postcopy,
            "vmdesc": r.vmdesc,
            "libvirt_image": libvirt,
            "compress_output": a.compress_output.map(|c| format!("{c:?}").to_lowercase()),
            "format": if a.format == FormatArg::MappedRam { "mapped-ram" } else { "stream" },
        });
        println!("{v}");
        return;
    }
    println!(
        "input   {}: {in_bytes} bytes (QEMU stream {} bytes)",
        a.input.display(),
        r.input_stream_bytes
    );
    println!(
        "output  {}: {output_bytes} bytes (QEMU stream {} bytes){}",
        a.output.display(),
        r.output_stream_bytes,
        if libvirt { ", libvirt save image" } else { "" }
    );
    println!("pages   kind          before      after");
    for (k, b, o) in [
        ("zero", r.input.zero, r.output.zero),
        ("page", r.input.page, r.output.page),
        ("xbzrle", r.input.xbzrle, r.output.xbzrle),
        ("compressed", r.input.compressed, r.output.compressed),
        ("total", r.input.total(), r.output.total()),
    ] {
        println!("        {k:<10} {b:>10} {o:>10}");
    }
    if r.discarded_pages > 0 || r.skipped_zero_pages > 0 || r.untouched_pages > 0 {
        println!(
            "        postcopy-discarded {}, zero pages skipped {}, never sent (not written) {}",
            r.discarded_pages, r.skipped_zero_pages, r.untouched_pages
        );
    }
    if !r.dropped_commands.is_empty() {
        let d: Vec<String> = r
            .dropped_commands
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("dropped commands: {}", d.join(", "));
    }
    println!("compaction ratio {ratio:.2} (input bytes / output bytes)");
}

/// `qmig send --mapped-ram --to file:PATH`: writes the RAM images
/// (`names`, `images`, already checked against the template) as a
/// mapped-ram file in the template's container
/// ([`qmig_ram_src::mapped::write_from_template`]). It lives here, with
/// `convert`'s mapped-ram output, to keep `send`'s stream code apart. A
/// failed file is removed unless `--keep-partial`.
pub fn send_mapped_ram<I: AsRef<[u8]>>(
    a: &crate::send::SendArgs,
    t: &qmig_ram_src::Template<'_>,
    names: &[String],
    images: &[I],
) -> crate::error::CliResult {
    use crate::error::CliError;
    let crate::uri::MigUri::File(path) = &a.to else {
        return Err(CliError::Usage(format!(
            "--mapped-ram writes a file (QEMU reads mapped-ram only from file:), not {}",
            a.to
        )));
    };
    let start = std::time::Instant::now();
    let file = File::create(path).map_err(|e| CliError::io(path, "create", e))?;
    let blocks: Vec<(&str, &[u8])> = names
        .iter()
        .zip(images)
        .map(|(n, i)| (n.as_str(), i.as_ref()))
        .collect();
    let r = qmig_ram_src::mapped::write_from_template(
        t,
        &blocks,
        BufWriter::with_capacity(1 << 20, file),
    )
    .map_err(|e| CliError::data(format!("{}: {e}", path.display())))
    .and_then(|(c, w)| {
        let f = w
            .into_inner()
            .map_err(|e| CliError::io(path, "write", e.into_error()))?;
        let len = f
            .metadata()
            .map_err(|e| CliError::io(path, "stat", e))?
            .len();
        Ok((c, len))
    });
    let (counts, len) = match r {
        Ok(x) => x,
        Err(e) => {
            if !a.keep_partial {
                let _ = fs::remove_file(path);
            }
            return Err(e);
        }
    };
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({"bytes": len, "seconds": secs, "mapped_ram": true, "passes": 1,
                   "normal": counts.written, "duplicate": counts.zero})
        );
    } else if !crate::progress::quiet() {
        eprintln!(
            "qmig: wrote mapped-ram file {} ({len} bytes, sparse) in {secs:.3}s: {} normal, {} zero pages",
            path.display(),
            counts.written,
            counts.zero
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The final RAM image of a conversion, in anonymous memory: one private
/// anonymous mapping per block, advised for transparent huge pages. Pages
/// never written cost nothing (they read as the shared zero page), a ZERO
/// record onto a page that is still zero writes nothing, and nothing goes
/// to disk (the image is read once, to write the output). It replaced
/// sparse files mapped from the temporary directory: faulting page-cache
/// pages of those files in, and their writeback, were a third of the run.
///
/// When the input is a mapped file, a PAGE record's data is not copied:
/// the image notes where in the input the page is (`refs`, per 4 KiB unit)
/// and gives that slice back when the output is written. Copying the pages
/// in made the kernel allocate and zero the whole image first, half of the
/// conversion's time. A page is copied in ("materialized") only when
/// something reads it for writing (an XBZRLE record, a fill byte) or writes
/// part of it; a ZERO record or a discard just forgets the reference.
struct AnonImage<'a> {
    blocks: Vec<(String, *mut u8, usize)>,
    /// Per block, per 4 KiB unit: 0, or 1 + the input offset of the unit's
    /// content. Allocated zeroed on the first reference.
    refs: Vec<Vec<u64>>,
    input: Option<&'a MappedInput>,
    /// Input bytes handed out by `read` since the mapping was last released.
    read_since_release: usize,
}

/// The unit of `AnonImage::refs`.
const UNIT: usize = 4096;
/// `read` releases the input mapping's pages after handing out this many
/// bytes of it, keeping the resident set bounded while the output is written.
const READ_RELEASE_STEP: usize = 16 << 20;

impl std::fmt::Debug for AnonImage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.blocks.iter().map(|(n, _, l)| (n, l)))
            .finish()
    }
}

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why)
}

impl<'a> AnonImage<'a> {
    fn new(input: Option<&'a MappedInput>) -> Self {
        AnonImage {
            blocks: Vec::new(),
            refs: Vec::new(),
            input,
            read_since_release: 0,
        }
    }

    fn map(len: usize) -> std::io::Result<*mut u8> {
        if len == 0 {
            return Ok(std::ptr::NonNull::<u8>::dangling().as_ptr());
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched, and the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just created, of its exact length;
        // failure only means no huge pages.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(p.cast())
    }

    fn unmap(p: *mut u8, len: usize) {
        if len > 0 {
            // SAFETY: `p`/`len` are exactly a mapping made by `map` and not
            // used after this (the caller drops or replaces the entry).
            unsafe { libc::munmap(p.cast(), len) };
        }
    }

    /// Checks `offset..offset + len` against block `index`; gives the start.
    fn check(&self, index: usize, offset: u64, len: usize) -> std::io::Result<usize> {
        let Some(&(_, _, have)) = self.blocks.get(index) else {
            return Err(invalid(format!("block index {index} out of range")));
        };
        usize::try_from(offset)
            .ok()
            .filter(|&o| o.checked_add(len).is_some_and(|e| e <= have))
            .ok_or_else(|| {
                invalid(format!(
                    "{len} bytes at {offset:#x} outside block {index} of {have:#x} bytes"
                ))
            })
    }

    /// The image's own bytes (not the references) of a checked range.
    fn slice(&mut self, index: usize, offset: u64, len: usize) -> std::io::Result<&mut [u8]> {
        let start = self.check(index, offset, len)?;
        let (_, p, _) = self.blocks[index];
        // SAFETY: `start` is inside the block's mapping (checked above).
        let at = unsafe { p.add(start) };
        // SAFETY: `at..at + len` lies inside the block's mapping of `have`
        // bytes (checked above), and the returned borrow of `self` keeps the
        // mapping alive and unaliased for its lifetime.
        Ok(unsafe { std::slice::from_raw_parts_mut(at, len) })
    }

    /// The units of `start..start + len` (a checked range of block `index`).
    fn units(start: usize, len: usize) -> std::ops::Range<usize> {
        start / UNIT..(start + len).div_ceil(UNIT)
    }

    /// Copies the referenced input content of every unit touching
    /// `start..start + len` of block `index` into the image; forgets the
    /// references.
    fn materialize(&mut self, index: usize, start: usize, len: usize) -> std::io::Result<()> {
        let Some(input) = self.input else {
            return Ok(());
        };
        let (_, p, have) = self.blocks[index];
        let Some(refs) = self.refs.get_mut(index).filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        for u in Self::units(start, len) {
            let Some(r) = refs.get_mut(u) else { break };
            if *r == 0 {
                continue;
            }
            let from = (*r - 1) as usize;
            *r = 0;
            let at = u * UNIT;
            let n = UNIT.min(have - at);
            let src = input
                .as_slice()
                .get(from..from + n)
                .ok_or_else(|| invalid(format!("reference {from:#x} outside the input")))?;
            // SAFETY: `at` is inside the block's mapping (`u` is a unit of a
            // checked range, so `at < have`).
            let dst = unsafe { p.add(at) };
            // SAFETY: `dst..dst + n` lies inside the block's mapping of
            // `have` bytes (`n` clipped to `have`); `src` is the read-only
            // input mapping, distinct from it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
        }
        Ok(())
    }

    /// Forgets the references of the units wholly inside `start..start + len`
    /// and materializes the ones it covers in part.
    fn forget(&mut self, index: usize, start: usize, len: usize) -> std::io::Result<()> {
        if !start.is_multiple_of(UNIT) {
            self.materialize(index, start, 1)?;
        }
        if !(start + len).is_multiple_of(UNIT) {
            self.materialize(index, start + len - 1, 1)?;
        }
        if let Some(refs) = self.refs.get_mut(index) {
            for u in Self::units(start, len) {
                match refs.get_mut(u) {
                    Some(r) => *r = 0,
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// Where `data` lies in the input mapping, if it does.
    fn input_offset(&self, data: &[u8]) -> Option<usize> {
        let input = self.input?.as_slice();
        let base = input.as_ptr() as usize;
        let at = (data.as_ptr() as usize).checked_sub(base)?;
        (at.checked_add(data.len())? <= input.len()).then_some(at)
    }
}

impl Drop for AnonImage<'_> {
    fn drop(&mut self) {
        for &(_, p, len) in &self.blocks {
            Self::unmap(p, len);
        }
    }
}

impl qmig_ram_dst::GuestMemory for AnonImage<'_> {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "block too large"))?;
        match index.cmp(&self.blocks.len()) {
            std::cmp::Ordering::Less => {
                let (_, old, old_len) = self.blocks[index];
                // A unit cut by the new end keeps only its image bytes.
                let keep = old_len.min(len);
                if !keep.is_multiple_of(UNIT) {
                    self.materialize(index, keep, 1)?;
                }
                let p = Self::map(len)?;
                // SAFETY: both mappings are live and distinct; `keep` is
                // within each.
                unsafe { std::ptr::copy_nonoverlapping(old, p, keep) };
                Self::unmap(old, old_len);
                self.blocks[index] = (name.to_string(), p, len);
                if let Some(r) = self.refs.get_mut(index).filter(|r| !r.is_empty()) {
                    r.resize(len.div_ceil(UNIT), 0);
                    if !keep.is_multiple_of(UNIT) {
                        r[keep / UNIT] = 0;
                    }
                }
            }
            std::cmp::Ordering::Equal => {
                let p = Self::map(len)?;
                self.blocks.push((name.to_string(), p, len));
                self.refs.push(Vec::new());
            }
            std::cmp::Ordering::Greater => {
                return Err(invalid(format!("block index {index} skips ahead")));
            }
        }
        Ok(())
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> std::io::Result<&mut [u8]> {
        let start = self.check(index, offset, len)?;
        self.materialize(index, start, len)?;
        self.slice(index, offset, len)
    }

    fn read(&mut self, index: usize, offset: u64, len: usize) -> std::io::Result<&[u8]> {
        let start = self.check(index, offset, len)?;
        let units = Self::units(start, len);
        let refs = self.refs.get(index).map_or(&[][..], |r| r.as_slice());
        let (first, whole) = (
            refs.get(units.start).copied().unwrap_or(0),
            start.is_multiple_of(UNIT),
        );
        if first != 0 && whole {
            // One input slice if every unit refers to the next unit's bytes.
            let from = (first - 1) as usize;
            let contiguous = units
                .clone()
                .enumerate()
                .all(|(i, u)| refs.get(u).copied() == Some(first + (i * UNIT) as u64));
            if let (true, Some(input)) = (contiguous, self.input) {
                self.read_since_release += len;
                if self.read_since_release >= READ_RELEASE_STEP {
                    // Drops this process's mappings of input pages (they
                    // stay in the page cache); no slice of it is borrowed now.
                    input.release_prefix(input.as_slice().len());
                    self.read_since_release = len;
                }
                return input
                    .as_slice()
                    .get(from..from + len)
                    .ok_or_else(|| invalid(format!("reference {from:#x} outside the input")));
            }
        }
        self.materialize(index, start, len)?;
        self.slice(index, offset, len).map(|b| &*b)
    }

    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let start = self.check(index, offset, data.len())?;
        if let (Some(from), true) = (
            self.input_offset(data),
            start.is_multiple_of(UNIT) && data.len().is_multiple_of(UNIT),
        ) {
            let n = self.blocks[index].2.div_ceil(UNIT);
            let refs = &mut self.refs[index];
            if refs.is_empty() {
                *refs = vec![0; n];
            }
            for (i, u) in Self::units(start, data.len()).enumerate() {
                refs[u] = (from + i * UNIT) as u64 + 1;
            }
            return Ok(());
        }
        self.forget(index, start, data.len())?;
        self.slice(index, offset, data.len())?.copy_from_slice(data);
        Ok(())
    }

    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).map_err(|_| invalid(format!("{len} bytes")))?;
        let start = self.check(index, offset, len)?;
        self.forget(index, start, len)?;
        let b = self.slice(index, offset, len)?;
        // Reading a page never written maps the zero page: no allocation.
        if !qmig_ram_src::is_zero(b) {
            b.fill(0);
        }
        Ok(())
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        let mut at = offset;
        let end = offset.checked_add(len).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "discard range overflows")
        })?;
        while at < end {
            let n = (end - at).min(1 << 20);
            self.zero_page(index, at, n)?;
            at += n;
        }
        Ok(())
    }
}
