//! COMPRESS_PAGE bodies: one zlib stream per page, as QEMU ≤ 9.0 made them.

use flate2::{Compress, Compression, FlushCompress, Status};

/// Compresses target pages the way QEMU's compression threads did: one
/// `deflateInit(level)` stream (zlib header, 32 KiB window, memLevel 8),
/// `deflateReset` before every page, then a single `deflate(Z_FINISH)`.
/// With the same zlib (flate2's system-zlib backend) the bytes equal QEMU's.
///
/// ```
/// use std::io::Read;
/// use qmig_ram_src::PageCompressor;
///
/// let mut c = PageCompressor::new(6).unwrap();
/// let page = vec![7u8; 4096];
/// let z = c.compress(&page).unwrap().to_vec();
/// let mut back = Vec::new();
/// flate2::read::ZlibDecoder::new(&z[..]).read_to_end(&mut back).unwrap();
/// assert_eq!(back, page);
/// ```
#[derive(Debug)]
pub struct PageCompressor {
    z: Compress,
    buf: Vec<u8>,
    level: u32,
}

impl PageCompressor {
    /// A compressor at zlib `level` (0–9).
    ///
    /// # Errors
    /// A message when the level is above 9.
    pub fn new(level: u32) -> Result<Self, String> {
        if level > 9 {
            return Err(format!("compress level {level} is not in 0..=9"));
        }
        Ok(PageCompressor {
            z: Compress::new(Compression::new(level), true),
            buf: Vec::new(),
            level,
        })
    }

    /// The zlib level.
    #[must_use]
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Compresses one page; the result borrows an internal buffer.
    ///
    /// # Errors
    /// zlib's complaint if the stream does not finish (cannot happen with a
    /// `compressBound`-sized buffer).
    pub fn compress(&mut self, page: &[u8]) -> Result<&[u8], String> {
        self.z.reset();
        let bound = qmig_wire::ram::compress_bound(page.len() as u32) as usize;
        self.buf.clear();
        self.buf.reserve(bound);
        match self
            .z
            .compress_vec(page, &mut self.buf, FlushCompress::Finish)
        {
            Ok(Status::StreamEnd) => Ok(&self.buf),
            Ok(s) => Err(format!("deflate did not finish ({s:?})")),
            Err(e) => Err(e.to_string()),
        }
    }
}
