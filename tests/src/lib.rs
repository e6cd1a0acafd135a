//! Support code for qmig's cross-crate and interop tests: the committed
//! real-QEMU corpus under `tests/data/` and SHA-256 digests (`sha2`) for it.

use std::path::{Path, PathBuf};

pub mod sha256;

/// One committed capture: a directory under `tests/data/`.
#[derive(Debug)]
pub struct Capture {
    /// Directory name, e.g. `q10-xbzrle`.
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
    /// Path of the stream as stored (`stream` or `stream.gz`).
    pub stream_path: PathBuf,
    /// The stream bytes (decompressed when stored gzip'd).
    pub stream: Vec<u8>,
    /// The return-path capture, when there is one.
    pub rp: Option<Vec<u8>>,
    /// `oracle.json`.
    pub oracle: serde_json::Value,
    /// `query-migrate.json`.
    pub query_migrate: serde_json::Value,
}

impl Capture {
    /// QEMU major version that produced the capture.
    pub fn qemu_major(&self) -> u32 {
        self.oracle["qemu_version"]
            .as_str()
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }

    /// Expected values asserted by the capture script (`expect` in the
    /// oracle): pairs like (`totals.zero`, 398), each checked against QEMU's
    /// own `query-migrate` counters when the capture was made.
    pub fn expectations(&self) -> Vec<(String, u64)> {
        self.oracle["expect"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Per-range memory digests of the source's `pmemsave`:
    /// (block, offset in block, length, sha256 hex).
    pub fn digests(&self) -> Vec<(String, u64, u64, String)> {
        self.oracle["digests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| {
                        Some((
                            d["block"].as_str()?.to_string(),
                            d["offset"].as_u64()?,
                            d["length"].as_u64()?,
                            d["sha256"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The repository's `tests/data` directory.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// Loads every committed capture (directories with a `stream` or `stream.gz`).
///
/// # Panics
/// When a capture directory is unreadable: the corpus is part of the repo.
pub fn captures() -> Vec<Capture> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(data_dir()) else {
        return out;
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let plain = dir.join("stream");
        let gz = dir.join("stream.gz");
        let (stream_path, stream) = if plain.exists() {
            (plain.clone(), std::fs::read(&plain).expect("read stream"))
        } else if gz.exists() {
            (
                gz.clone(),
                gunzip(&std::fs::read(&gz).expect("read stream.gz")),
            )
        } else {
            continue;
        };
        let read_json = |n: &str| {
            std::fs::read(dir.join(n))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        out.push(Capture {
            name: dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            rp: std::fs::read(dir.join("rp")).ok(),
            oracle: read_json("oracle.json"),
            query_migrate: read_json("query-migrate.json"),
            stream_path,
            stream,
            dir,
        });
    }
    out
}

/// Decompresses a gzip file.
///
/// # Panics
/// On corrupt gzip data (the corpus is trusted).
pub fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// Runs `cmd` with `input` written to its stdin (from another thread, so a
/// child that stops reading early cannot block the test) and collects its
/// output. The CLI tests use it for every "through a pipe" case.
///
/// # Panics
/// When the command cannot be started.
pub fn run_with_stdin(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = w.join();
    out
}
