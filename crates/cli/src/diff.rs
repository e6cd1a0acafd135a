//! `qmig diff A B [--records]`: compares two streams record by record,
//! ignoring how the RAM records are split into sections (section headers,
//! footers and EOS of the `ram` section are not compared).
//!
//! A page record is compared as written: offset, flags (so whether the block
//! name was sent), the name itself, and the body. Without `--records`, the
//! rest of the stream is compared too (header, configuration, commands,
//! device sections, EOF, vmdesc). Prints the first difference and per-kind
//! counts of both streams; exit 0 iff no difference.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Item, SectionKind, SliceReader, WireError};

type Error = Box<dyn std::error::Error>;

/// One compared unit.
#[derive(Debug)]
struct Entry {
    /// Stream offset.
    offset: u64,
    /// Kind name (RAM record kind, or item kind).
    kind: &'static str,
    /// The block the record addresses (resolved through CONTINUE).
    block: Option<String>,
    /// Whether the block name is on the wire.
    name_sent: bool,
    /// Page offset in the block.
    page: Option<u64>,
    /// The serialized item.
    bytes: Vec<u8>,
}

/// Turns a stream into comparable entries.
struct Normalizer<'a> {
    reader: SliceReader<'a>,
    ram_id: Option<u32>,
    block: Option<String>,
    records_only: bool,
    done: bool,
}

impl<'a> Normalizer<'a> {
    fn new(buf: &'a [u8], records_only: bool) -> Self {
        Normalizer {
            reader: SliceReader::new(buf),
            ram_id: None,
            block: None,
            records_only,
            done: false,
        }
    }

    fn next_entry(&mut self) -> Result<Option<Entry>, WireError> {
        while !self.done {
            let Some(r) = self.reader.next() else {
                self.done = true;
                break;
            };
            let (offset, item) = r?;
            match &item {
                Item::Section(h) => {
                    if let Some(id) = h.ident {
                        if id.idstr == "ram" && h.kind == SectionKind::Start {
                            self.ram_id = Some(h.section_id);
                        }
                    }
                    if Some(h.section_id) == self.ram_id {
                        continue;
                    }
                }
                Item::Footer(id) if Some(*id) == self.ram_id => continue,
                Item::Ram(rec) => {
                    if rec.kind() == qmig_wire::RamKind::Eos {
                        continue;
                    }
                    if let Some(b) = rec.block {
                        self.block = Some(b.to_string());
                    }
                    let mut bytes = Vec::new();
                    item.write(&mut bytes);
                    let is_page = rec.is_page();
                    return Ok(Some(Entry {
                        offset,
                        kind: rec.kind().name(),
                        block: if is_page { self.block.clone() } else { None },
                        name_sent: rec.block.is_some(),
                        page: is_page.then_some(rec.offset),
                        bytes,
                    }));
                }
                Item::PackageEnd => continue,
                _ => {}
            }
            if self.records_only {
                continue;
            }
            let mut bytes = Vec::new();
            item.write(&mut bytes);
            return Ok(Some(Entry {
                offset,
                kind: item.kind_name(),
                block: None,
                name_sent: false,
                page: None,
                bytes,
            }));
        }
        Ok(None)
    }
}

fn load(p: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut v)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(v)
    } else {
        Ok(raw)
    }
}

fn describe(e: &Entry) -> String {
    let mut s = format!("offset {} (0x{:x}): {}", e.offset, e.offset, e.kind);
    if let Some(b) = &e.block {
        s += &format!(
            " block {b}{}",
            if e.name_sent {
                " (name sent)"
            } else {
                " (CONTINUE)"
            }
        );
    }
    if let Some(p) = e.page {
        s += &format!(" page 0x{p:x}");
    }
    s += &format!(", {} bytes", e.bytes.len());
    s
}

fn why(a: &Entry, b: &Entry) -> String {
    if a.kind != b.kind {
        "record kind".into()
    } else if a.page != b.page {
        "page offset".into()
    } else if a.block != b.block {
        "block".into()
    } else if a.name_sent != b.name_sent {
        "whether the block name is sent".into()
    } else {
        let i = a
            .bytes
            .iter()
            .zip(&b.bytes)
            .position(|(x, y)| x != y)
            .unwrap_or(a.bytes.len().min(b.bytes.len()));
        format!("content (first differing byte at +{i} of the item)")
    }
}

/// Runs `qmig diff`.
pub fn run(a: &Path, b: &Path, records_only: bool) -> Result<ExitCode, Error> {
    let (da, db) = (load(a)?, load(b)?);
    let mut na = Normalizer::new(&da, records_only);
    let mut nb = Normalizer::new(&db, records_only);
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut first: Option<String> = None;
    let mut index = 0u64;
    loop {
        let ea = na
            .next_entry()
            .map_err(|e| format!("{}: {e}", a.display()))?;
        let eb = nb
            .next_entry()
            .map_err(|e| format!("{}: {e}", b.display()))?;
        if ea.is_none() && eb.is_none() {
            break;
        }
        if let Some(e) = &ea {
            counts.entry(e.kind).or_default().0 += 1;
        }
        if let Some(e) = &eb {
            counts.entry(e.kind).or_default().1 += 1;
        }
        if first.is_none() {
            match (&ea, &eb) {
                (Some(x), Some(y)) if x.kind == y.kind && x.bytes == y.bytes => {}
                (Some(x), Some(y)) => {
                    first = Some(format!(
                        "first difference at {} #{index}: {}\n  A: {}\n  B: {}",
                        if records_only { "record" } else { "item" },
                        why(x, y),
                        describe(x),
                        describe(y)
                    ))
                }
                (Some(x), None) => {
                    first = Some(format!(
                        "B ends before A, at #{index}\n  A: {}",
                        describe(x)
                    ))
                }
                (None, Some(y)) => {
                    first = Some(format!(
                        "A ends before B, at #{index}\n  B: {}",
                        describe(y)
                    ))
                }
                (None, None) => {}
            }
        }
        index += 1;
    }
    println!("A: {}\nB: {}", a.display(), b.display());
    println!("{:<16} {:>12} {:>12}", "kind", "A", "B");
    for (k, (x, y)) in &counts {
        println!(
            "{k:<16} {x:>12} {y:>12}{}",
            if x != y { "  <- differs" } else { "" }
        );
    }
    match first {
        None => {
            println!(
                "no difference ({index} {} compared)",
                if records_only { "records" } else { "items" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(d) => {
            println!("{d}");
            Ok(ExitCode::from(1))
        }
    }
}
