//! `qmig roundtrip`: re-serialize every item and compare with the input.

use std::io::{BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

use crate::error::{CliError, CliResult};

pub fn run(path: &Path) -> CliResult {
    if !std::fs::metadata(path)
        .map_err(|e| CliError::io(path, "open", e))?
        .is_file()
    {
        return Err(CliError::Usage(format!(
            "{}: roundtrip needs a regular file (it reads the input twice)",
            path.display()
        )));
    }
    let mut orig = BufReader::with_capacity(1 << 20, crate::input::open_input(path)?.0);
    let (mut rd, total) = crate::input::open_stream(path)?;
    let pb = crate::progress::bytes(total, "roundtrip");
    let mut out = Vec::with_capacity(1 << 16);
    let mut want = Vec::with_capacity(1 << 16);
    let mut items = 0u64;
    loop {
        let ri = match rd.next_item() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                pb.finish_and_clear();
                return Err(CliError::wire(path, e));
            }
        };
        let (off, item) = (ri.offset, ri.item);
        out.clear();
        item.write(&mut out);
        want.resize(out.len(), 0);
        orig.read_exact(&mut want).map_err(|e| CliError::Io {
            path: path.display().to_string(),
            op: "re-read",
            offset: Some(off),
            source: e,
        })?;
        if out != want {
            let i = out.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            println!(
                "difference at offset {}: item {} at {} ({}), re-serialized byte {:#04x}, original {:#04x}",
                off + i as u64,
                items,
                off,
                item.kind_name(),
                out[i],
                want[i]
            );
            return Ok(ExitCode::from(1));
        }
        items += 1;
        pb.set_position(off);
    }
    pb.finish_and_clear();
    let mut extra = [0u8; 1];
    if orig
        .read(&mut extra)
        .map_err(|e| CliError::io(path, "re-read", e))?
        != 0
    {
        println!(
            "difference: input has bytes after the last item at offset {}",
            rd.decoder().position()
        );
        return Ok(ExitCode::from(1));
    }
    println!(
        "identical: {items} items, {} bytes",
        rd.decoder().position()
    );
    Ok(ExitCode::SUCCESS)
}
