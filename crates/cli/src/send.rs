//! `qmig send`: migrate RAM images (an `extract`/`recv` output) to a QEMU
//! destination, in a container copied from a template stream.
//!
//! The stream: the template's header and configuration, the `ram` START
//! section (MEM_SIZE), PART sections of at most one rate-limit period's
//! bytes each, \[SWITCHOVER_START\], the `ram` END section (the final pass),
//! then the template's device sections, EOF and vmdesc, byte for byte.
//!
//! With `--passes N` (N > 1), a deterministic workload (seeded PRNG) changes
//! a fraction of the first block's pages before passes 2..=N and reports
//! them dirty; pass N is the completion stage. `--final-ram DIR` writes the
//! memory as the destination must end with it (manifest + images).
//!
//! Safety checks: the RAM directory's manifest must say complete
//! (`--allow-incomplete`), its layout must match the template's MEM_SIZE
//! list (`--force`), and `--compress` is refused for a template whose
//! machine type belongs to QEMU 9.1 or later, which can no longer load
//! COMPRESS_PAGE records.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qmig_ram_src::{
    Config, Progress, RamSrc, Source, SourcePhase, SrcBlock, Template, DEFAULT_XBZRLE_CACHE_SIZE,
};
use qmig_wire::Item;
use serde::Serialize;

use crate::error::{CliError, CliResult};
use crate::manifest::{self, BlockEntry, Manifest};
use crate::uri::MigUri;

/// `--dirty-fraction`: a number in [0, 1] (NaN refused).
fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{s} is not in [0, 1]"));
    }
    Ok(f)
}

/// Options of `qmig send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Directory with manifest.json and block images.
    #[arg(long, value_name = "DIR")]
    pub ram: PathBuf,
    /// Stream whose header, configuration, device sections and vmdesc are reused.
    #[arg(long, value_name = "STREAM")]
    pub template: PathBuf,
    /// Destination: `tcp:HOST:PORT`, `tcp::PORT`, `tcp:[IPv6]:PORT`, `unix:PATH`, `file:PATH` or `exec:CMD`.
    #[arg(long, value_name = "URI", value_parser = crate::uri::MigUri::parse)]
    pub to: MigUri,
    /// Use XBZRLE after the first pass.
    #[arg(long)]
    pub xbzrle: bool,
    /// XBZRLE cache size (bytes, or with a K/M/G/T suffix; default 64M).
    #[arg(long, value_name = "SIZE", requires = "xbzrle", value_parser = crate::size::parse_size)]
    pub cache_size: Option<u64>,
    /// Send COMPRESS_PAGE records at this zlib level (QEMU <= 9.0 destinations only).
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(u32).range(0..=9))]
    pub compress: Option<u32>,
    /// Number of passes (>= 1); before passes 2..=N a workload changes pages (N is the final pass).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub passes: u32,
    /// Fraction (0 to 1) of the first block's pages changed before each later pass.
    #[arg(long, default_value_t = 0.05, value_parser = parse_fraction)]
    pub dirty_fraction: f64,
    /// Workload PRNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rate limit per second (QEMU's max-bandwidth; bytes or K/M/G/T suffix; 0 = unlimited).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Send zero pages as PAGE (QEMU's zero-page-detection=none).
    #[arg(long)]
    pub no_zero_detection: bool,
    /// Write the memory the destination must end with (manifest + images) here.
    #[arg(long, value_name = "DIR")]
    pub final_ram: Option<PathBuf>,
    /// Send RAM whose manifest says incomplete (an interrupted or failed extract/recv).
    #[arg(long)]
    pub allow_incomplete: bool,
    /// Send although the RAM layout does not match the template's.
    #[arg(long)]
    pub force: bool,
    /// Keep a partial file: output after an error (default: removed).
    #[arg(long)]
    pub keep_partial: bool,
    /// Print the counters (or the error) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write a mapped-ram file (`--to file:PATH` only; QEMU loads it with
    /// the mapped-ram capability on): the RAM at fixed offsets, in one pass.
    #[arg(long, conflicts_with_all = ["xbzrle", "compress", "passes", "no_zero_detection", "max_bandwidth", "final_ram"])]
    pub mapped_ram: bool,
    /// Give up when a tcp: destination accepts no data, or does not close
    /// the connection after the stream, for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Postcopy: advise it at setup, then switch over after
    /// `--postcopy-after` precopy passes and serve the destination's page
    /// requests before the background scan (tcp: and unix: only; the
    /// destination needs the postcopy-ram capability).
    #[arg(long, conflicts_with_all = ["passes", "compress"])]
    pub postcopy: bool,
    /// Precopy passes before the postcopy switchover (0 = right after setup:
    /// every page is then requested or pushed by the background scan). The
    /// workload (`--dirty-fraction`, `--seed`) changes pages after each pass.
    #[arg(
        long,
        value_name = "PASSES",
        default_value_t = 1,
        requires = "postcopy"
    )]
    pub postcopy_after: u32,
    /// Multifd (`--multifd N` and its settings).
    #[command(flatten)]
    pub multifd: crate::multifd_send::MultifdSendArgs,
    /// Postcopy recovery: when the connection breaks after POSTCOPY_RUN,
    /// pause and reconnect here (the destination's `migrate-recover` URI, or
    /// the address a `qmig recv` keeps listening on). Default: `--to`.
    #[arg(long, value_name = "URI", value_parser = crate::uri::MigUri::parse, requires = "postcopy")]
    pub recover_to: Option<MigUri>,
    /// Postcopy recovery: keep trying to reconnect for this many seconds
    /// after a cut (counted from the cut), then fail.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..), requires = "postcopy")]
    pub recover_timeout: u64,
    /// Postcopy-preempt: open a second connection to the destination after
    /// the first PONG (and again on each recovery) and send the pages it
    /// requests there, while the background scan goes on on the main
    /// connection (the destination needs the postcopy-preempt capability).
    #[arg(long, requires = "postcopy")]
    pub postcopy_preempt: bool,
}

/// Where the stream goes.
pub(crate) enum Sink {
    Tcp(TcpStream),
    Unix(UnixStream),
    File(File),
    Exec(Child, Option<ChildStdin>),
}

/// Smallest write to a `file:` destination whose blocks are allocated first.
const MIN_PREALLOCATE: usize = 64 << 10;

/// Allocates the blocks of a `len`-byte append at `offset` of a `file:`
/// destination before it is written (`fallocate` with `FALLOC_FL_KEEP_SIZE`,
/// so the size only grows as the bytes are written): the write then skips
/// the filesystem's delayed-allocation bookkeeping (on ext4 about a quarter
/// of a buffered append's time, measured with 4 MiB appends). Only a
/// speed-up: a refusal (no `fallocate` on this filesystem) is ignored, and
/// the write reports any real error.
fn preallocate_append(f: &File, offset: u64, len: usize) {
    use std::os::unix::io::AsRawFd;
    if len < MIN_PREALLOCATE {
        return;
    }
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: fallocate only reads its integer arguments; `f` is an open
    // descriptor borrowed for the duration of the call.
    let _ = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, o, l) };
}

/// Connect retries: the destination may still be starting.
const CONNECT_TRIES: u32 = 50;

impl Sink {
    /// Opens the destination. A socket gets `idle` as its read and write
    /// timeout: a destination that stops reading cannot stall us forever.
    pub(crate) fn open(uri: &MigUri, idle: Duration) -> Result<Sink, CliError> {
        let retry = |f: &mut dyn FnMut() -> std::io::Result<Sink>| {
            let mut last = None;
            for _ in 0..CONNECT_TRIES {
                if let Some(signal) = crate::signals::pending() {
                    return Err(CliError::Interrupted {
                        signal,
                        detail: Some("while connecting".into()),
                    });
                }
                match f() {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(CliError::io(
                uri.to_string(),
                "connect",
                last.unwrap_or_else(|| std::io::Error::other("no address")),
            ))
        };
        match uri {
            MigUri::Tcp { host, port } => {
                let addr = MigUri::socket_addr(host, *port, "localhost");
                retry(&mut || {
                    let s = TcpStream::connect(addr.as_str())?;
                    s.set_nodelay(true).ok();
                    s.set_write_timeout(Some(idle))?;
                    s.set_read_timeout(Some(idle))?;
                    Ok(Sink::Tcp(s))
                })
            }
            MigUri::Unix(p) => retry(&mut || {
                let s = UnixStream::connect(p)?;
                s.set_write_timeout(Some(idle))?;
                s.set_read_timeout(Some(idle))?;
                Ok(Sink::Unix(s))
            }),
            MigUri::File(p) => Ok(Sink::File(
                File::create(p).map_err(|e| CliError::io(p, "create", e))?,
            )),
            MigUri::Exec(cmd) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(Stdio::piped())
                    .spawn()
                    .map_err(|e| CliError::io("/bin/sh", "run", e))?;
                let stdin = child.stdin.take();
                Ok(Sink::Exec(child, stdin))
            }
        }
    }

    /// Writes all of `buf`, counting every byte that went out in `sent`
    /// (so an error reports the real offset).
    fn write_all(&mut self, mut buf: &[u8], sent: &mut u64, uri: &MigUri) -> Result<(), CliError> {
        if let Sink::File(f) = self {
            preallocate_append(f, *sent, buf.len());
        }
        while !buf.is_empty() {
            let r = match self {
                Sink::Tcp(s) => s.write(buf),
                Sink::Unix(s) => s.write(buf),
                Sink::File(f) => f.write(buf),
                Sink::Exec(_, Some(i)) => i.write(buf),
                Sink::Exec(_, None) => Ok(buf.len()),
            };
            match r {
                Ok(0) => {
                    return Err(CliError::Io {
                        path: uri.to_string(),
                        op: "write",
                        offset: Some(*sent),
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => {
                    *sent += n as u64;
                    buf = &buf[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    if let Some(signal) = crate::signals::pending() {
                        return Err(CliError::Interrupted {
                            signal,
                            detail: Some(format!("after {sent} bytes")),
                        });
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(CliError::Data {
                        message: format!(
                            "{uri}: the destination closed the connection after {sent} bytes (it refused the stream?): {e}"
                        ),
                        offset: Some(*sent),
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(CliError::Data {
                        message: format!(
                            "{uri}: the destination accepted no data for the idle timeout (--idle-timeout) after {sent} bytes"
                        ),
                        offset: Some(*sent),
                    })
                }
                Err(e) => {
                    return Err(CliError::Io {
                        path: uri.to_string(),
                        op: "write",
                        offset: Some(*sent),
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    /// Ends the stream and waits for the destination to let go.
    pub(crate) fn finish(self, uri: &MigUri) -> Result<(), CliError> {
        let refused = |what: String| CliError::data(format!("{uri}: {what}"));
        let io = |op, e| CliError::io(uri.to_string(), op, e);
        match self {
            Sink::Tcp(s) => {
                s.shutdown(std::net::Shutdown::Write).ok();
                wait_close(s, &refused, &io)
            }
            Sink::Unix(s) => {
                s.shutdown(std::net::Shutdown::Write).ok();
                wait_close(s, &refused, &io)
            }
            Sink::File(f) => {
                // Like QEMU's file: migration, no fsync: the data is in the
                // page cache when the command returns.
                drop(f);
                Ok(())
            }
            Sink::Exec(mut c, stdin) => {
                drop(stdin);
                let st = c.wait().map_err(|e| io("wait", e))?;
                if st.success() {
                    Ok(())
                } else {
                    Err(refused(format!("the command failed: {st}")))
                }
            }
        }
    }
}

/// QEMU closes its end once it has loaded the stream: waits for that.
/// The read timeout is `--idle-timeout`, set at connect.
fn wait_close(
    mut s: impl Read,
    refused: &dyn Fn(String) -> CliError,
    io: &dyn Fn(&'static str, std::io::Error) -> CliError,
) -> Result<(), CliError> {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if let Some(signal) = crate::signals::pending() {
                    return Err(CliError::Interrupted {
                        signal,
                        detail: Some("waiting for the destination to close".into()),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(refused(
                    "the destination reset the connection at the end of the stream".into(),
                ))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(refused(
                    "the destination did not close the connection within the idle timeout (--idle-timeout) after the stream".into(),
                ))
            }
            Err(e) => return Err(io("waiting for the destination to close", e)),
        }
    }
}

/// The RAM to send: the manifest's blocks and their images.
pub(crate) struct Ram {
    pub(crate) names: Vec<String>,
    files: Vec<String>,
    pub(crate) images: Vec<Image>,
}

/// One block image: mapped from its file (nothing is read before a page is
/// sent, so a postcopy destination runs the guest without waiting for the
/// whole image to be read), or owned (a file shorter than the block, padded
/// with zeroes, or an image the workload changed). The files must not be
/// truncated while `send` runs (reading a truncated mapping is SIGBUS).
pub(crate) enum Image {
    Owned(Vec<u8>),
    Mapped(qmig_ram_dst::MappedInput),
}

impl Image {
    /// The image as a writable vector (a mapped image is copied once).
    fn make_mut(&mut self) -> &mut Vec<u8> {
        if let Image::Mapped(m) = self {
            *self = Image::Owned(m.as_slice().to_vec());
        }
        match self {
            Image::Owned(v) => v,
            Image::Mapped(_) => unreachable!("converted above"),
        }
    }
}

impl Ram {
    /// Drops the resident pages of the mapped images (sent pages stay in
    /// the page cache), keeping `send`'s RSS bounded by one iteration's
    /// pages rather than the RAM's size.
    fn release_mapped(&self) {
        for i in &self.images {
            if let Image::Mapped(m) = i {
                m.release_prefix(m.as_slice().len());
            }
        }
    }
}

impl std::ops::Deref for Image {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Image::Owned(v) => v,
            Image::Mapped(m) => m.as_slice(),
        }
    }
}

impl AsRef<[u8]> for Image {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

fn load_ram(dir: &Path, allow_incomplete: bool) -> Result<Ram, CliError> {
    let mpath = dir.join(manifest::MANIFEST);
    let m = Manifest::read(dir)?;
    if !m.complete && !allow_incomplete {
        let why = if m.interrupted {
            "the run that wrote it was interrupted".to_string()
        } else if m.in_progress {
            "it is still being written, or its writer died".to_string()
        } else if let Some(e) = &m.error {
            format!("its writer stopped: {e}")
        } else {
            "it does not say \"complete\": true".to_string()
        };
        return Err(CliError::data(format!(
            "{}: the RAM is incomplete ({why}); pass --allow-incomplete to send it anyway",
            mpath.display()
        )));
    }
    let mut ram = Ram {
        names: Vec::new(),
        files: Vec::new(),
        images: Vec::new(),
    };
    for b in m.blocks {
        let Some(file) = b.file else {
            return Err(CliError::data(format!(
                "{}: block \"{}\" has no image file",
                mpath.display(),
                b.name
            )));
        };
        if !manifest::is_plain_file_name(&file) {
            return Err(CliError::data(format!(
                "{}: image file name \"{file}\" leaves the directory",
                mpath.display()
            )));
        }
        let path = dir.join(&file);
        let f = File::open(&path).map_err(|e| CliError::io(&path, "open", e))?;
        let flen = f
            .metadata()
            .map_err(|e| CliError::io(&path, "stat", e))?
            .len();
        if flen > b.length {
            return Err(CliError::data(format!(
                "{}: {flen} bytes, the manifest says {}",
                path.display(),
                b.length
            )));
        }
        let img = if flen == b.length && flen > 0 {
            let mut m =
                qmig_ram_dst::MappedInput::new(f).map_err(|e| CliError::io(&path, "mmap", e))?;
            // Sent pages leave the resident set (they stay in the page
            // cache) in every mode, not only where the precopy loop calls
            // `Ram::release_mapped`: peak RSS under 64 MiB (scripts/rss_check.sh).
            m.release_periodically(std::time::Duration::from_millis(10))
                .map_err(|e| CliError::io(&path, "start a thread for", e))?;
            Image::Mapped(m)
        } else {
            let mut v = std::fs::read(&path).map_err(|e| CliError::io(&path, "read", e))?;
            v.resize(b.length as usize, 0);
            Image::Owned(v)
        };
        ram.names.push(b.name);
        ram.files.push(file);
        ram.images.push(img);
    }
    Ok(ram)
}

/// The QEMU version a versioned machine type belongs to: `pc-i440fx-9.1`
/// and `pc-q35-10.0` give (9, 1) and (10, 0); `microvm` gives `None`.
pub(crate) fn machine_version(machine: &str) -> Option<(u32, u32)> {
    machine.split('-').rev().find_map(|part| {
        let (a, b) = part.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
}

/// splitmix64: a small deterministic PRNG for the workload.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Changes about `fraction` of the first block's pages: mostly a few bytes
/// (XBZRLE material), sometimes the whole page, sometimes zeroes it, and
/// reports them dirty. Only the upper half of the block is touched (low
/// memory holds firmware and option-ROM state that devices check when they
/// load), and three quarters of the writes go to a hot window of
/// `fraction` of the block, so later passes rewrite the same pages, as guests do.
pub(crate) fn workload(
    rng: &mut Rng,
    ram: &mut Ram,
    src: &mut RamSrc,
    fraction: f64,
    page_size: usize,
) -> Result<u64, CliError> {
    let Some(img) = ram.images.first_mut() else {
        return Ok(0);
    };
    if fraction <= 0.0 {
        return Ok(0);
    }
    let img = img.make_mut();
    let pages = (img.len() / page_size) as u64;
    let base = pages / 2;
    let span = pages - base;
    let n = ((pages as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
    let hot = n.clamp(1, span.max(1));
    for _ in 0..n {
        let p = if rng.below(4) < 3 {
            base + rng.below(hot)
        } else {
            base + rng.below(span)
        };
        let page = &mut img[(p as usize) * page_size..(p as usize + 1) * page_size];
        match rng.below(20) {
            0..=13 => {
                for _ in 0..=rng.below(16) {
                    let at = rng.below(page_size as u64) as usize;
                    page[at] = rng.next() as u8;
                }
            }
            14..=16 => page.iter_mut().for_each(|b| *b = rng.next() as u8),
            _ => page.fill(0),
        }
        src.handle_dirty_page(0, p)
            .map_err(|e| CliError::Usage(e.to_string()))?;
    }
    Ok(n)
}

/// Reads the template stream item by item (gzip'd or not) and keeps
/// everything but its page records: a valid stream with the same container,
/// MEM_SIZE list and device state, a few hundred KiB however large the
/// template's RAM.
fn template_skeleton(path: &Path) -> Result<Vec<u8>, CliError> {
    let (input, seekable) = crate::input::open_input(path)?;
    let mut out = Vec::new();
    // A plain file is mapped and parsed in place (`SliceReader`, several
    // times faster than reading it: the template is often the whole
    // capture), its pages released as the parse moves on.
    if let (crate::input::Input::Plain { file, base }, true) = (&input, seekable) {
        let map = qmig_ram_dst::MappedInput::new(
            file.try_clone()
                .map_err(|e| CliError::io(path, "open", e))?,
        )
        .map_err(|e| CliError::io(path, "mmap", e))?;
        let buf = map.as_slice().get(*base as usize..).unwrap_or(&[]);
        let mut rd = qmig_wire::SliceReader::new(buf);
        crate::input::configure(rd.decoder_mut());
        let mut released = 0u64;
        for r in rd.by_ref() {
            let (offset, item) = r.map_err(|e| CliError::wire(path, e))?;
            if offset - released > 16 << 20 {
                map.release_prefix((base + offset) as usize);
                released = offset;
            }
            skeleton_item(path, offset, &item, &mut out)?;
        }
        return Ok(out);
    }
    let (mut rd, _) = crate::input::reader_for(input, seekable, path)?;
    while let Some(ri) = rd.next_item().map_err(|e| CliError::wire(path, e))? {
        skeleton_item(path, ri.offset, &ri.item, &mut out)?;
    }
    Ok(out)
}

/// Appends `item` to the template skeleton unless it is a page record.
fn skeleton_item(
    path: &Path,
    offset: u64,
    item: &Item<'_>,
    out: &mut Vec<u8>,
) -> Result<(), CliError> {
    {
        match item {
            Item::Ram(r) if r.is_page() => {}
            // Refused before its page areas are read into the skeleton.
            Item::MappedRam(_) => {
                return Err(CliError::data(format!(
                    "{}: the template uses mapped-ram, which qmig does not support",
                    path.display()
                )))
            }
            it => it.write(out).map_err(|e| CliError::Data {
                message: format!("{}: {e}", path.display()),
                offset: Some(offset),
            })?,
        }
    }
    Ok(())
}

/// Writes `buf` and paces to `bw` bytes per second.
struct Pacer {
    start: Instant,
    sent: u64,
    /// Bytes not paced: pages the destination requested in postcopy.
    exempt: u64,
    bw: Option<u64>,
}

impl Pacer {
    /// Writes `buf` and sleeps until the rate limit allows more.
    fn send(&mut self, sink: &mut Sink, buf: &mut Vec<u8>, uri: &MigUri) -> Result<(), CliError> {
        self.write(sink, buf, uri)?;
        if let Some(d) = self.due() {
            std::thread::sleep(d);
        }
        Ok(())
    }

    /// Writes `buf` without waiting.
    fn write(&mut self, sink: &mut Sink, buf: &mut Vec<u8>, uri: &MigUri) -> Result<(), CliError> {
        if let Some(signal) = crate::signals::pending() {
            return Err(CliError::Interrupted {
                signal,
                detail: Some(format!("after {} bytes", self.sent)),
            });
        }
        sink.write_all(buf, &mut self.sent, uri)?;
        buf.clear();
        Ok(())
    }

    /// How long the rate limit wants us to wait now, if at all.
    fn due(&self) -> Option<Duration> {
        let bw = self.bw?;
        let paced = self.sent.saturating_sub(self.exempt);
        let due = Duration::from_secs_f64(paced as f64 / bw as f64);
        let el = self.start.elapsed();
        (due > el).then(|| due - el)
    }
}

/// The `--json` summary.
#[derive(Serialize)]
struct Summary {
    bytes: u64,
    seconds: f64,
    passes: u32,
    dirty_sync_count: u64,
    normal: u64,
    duplicate: u64,
    xbzrle: XbzrleSummary,
    compressed: CompressedSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<PostcopySummary>,
}

#[derive(Serialize)]
struct XbzrleSummary {
    pages: u64,
    bytes: u64,
    cache_miss: u64,
    overflow: u64,
    unchanged: u64,
}

#[derive(Serialize)]
struct CompressedSummary {
    pages: u64,
    bytes: u64,
}

/// `--postcopy` figures (`ram.postcopy-requests` and `ram.postcopy-bytes`
/// in QEMU's terms, plus the pages served on request).
#[derive(Serialize)]
struct PostcopySummary {
    switchover_seconds: f64,
    postcopy_seconds: f64,
    requests: u64,
    requested_pages: u64,
    requested_bytes: u64,
    postcopy_bytes: u64,
    discard_commands: u64,
    discard_ranges: u64,
    /// Recoveries completed (RESUME_ACK received) after a cut.
    recoveries: u64,
    /// Pages sent on the preempt channel.
    preempt_pages: u64,
    /// From reading a page request to having written it ([`ServeTime`]).
    request_serve_us: LatencyUs,
}

fn src_error(e: qmig_ram_src::RamSrcError) -> CliError {
    CliError::data(e.to_string())
}

/// Checks the RAM directory's blocks against the template's MEM_SIZE list.
fn check_layout(t: &Template<'_>, ram: &Ram, force: bool) -> Result<(), CliError> {
    let mut problems = Vec::new();
    for (name, img) in ram.names.iter().zip(&ram.images) {
        match t.mem_block(name) {
            Some(tb) if tb.used_length != img.len() as u64 => problems.push(format!(
                "block {name} is {:#x} bytes, the template's is {:#x}",
                img.len(),
                tb.used_length
            )),
            None => problems.push(format!("block {name} is not in the template")),
            _ => {}
        }
    }
    for tb in &t.mem_blocks {
        if !ram.names.iter().any(|n| n == tb.name) {
            problems.push(format!(
                "the template's block {} is not in the RAM directory",
                tb.name
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let text = problems.join("; ");
    if force {
        eprintln!("qmig: send: warning (--force): {text}");
        return Ok(());
    }
    Err(CliError::data(format!(
        "the RAM layout does not match the template: {text}; a destination started like the template would refuse it (--force sends anyway)"
    )))
}

/// Runs `qmig send`.
pub fn run(a: &SendArgs) -> CliResult {
    let tpl_bytes = template_skeleton(&a.template)?;
    let t = Template::parse(&tpl_bytes)
        .map_err(|e| CliError::data(format!("{}: {e}", a.template.display())))?;
    if let (Some(_), Some((major, minor))) = (a.compress, machine_version(t.machine)) {
        if (major, minor) >= (9, 1) {
            return Err(CliError::Usage(format!(
                "--compress: the template's machine type {} belongs to QEMU {major}.{minor}, and QEMU 9.1 removed \
                 the compress capability: its destinations cannot load COMPRESS_PAGE records (use --xbzrle, or \
                 a template captured from QEMU 9.0 or older)",
                t.machine
            )));
        }
    }
    if t.has_capability("mapped-ram") {
        return Err(CliError::data(format!(
            "{}: the template's configuration lists the mapped-ram capability (a `migrate file:` with \
             mapped-ram), which a socket destination would refuse: `qmig convert` it to a plain stream \
             first, or use a template from a socket migration",
            a.template.display()
        )));
    }
    let mut ram = load_ram(&a.ram, a.allow_incomplete)?;
    check_layout(&t, &ram, a.force)?;
    if a.mapped_ram {
        return crate::convert::send_mapped_ram(a, &t, &ram.names, &ram.images);
    }
    let page_size = 1usize << t.page_bits;

    let mut blocks = SrcBlock::sequential(
        ram.names
            .iter()
            .zip(&ram.images)
            .map(|(n, i)| (n.as_str(), i.len() as u64)),
    );
    let ignore_shared = t.has_capability("x-ignore-shared");
    for b in &mut blocks {
        let tb = t.mem_block(&b.name);
        b.mem_size_page_size = tb.and_then(|tb| tb.page_size);
        b.mem_size_addr = tb.and_then(|tb| tb.addr);
        if ignore_shared && b.mem_size_addr.is_none() {
            return Err(CliError::data(format!(
                "the template has x-ignore-shared but no guest address for block {}",
                b.name
            )));
        }
        // Postcopy sends, requests and discards whole host pages: a block
        // the template's MEM_SIZE gives a larger page size (hugetlbfs) has
        // host pages of that size (QEMU's `qemu_ram_pagesize`).
        b.host_page_size = match b.mem_size_page_size {
            Some(ps) if a.postcopy => ps,
            _ => page_size as u64,
        };
    }
    let config = Config {
        page_size,
        xbzrle_cache_size: a
            .xbzrle
            .then_some(a.cache_size.unwrap_or(DEFAULT_XBZRLE_CACHE_SIZE)),
        compress_level: a.compress,
        zero_page_detection: !a.no_zero_detection,
    };
    let src = RamSrc::new(blocks, config).map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(n) = a.multifd.multifd {
        return crate::multifd_send::run(a, t, src, ram, n);
    }
    if a.postcopy && !matches!(a.to, MigUri::Tcp { .. } | MigUri::Unix(_)) {
        return Err(CliError::Usage(format!(
            "--postcopy needs a return path: use a tcp: or unix: destination, not {}",
            a.to
        )));
    }
    if let Some(dir) = &a.final_ram {
        crate::files::output_dir(dir)?;
    }
    let mut source = Source::new(t, src, a.postcopy);

    crate::signals::install();
    let partial = match &a.to {
        MigUri::File(p) => Some(p.clone()),
        _ => None,
    };
    let idle = Duration::from_secs(a.idle_timeout);
    let mut sink = Sink::open(&a.to, idle)?;
    let mut pacer = Pacer {
        start: Instant::now(),
        sent: 0,
        exempt: 0,
        bw: a.max_bandwidth.filter(|&b| b > 0),
    };
    let mut pc = None;
    let r = if a.postcopy {
        stream_postcopy(a, &mut ram, &mut source, &mut sink, &mut pacer, idle)
            .map(|stats| pc = Some(stats))
    } else {
        stream(a, &mut ram, &mut source, &mut sink, &mut pacer).and_then(|()| sink.finish(&a.to))
    };
    if let Err(e) = r {
        if let (Some(p), false) = (&partial, a.keep_partial) {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let elapsed = pacer.start.elapsed();

    if let Some(dir) = &a.final_ram {
        write_final_ram(dir, &ram, &a.to)?;
    }

    let c = source.ram().counters();
    let summary = Summary {
        bytes: pacer.sent,
        seconds: elapsed.as_secs_f64(),
        passes: if a.postcopy {
            a.postcopy_after
        } else {
            a.passes
        },
        dirty_sync_count: c.dirty_sync_count,
        normal: c.normal,
        duplicate: c.duplicate,
        xbzrle: XbzrleSummary {
            pages: c.xbzrle_pages,
            bytes: c.xbzrle_bytes,
            cache_miss: c.xbzrle_cache_miss,
            overflow: c.xbzrle_overflow,
            unchanged: c.xbzrle_unchanged,
        },
        compressed: CompressedSummary {
            pages: c.compressed_pages,
            bytes: c.compressed_bytes,
        },
        postcopy: pc.map(|p: PostcopyTimes| PostcopySummary {
            switchover_seconds: p.switchover.as_secs_f64(),
            postcopy_seconds: p.postcopy.as_secs_f64(),
            requests: c.postcopy_requests,
            requested_pages: c.requested_pages,
            requested_bytes: c.requested_bytes,
            postcopy_bytes: c.postcopy_bytes,
            discard_commands: c.discard_commands,
            discard_ranges: c.discard_ranges,
            recoveries: c.resumes,
            preempt_pages: c.preempt_pages,
            request_serve_us: LatencyUs {
                count: p.serve.lat.count(),
                p50: p.serve.lat.quantile_us(0.50),
                p99: p.serve.lat.quantile_us(0.99),
            },
        }),
    };
    print_summary(a.json, &summary, || {
        let mut text = vec![format!(
            "qmig: sent {} bytes in {:.3}s: {} normal, {} zero, {} xbzrle ({} cache misses, {} overflows), {} compressed, {} syncs",
            pacer.sent,
            elapsed.as_secs_f64(),
            c.normal,
            c.duplicate,
            c.xbzrle_pages,
            c.xbzrle_cache_miss,
            c.xbzrle_overflow,
            c.compressed_pages,
            c.dirty_sync_count
        )];
        if let Some(p) = &summary.postcopy {
            text.push(format!(
                "qmig: postcopy: switched over at {:.3}s, {} page requests, {} pages served on request, \
                 {} bytes in postcopy, {} discard commands ({} ranges), {} recoveries, {} pages on the preempt channel",
                p.switchover_seconds,
                p.requests,
                p.requested_pages,
                p.postcopy_bytes,
                p.discard_commands,
                p.discard_ranges,
                p.recoveries,
                p.preempt_pages
            ));
        }
        text
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Ends a send (single connection or multifd) with its summary: with
/// `--json` (`json`), `summary` as one JSON line on stdout; otherwise the
/// lines `text` makes on stderr, unless `--quiet`.
///
/// # Errors
/// A summary serde_json cannot serialize (a data error).
pub(crate) fn print_summary<S: Serialize>(
    json: bool,
    summary: &S,
    text: impl FnOnce() -> Vec<String>,
) -> Result<(), CliError> {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).map_err(|e| CliError::data(e.to_string()))?
        );
    } else if !crate::progress::quiet() {
        for line in text() {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// The precopy stream: setup, passes, completion (device state, EOF, vmdesc).
fn stream(
    a: &SendArgs,
    ram: &mut Ram,
    src: &mut Source<'_>,
    sink: &mut Sink,
    pacer: &mut Pacer,
) -> Result<(), CliError> {
    let total: u64 = ram.images.iter().map(|i| i.len() as u64).sum();
    let page_size = 1usize << src.template().page_bits;
    // QEMU's rate limit: max-bandwidth per 100 ms period (default 128 MiB/s).
    // Unpaced, 4 MiB per iteration: the buffer and the image pages read
    // between two `release_mapped` calls stay small.
    let budget = pacer.bw.map_or(4 << 20, |b| (b / 10).max(1) as usize);
    let mut out = Vec::with_capacity(budget + (1 << 16));
    let mut rng = Rng(a.seed);
    let passes = a.passes.max(1);
    let verbose = !a.json && !crate::progress::quiet();
    let uri = &a.to;

    src.write_setup(&mut out).map_err(src_error)?;
    pacer.send(sink, &mut out, uri)?;

    let pb = crate::progress::bytes(total, "send pass 1");
    for pass in 1..passes.max(2) {
        if pass > 1 {
            let n = workload(&mut rng, ram, src.ram_mut(), a.dirty_fraction, page_size)?;
            let d = src.ram_mut().handle_sync().map_err(src_error)?;
            pb.set_message(format!("send pass {pass}"));
            if verbose {
                pb.suspend(|| {
                    eprintln!("qmig: pass {pass}: workload changed {n} pages, {d} dirty")
                });
            }
        }
        loop {
            let p = src
                .write_iteration(&ram.images, budget, &mut out)
                .map_err(src_error)?;
            pb.set_position(src.ram().counters().transferred.min(total));
            pacer.send(sink, &mut out, uri)?;
            ram.release_mapped();
            if p == Progress::Clean {
                break;
            }
        }
    }
    pb.finish_and_clear();
    if passes > 1 {
        let n = workload(&mut rng, ram, src.ram_mut(), a.dirty_fraction, page_size)?;
        if verbose {
            eprintln!("qmig: pass {passes} (completion): workload changed {n} pages");
        }
    }
    src.write_completion(&ram.images, &mut out)
        .map_err(src_error)?;
    pacer.send(sink, &mut out, uri)
}

/// What the return-path reader thread reports.
pub(crate) enum RpEvent {
    /// One whole message (its bytes) and its offset in the return path.
    Msg(u64, Vec<u8>),
    /// The return path ended: EOF (`None`) or a read error.
    Closed(Option<String>),
    /// A message broke the return path's framing (e.g. a RECV_BITMAP reply
    /// with a wrong end marker): the migration fails.
    Bad(String),
}

/// When the postcopy phase started and how long it took.
struct PostcopyTimes {
    switchover: Duration,
    postcopy: Duration,
    serve: ServeTime,
}

/// How long page requests wait on the source: from reading a request off
/// the return path until every pending request has been written to the
/// socket (the source's share of the fault round trip; the `--json`
/// summary's `request_serve_us`).
#[derive(Default)]
struct ServeTime {
    /// When the oldest request not yet written was read.
    since: Option<Instant>,
    lat: qmig_uffd_host::Latency,
}

impl ServeTime {
    /// After return-path messages were taken: start the clock if requests
    /// are now pending.
    fn read(&mut self, src: &Source<'_>) {
        if self.since.is_none() && src.ram().pending_requests().next().is_some() {
            self.since = Some(Instant::now());
        }
    }

    /// After a write: stop the clock once no request is pending.
    fn written(&mut self, src: &Source<'_>) {
        if self.since.is_some() && src.ram().pending_requests().next().is_none() {
            if let Some(t) = self.since.take() {
                self.lat.record(t.elapsed());
            }
        }
    }
}

/// p50 / p99 / count of a latency, in µs (the `--json` summary).
#[derive(Serialize)]
struct LatencyUs {
    count: u64,
    p50: Option<u64>,
    p99: Option<u64>,
}

/// Hands one return-path event to the source. `Ok(false)`: the return
/// path is closed.
fn take_rp_event(src: &mut Source<'_>, ev: RpEvent, uri: &MigUri) -> Result<bool, CliError> {
    match ev {
        RpEvent::Msg(at, bytes) => {
            let (msg, _) = qmig_wire::decode_rp_message(&bytes, at)
                .map_err(|e| CliError::data(format!("{uri}: return path: {e}")))?
                .ok_or_else(|| {
                    CliError::data(format!("{uri}: return path: message at {at} cut short"))
                })?;
            src.handle_return_path(&msg).map_err(|e| CliError::Data {
                message: format!("{uri}: {e} (return-path offset {at}); migration failed"),
                offset: Some(at),
            })?;
            Ok(true)
        }
        RpEvent::Closed(None) => Ok(false),
        RpEvent::Closed(Some(why)) | RpEvent::Bad(why) => {
            Err(CliError::data(format!("{uri}: {why}")))
        }
    }
}

/// The postcopy stream: setup with ADVISE, `--postcopy-after` precopy
/// passes, `[--postcopy-preempt: wait for the first PONG, open the preempt
/// channel]`, the switchover, then PART sections that serve page requests
/// first (never paced; on the preempt channel with `--postcopy-preempt`)
/// and push the rest in the background (paced by `--max-bandwidth`), END,
/// EOF; then waits (at most `--idle-timeout`) for the destination's SHUT.
///
/// A broken connection before POSTCOPY_RUN was sent fails the migration;
/// after it, the source pauses and recovers ([`recover`]) as often as the
/// connection breaks, each time within `--recover-timeout`.
fn stream_postcopy(
    a: &SendArgs,
    ram: &mut Ram,
    src: &mut Source<'_>,
    sink: &mut Sink,
    pacer: &mut Pacer,
    idle: Duration,
) -> Result<PostcopyTimes, CliError> {
    let uri = &a.to;
    let mut rx = sink_rp(sink, uri)?;
    let page_size = 1usize << src.template().page_bits;
    let verbose = !a.json && !crate::progress::quiet();
    // QEMU's rate limit: max-bandwidth per 100 ms period; in postcopy, at
    // most 64 KiB of background pages per PART (at least one host page), so
    // that a request waits behind little of our own writing and the return
    // path is looked at between PARTs (bench_postcopy_latency.py).
    let budget = pacer.bw.map_or(16 << 20, |b| (b / 10).max(1) as usize);
    let pc_budget = budget.min(64 << 10);
    let mut out = Vec::with_capacity(budget + (1 << 16));
    let mut rng = Rng(a.seed);
    let mut rp_open = true;
    let drain = |src: &mut Source<'_>,
                 rx: &crate::rp_poll::RpPoll,
                 open: &mut bool|
     -> Result<(), CliError> {
        while *open {
            match rx.try_recv() {
                Ok(ev) => *open = take_rp_event(src, ev, uri)?,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => *open = false,
            }
        }
        Ok(())
    };
    let lost = |what: &str| {
        CliError::data(format!(
            "{uri}: the destination closed its return path {what} (killed, or it refused the stream?)"
        ))
    };

    src.write_setup(&mut out).map_err(src_error)?;
    pacer.send(sink, &mut out, uri)?;
    for pass in 1..=a.postcopy_after {
        loop {
            drain(src, &rx, &mut rp_open)?;
            if !rp_open {
                return Err(lost("during precopy"));
            }
            let p = src
                .write_iteration(&ram.images, budget, &mut out)
                .map_err(src_error)?;
            pacer.send(sink, &mut out, uri)?;
            if p == Progress::Clean {
                break;
            }
        }
        let n = workload(&mut rng, ram, src.ram_mut(), a.dirty_fraction, page_size)?;
        if pass < a.postcopy_after {
            src.ram_mut().handle_sync().map_err(src_error)?;
        }
        if verbose {
            eprintln!("qmig: precopy pass {pass}: workload changed {n} pages");
        }
    }
    let mut preempt = None;
    if a.postcopy_preempt {
        // QEMU 10 (8.0+ machine types, `postcopy_start`): the preempt
        // channel is opened at switchover, once the main channel's first
        // PONG proves the destination took the main channel.
        let deadline = Instant::now() + idle;
        while src.ram().last_pong().is_none() {
            if !rp_open {
                return Err(lost("before its first PONG"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CliError::data(format!(
                    "{uri}: no PONG from the destination within the idle timeout (--idle-timeout)"
                )));
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(ev) => rp_open = take_rp_event(src, ev, uri)?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => rp_open = false,
            }
        }
        preempt = Some(Sink::open(uri, idle)?);
        src.handle_preempt_connected();
    }
    let switchover = pacer.start.elapsed();
    src.write_postcopy_switchover(&mut out).map_err(src_error)?;
    if let Err(e) = pacer.write(sink, &mut out, uri) {
        // POSTCOPY_RUN may not have reached the destination: fail, as
        // QEMU's `postcopy_start` does.
        let e = match src.handle_connection_lost() {
            Err(p) => CliError::data(format!("{uri}: {p}: {e}")),
            Ok(()) => e,
        };
        return Err(e);
    }
    src.handle_run_sent().map_err(src_error)?;
    if verbose {
        eprintln!(
            "qmig: postcopy switchover after {:.3}s: {} pages to go, {} discard commands",
            switchover.as_secs_f64(),
            src.ram().remaining_pages(),
            src.ram().counters().discard_commands
        );
    }
    let t_post = Instant::now();
    if !rp_open {
        // The return path ended during the switchover: a cut after RUN.
        rx = recover(
            a,
            src,
            sink,
            &mut preempt,
            pacer,
            idle,
            "the return path closed".into(),
        )?;
    }
    let mut serve = ServeTime::default();
    let postcopy = loop {
        match postcopy_phase(
            a,
            ram,
            src,
            sink,
            &rx,
            &mut preempt,
            pacer,
            idle,
            pc_budget,
            &mut out,
            &mut serve,
        ) {
            Ok(()) => break t_post.elapsed(),
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Cut(why)) => {
                out.clear();
                rx = recover(a, src, sink, &mut preempt, pacer, idle, why)?;
            }
        }
    };
    if let Some(v) = src.ram().shut().filter(|&v| v != 0) {
        return Err(CliError::data(format!(
            "{uri}: the destination sent SHUT({v}): it failed to load the stream"
        )));
    }
    close_sink(sink);
    if let Some(p) = &preempt {
        close_sink(p);
    }
    Ok(PostcopyTimes {
        switchover,
        postcopy,
        serve,
    })
}

/// Why the postcopy phase stopped before SHUT.
enum Stop {
    /// The connection broke (write or read error, EOF, idle timeout): pause
    /// and recover.
    Cut(String),
    /// A protocol error, a signal, or a timeout that recovery cannot help.
    Fatal(CliError),
}

/// A failed write: a signal ends the migration, anything else is a cut.
fn cut_or_fatal(e: CliError) -> Stop {
    match e {
        e @ CliError::Interrupted { .. } => Stop::Fatal(e),
        e => Stop::Cut(e.to_string()),
    }
}

/// One return-path event in postcopy: messages go to the source (a
/// refused one ends the migration), the end of the return path is a cut.
fn rp_event(src: &mut Source<'_>, ev: RpEvent, uri: &MigUri) -> Result<(), Stop> {
    match ev {
        RpEvent::Closed(why) => {
            Err(Stop::Cut(why.unwrap_or_else(|| {
                "the destination closed the return path".into()
            })))
        }
        RpEvent::Bad(why) => Err(Stop::Fatal(CliError::data(format!("{uri}: {why}")))),
        ev => take_rp_event(src, ev, uri).map(|_| ()).map_err(Stop::Fatal),
    }
}

/// The return path of a socket sink, read on the sending thread
/// ([`crate::rp_poll::RpPoll`]: poll + `MSG_DONTWAIT` on a `dup` of it).
fn sink_rp(sink: &Sink, uri: &MigUri) -> Result<crate::rp_poll::RpPoll, CliError> {
    let dup = |e| CliError::io(uri.to_string(), "dup", e);
    match sink {
        Sink::Tcp(s) => Ok(crate::rp_poll::RpPoll::new(
            s.try_clone().map_err(dup)?.into(),
        )),
        Sink::Unix(s) => Ok(crate::rp_poll::RpPoll::new(
            s.try_clone().map_err(dup)?.into(),
        )),
        _ => Err(CliError::Usage(
            "--postcopy needs a socket destination".into(),
        )),
    }
}

/// Shuts a socket sink down both ways (its reader thread then ends).
fn close_sink(sink: &Sink) {
    match sink {
        Sink::Tcp(s) => drop(s.shutdown(std::net::Shutdown::Both)),
        Sink::Unix(s) => drop(s.shutdown(std::net::Shutdown::Both)),
        _ => {}
    }
}

/// One connection attempt (no retries: [`recover`] retries until its
/// deadline), with `idle` as read and write timeout.
fn connect_once(uri: &MigUri, idle: Duration) -> std::io::Result<Sink> {
    match uri {
        MigUri::Tcp { host, port } => {
            use std::net::ToSocketAddrs;
            let addr = MigUri::socket_addr(host, *port, "localhost");
            let mut last = std::io::Error::other(format!("{addr}: no address"));
            for sa in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
                    Ok(s) => {
                        s.set_nodelay(true).ok();
                        s.set_write_timeout(Some(idle))?;
                        s.set_read_timeout(Some(idle))?;
                        return Ok(Sink::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        MigUri::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_write_timeout(Some(idle))?;
            s.set_read_timeout(Some(idle))?;
            Ok(Sink::Unix(s))
        }
        _ => Err(std::io::Error::other("postcopy needs a tcp: or unix: URI")),
    }
}

/// The postcopy phase on one connection, until SHUT: requested pages
/// (preempt channel first), the paced background scan, END and EOF once
/// nothing is left, then the wait for SHUT. A cut returns [`Stop::Cut`]
/// with the source's state untouched; the caller pauses and recovers.
#[allow(clippy::too_many_arguments)]
fn postcopy_phase(
    a: &SendArgs,
    ram: &Ram,
    src: &mut Source<'_>,
    sink: &mut Sink,
    rx: &crate::rp_poll::RpPoll,
    preempt: &mut Option<Sink>,
    pacer: &mut Pacer,
    idle: Duration,
    pc_budget: usize,
    out: &mut Vec<u8>,
    serve: &mut ServeTime,
) -> Result<(), Stop> {
    let uri = &a.to;
    let mut pre = Vec::new();
    let mut shut_deadline = None;
    let mut urgent_only = false;
    loop {
        loop {
            // SHUT ends the migration (the return path closes right after).
            if src.ram().shut().is_some() {
                return Ok(());
            }
            match rx.try_recv() {
                Ok(ev) => rp_event(src, ev, uri)?,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    return Err(Stop::Cut("the return path ended".into()))
                }
            }
            serve.read(src);
        }
        if src.phase() == SourcePhase::Finished {
            // QEMU's source completes once the destination's SHUT arrives.
            if src.ram().shut().is_some() {
                return Ok(());
            }
            let deadline = *shut_deadline.get_or_insert_with(|| Instant::now() + idle);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::Fatal(CliError::data(format!(
                    "{uri}: no SHUT from the destination within the idle timeout (--idle-timeout) after the stream"
                ))));
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(ev) => rp_event(src, ev, uri)?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(signal) = crate::signals::pending() {
                        return Err(Stop::Fatal(CliError::Interrupted {
                            signal,
                            detail: Some("waiting for SHUT".into()),
                        }));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Stop::Cut("the return path ended".into()))
                }
            }
            continue;
        }
        if let Some(p) = preempt.as_mut() {
            src.write_preempt(&ram.images, &mut pre)
                .map_err(|e| Stop::Fatal(src_error(e)))?;
            if !pre.is_empty() {
                pacer.exempt += pre.len() as u64;
                pacer.write(p, &mut pre, uri).map_err(cut_or_fatal)?;
                serve.written(src);
            }
        }
        if src.postcopy_done() {
            src.write_completion(&ram.images, out)
                .map_err(|e| Stop::Fatal(src_error(e)))?;
            pacer.write(sink, out, uri).map_err(cut_or_fatal)?;
            continue;
        }
        let before = src.ram().counters().requested_bytes;
        // Background pages only when the rate limit allows them; requested
        // pages always, and in a PART of their own (written at once, not
        // behind background pages), but not twice in a row so that a
        // steady stream of requests cannot starve the background scan.
        let urgent = src.ram().pending_requests().next().is_some();
        urgent_only = urgent && !urgent_only;
        let b = if pacer.due().is_none() && !urgent_only {
            pc_budget
        } else {
            0
        };
        if b > 0 || urgent {
            let _ = src
                .write_iteration(&ram.images, b, out)
                .map_err(|e| Stop::Fatal(src_error(e)))?;
        }
        pacer.exempt += src.ram().counters().requested_bytes - before;
        pacer.write(sink, out, uri).map_err(cut_or_fatal)?;
        serve.written(src);
        // Pace the background scan; a page request ends the wait.
        if let Some(wait) = pacer.due() {
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    rp_event(src, ev, uri)?;
                    serve.read(src);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Stop::Cut("the return path ended".into()))
                }
            }
        }
    }
}

/// Postcopy recovery after a cut (QEMU 10's `postcopy_pause` and
/// `postcopy_do_resume`): pause, then until `--recover-timeout` runs out,
/// connect to `--recover-to` (default `--to`), send RECV_BITMAP for every
/// block, take the replies (the dirty bitmap becomes what the destination
/// lacks), `[--postcopy-preempt: open a new preempt channel]`, send
/// POSTCOPY_RESUME and wait for RESUME_ACK. A cut during all this pauses
/// again and the next attempt starts over. Returns the new connection's
/// return-path events; `sink` (and `preempt`) are the new connections.
#[allow(clippy::too_many_arguments)]
fn recover(
    a: &SendArgs,
    src: &mut Source<'_>,
    sink: &mut Sink,
    preempt: &mut Option<Sink>,
    pacer: &mut Pacer,
    idle: Duration,
    why: String,
) -> Result<crate::rp_poll::RpPoll, CliError> {
    let to = a.recover_to.as_ref().unwrap_or(&a.to);
    let verbose = !a.json && !crate::progress::quiet();
    src.handle_connection_lost()
        .map_err(|e| CliError::data(format!("{}: {e} ({why})", a.to)))?;
    close_sink(sink);
    if let Some(p) = preempt.take() {
        close_sink(&p);
    }
    if verbose {
        eprintln!(
            "qmig: postcopy paused ({why}); reconnecting to {to} for up to {}s (--recover-timeout)",
            a.recover_timeout
        );
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(a.recover_timeout);
    let mut last = why;
    loop {
        if let Some(signal) = crate::signals::pending() {
            return Err(CliError::Interrupted {
                signal,
                detail: Some("while recovering postcopy".into()),
            });
        }
        if Instant::now() >= deadline {
            return Err(CliError::data(format!(
                "{to}: postcopy recovery failed: no resumed connection within --recover-timeout {}s \
                 (last: {last}); the destination holds only part of the guest's memory",
                a.recover_timeout
            )));
        }
        let s = match connect_once(to, idle) {
            Ok(s) => s,
            Err(e) => {
                last = format!("connect: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        *sink = s;
        let rx = sink_rp(sink, to)?;
        match recovery_handshake(a, src, sink, &rx, preempt, pacer, idle, to, deadline) {
            Ok(()) => {
                if verbose {
                    eprintln!(
                        "qmig: postcopy resumed after {:.3}s: {} pages to go",
                        t0.elapsed().as_secs_f64(),
                        src.ram().remaining_pages()
                    );
                }
                return Ok(rx);
            }
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Cut(w)) => {
                last = w;
                src.handle_connection_lost().map_err(src_error)?;
                close_sink(sink);
                if let Some(p) = preempt.take() {
                    close_sink(&p);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The recovery connection's opening, as QEMU 10 orders it: RECV_BITMAP
/// × blocks; every reply; the preempt channel; POSTCOPY_RESUME; RESUME_ACK.
#[allow(clippy::too_many_arguments)]
fn recovery_handshake(
    a: &SendArgs,
    src: &mut Source<'_>,
    sink: &mut Sink,
    rx: &crate::rp_poll::RpPoll,
    preempt: &mut Option<Sink>,
    pacer: &mut Pacer,
    idle: Duration,
    to: &MigUri,
    deadline: Instant,
) -> Result<(), Stop> {
    let mut out = Vec::new();
    let fatal = |e| Stop::Fatal(src_error(e));
    src.write_recovery_start(&mut out).map_err(fatal)?;
    pacer.write(sink, &mut out, to).map_err(cut_or_fatal)?;
    let wait = |src: &mut Source<'_>, done: &dyn Fn(&Source<'_>) -> bool, what: &str| {
        while !done(src) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::Cut(format!("no {what} from {to}")));
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(ev) => rp_event(src, ev, to)?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(signal) = crate::signals::pending() {
                        return Err(Stop::Fatal(CliError::Interrupted {
                            signal,
                            detail: Some(format!("waiting for {what}")),
                        }));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Stop::Cut("the return path ended".into()))
                }
            }
        }
        Ok(())
    };
    wait(src, &|s| s.ram().ready_to_resume(), "RECV_BITMAP replies")?;
    if a.postcopy_preempt {
        let p = connect_once(to, idle).map_err(|e| Stop::Cut(format!("preempt channel: {e}")))?;
        *preempt = Some(p);
        src.handle_preempt_connected();
    }
    src.write_resume(&mut out).map_err(fatal)?;
    pacer.write(sink, &mut out, to).map_err(cut_or_fatal)?;
    wait(
        src,
        &|s| s.ram().state() == qmig_ram_src::State::Postcopy,
        "RESUME_ACK",
    )
}

/// `--final-ram DIR`: the memory the destination must end with.
pub(crate) fn write_final_ram(dir: &Path, ram: &Ram, to: &MigUri) -> Result<(), CliError> {
    manifest::begin(dir, "send", &to.to_string())?;
    let mut blocks = Vec::new();
    for ((n, f), img) in ram.names.iter().zip(&ram.files).zip(&ram.images) {
        let path = dir.join(f);
        let mut file = crate::files::create_fresh(&path)?;
        file.write_all(img)
            .map_err(|e| CliError::io(&path, "write", e))?;
        blocks.push(BlockEntry {
            name: n.clone(),
            file: Some(f.clone()),
            length: img.len() as u64,
            max_length: None,
            page_size: None,
            resizable: None,
        });
    }
    manifest::write(
        dir,
        &Manifest {
            blocks,
            writer: Some("send".into()),
            source: Some(to.to_string()),
            complete: true,
            ..Manifest::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_versions() {
        assert_eq!(machine_version("pc-i440fx-9.1"), Some((9, 1)));
        assert_eq!(machine_version("pc-q35-10.0"), Some((10, 0)));
        assert_eq!(machine_version("pc-i440fx-7.2"), Some((7, 2)));
        assert_eq!(machine_version("microvm"), None);
        assert_eq!(machine_version("pc"), None);
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        for bad in ["5", "nan", "NaN", "-0.1", "inf", "x"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }
}
