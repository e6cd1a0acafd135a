//! Opening a stream file. Regular files get the vmdesc trailer located first
//! (certain delimiting of the last device section); pipes, sockets and
//! gzip'd captures (recognised by their magic) are read incrementally.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use qmig_wire::{Decoder, Limits, StreamReader};

/// A stream source: a plain file or pipe, or a gzip'd capture.
pub enum Input {
    /// Plain bytes.
    Plain(File),
    /// A gzip'd capture, decompressed on the fly (not seekable).
    Gz(Box<flate2::read::GzDecoder<File>>),
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Plain(f) => f.read(buf),
            Input::Gz(g) => g.read(buf),
        }
    }
}

impl Seek for Input {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match self {
            Input::Plain(f) => f.seek(pos),
            Input::Gz(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "gzip input is not seekable",
            )),
        }
    }
}

/// Opens the raw bytes of a stream, decompressing gzip'd captures.
/// Returns the source and whether it is a seekable regular file.
pub fn open_input(path: &Path) -> Result<(Input, bool), String> {
    let err = |e: io::Error| format!("{}: {e}", path.display());
    let mut f = File::open(path).map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if meta.is_file() {
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic).map_err(err)?;
        f.seek(SeekFrom::Start(0)).map_err(err)?;
        if n == 2 && magic == [0x1f, 0x8b] {
            return Ok((Input::Gz(Box::new(flate2::read::GzDecoder::new(f))), false));
        }
        return Ok((Input::Plain(f), true));
    }
    Ok((Input::Plain(f), false))
}

/// Opens `path` for item-by-item reading; returns the reader and the input
/// size for progress display (0 when unknown).
pub fn open_stream(path: &Path) -> Result<(StreamReader<Input>, u64), String> {
    let (input, seekable) = open_input(path)?;
    reader_for(input, seekable, path)
}

/// A reader over an opened input (see [`open_input`]).
pub fn reader_for(
    input: Input,
    seekable: bool,
    path: &Path,
) -> Result<(StreamReader<Input>, u64), String> {
    if seekable {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let r =
            StreamReader::new_seekable(input).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((r, len))
    } else {
        Ok((
            StreamReader::with_decoder(input, Decoder::new(Limits::default())),
            0,
        ))
    }
}
