//! Opening a stream file: seekable files get the vmdesc trailer located first
//! (certain delimiting of the last device section); pipes and sockets are
//! read incrementally without it.

use std::fs::File;
use std::path::Path;

use qmig_wire::StreamReader;

/// Opens `path` for item-by-item reading; returns the reader and the file
/// size (0 when unknown).
pub fn open_stream(path: &Path) -> Result<(StreamReader<File>, u64), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_file() {
        let r = StreamReader::new_seekable(f).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((r, meta.len()))
    } else {
        Ok((StreamReader::new(f), 0))
    }
}
