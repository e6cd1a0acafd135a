//! `manifest.json`: the one description of a RAM directory, written by
//! `extract`, `recv` and `send --final-ram` and read by `send --ram` and
//! `recv --blocks`.
//!
//! Integrity rules: before the first byte of new output goes into a
//! directory, [`begin`] replaces any old manifest with one that says
//! `"complete": false, "in_progress": true` (and removes the images the old
//! manifest listed), so a directory is never described by a manifest of
//! another run. The final manifest is written atomically ([`write()`]); a run
//! stopped by a signal writes `"interrupted": true` and how far it got.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::files;

/// File name of the manifest inside a RAM directory.
pub const MANIFEST: &str = "manifest.json";

/// One RAM block and its raw image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// RAM block name (QEMU's `RAMBlock.idstr`).
    pub name: String,
    /// Image file name inside the directory (absent in a layout-only file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Used length in bytes.
    pub length: u64,
    /// Maximum length in bytes (layout files for `recv --blocks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    /// Page size of the block in bytes (layout files for `recv --blocks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Whether the block may be resized (layout files for `recv --blocks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resizable: Option<bool>,
}

/// Record counts applied to the images.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordCounts {
    /// ZERO records.
    pub zero: u64,
    /// PAGE records.
    pub page: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
}

/// One non-RAM section kept in `device-state.bin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSection {
    /// Section header kind (`START`, `FULL`, ...).
    pub kind: String,
    /// Section id.
    pub section_id: u32,
    /// Section name, when known.
    pub idstr: Option<String>,
    /// Instance id, when known.
    pub instance: Option<u32>,
    /// Version id, when known.
    pub version: Option<u32>,
    /// Offset of the section header in the stream.
    pub stream_offset: u64,
    /// Offset of the section header in `device-state.bin`.
    pub file_offset: u64,
}

/// `device-state.bin`: the non-RAM bytes of the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// File name inside the directory.
    pub file: String,
    /// Bytes written to it.
    pub bytes: u64,
    /// The first 1000 sections it holds, in stream order.
    pub sections: Vec<DeviceSection>,
    /// Sections past those, only counted (so a hostile stream of millions of
    /// sections cannot grow the manifest without bound).
    #[serde(default)]
    pub sections_omitted: u64,
}

/// Something accepted that QEMU 10's loader refuses, because the stream may
/// come from an older QEMU (see `qmig_ram_dst::Leniency`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leniency {
    /// What was accepted (`nonzero_zero_fill`).
    pub kind: String,
    /// How many records it concerned.
    pub records: u64,
    /// The QEMU rule that was relaxed (function and version).
    pub qemu_rule: String,
    /// Why qmig accepted it.
    pub why_accepted: String,
}

/// What `recv` adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecvInfo {
    /// The source's address (`HOST:PORT`, a socket path, or the file/command).
    pub peer: String,
    /// Whether the source opened a return path.
    pub return_path: bool,
    /// Bytes received.
    pub bytes_received: u64,
    /// Seconds from accepting the connection to the end.
    pub seconds: f64,
    /// The `--save` file, if any.
    pub saved_stream: Option<String>,
    /// How postcopy was served (absent before postcopy support wrote it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyInfo>,
}

/// How long one postcopy recovery took on the destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryTiming {
    /// From accepting the recovery connection to RESUME_ACK written on its
    /// return path (includes the source's own work between the RECV_BITMAP
    /// replies and POSTCOPY_RESUME), microseconds.
    pub accept_to_resume_ack_us: u64,
    /// Time qmig spent on the RECV_BITMAP commands (decode, bitmap
    /// serialization, write), microseconds.
    pub recv_bitmap_us: u64,
    /// Return-path bytes of the RECV_BITMAP replies.
    pub recv_bitmap_bytes: u64,
}

/// Fault latencies in microseconds (`null` when there were none): each wait
/// of a faulting thread, from the fault thread reading the fault to the
/// placement that released it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Waits closed by a placement.
    pub count: u64,
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest.
    pub max: Option<u64>,
}

/// One vCPU's (touch thread's) blocktime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuBlocktime {
    /// Kernel thread id.
    pub thread: u32,
    /// Total time blocked on missing pages, µs.
    pub blocktime_us: u64,
    /// Faults waited on.
    pub faults: u64,
}

/// The memory a block was registered in at POSTCOPY_LISTEN.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockBacking {
    /// Block name.
    pub block: String,
    /// `anonymous`, `memfd` or `hugetlbfs`.
    pub backing: String,
    /// Bytes asked for and placed at a time (the block's host page).
    pub host_page_size: u64,
    /// The userfaultfd reports user-mode faults only (unprivileged).
    pub user_mode_only: bool,
}

/// What `recv` reports about postcopy (the manifest's `postcopy` object).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyInfo {
    /// `"userfaultfd"`, `"passive (why)"`, or `null` when the stream never
    /// reached POSTCOPY_LISTEN.
    pub mode: Option<String>,
    /// REQ_PAGES / REQ_PAGES_ID messages sent on the return path.
    pub page_requests: u64,
    /// Times the migration paused (connection lost after POSTCOPY_RUN).
    #[serde(default)]
    pub pauses: u64,
    /// Times it resumed (POSTCOPY_RESUME answered with RESUME_ACK).
    #[serde(default)]
    pub resumes: u64,
    /// Page requests sent again after a resume (included in `page_requests`).
    #[serde(default)]
    pub requests_resent: u64,
    /// Page records received on postcopy-preempt channels.
    #[serde(default)]
    pub preempt_records: u64,
    /// One entry per postcopy recovery, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recoveries: Vec<RecoveryTiming>,
    /// Faults the userfaultfd fault threads read.
    pub faults: u64,
    /// Faults handed to the state machine.
    pub faults_handled: u64,
    /// Faults on pages already received (placed locally, nothing asked).
    pub faults_resolved_locally: u64,
    /// Faults on pages already asked for.
    pub faults_already_requested: u64,
    /// Requests still unanswered at the end.
    pub outstanding_requests: u64,
    /// Host pages placed with UFFDIO_COPY (or written, passively).
    pub placed_host_pages: u64,
    /// Zero host pages placed.
    pub placed_zero_pages: u64,
    /// Fault-to-placement latencies.
    pub fault_latency_us: LatencySummary,
    /// Log2 histogram of the same latencies, laid out as QEMU 10.1's
    /// `postcopy-latency-dist`: element `n` counts latencies in
    /// `[2^n, 2^(n+1))` µs (element 0 also takes < 1 µs, the last, 25,
    /// anything longer).
    #[serde(default)]
    pub fault_latency_dist_us: Vec<u64>,
    /// Round trips of the faults that needed a page from the source: from
    /// the fault thread reading the fault, through REQ_PAGES, to the
    /// placement of the page the source sent, µs.
    #[serde(default)]
    pub request_latency_us: LatencySummary,
    /// Log2 histogram of `request_latency_us` (the layout of
    /// `fault_latency_dist_us`).
    #[serde(default)]
    pub request_latency_dist_us: Vec<u64>,
    /// `request_latency_us` of the requests whose page came on the main
    /// channel (with postcopy-preempt: the source had already queued the
    /// page on the main channel, so the request waited behind the
    /// background stream), µs.
    #[serde(default)]
    pub request_latency_main_us: LatencySummary,
    /// `request_latency_us` of the requests whose page came on a
    /// postcopy-preempt channel, µs.
    #[serde(default)]
    pub request_latency_preempt_us: LatencySummary,
    /// Where `request_latency_us` goes, in three spans per request, µs:
    /// `[0]` fault read → REQ_PAGES written on the return path (lock, state
    /// machine, socket write), `[1]` written → the page's record parsed from
    /// the stream (the source and both socket hops), `[2]` parsed → placed
    /// (UFFDIO_COPY, which wakes the faulting thread).
    #[serde(default)]
    pub request_phases_us: Vec<LatencySummary>,
    /// Time during which every vCPU (touch thread) was blocked at once, µs:
    /// QEMU's `postcopy-blocktime`.
    #[serde(default)]
    pub blocktime_us: u64,
    /// Blocked time summed over the vCPUs, µs.
    pub blocktime_total_us: u64,
    /// Per vCPU (touch thread): QEMU's `postcopy-vcpu-blocktime`, in µs, with
    /// the faults it waited on.
    #[serde(default)]
    pub vcpu_blocktime: Vec<VcpuBlocktime>,
    /// How each registered block was backed.
    #[serde(default)]
    pub backing: Vec<BlockBacking>,
    /// `--touch`.
    pub touch_threads: usize,
    /// `--touch-pattern` (`random` or `sequential`).
    #[serde(default)]
    pub touch_pattern: String,
    /// Pages the touch threads read.
    pub touched_pages: u64,
    /// Touch threads still blocked when `recv` gave up waiting.
    pub touch_threads_unfinished: u64,
    /// Errors of the fault threads.
    pub fault_thread_errors: Vec<String>,
    /// The fault handler's error, if any.
    pub error: Option<String>,
}

/// The manifest of a RAM directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The blocks and their images.
    #[serde(default)]
    pub blocks: Vec<BlockEntry>,
    /// The subcommand that wrote the directory (`extract`, `recv`, `send`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// The stream the RAM came from (a path or a URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// True only when the whole stream was applied and every output flushed.
    #[serde(default)]
    pub complete: bool,
    /// The writer is (or was, if it died without a trace) still writing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_progress: bool,
    /// The run was stopped by SIGINT or SIGTERM.
    #[serde(default, skip_serializing_if = "is_false")]
    pub interrupted: bool,
    /// Target page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Stream offset up to which every item was applied to the images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_up_to: Option<u64>,
    /// Why the run stopped early.
    #[serde(default)]
    pub error: Option<String>,
    /// The stream offset of `error`, when it has one.
    #[serde(default)]
    pub error_offset: Option<u64>,
    /// ZERO records whose fill byte was not 0 (applied as fills).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonzero_fill_pages: Option<u64>,
    /// What was accepted that QEMU 10 refuses (empty: as strict as QEMU 10).
    /// Absent only in the in-progress marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leniencies: Option<Vec<Leniency>>,
    /// Records applied, per kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<RecordCounts>,
    /// Postcopy state at the end (`none`, `advised`, ..., `end`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_state: Option<String>,
    /// The device-state file, when one was written and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_state: Option<DeviceState>,
    /// `vmdesc.json` when the stream had a vmdesc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmdesc: Option<String>,
    /// `recv` details.
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub recv: Option<RecvInfo>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    ///
    /// # Errors
    /// I/O errors (exit 2) and JSON that is not a manifest (exit 1).
    pub fn read(dir: &Path) -> Result<Manifest, CliError> {
        Self::read_file(&dir.join(MANIFEST))
    }

    /// Reads a manifest (or a layout file `{"blocks":[{"name","length"}]}`).
    ///
    /// # Errors
    /// As [`Manifest::read`].
    pub fn read_file(path: &Path) -> Result<Manifest, CliError> {
        let bytes = std::fs::read(path).map_err(|e| CliError::io(path, "read", e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::data(format!("{}: not a manifest: {e}", path.display())))
    }

    /// The manifest as pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and bools always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// Marks `dir` as being written by `writer` from `source`, before any new
/// output: the old manifest is atomically replaced by one that says
/// `"complete": false, "in_progress": true`, then the images it listed are
/// removed (in that order, so that even unsynced, a crash cannot leave a
/// complete-looking manifest whose images are gone: ext4 and other
/// journalling filesystems commit the rename before the later unlinks).
///
/// # Errors
/// I/O errors naming the path.
pub fn begin(dir: &Path, writer: &str, source: &str) -> Result<(), CliError> {
    let old = Manifest::read(dir).ok();
    let marker = Manifest {
        writer: Some(writer.to_string()),
        source: Some(source.to_string()),
        complete: false,
        in_progress: true,
        ..Manifest::default()
    };
    write(dir, &marker)?;
    for b in old.iter().flat_map(|m| &m.blocks) {
        if let Some(f) = &b.file {
            if is_plain_file_name(f) {
                files::remove_if_present(&dir.join(f))?;
            }
        }
    }
    for f in ["device-state.bin", "vmdesc.json"] {
        files::remove_if_present(&dir.join(f))?;
    }
    Ok(())
}

/// Writes `dir/manifest.json` atomically.
///
/// # Errors
/// I/O errors naming the path (the old manifest is then left as it was).
pub fn write(dir: &Path, m: &Manifest) -> Result<(), CliError> {
    files::write_atomic(dir, MANIFEST, m.to_json().as_bytes())
}

/// A file name that stays inside its directory (no `/`, not hidden, not `..`).
pub fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && !f.contains('/') && !f.starts_with('.') && f != MANIFEST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_files_and_old_manifests_parse() {
        let m: Manifest =
            serde_json::from_str(r#"{"blocks":[{"name":"pc.ram","length":4096}]}"#).unwrap();
        assert!(!m.complete);
        assert_eq!(m.blocks[0].file, None);
        let old = r#"{"blocks":[{"name":"pc.ram","file":"pc.ram.img","length":8192}],
            "page_size":4096,"source":"x","complete":true,"applied_up_to":10,"error":null,
            "error_offset":null,"nonzero_fill_pages":0,
            "records":{"zero":1,"page":2,"xbzrle":0,"compressed":0},"postcopy_state":"None",
            "device_state":{"file":"device-state.bin","bytes":3,"sections":[]},"vmdesc":null}"#;
        let m: Manifest = serde_json::from_str(old).unwrap();
        assert!(m.complete && m.recv.is_none());
        assert_eq!(m.blocks[0].file.as_deref(), Some("pc.ram.img"));
    }

    #[test]
    fn round_trip_with_recv_fields() {
        let m = Manifest {
            blocks: vec![BlockEntry {
                name: "pc.ram".into(),
                file: Some("pc.ram.img".into()),
                length: 1 << 20,
                max_length: None,
                page_size: None,
                resizable: None,
            }],
            complete: true,
            recv: Some(RecvInfo {
                peer: "127.0.0.1:1".into(),
                return_path: true,
                bytes_received: 5,
                seconds: 0.5,
                saved_stream: None,
                postcopy: Some(PostcopyInfo {
                    mode: Some("userfaultfd".into()),
                    page_requests: 3,
                    ..PostcopyInfo::default()
                }),
            }),
            ..Manifest::default()
        };
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["peer"], "127.0.0.1:1");
        assert_eq!(v["postcopy"]["page_requests"], 3);
        assert!(v["postcopy"]["fault_latency_us"]["p50"].is_null());
        assert_eq!(v["complete"], true);
        assert!(v.get("interrupted").is_none());
        let back: Manifest = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn plain_names_only() {
        assert!(is_plain_file_name("pc.ram.img"));
        for bad in ["", "../x", "a/b", ".hidden", "manifest.json"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
