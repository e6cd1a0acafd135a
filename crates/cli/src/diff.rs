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
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Item, SectionKind, StreamReader, WireError};

use crate::error::{CliError, CliResult};
use crate::input::Input;

/// What one compared unit is (its bytes and block live in the [`Normalizer`]).
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Stream offset.
    offset: u64,
    /// Kind name (RAM record kind, or item kind).
    kind: &'static str,
    /// Whether it is a page record (so it addresses the normalizer's block).
    is_page: bool,
    /// Whether the block name is on the wire.
    name_sent: bool,
    /// Page offset in the block.
    page: Option<u64>,
}

/// Turns a stream, read incrementally, into comparable entries. The current
/// entry's serialized bytes and block are kept here, in buffers reused from
/// one entry to the next.
struct Normalizer {
    reader: StreamReader<Input>,
    ram_id: Option<u32>,
    /// The block page records address (resolved through CONTINUE).
    block: String,
    /// The serialized current entry.
    bytes: Vec<u8>,
    records_only: bool,
}

impl Normalizer {
    fn open(path: &Path, records_only: bool) -> Result<Self, CliError> {
        Ok(Normalizer {
            reader: crate::input::open_stream(path)?.0,
            ram_id: None,
            block: String::new(),
            bytes: Vec::new(),
            records_only,
        })
    }

    fn next_entry(&mut self) -> Result<Option<Entry>, WireError> {
        while let Some(ri) = self.reader.next_item()? {
            let (offset, item) = (ri.offset, ri.item);
            let entry = match &item {
                Item::Section(h) => {
                    if let Some(id) = h.ident {
                        if id.idstr == "ram" && h.kind == SectionKind::Start {
                            self.ram_id = Some(h.section_id);
                        }
                    }
                    if Some(h.section_id) == self.ram_id {
                        continue;
                    }
                    None
                }
                Item::Footer(id) if Some(*id) == self.ram_id => continue,
                Item::Ram(rec) => {
                    if rec.kind() == qmig_wire::RamKind::Eos {
                        continue;
                    }
                    if let Some(b) = rec.block {
                        self.block.clear();
                        self.block.push_str(b);
                    }
                    let is_page = rec.is_page();
                    Some(Entry {
                        offset,
                        kind: rec.kind().name(),
                        is_page,
                        name_sent: rec.block.is_some(),
                        page: is_page.then_some(rec.offset),
                    })
                }
                Item::PackageEnd => continue,
                _ => None,
            };
            let entry = match entry {
                Some(e) => e,
                None if self.records_only => continue,
                None => Entry {
                    offset,
                    kind: item.kind_name(),
                    is_page: false,
                    name_sent: false,
                    page: None,
                },
            };
            self.bytes.clear();
            item.write(&mut self.bytes)?;
            return Ok(Some(entry));
        }
        Ok(None)
    }

    fn block_of(&self, e: &Entry) -> Option<&str> {
        e.is_page.then_some(self.block.as_str())
    }
}

fn describe(e: &Entry, n: &Normalizer) -> String {
    let mut s = format!("offset {} (0x{:x}): {}", e.offset, e.offset, e.kind);
    if let Some(b) = n.block_of(e) {
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
    s += &format!(", {} bytes", n.bytes.len());
    s
}

fn why(a: &Entry, na: &Normalizer, b: &Entry, nb: &Normalizer) -> String {
    if a.kind != b.kind {
        "record kind".into()
    } else if a.page != b.page {
        "page offset".into()
    } else if na.block_of(a) != nb.block_of(b) {
        "block".into()
    } else if a.name_sent != b.name_sent {
        "whether the block name is sent".into()
    } else {
        let i = na
            .bytes
            .iter()
            .zip(&nb.bytes)
            .position(|(x, y)| x != y)
            .unwrap_or(na.bytes.len().min(nb.bytes.len()));
        format!("content (first differing byte at +{i} of the item)")
    }
}

/// Runs `qmig diff`.
pub fn run(a: &Path, b: &Path, records_only: bool) -> CliResult {
    let mut na = Normalizer::open(a, records_only)?;
    let mut nb = Normalizer::open(b, records_only)?;
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut first: Option<String> = None;
    let mut index = 0u64;
    loop {
        let ea = na.next_entry().map_err(|e| CliError::wire(a, e))?;
        let eb = nb.next_entry().map_err(|e| CliError::wire(b, e))?;
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
                (Some(x), Some(y)) if x.kind == y.kind && na.bytes == nb.bytes => {}
                (Some(x), Some(y)) => {
                    first = Some(format!(
                        "first difference at {} #{index}: {}\n  A: {}\n  B: {}",
                        if records_only { "record" } else { "item" },
                        why(x, &na, y, &nb),
                        describe(x, &na),
                        describe(y, &nb)
                    ))
                }
                (Some(x), None) => {
                    first = Some(format!(
                        "B ends before A, at #{index}\n  A: {}",
                        describe(x, &na)
                    ))
                }
                (None, Some(y)) => {
                    first = Some(format!(
                        "A ends before B, at #{index}\n  B: {}",
                        describe(y, &nb)
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
