//! `qmig`: inspect, round-trip and extract QEMU live-migration streams.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod diff;
mod extract;
mod input;
mod inspect;
mod postcopy;
mod progress;
mod recv;
mod roundtrip;
mod send;

/// Tools for QEMU live-migration streams.
#[derive(Parser, Debug)]
#[command(name = "qmig", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Summarise a stream: header, machine, capabilities, sections, commands,
    /// RAM blocks and per-block record counts.
    Inspect {
        /// The migration stream (e.g. written by `migrate file:PATH`), `-` for
        /// stdin; gzip, bzip2, xz, zstd and libvirt save images are recognised.
        stream: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Print one line per item (offset, section, block, page offset, kind, payload length).
        #[arg(long)]
        records: bool,
        /// A captured return path (destination → source) to summarise too.
        #[arg(long, value_name = "FILE")]
        return_path: Option<PathBuf>,
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
    },
    /// Parse and re-serialize a stream; exit 0 iff the bytes are identical.
    Roundtrip {
        /// The migration stream.
        stream: PathBuf,
    },
    /// Write the final content of every RAM block as a raw image, plus manifest.json.
    Extract {
        /// The migration stream.
        stream: PathBuf,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Receive a live precopy migration from a QEMU source (`migrate tcp:...`) into
    /// raw block images plus manifest.json, device-state.bin and vmdesc.json.
    Recv {
        /// Where to listen: tcp:HOST:PORT.
        #[arg(long, value_name = "tcp:HOST:PORT")]
        listen: String,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
        /// The local RAM layout to check the source's against (a manifest.json or
        /// {"blocks":[{"name","length"}]}); default: adopt the source's layout.
        #[arg(long, value_name = "MANIFEST")]
        blocks: Option<PathBuf>,
        /// Also record the whole incoming stream, byte for byte, in this file.
        #[arg(long, value_name = "STREAM")]
        save: Option<PathBuf>,
        /// Postcopy: from POSTCOPY_RUN on, N threads read every guest page
        /// once in a pseudo-random order (like vCPUs), so pages are demand-paged.
        #[arg(long, value_name = "N", default_value_t = 0)]
        touch: usize,
        /// Give up when the source sends nothing, or does not read the return
        /// path, for this many seconds (the manifest then says so).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        idle_timeout: u64,
    },
    /// Migrate RAM images (an `extract`/`recv` output) to a destination, in a
    /// container copied from a template stream (e.g. a capture of the same machine).
    Send(send::SendArgs),
    /// Compare two streams record by record, ignoring how RAM is split into
    /// sections; exit 0 iff no difference.
    Diff {
        /// First stream.
        a: PathBuf,
        /// Second stream.
        b: PathBuf,
        /// Compare only the RAM records (not header, configuration, devices, vmdesc).
        #[arg(long)]
        records: bool,
    },
}

/// Error text for a failed write to stdout; a closed pipe (`qmig inspect
/// --records | head`) is not an error worth reporting.
pub(crate) fn output_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        BROKEN_PIPE.to_string()
    } else {
        e.to_string()
    }
}

/// Marker for [`output_error`]'s closed pipe.
const BROKEN_PIPE: &str = "\0broken pipe";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Inspect {
            stream,
            json,
            records,
            return_path,
            devices,
            vmdesc,
            libvirt_xml,
        } => match (devices, vmdesc) {
            (true, v) => inspect::run_devices(&stream, json, v.flatten().as_deref()),
            (false, Some(v)) => inspect::run_vmdesc(&stream, v.as_deref()),
            (false, None) => {
                inspect::run(&stream, json, records, return_path.as_deref(), libvirt_xml)
            }
        },
        Cmd::Roundtrip { stream } => roundtrip::run(&stream),
        Cmd::Extract { stream, output } => extract::run(&stream, &output),
        Cmd::Recv {
            listen,
            output,
            blocks,
            save,
            touch,
            idle_timeout,
        } => recv::run(
            &listen,
            &output,
            blocks.as_deref(),
            save.as_deref(),
            std::time::Duration::from_secs(idle_timeout),
            touch,
        ),
        Cmd::Send(args) => send::run(&args).map_err(|e| e.to_string()),
        Cmd::Diff { a, b, records } => diff::run(&a, &b, records).map_err(|e| e.to_string()),
    };
    match r {
        Ok(code) => code,
        Err(e) if e == BROKEN_PIPE => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmig: {e}");
            ExitCode::from(2)
        }
    }
}
