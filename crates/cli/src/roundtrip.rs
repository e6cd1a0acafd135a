//! `qmig roundtrip`: re-serialize every item and compare with the input.

use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use crate::error::{CliError, CliResult};
use crate::input::Input;

/// Passes reads through and keeps a copy of the bytes, for [`Replay`]: a
/// pipe is read once, and its bytes are compared as the parser goes.
struct Tee {
    inner: Input,
    seen: Arc<Mutex<VecDeque<u8>>>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut q) = self.seen.lock() {
            q.extend(&buf[..n]);
        }
        Ok(n)
    }
}

/// Hands out the bytes a [`Tee`] kept, once each (0 when none are left).
struct Replay(Arc<Mutex<VecDeque<u8>>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut q = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("replay buffer poisoned"))?;
        let n = buf.len().min(q.len());
        for (d, s) in buf.iter_mut().zip(q.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

pub fn run(path: &Path, channels: &[std::path::PathBuf]) -> CliResult {
    // A regular file (compressed or not) is read twice: once parsed, once as
    // the bytes to compare with. A pipe is read once, its bytes kept until
    // compared.
    let (mut orig, (mut rd, total)): (Box<dyn Read>, _) = if crate::input::is_regular_file(path) {
        (
            Box::new(BufReader::with_capacity(
                1 << 20,
                crate::input::open_input(path)?.0,
            )),
            crate::input::open_stream(path)?,
        )
    } else {
        let (input, _) = crate::input::open_input(path)?;
        let seen = Arc::new(Mutex::new(VecDeque::new()));
        let tee = Input::Stream(Box::new(Tee {
            inner: input,
            seen: seen.clone(),
        }));
        (
            Box::new(Replay(seen)),
            crate::input::reader_for(tee, false, path)?,
        )
    };
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
        if let Err(e) = item.write(&mut out) {
            pb.finish_and_clear();
            return Err(CliError::Data {
                message: format!(
                    "{}: offset {off}: {} does not re-serialize: {e}",
                    path.display(),
                    item.kind_name()
                ),
                offset: Some(off),
            });
        }
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
    // Recorded multifd channels: each packet re-serialized.
    let page_size = 1u64 << rd.decoder().ram_context().page_bits;
    for c in channels {
        if let Some(diff) = crate::multifd_apply::roundtrip_channel(c, page_size)? {
            println!("{}: {diff}", c.display());
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}
