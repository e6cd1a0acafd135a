//! Whole-stream compression formats, recognised by their magic numbers.

use std::io::{BufReader, Read};

use crate::ContainerError;

/// A compression format qmig recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (RFC 1952), members read one after another like `gzip -dc`.
    Gzip,
    /// bzip2, streams read one after another like `bzip2 -dc`.
    Bzip2,
    /// xz, streams read one after another like `xz -dc`.
    Xz,
    /// Zstandard, frames (and skippable frames) read like `zstd -dc`.
    Zstd,
    /// lzop: recognised, not decompressed.
    Lzop,
}

/// The magic of an lzop file.
const LZOP_MAGIC: [u8; 9] = [0x89, b'L', b'Z', b'O', 0, 0x0d, 0x0a, 0x1a, 0x0a];

/// How many bytes [`sniff`] needs to tell every format apart.
pub const SNIFF_LEN: usize = LZOP_MAGIC.len();

impl Compression {
    /// The format's usual name (and command).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lzop => "lzop",
        }
    }

    /// A decompressing reader over `r`.
    ///
    /// # Errors
    /// [`ContainerError::Unsupported`] for lzop (no well-kept Rust decoder;
    /// the hint names the command to use), [`ContainerError::Io`] when the
    /// decoder cannot be set up; `offset` is where the compressed data starts.
    pub fn decoder<R: Read + Send + 'static>(
        self,
        r: R,
        offset: u64,
        hint_cmd: &str,
    ) -> Result<Box<dyn Read + Send>, ContainerError> {
        Ok(match self {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(r))),
            Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(BufReader::new(r))),
            Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(
                BufReader::new(r),
            )),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(r)
                    .map_err(|source| ContainerError::Io { offset, source })?,
            ),
            Compression::Lzop => {
                return Err(ContainerError::Unsupported {
                    offset,
                    what: "lzop compression".into(),
                    hint: format!("qmig has no lzop decoder; decompress it first: {hint_cmd}"),
                })
            }
        })
    }
}

/// The compression whose magic starts `prefix`, if any. Give it at least
/// [`SNIFF_LEN`] bytes when the input has them.
pub fn sniff(prefix: &[u8]) -> Option<Compression> {
    let p = prefix;
    if p.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if p.len() >= 4 && p.starts_with(b"BZh") && (b'1'..=b'9').contains(&p[3]) {
        Some(Compression::Bzip2)
    } else if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (p.len() >= 4 && p[0] & 0xf0 == 0x50 && p[1..4] == [0x2a, 0x4d, 0x18])
    {
        Some(Compression::Zstd)
    } else if p.starts_with(&LZOP_MAGIC) {
        Some(Compression::Lzop)
    } else {
        None
    }
}
