//! `qmig`: inspect, round-trip and extract QEMU live-migration streams.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod channels;
mod connections;
mod convert;
mod diff;
mod error;
mod extract;
mod files;
mod input;
mod inspect;
mod manifest;
mod multifd_apply;
mod multifd_recv;
mod multifd_send;
mod postcopy;
mod progress;
mod recover;
mod recv;
mod roundtrip;
mod rp_poll;
mod send;
mod signals;
mod size;
mod uri;

use error::{CliError, CliResult};

/// Tools for QEMU live-migration streams.
#[derive(Parser, Debug)]
#[command(name = "qmig", version, about, long_about = None, after_help = error::EXIT_CODES)]
struct Cli {
    /// No progress bars or summary lines on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Target page size of the stream (e.g. 1K, 4K, 8K), for streams that do
    /// not declare it (no target-page-bits, no vmdesc, unknown machine type):
    /// it overrides every source in the stream.
    #[arg(long, global = true, value_name = "SIZE", value_parser = size::parse_size)]
    target_page_size: Option<u64>,
    /// For streams without a vmdesc of their own (postcopy captures): take
    /// the device-section lengths from FILE, a bare vmdesc JSON or another
    /// capture of the same QEMU and machine type (`recv` keeps `vmdesc.json`).
    #[arg(long, global = true, value_name = "FILE")]
    vmdesc_from: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Summarise a stream: header, machine, capabilities, sections, commands,
    /// RAM blocks and per-block record counts.
    #[command(after_help = error::EXIT_CODES)]
    Inspect {
        /// The migration stream (e.g. written by `migrate file:PATH`), `-` for
        /// stdin; gzip, bzip2, xz, zstd and libvirt save images are recognised.
        /// Several files: the main connections of one postcopy migration that
        /// was paused and recovered, in order (each later one continues the
        /// one before it).
        #[arg(required = true, num_args = 1..)]
        stream: Vec<PathBuf>,
        /// Print one JSON object instead of text (with --records: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Print one line per item (offset, section, block, page offset, kind, payload length).
        #[arg(long)]
        records: bool,
        /// With --records: only RAM records of this block.
        #[arg(long, value_name = "NAME", requires = "records")]
        block: Option<String>,
        /// With --records: only items of this kind (PAGE, ZERO, XBZRLE, START, ...; case-insensitive).
        #[arg(long, value_name = "KIND", requires = "records")]
        kind: Option<String>,
        /// A captured return path (destination → source) to summarise too;
        /// with several connections, one per main connection (repeatable).
        #[arg(long, value_name = "FILE")]
        return_path: Vec<PathBuf>,
        /// Print the device state of every section, decoded field by field
        /// from the vmdesc (like analyze-migration.py -d state).
        #[arg(long, conflicts_with = "records")]
        devices: bool,
        /// Alone: print the vmdesc (like analyze-migration.py -d desc). With a
        /// FILE (a bare vmdesc JSON or another capture of the same QEMU and
        /// machine type): use its vmdesc instead of the stream's. Put STREAM first.
        #[arg(long, value_name = "FILE", num_args = 0..=1)]
        vmdesc: Option<Option<PathBuf>>,
        /// Print the domain XML (and save cookie) of a libvirt save image instead.
        #[arg(long, conflicts_with_all = ["json", "records", "return_path"])]
        libvirt_xml: bool,
        /// A recorded multifd channel connection (repeatable): summarised
        /// with the main STREAM (its target page size).
        #[arg(long, value_name = "FILE")]
        multifd_channel: Vec<PathBuf>,
        /// A recorded postcopy-preempt channel (page records only); the k-th
        /// belongs to the k-th main connection (repeatable).
        #[arg(long, value_name = "FILE")]
        preempt_channel: Vec<PathBuf>,
    },
    /// Parse and re-serialize a stream; exit 0 iff the bytes are identical.
    #[command(after_help = error::EXIT_CODES)]
    Roundtrip {
        /// The migration stream; several files: the main connections of one
        /// recovered postcopy migration, in order.
        #[arg(required = true, num_args = 1..)]
        stream: Vec<PathBuf>,
        /// A recorded postcopy-preempt channel (repeatable).
        #[arg(long, value_name = "FILE")]
        preempt_channel: Vec<PathBuf>,
        /// A recorded multifd channel connection (repeatable): its header and
        /// packets are re-serialized and compared too.
        #[arg(long, value_name = "FILE")]
        multifd_channel: Vec<PathBuf>,
    },
    /// Write the final content of every RAM block as a raw image, plus manifest.json.
    #[command(after_help = error::EXIT_CODES)]
    Extract {
        /// The migration stream; several files: the main connections of one
        /// recovered postcopy migration, in order (`main1.bin main2.bin`).
        #[arg(required = true, num_args = 1..)]
        stream: Vec<PathBuf>,
        /// A recorded postcopy-preempt channel (page records only); the k-th
        /// belongs to the k-th main connection (repeatable).
        #[arg(long, value_name = "FILE")]
        preempt_channel: Vec<PathBuf>,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
        /// A recorded multifd channel connection (repeatable): its packets
        /// are applied at the main STREAM's sync points.
        #[arg(long, value_name = "FILE")]
        multifd_channel: Vec<PathBuf>,
        /// Also write a guest-physical memory image, OUTPUT/physical.{raw,elf,lime}:
        /// raw = sparse file at guest-physical offsets, elf = ELF core with one
        /// PT_LOAD (p_paddr) per RAM range, lime = LiME range headers.
        #[arg(long, value_name = "FORMAT", value_parser = extract::parse_format)]
        format: Option<qmig_phys::image::ImageFormat>,
        /// The guest's max-ram-below-4g machine option (x86 pc/q35; not in the stream).
        #[arg(long, value_name = "SIZE", value_parser = size::parse_size, requires = "format")]
        max_ram_below_4g: Option<u64>,
        /// The guest-physical layout instead of the stream's machine type:
        /// pc, pc-legacy, q35, microvm, virt or flat, optionally with the RAM
        /// blocks in address order (`q35:m0,m1`).
        #[arg(long, value_name = "LAYOUT[:BLOCKS]", requires = "format")]
        machine_layout: Option<String>,
        /// fsync the images, device state and metadata before returning
        /// (durable output). Without it, like `cp`, nothing is fsynced: the
        /// output is in the page cache when the command returns.
        #[arg(long)]
        sync: bool,
    },
    /// Receive a live precopy or postcopy migration from a QEMU source (`migrate tcp:...`) into
    /// raw block images plus manifest.json, device-state.bin and vmdesc.json.
    #[command(after_help = error::EXIT_CODES)]
    Recv {
        /// Where the migration comes from: `tcp:HOST:PORT`, `tcp::PORT`, `tcp:[IPv6]:PORT`,
        /// `unix:PATH` (listen), `file:PATH` (read) or `exec:CMD` (read its stdout).
        #[arg(long, value_name = "URI", value_parser = uri::MigUri::parse)]
        listen: uri::MigUri,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
        /// The local RAM layout to check the source's against (a manifest.json or
        /// {"blocks":[{"name","length"}]}); default: adopt the source's layout.
        #[arg(long, value_name = "MANIFEST")]
        blocks: Option<PathBuf>,
        /// Also record the whole incoming stream, byte for byte, in this file; multifd
        /// channels go to STREAM.conn-N.bin. An existing directory gets a capture set:
        /// conn-0.bin (main) and conn-1.bin... (channels, for --multifd-channel).
        /// Postcopy: recovery connections go to STREAM.main-N.bin (N = 2, 3...),
        /// preempt channels to STREAM.preempt-N.bin and return paths to
        /// STREAM.rp-N.bin (DIR/main-N.bin... in a directory).
        #[arg(long, value_name = "STREAM|DIR")]
        save: Option<PathBuf>,
        /// Postcopy: from POSTCOPY_RUN on, N threads read every guest page
        /// once in a pseudo-random order (like vCPUs), so pages are demand-paged.
        #[arg(long, value_name = "N", default_value_t = 0)]
        touch: usize,
        /// The order in which `--touch` threads read pages.
        #[arg(long, value_enum, default_value_t = postcopy::TouchPattern::Random)]
        touch_pattern: postcopy::TouchPattern,
        /// TCP receive buffer (SO_RCVBUF, bytes; the kernel doubles it) instead of Linux's
        /// autotuning. A small one (e.g. 131072) shortens postcopy page-request round trips:
        /// requested pages queue behind what the socket buffers hold.
        #[arg(long, value_name = "BYTES")]
        rcvbuf: Option<usize>,
        /// SO_RCVBUF (bytes; the kernel doubles it) given to the main connection at
        /// POSTCOPY_LISTEN (and to recovery connections) unless --rcvbuf is given; 0 keeps
        /// Linux's autotuning. A requested page the source had already queued on the main
        /// channel (with postcopy-preempt too) waits behind this buffer.
        #[arg(long, value_name = "BYTES", default_value_t = recv::DEFAULT_POSTCOPY_RCVBUF)]
        postcopy_rcvbuf: usize,
        /// Give up when the source sends nothing, or does not read the return
        /// path, for this many seconds (the manifest then says so).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        idle_timeout: u64,
        /// Postcopy recovery: where a paused migration waits for the source's
        /// recovery connection (`migrate URI resume=true`); default the --listen address.
        #[arg(long, value_name = "URI", value_parser = uri::MigUri::parse)]
        recover_listen: Option<uri::MigUri>,
        /// Postcopy recovery: how long a paused migration waits for the recovery
        /// connection before it fails (seconds).
        #[arg(long, value_name = "SECS", default_value_t = recv::DEFAULT_RECOVER_TIMEOUT)]
        recover_timeout: u64,
    },
    /// Migrate RAM images (an `extract`/`recv` output) to a destination, in a
    /// container copied from a template stream (e.g. a capture of the same machine).
    #[command(after_help = error::EXIT_CODES)]
    Send(send::SendArgs),
    /// Rewrite any stream as one single-pass precopy stream that QEMU 10
    /// loads: each page's final content once (ZERO/PAGE), container kept.
    Convert(convert::ConvertArgs),
    /// Compare two streams record by record, ignoring how RAM is split into
    /// sections; exit 0 iff no difference.
    #[command(after_help = error::EXIT_CODES)]
    Diff {
        /// First stream.
        a: PathBuf,
        /// Second stream.
        b: PathBuf,
        /// Compare only the RAM records (not header, configuration, devices, vmdesc).
        #[arg(long)]
        records: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `qmig man > qmig.1`.
    Man,
}

/// A failed write to stdout; a closed pipe (`qmig inspect --records | head`)
/// is not an error worth reporting.
pub(crate) fn output_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::Usage(BROKEN_PIPE.to_string())
    } else {
        CliError::io("stdout", "write", e)
    }
}

/// Marker for [`output_error`]'s closed pipe.
const BROKEN_PIPE: &str = "\0broken pipe";

/// The subcommand named on the command line (for messages about clap errors).
fn command_word() -> String {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "qmig".into())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.render().to_string();
            let text = text.trim_start_matches("error: ").trim_end();
            eprintln!("qmig: {}: {text}", command_word());
            return ExitCode::from(2);
        }
    };
    progress::set_quiet(cli.quiet);
    if let Some(f) = &cli.vmdesc_from {
        if let Err(e) = input::set_vmdesc_from(f) {
            eprintln!("qmig: {}: {e}", command_word());
            return ExitCode::from(e.exit_code());
        }
    }
    if let Some(ps) = cli.target_page_size {
        if let Err(e) = input::set_target_page_size(ps) {
            eprintln!("qmig: {}: {e}", command_word());
            return ExitCode::from(2);
        }
    }
    let (name, json) = match &cli.cmd {
        Cmd::Inspect { json, .. } => ("inspect", *json),
        Cmd::Roundtrip { .. } => ("roundtrip", false),
        Cmd::Extract { .. } => ("extract", false),
        Cmd::Recv { .. } => ("recv", false),
        Cmd::Send(a) => ("send", a.json),
        Cmd::Convert(a) => ("convert", a.json),
        Cmd::Diff { .. } => ("diff", false),
        Cmd::Completions { .. } => ("completions", false),
        Cmd::Man => ("man", false),
    };
    let r: CliResult = match cli.cmd {
        Cmd::Inspect {
            stream,
            json,
            records,
            return_path,
            block,
            kind,
            devices,
            vmdesc,
            libvirt_xml,
            multifd_channel,
            preempt_channel,
        } => {
            if is_connection_list(&stream, &preempt_channel) {
                if devices
                    || vmdesc.is_some()
                    || libvirt_xml
                    || !multifd_channel.is_empty()
                    || block.is_some()
                    || kind.is_some()
                {
                    Err(CliError::Usage(
                        "--devices, --vmdesc, --libvirt-xml, --multifd-channel, --block and --kind take one stream, not a list of connections".into(),
                    ))
                } else {
                    connections::inspect(
                        &connections::Plan {
                            mains: &stream,
                            preempt: &preempt_channel,
                        },
                        json,
                        records,
                        &return_path,
                    )
                }
            } else if return_path.len() > 1 {
                Err(CliError::Usage(
                    "several --return-path files need several connections (one per main connection)".into(),
                ))
            } else {
                match (devices, vmdesc) {
                    (true, v) => inspect::run_devices(&stream[0], json, v.flatten().as_deref()),
                    (false, Some(v)) => inspect::run_vmdesc(&stream[0], v.as_deref()),
                    (false, None) => inspect::run(
                        &stream[0],
                        json,
                        records,
                        return_path.first().map(PathBuf::as_path),
                        libvirt_xml,
                        &inspect::Filter { block, kind },
                        &multifd_channel,
                    ),
                }
            }
        }
        Cmd::Roundtrip {
            stream,
            preempt_channel,
            multifd_channel,
        } => match connection_plan(&stream, &preempt_channel, &multifd_channel) {
            Err(e) => Err(e),
            Ok(Some(plan)) => connections::roundtrip(&plan),
            Ok(None) => roundtrip::run(&stream[0], &multifd_channel),
        },
        Cmd::Extract {
            stream,
            output,
            preempt_channel,
            multifd_channel,
            format,
            max_ram_below_4g,
            machine_layout,
            sync,
        } => match connection_plan(&stream, &preempt_channel, &multifd_channel) {
            Err(e) => Err(e),
            Ok(Some(_)) if format.is_some() => Err(CliError::Usage(
                "--format takes one main connection (extract the list first, then the images)"
                    .into(),
            )),
            Ok(plan) => {
                files::set_durability(if sync {
                    files::Durability::All
                } else {
                    files::Durability::None
                });
                match plan {
                    Some(plan) => connections::extract(&plan, &output),
                    None => extract::run_with(
                        &stream[0],
                        &output,
                        &multifd_channel,
                        &extract::PhysArgs {
                            format,
                            max_ram_below_4g,
                            machine_layout,
                        },
                    ),
                }
            }
        },
        Cmd::Recv {
            listen,
            output,
            blocks,
            save,
            touch,
            touch_pattern,
            rcvbuf,
            postcopy_rcvbuf,
            idle_timeout,
            recover_listen,
            recover_timeout,
        } => recv::run(
            &listen,
            &output,
            blocks.as_deref(),
            save.as_deref(),
            std::time::Duration::from_secs(idle_timeout),
            postcopy::Touch {
                threads: touch,
                pattern: touch_pattern,
            },
            recv::RecoverArgs {
                rcvbuf,
                postcopy_rcvbuf,
                listen: recover_listen.as_ref(),
                timeout: std::time::Duration::from_secs(recover_timeout),
            },
        ),
        Cmd::Send(args) => send::run(&args),
        Cmd::Convert(args) => convert::run(&args).map_err(|e| CliError::from(e.to_string())),
        Cmd::Diff { a, b, records } => diff::run(&a, &b, records),
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "qmig", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(output_error)
                .and_then(|()| std::io::stdout().write_all(&out).map_err(output_error))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    match r {
        Ok(code) => code,
        Err(CliError::Usage(m)) if m == BROKEN_PIPE => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let v = serde_json::json!({ "error": e.to_json() });
                println!("{v}");
            } else {
                eprintln!("qmig: {name}: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// True when the command was given a list of connections rather than one stream: several
/// main connections (the first, then each postcopy recovery connection) or a preempt channel.
fn is_connection_list(mains: &[PathBuf], preempt: &[PathBuf]) -> bool {
    mains.len() > 1 || !preempt.is_empty()
}

/// The [`connections::Plan`] for `roundtrip`/`extract` when they were given a list of
/// connections (see [`is_connection_list`]); `Ok(None)` for one stream.
///
/// # Errors
/// [`CliError::Usage`] when `--multifd-channel` comes with a list of connections.
fn connection_plan<'a>(
    mains: &'a [PathBuf],
    preempt: &'a [PathBuf],
    multifd: &[PathBuf],
) -> Result<Option<connections::Plan<'a>>, CliError> {
    if !is_connection_list(mains, preempt) {
        return Ok(None);
    }
    no_multifd_with_connections(multifd)?;
    Ok(Some(connections::Plan { mains, preempt }))
}

/// Multifd channels belong to one main connection; QEMU has no postcopy
/// (hence no recovery or preempt channel) with multifd.
fn no_multifd_with_connections(multifd: &[PathBuf]) -> Result<(), CliError> {
    if multifd.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(
            "--multifd-channel takes one main connection: QEMU does not combine multifd with postcopy recovery or preempt".into(),
        ))
    }
}
