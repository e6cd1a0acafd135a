//! `qmig extract`: replay the RAM records of a stream into raw block images.
//!
//! Every record is applied whole or not at all: pages are decoded into a
//! scratch page first and written only when complete, so a corrupt stream
//! leaves each page with either its old or its new content. The manifest
//! records how far the stream was applied.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Command, Item, RamBody, StreamReader, WireError};
use serde_json::json;

/// One block image on disk.
struct Image {
    name: String,
    file_name: String,
    file: File,
    length: u64,
    /// Pages that may hold non-zero bytes (so a ZERO must really write).
    dirty: Vec<u64>,
}

impl Image {
    fn mark(&mut self, page: u64, nonzero: bool) {
        let (w, b) = ((page / 64) as usize, page % 64);
        if nonzero {
            self.dirty[w] |= 1 << b;
        } else {
            self.dirty[w] &= !(1 << b);
        }
    }

    fn is_dirty(&self, page: u64) -> bool {
        self.dirty[(page / 64) as usize] >> (page % 64) & 1 == 1
    }
}

/// Write-combining for runs of consecutive pages in one block.
struct Pending {
    block: usize,
    start: u64,
    data: Vec<u8>,
}

const MAX_PENDING: usize = 4 << 20;

struct Replay {
    images: Vec<Image>,
    by_name: HashMap<String, usize>,
    page_size: usize,
    pending: Option<Pending>,
    scratch: Vec<u8>,
    inflate: flate2::Decompress,
    nonzero_fills: u64,
}

#[derive(Debug)]
enum ApplyError {
    Wire(WireError),
    Rule { offset: u64, why: String },
    Io(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Wire(e) => write!(f, "{e}"),
            ApplyError::Rule { offset, why } => write!(f, "offset {offset}: {why}"),
            ApplyError::Io(e) => write!(f, "I/O: {e}"),
        }
    }
}

impl ApplyError {
    fn offset(&self) -> Option<u64> {
        match self {
            ApplyError::Wire(e) => Some(e.offset()),
            ApplyError::Rule { offset, .. } => Some(*offset),
            ApplyError::Io(_) => None,
        }
    }
}

fn sanitize(name: &str, taken: &HashMap<String, usize>, images: &[Image]) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
        .collect();
    while s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    let base = s.clone();
    let mut n = 1;
    while images.iter().any(|i| i.file_name == format!("{s}.img")) {
        n += 1;
        s = format!("{base}-{n}");
    }
    let _ = taken;
    format!("{s}.img")
}

impl Replay {
    fn flush(&mut self) -> Result<(), ApplyError> {
        if let Some(p) = self.pending.take() {
            self.images[p.block]
                .file
                .write_all_at(&p.data, p.start)
                .map_err(|e| ApplyError::Io(e.to_string()))?;
        }
        Ok(())
    }

    fn write_page(&mut self, block: usize, off: u64, data: &[u8]) -> Result<(), ApplyError> {
        if let Some(p) = &mut self.pending {
            if p.block == block && p.start + p.data.len() as u64 == off && p.data.len() < MAX_PENDING {
                p.data.extend_from_slice(data);
                return Ok(());
            }
        }
        self.flush()?;
        let mut v = Vec::with_capacity(MAX_PENDING.min(1 << 20));
        v.extend_from_slice(data);
        self.pending = Some(Pending { block, start: off, data: v });
        Ok(())
    }

    fn read_page(&mut self, block: usize, off: u64) -> Result<(), ApplyError> {
        self.flush()?;
        let ps = self.page_size;
        self.scratch.resize(ps, 0);
        self.images[block]
            .file
            .read_exact_at(&mut self.scratch, off)
            .map_err(|e| ApplyError::Io(e.to_string()))
    }

    fn block_for(&self, at: u64, name: &str, off: u64) -> Result<usize, ApplyError> {
        let Some(&b) = self.by_name.get(name) else {
            return Err(ApplyError::Rule { offset: at, why: format!("page for block \"{name}\" which MEM_SIZE did not list") });
        };
        let len = self.images[b].length;
        if off.checked_add(self.page_size as u64).is_none_or(|end| end > len) {
            return Err(ApplyError::Rule {
                offset: at,
                why: format!("page offset {off:#x} outside block \"{name}\" of {len:#x} bytes"),
            });
        }
        Ok(b)
    }
}

pub fn run(path: &Path, outdir: &Path) -> Result<ExitCode, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    fs::create_dir_all(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    let mut rd = StreamReader::new_seekable(f).map_err(|e| e.to_string())?;
    let pb = crate::progress::bytes(total, "extract");
    let mut rp = Replay {
        images: Vec::new(),
        by_name: HashMap::new(),
        page_size: 4096,
        pending: None,
        scratch: Vec::new(),
        inflate: flate2::Decompress::new(true),
        nonzero_fills: 0,
    };
    let mut cur: Option<String> = None;
    let mut applied_to = 0u64;
    let result: Result<(), ApplyError> = (|| {
        loop {
            let ri = match rd.next_item().map_err(ApplyError::Wire)? {
                Some(x) => x,
                None => return Ok(()),
            };
            let (off, item, dec) = (ri.offset, ri.item, ri.decoder);
            pb.set_position(off);
            rp.page_size = dec.ram_context().page_size();
            match item {
                Item::Ram(r) => {
                    if let Some(b) = r.block {
                        cur = Some(b.to_string());
                    }
                    let page_off = r.offset;
                    match &r.body {
                        RamBody::MemSize(blocks) => {
                            for b in blocks {
                                if let Some(&i) = rp.by_name.get(b.name) {
                                    if rp.images[i].length != b.used_length {
                                        return Err(ApplyError::Rule {
                                            offset: off,
                                            why: format!("block {} announced again with another length", b.name),
                                        });
                                    }
                                    continue;
                                }
                                let file_name = sanitize(b.name, &rp.by_name, &rp.images);
                                let file = OpenOptions::new()
                                    .read(true)
                                    .write(true)
                                    .create(true)
                                    .truncate(true)
                                    .open(outdir.join(&file_name))
                                    .map_err(|e| ApplyError::Io(format!("{file_name}: {e}")))?;
                                file.set_len(b.used_length).map_err(|e| ApplyError::Io(e.to_string()))?;
                                let pages = b.used_length.div_ceil(rp.page_size as u64);
                                rp.by_name.insert(b.name.to_string(), rp.images.len());
                                rp.images.push(Image {
                                    name: b.name.to_string(),
                                    file_name,
                                    file,
                                    length: b.used_length,
                                    dirty: vec![0; pages.div_ceil(64) as usize],
                                });
                            }
                        }
                        RamBody::Zero { fill } => {
                            let name = cur.clone().unwrap_or_default();
                            let b = rp.block_for(off, &name, page_off)?;
                            let pg = page_off / rp.page_size as u64;
                            if *fill != 0 {
                                rp.nonzero_fills += 1;
                                let page = vec![*fill; rp.page_size];
                                rp.write_page(b, page_off, &page)?;
                                rp.images[b].mark(pg, true);
                            } else if rp.images[b].is_dirty(pg) {
                                let page = vec![0; rp.page_size];
                                rp.write_page(b, page_off, &page)?;
                                rp.images[b].mark(pg, false);
                            }
                        }
                        RamBody::Page(data) => {
                            let name = cur.clone().unwrap_or_default();
                            let b = rp.block_for(off, &name, page_off)?;
                            rp.write_page(b, page_off, data)?;
                            rp.images[b].mark(page_off / rp.page_size as u64, true);
                        }
                        RamBody::Xbzrle(enc) => {
                            let name = cur.clone().unwrap_or_default();
                            let b = rp.block_for(off, &name, page_off)?;
                            rp.read_page(b, page_off)?;
                            let mut page = std::mem::take(&mut rp.scratch);
                            let r = qmig_xbzrle::decode(enc, &mut page);
                            if let Err(e) = r {
                                return Err(ApplyError::Rule { offset: off, why: format!("XBZRLE page: {e}") });
                            }
                            rp.write_page(b, page_off, &page)?;
                            rp.scratch = page;
                            rp.images[b].mark(page_off / rp.page_size as u64, true);
                        }
                        RamBody::Compressed(z) => {
                            let name = cur.clone().unwrap_or_default();
                            let b = rp.block_for(off, &name, page_off)?;
                            let page = inflate_page(&mut rp.inflate, z, rp.page_size)
                                .map_err(|why| ApplyError::Rule { offset: off, why })?;
                            rp.write_page(b, page_off, &page)?;
                            rp.images[b].mark(page_off / rp.page_size as u64, true);
                        }
                        RamBody::Eos | RamBody::Hook | RamBody::MultifdFlush => {}
                    }
                }
                Item::Command(Command::RamDiscard(d)) => {
                    let Some(&b) = rp.by_name.get(d.block) else {
                        return Err(ApplyError::Rule { offset: off, why: format!("discard for unknown block {}", d.block) });
                    };
                    let ps = rp.page_size as u64;
                    let len = rp.images[b].length;
                    for r in &d.ranges {
                        if r.start % ps != 0 || r.len % ps != 0 || r.start.checked_add(r.len).is_none_or(|e| e > len) {
                            return Err(ApplyError::Rule {
                                offset: off,
                                why: format!("discard range {:#x}+{:#x} unaligned or outside block {}", r.start, r.len, d.block),
                            });
                        }
                    }
                    rp.flush()?;
                    for r in &d.ranges {
                        let zero = vec![0u8; rp.page_size];
                        for p in (r.start..r.start + r.len).step_by(rp.page_size) {
                            if rp.images[b].is_dirty(p / ps) {
                                rp.images[b].file.write_all_at(&zero, p).map_err(|e| ApplyError::Io(e.to_string()))?;
                                rp.images[b].mark(p / ps, false);
                            }
                        }
                    }
                }
                _ => {}
            }
            applied_to = dec.position();
        }
    })();
    let flushed = rp.flush();
    pb.finish_and_clear();
    let complete = result.is_ok() && flushed.is_ok();
    let err = result.err().or(flushed.err());
    let manifest = json!({
        "blocks": rp.images.iter().map(|i| json!({"name": i.name, "file": i.file_name, "length": i.length})).collect::<Vec<_>>(),
        "page_size": rp.page_size,
        "source": path.display().to_string(),
        "complete": complete,
        "applied_up_to": applied_to,
        "error": err.as_ref().map(|e| e.to_string()),
        "error_offset": err.as_ref().and_then(|e| e.offset()),
        "nonzero_fill_pages": rp.nonzero_fills,
    });
    fs::write(outdir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n")
        .map_err(|e| format!("manifest.json: {e}"))?;
    if let Some(e) = err {
        eprintln!("qmig: extract stopped: {e}; images hold the stream applied up to offset {applied_to}");
        return Ok(ExitCode::from(1));
    }
    if rp.nonzero_fills > 0 {
        eprintln!("qmig: note: {} ZERO records had a non-zero fill byte (applied as fills)", rp.nonzero_fills);
    }
    eprintln!("extracted {} blocks to {}", rp.images.len(), outdir.display());
    Ok(ExitCode::SUCCESS)
}

/// Inflates one zlib stream that must give exactly one page.
fn inflate_page(z: &mut flate2::Decompress, input: &[u8], page_size: usize) -> Result<Vec<u8>, String> {
    z.reset(true);
    let mut out = vec![0u8; page_size + 1];
    let st = z
        .decompress(input, &mut out, flate2::FlushDecompress::Finish)
        .map_err(|e| format!("COMPRESS_PAGE: zlib error: {e}"))?;
    if st != flate2::Status::StreamEnd {
        return Err("COMPRESS_PAGE: zlib stream incomplete or inflates to more than a page".into());
    }
    if z.total_out() != page_size as u64 {
        return Err(format!("COMPRESS_PAGE: inflates to {} bytes, not one page of {page_size}", z.total_out()));
    }
    out.truncate(page_size);
    Ok(out)
}
