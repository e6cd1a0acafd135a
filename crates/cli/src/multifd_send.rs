//! `qmig send --multifd N`: a QEMU 10 multifd source (wire-format §13).
//!
//! The main connection opens first, then N channel connections to the same
//! address, each starting with its channel header; `qmig_ram_src`'s
//! [`MultifdSender`] produces every byte (packets, SYNCs, the main stream's
//! MULTIFD_FLUSH records), this module only moves them. Each connection
//! has a writer thread fed through a bounded queue; every batch of output
//! goes to the main connection's queue before the channels' queues, so a
//! destination waiting at a MULTIFD_FLUSH for the channels' SYNC packets,
//! or a channel waiting at a SYNC for the main stream, always gets the
//! bytes it waits for.
//!
//! Settings the destination must share (QEMU migration parameters):
//! `multifd-channels` N, `multifd-compression`, `zero-page-detection`, the
//! zlib/zstd level (only the method must match), and the VM UUID
//! (`--multifd-uuid`, when the destination was started with `-uuid`).

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmig_ram_src::multifd::{MultifdConfig, MultifdSender, ZeroPageDetection};
use qmig_ram_src::{Progress, RamSrc, Source, Template};
use qmig_wire::multifd::Compression;
use serde::Serialize;

use crate::error::{CliError, CliResult};
use crate::send::{machine_version, Ram, Rng, SendArgs, Sink};
use crate::uri::MigUri;

/// `--multifd-compression` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MultifdCompression {
    /// No compression.
    None,
    /// zlib (flate2 on the system zlib).
    Zlib,
    /// zstd.
    Zstd,
}

/// `--zero-page-detection` values (QEMU 9.0+ parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZeroPages {
    /// Zero pages go with their data.
    None,
    /// ZERO records on the main connection.
    Legacy,
    /// Listed in the packets (QEMU's default).
    Multifd,
}

/// The multifd options of `qmig send`.
#[derive(Debug, Clone, clap::Args)]
pub struct MultifdSendArgs {
    /// Send pages over N multifd channels (QEMU's `multifd` capability and
    /// `multifd-channels` N; tcp: and unix: destinations started with the
    /// same settings).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    pub multifd: Option<u8>,
    /// `multifd-compression` (the destination must use the same).
    #[arg(long, value_enum, value_name = "METHOD", requires = "multifd")]
    pub multifd_compression: Option<MultifdCompression>,
    /// `multifd-zlib-level` (0-9, default 1) or `multifd-zstd-level`
    /// (0-20, default 1) for the chosen compression.
    #[arg(long, value_name = "LEVEL", requires = "multifd_compression")]
    pub multifd_level: Option<u32>,
    /// `zero-page-detection` with --multifd (default multifd;
    /// --no-zero-detection means none).
    #[arg(long, value_enum, value_name = "MODE", requires = "multifd")]
    pub zero_page_detection: Option<ZeroPages>,
    /// VM UUID in the channel headers (the destination's `-uuid`; default
    /// all zeros, a destination started without `-uuid`).
    #[arg(long, value_name = "UUID", requires = "multifd", value_parser = parse_uuid)]
    pub multifd_uuid: Option<[u8; 16]>,
}

/// A UUID as 32 hex digits, dashes allowed anywhere.
fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("\"{s}\" is not a UUID (32 hex digits)"));
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).map_err(|e| e.to_string())?;
        *b = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
    }
    Ok(u)
}

/// Options that do not go with --multifd, with the reason.
fn check_args(a: &SendArgs) -> Result<(), CliError> {
    let clash = |opt: &str, why: &str| Err(CliError::Usage(format!("--multifd with {opt}: {why}")));
    if a.xbzrle {
        return clash(
            "--xbzrle",
            "QEMU 10 refuses the multifd and xbzrle capabilities together",
        );
    }
    if a.compress.is_some() {
        return clash(
            "--compress",
            "QEMU refuses the compress and multifd capabilities together (use --multifd-compression)",
        );
    }
    if a.mapped_ram {
        return clash(
            "--mapped-ram",
            "multifd into a mapped-ram file is not written by qmig send (QEMU's file: migration with multifd)",
        );
    }
    if a.postcopy {
        return clash(
            "--postcopy",
            "QEMU 10.0 refuses the multifd and postcopy-ram capabilities together",
        );
    }
    if a.no_zero_detection
        && matches!(
            a.multifd.zero_page_detection,
            Some(ZeroPages::Legacy | ZeroPages::Multifd)
        )
    {
        return clash(
            "--no-zero-detection",
            "it means --zero-page-detection none, which contradicts the mode given",
        );
    }
    if !matches!(a.to, MigUri::Tcp { .. } | MigUri::Unix(_)) {
        return Err(CliError::Usage(format!(
            "--multifd needs a tcp: or unix: destination (the channels are extra connections to it), not {}",
            a.to
        )));
    }
    Ok(())
}

/// The sender's settings from the options and the template.
fn config(a: &SendArgs, t: &Template<'_>, channels: u8) -> Result<MultifdConfig, CliError> {
    let m = &a.multifd;
    let compression = match m.multifd_compression.unwrap_or(MultifdCompression::None) {
        MultifdCompression::None => Compression::None,
        MultifdCompression::Zlib => Compression::Zlib,
        MultifdCompression::Zstd => Compression::Zstd,
    };
    let zero = match (m.zero_page_detection, a.no_zero_detection) {
        (Some(ZeroPages::None), _) | (None, true) => ZeroPageDetection::None,
        (Some(ZeroPages::Legacy), _) => ZeroPageDetection::Legacy,
        _ => ZeroPageDetection::Multifd,
    };
    let mut cfg = MultifdConfig {
        channels,
        compression,
        zero_page_detection: zero,
        // hw_compat_8_0 turns multifd-flush-after-each-section on.
        flush_after_each_section: machine_version(t.machine).is_some_and(|v| v < (8, 1)),
        uuid: m.multifd_uuid.unwrap_or([0; 16]),
        ..MultifdConfig::default()
    };
    if let Some(l) = m.multifd_level {
        match compression {
            Compression::Zlib => cfg.zlib_level = l,
            Compression::Zstd => {
                cfg.zstd_level = i32::try_from(l).unwrap_or(i32::MAX);
            }
            Compression::None => {
                return Err(CliError::Usage(
                    "--multifd-level needs --multifd-compression zlib or zstd".into(),
                ))
            }
        }
    }
    Ok(cfg)
}

/// One connection's writer thread and its queue.
struct Writer {
    tx: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<Result<(), CliError>>>,
    what: String,
}

/// Queue depth per connection (batches of up to one rate-limit period).
const QUEUE: usize = 4;

impl Writer {
    fn spawn(mut w: Box<dyn Write + Send>, what: String, uri: String) -> Writer {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let label = what.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0u64;
            for buf in rx {
                if let Err(e) = w.write_all(&buf) {
                    return Err(CliError::Io {
                        path: format!("{uri} ({label})"),
                        op: "write",
                        offset: Some(sent),
                        source: e,
                    });
                }
                sent += buf.len() as u64;
            }
            w.flush().map_err(|e| CliError::Io {
                path: format!("{uri} ({label})"),
                op: "write",
                offset: Some(sent),
                source: e,
            })
        });
        Writer {
            tx: Some(tx),
            thread: Some(thread),
            what,
        }
    }

    /// Queues `buf`; a writer that stopped gives its error.
    fn push(&mut self, buf: Vec<u8>) -> Result<(), CliError> {
        if buf.is_empty() {
            return Ok(());
        }
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(buf).is_ok());
        if sent {
            return Ok(());
        }
        self.join()?;
        Err(CliError::data(format!(
            "{}: the connection's writer stopped",
            self.what
        )))
    }

    /// Closes the queue and waits for the writer.
    fn join(&mut self) -> Result<(), CliError> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(CliError::data(format!(
                "{}: writer thread panicked",
                self.what
            ))),
            None => Ok(()),
        }
    }
}

/// The connections: main first, then the channels.
struct Conns {
    main: Writer,
    channels: Vec<Writer>,
    start: Instant,
    sent: u64,
    bw: Option<u64>,
}

impl Conns {
    /// Moves `main` and every channel's pending output to the writers
    /// (main first), then paces to `--max-bandwidth` over all of them.
    fn push(&mut self, main: &mut Vec<u8>, src: &mut RamSrc) -> Result<(), CliError> {
        if let Some(signal) = crate::signals::pending() {
            return Err(CliError::Interrupted {
                signal,
                detail: Some(format!("after {} bytes", self.sent)),
            });
        }
        self.sent += main.len() as u64;
        self.main.push(std::mem::take(main))?;
        if let Some(m) = src.multifd_mut() {
            for (ch, w) in self.channels.iter_mut().enumerate() {
                let buf = m.take_output(ch);
                self.sent += buf.len() as u64;
                w.push(buf)?;
            }
        }
        if let Some(bw) = self.bw {
            let due = Duration::from_secs_f64(self.sent as f64 / bw as f64);
            let el = self.start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
        Ok(())
    }
}

fn stream_of(s: &Sink, uri: &MigUri) -> Result<Box<dyn Write + Send>, CliError> {
    let io = |e| CliError::io(uri.to_string(), "clone socket", e);
    match s {
        Sink::Tcp(t) => Ok(Box::new(t.try_clone().map_err(io)?)),
        Sink::Unix(u) => Ok(Box::new(u.try_clone().map_err(io)?)),
        _ => Err(CliError::Usage(format!(
            "--multifd needs a tcp: or unix: destination, not {uri}"
        ))),
    }
}

/// The `--json` summary of a multifd send.
#[derive(Serialize)]
struct Summary {
    bytes: u64,
    seconds: f64,
    passes: u32,
    dirty_sync_count: u64,
    normal: u64,
    duplicate: u64,
    multifd: MultifdSummary,
}

#[derive(Serialize)]
struct MultifdSummary {
    channels: u8,
    compression: &'static str,
    zero_page_detection: &'static str,
    packets: u64,
    sync_packets: u64,
    syncs: u64,
    normal_pages: u64,
    zero_pages: u64,
    payload_bytes: u64,
    bytes: u64,
}

/// Runs `qmig send --multifd N` once the template, RAM and the (not yet
/// started) RAM source are ready.
pub(crate) fn run(
    a: &SendArgs,
    t: Template<'_>,
    mut src: RamSrc,
    mut ram: Ram,
    channels: u8,
) -> CliResult {
    check_args(a)?;
    let cfg = config(a, &t, channels)?;
    let page_size = 1usize << t.page_bits;
    let sender =
        MultifdSender::new(cfg.clone(), page_size).map_err(|e| CliError::Usage(e.to_string()))?;
    src.set_multifd(sender)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(dir) = &a.final_ram {
        crate::files::output_dir(dir)?;
    }
    let mut source = Source::new(t, src, false);
    crate::signals::install();
    let idle = Duration::from_secs(a.idle_timeout);
    let uri = a.to.to_string();
    // QEMU connects the main channel first, then the multifd channels.
    let sink = Sink::open(&a.to, idle)?;
    let main = Writer::spawn(
        stream_of(&sink, &a.to)?,
        "main connection".into(),
        uri.clone(),
    );
    let mut conns = Conns {
        main,
        channels: Vec::new(),
        start: Instant::now(),
        sent: 0,
        bw: a.max_bandwidth.filter(|&b| b > 0),
    };
    let mut socks = Vec::new();
    for id in 0..channels {
        let s = Sink::open(&a.to, idle)?;
        conns.channels.push(Writer::spawn(
            stream_of(&s, &a.to)?,
            format!("multifd channel {id}"),
            uri.clone(),
        ));
        socks.push(s);
    }
    let r = stream(a, &mut ram, &mut source, &mut conns, page_size);
    // Close the queues and wait for every writer, main first.
    let mut first_err = r.err();
    for w in std::iter::once(&mut conns.main).chain(conns.channels.iter_mut()) {
        if let Err(e) = w.join() {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    sink.finish(&a.to)?;
    drop(socks);
    let elapsed = conns.start.elapsed();
    if let Some(dir) = &a.final_ram {
        crate::send::write_final_ram(dir, &ram, &a.to)?;
    }
    let c = source.ram().counters();
    let m = source
        .ram()
        .multifd()
        .map(|m| *m.stats())
        .unwrap_or_default();
    let summary = Summary {
        bytes: conns.sent,
        seconds: elapsed.as_secs_f64(),
        passes: a.passes,
        dirty_sync_count: c.dirty_sync_count,
        normal: c.normal + m.normal_pages,
        duplicate: c.duplicate + m.zero_pages,
        multifd: MultifdSummary {
            channels,
            compression: cfg.compression.name(),
            zero_page_detection: cfg.zero_page_detection.name(),
            packets: m.packets,
            sync_packets: m.sync_packets,
            syncs: m.syncs,
            normal_pages: m.normal_pages,
            zero_pages: m.zero_pages,
            payload_bytes: m.payload_bytes,
            bytes: m.bytes,
        },
    };
    crate::send::print_summary(a.json, &summary, || {
        vec![format!(
            "qmig: sent {} bytes in {:.3}s over 1 + {channels} connections ({} multifd, {}): {} normal, {} zero pages, {} packets, {} syncs",
            conns.sent,
            elapsed.as_secs_f64(),
            m.bytes,
            cfg.compression.name(),
            summary.normal,
            summary.duplicate,
            m.packets,
            m.syncs,
        )]
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The precopy passes and completion, as `send`'s single-connection
/// stream, with every batch moved to the connections.
fn stream(
    a: &SendArgs,
    ram: &mut Ram,
    src: &mut Source<'_>,
    conns: &mut Conns,
    page_size: usize,
) -> Result<(), CliError> {
    let src_error = |e: qmig_ram_src::RamSrcError| CliError::data(e.to_string());
    let total: u64 = ram.images.iter().map(|i| i.len() as u64).sum();
    // QEMU's rate limit: max-bandwidth per 100 ms period (default 128 MiB/s).
    let budget = conns.bw.map_or(16 << 20, |b| (b / 10).max(1) as usize);
    let mut out = Vec::with_capacity(1 << 16);
    let mut rng = Rng(a.seed);
    let passes = a.passes.max(1);
    let verbose = !a.json && !crate::progress::quiet();

    src.write_setup(&mut out).map_err(src_error)?;
    conns.push(&mut out, src.ram_mut())?;
    let pb = crate::progress::bytes(total, "send pass 1");
    for pass in 1..passes.max(2) {
        if pass > 1 {
            let n =
                crate::send::workload(&mut rng, ram, src.ram_mut(), a.dirty_fraction, page_size)?;
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
            let sent = src.ram().multifd().map_or(0, |m| m.stats().bytes);
            pb.set_position(sent.min(total));
            conns.push(&mut out, src.ram_mut())?;
            if p == Progress::Clean {
                break;
            }
        }
    }
    pb.finish_and_clear();
    if passes > 1 {
        let n = crate::send::workload(&mut rng, ram, src.ram_mut(), a.dirty_fraction, page_size)?;
        if verbose {
            eprintln!("qmig: pass {passes} (completion): workload changed {n} pages");
        }
    }
    src.write_completion(&ram.images, &mut out)
        .map_err(src_error)?;
    conns.push(&mut out, src.ram_mut())
}
