//! What wraps a QEMU migration stream on disk, recognised by magic so that
//! regular files and pipes are read alike:
//!
//! - whole-file compression: gzip (multi-member), bzip2, xz and zstd
//!   (multi-stream, multi-frame), decompressed on the fly; lzop is recognised
//!   and refused with a hint;
//! - libvirt save images (`virsh save`, managedsave): the header and the
//!   domain XML are decoded ([`libvirt`]) and the payload, raw or compressed,
//!   is handed on as the QEMU stream.
//!
//! [`open`] peels these layers off any [`std::io::Read`] without seeking: it
//! peeks at the first bytes through [`Peeked`], which replays them.
//!
//! ```
//! use std::io::Read;
//! let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
//! std::io::Write::write_all(&mut gz, b"QEVM\0\0\0\x03").unwrap();
//! let bytes = gz.finish().unwrap();
//! let mut o = qmig_container::open(Box::new(std::io::Cursor::new(bytes)), &Default::default()).unwrap();
//! let mut s = Vec::new();
//! o.reader.read_to_end(&mut s).unwrap();
//! assert_eq!(s, b"QEVM\0\0\0\x03");
//! assert_eq!(o.layers.len(), 1);
//! ```

use std::io;

mod compress;
pub mod libvirt;
mod open;
mod peek;

pub use compress::{sniff, Compression};
pub use open::{open, Layer, LibvirtImage, Limits, Opened};
pub use peek::Peeked;

/// Why a container could not be opened. Offsets are byte offsets in the
/// layer being read: the file itself, or the decompressed bytes of an
/// enclosing whole-file compression.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The input ends inside a structure.
    #[error("offset {offset}: truncated: {what} ends at offset {end}")]
    Truncated {
        /// Where the input ended.
        offset: u64,
        /// The structure cut short.
        what: &'static str,
        /// Where it should have ended.
        end: u64,
    },
    /// A libvirt save image breaks a rule of its header or data.
    #[error("offset {offset}: libvirt save image: {rule}")]
    Libvirt {
        /// Offset of the offending field.
        offset: u64,
        /// The rule broken.
        rule: String,
    },
    /// A format qmig recognises but does not read.
    #[error("offset {offset}: {what} is not supported: {hint}")]
    Unsupported {
        /// Where the data in that format starts.
        offset: u64,
        /// The format.
        what: String,
        /// What to do instead. Shell commands in it name the input `FILE`
        /// and the qmig subcommand `COMMAND` (see [`ContainerError::with_file`]).
        hint: String,
    },
    /// Reading (or decompressing) failed.
    #[error("offset {offset}: {source}")]
    Io {
        /// Offset of the read that failed.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl ContainerError {
    /// Puts the input's name in place of `FILE` in an
    /// [`ContainerError::Unsupported`] hint.
    pub fn with_file(self, file: &str) -> Self {
        match self {
            ContainerError::Unsupported { offset, what, hint } => ContainerError::Unsupported {
                offset,
                what,
                hint: hint.replace("FILE", file),
            },
            other => other,
        }
    }

    /// The byte offset the error names.
    pub fn offset(&self) -> u64 {
        match self {
            ContainerError::Truncated { offset, .. }
            | ContainerError::Libvirt { offset, .. }
            | ContainerError::Unsupported { offset, .. }
            | ContainerError::Io { offset, .. } => *offset,
        }
    }
}
