//! `qmig roundtrip`: re-serialize every item and compare with the input.

use std::io::{BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

pub fn run(path: &Path) -> Result<ExitCode, String> {
    if !std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .is_file()
    {
        return Err(format!(
            "{}: roundtrip needs a regular file (it reads the input twice)",
            path.display()
        ));
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
                println!("parse error: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        let (off, item) = (ri.offset, ri.item);
        out.clear();
        if let Err(e) = item.write(&mut out) {
            println!(
                "offset {off}: {} does not re-serialize: {e}",
                item.kind_name()
            );
            return Ok(ExitCode::from(1));
        }
        want.resize(out.len(), 0);
        orig.read_exact(&mut want)
            .map_err(|e| format!("re-reading input at {off}: {e}"))?;
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
    if orig.read(&mut extra).map_err(|e| e.to_string())? != 0 {
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
