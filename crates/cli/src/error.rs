//! The CLI's one error type and its exit-code policy.
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the data says no: streams differ, a stream is corrupt or truncated, the peer refused the migration, the RAM directory is incomplete |
//! | 2 | usage or environment: bad option, missing file, permission, disk full, connection refused |
//! | 130, 143 | interrupted by SIGINT / SIGTERM (outputs say so) |

use std::io;
use std::path::Path;

use serde::Serialize;

/// Everything a `qmig` subcommand can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An option or argument that clap could not check on its own.
    #[error("{0}")]
    Usage(String),
    /// An operating-system call on a named file or endpoint failed.
    #[error("{path}: {op}{}: {source}", at(*offset))]
    Io {
        /// The file, directory or endpoint.
        path: String,
        /// What was being done ("write", "create", "connect", ...).
        op: &'static str,
        /// The stream offset the operation belonged to, when there is one.
        offset: Option<u64>,
        /// The OS error.
        source: io::Error,
    },
    /// Opening an input failed (message already names the path).
    #[error("{0}")]
    Open(String),
    /// The data says no (corrupt or truncated stream, refused migration...).
    #[error("{message}")]
    Data {
        /// What is wrong, naming the input.
        message: String,
        /// The stream offset, when there is one.
        offset: Option<u64>,
    },
    /// Stopped by a signal; outputs record how far the command got.
    #[error("interrupted by {}{}", signal_name(*signal), detail.as_deref().map(|d| format!("; {d}")).unwrap_or_default())]
    Interrupted {
        /// The signal number.
        signal: i32,
        /// How far the command got.
        detail: Option<String>,
    },
}

fn at(offset: Option<u64>) -> String {
    offset
        .map(|o| format!(" at stream offset {o}"))
        .unwrap_or_default()
}

/// `SIGINT`, `SIGTERM`, or the number.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// The `"error"` object of `--json` outputs.
#[derive(Debug, Serialize)]
pub struct JsonError {
    /// `usage`, `io`, `data` or `interrupted`.
    pub kind: &'static str,
    /// The message as printed on stderr without `--json`.
    pub message: String,
    /// The stream offset, when the error has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The process exit code.
    pub exit_code: u8,
}

impl CliError {
    /// A data error without an offset.
    pub fn data(message: impl Into<String>) -> Self {
        CliError::Data {
            message: message.into(),
            offset: None,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, op: &'static str, source: io::Error) -> Self {
        CliError::Io {
            path: path.as_ref().display().to_string(),
            op,
            offset: None,
            source,
        }
    }

    /// A stream that does not parse: `path: <wire error>`; read errors of
    /// the input are environment errors, everything else is the data.
    pub fn wire(path: impl AsRef<Path>, e: qmig_wire::WireError) -> Self {
        let path = path.as_ref().display().to_string();
        let offset = e.offset();
        match e {
            qmig_wire::WireError::Io { offset, source } => CliError::Io {
                path,
                op: "read",
                offset: Some(offset),
                source,
            },
            e => CliError::Data {
                message: format!("{path}: {e}"),
                offset: Some(offset),
            },
        }
    }

    /// The same error with `note` appended to its message (for a second
    /// failure that must not replace the first one).
    pub fn with_note(self, note: &str) -> Self {
        match self {
            CliError::Usage(m) => CliError::Usage(format!("{m}; also: {note}")),
            CliError::Open(m) => CliError::Open(format!("{m}; also: {note}")),
            CliError::Data { message, offset } => CliError::Data {
                message: format!("{message}; also: {note}"),
                offset,
            },
            CliError::Io {
                path,
                op,
                offset,
                source,
            } => CliError::Io {
                path,
                op,
                offset,
                source: io::Error::new(source.kind(), format!("{source}; also: {note}")),
            },
            CliError::Interrupted { signal, detail } => CliError::Interrupted {
                signal,
                detail: Some(match detail {
                    Some(d) => format!("{d}; also: {note}"),
                    None => note.to_string(),
                }),
            },
        }
    }

    /// The exit code of the policy in the module documentation.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Io { .. } | CliError::Open(_) => 2,
            CliError::Data { .. } => 1,
            CliError::Interrupted { signal, .. } => (128 + signal).clamp(0, 255) as u8,
        }
    }

    /// The kind name of the JSON error object.
    pub fn kind(&self) -> &'static str {
        match self {
            CliError::Usage(_) => "usage",
            CliError::Io { .. } | CliError::Open(_) => "io",
            CliError::Data { .. } => "data",
            CliError::Interrupted { .. } => "interrupted",
        }
    }

    /// The stream offset the error names, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            CliError::Io { offset, .. } | CliError::Data { offset, .. } => *offset,
            _ => None,
        }
    }

    /// The `"error"` object of `--json` outputs.
    pub fn to_json(&self) -> JsonError {
        JsonError {
            kind: self.kind(),
            message: self.to_string(),
            offset: self.offset(),
            exit_code: self.exit_code(),
        }
    }
}

impl From<String> for CliError {
    /// Errors of the input module (`path: OS error`) are open errors.
    fn from(s: String) -> Self {
        CliError::Open(s)
    }
}

/// Result of a subcommand: the exit code it chose (0 or "differ" 1), or an error.
pub type CliResult = Result<std::process::ExitCode, CliError>;

/// The exit-code policy, as shown by `qmig --help` and in the README.
pub const EXIT_CODES: &str = "\
Exit status (every subcommand):
  0    success
  1    the data says no: streams differ, a stream is corrupt or truncated,
       the peer refused the migration, the RAM directory is incomplete
  2    usage or environment: bad option, missing file, permission,
       disk full, connection refused
  130  interrupted by SIGINT (143: SIGTERM); outputs record how far it got
Errors are printed once on stderr as `qmig: <command>: <message>`; with
--json they are printed on stdout as {\"error\": {...}} instead.";
