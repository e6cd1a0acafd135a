//! `qmig inspect`: a summary of a stream (text or JSON), or a listing of
//! every item with `--records`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Command, ConfigBody, Item, RamBody, RamKind, RpMessage};
use serde_json::{json, Value};

use crate::error::{CliError, CliResult};

/// `--records` filters.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only RAM page records of this block.
    pub block: Option<String>,
    /// Only items of this kind name (case-insensitive).
    pub kind: Option<String>,
}

impl Filter {
    fn keeps(&self, item: &Item<'_>, block: &str) -> bool {
        if let Some(b) = &self.block {
            match item {
                Item::Ram(r) if r.is_page() && block == b => {}
                _ => return false,
            }
        }
        self.kind
            .as_deref()
            .is_none_or(|k| item.kind_name().eq_ignore_ascii_case(k))
    }
}

#[derive(Default, Clone)]
struct BlockStats {
    length: u64,
    page_size: Option<u64>,
    addr: Option<u64>,
    zero: u64,
    page: u64,
    xbzrle: u64,
    compressed: u64,
    nonzero_fill: u64,
    discarded_bytes: u64,
    discard_ranges: u64,
}

#[derive(Default)]
struct Summary {
    version: u32,
    machine: String,
    page_bits: Option<u32>,
    capabilities: Vec<String>,
    uuid: Option<String>,
    sections: BTreeMap<u32, (String, u32, u32, &'static str)>,
    section_counts: BTreeMap<&'static str, u64>,
    commands: Vec<Value>,
    block_order: Vec<String>,
    blocks: BTreeMap<String, BlockStats>,
    totals: BTreeMap<&'static str, u64>,
    device_bytes: u64,
    ram_bytes: u64,
    vmdesc_len: Option<usize>,
    vmdesc_devices: Option<usize>,
    eof: bool,
    end: u64,
    items: u64,
    error: Option<qmig_wire::WireError>,
}

pub fn run(
    path: &Path,
    json_out: bool,
    records: bool,
    rp: Option<&Path>,
    filter: &Filter,
) -> CliResult {
    let (mut rd, total) = crate::input::open_stream(path)?;
    let pb = crate::progress::bytes(total, "inspect");
    let mut s = Summary::default();
    for k in [
        "zero",
        "page",
        "xbzrle",
        "compressed",
        "eos",
        "mem_size",
        "hook",
        "multifd_flush",
    ] {
        s.totals.insert(k, 0);
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut cur_section = String::from("-");
    let mut cur_block = String::from("-");
    loop {
        let ri = match rd.next_item() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e);
                break;
            }
        };
        if records && !json_out && s.items == 0 {
            // The header line only once the input is known to be a stream.
            writeln!(
                out,
                "{:>12} {:<24} {:<24} {:>14} {:<16} payload",
                "offset", "section", "block", "page offset", "kind"
            )
            .map_err(crate::output_error)?;
        }
        s.items += 1;
        let (off, item, dec) = (ri.offset, ri.item, ri.decoder);
        s.end = dec.position();
        pb.set_position(off);
        match &item {
            Item::Header { version } => s.version = *version,
            Item::Configuration(c) => {
                s.machine = c.machine.to_string();
                s.page_bits = c.target_page_bits();
                s.capabilities = c.capabilities().map(str::to_string).collect();
                for sub in &c.subsections {
                    if let ConfigBody::Uuid(u) = sub.body {
                        s.uuid = Some(u.iter().map(|b| format!("{b:02x}")).collect());
                    }
                }
            }
            Item::Section(h) => {
                *s.section_counts.entry(h.kind.name()).or_default() += 1;
                if let Some(id) = h.ident {
                    s.sections.entry(h.section_id).or_insert((
                        id.idstr.to_string(),
                        id.instance,
                        id.version,
                        h.kind.name(),
                    ));
                }
                cur_section = dec
                    .sections()
                    .get(&h.section_id)
                    .map(|i| format!("{}:{}", h.section_id, i.idstr))
                    .unwrap_or_else(|| h.section_id.to_string());
            }
            Item::Ram(r) => {
                if let Some(b) = r.block {
                    cur_block = b.to_string();
                }
                s.ram_bytes += dec.position() - off;
                let key = match r.kind() {
                    RamKind::Zero => "zero",
                    RamKind::Page => "page",
                    RamKind::Xbzrle => "xbzrle",
                    RamKind::Compressed => "compressed",
                    RamKind::Eos => "eos",
                    RamKind::MemSize => "mem_size",
                    RamKind::Hook => "hook",
                    RamKind::MultifdFlush => "multifd_flush",
                };
                *s.totals.entry(key).or_default() += 1;
                if let RamBody::MemSize(blocks) = &r.body {
                    for b in blocks {
                        if !s.blocks.contains_key(b.name) {
                            s.block_order.push(b.name.to_string());
                        }
                        let e = s.blocks.entry(b.name.to_string()).or_default();
                        e.length = b.used_length;
                        e.page_size = b.page_size;
                        e.addr = b.addr;
                    }
                }
                if r.is_page() {
                    if !s.blocks.contains_key(&cur_block) {
                        s.block_order.push(cur_block.clone());
                    }
                    let e = s.blocks.entry(cur_block.clone()).or_default();
                    match &r.body {
                        RamBody::Zero { fill } => {
                            e.zero += 1;
                            if *fill != 0 {
                                e.nonzero_fill += 1;
                            }
                        }
                        RamBody::Page(_) => e.page += 1,
                        RamBody::Xbzrle(_) => e.xbzrle += 1,
                        RamBody::Compressed(_) => e.compressed += 1,
                        _ => {}
                    }
                }
            }
            Item::DeviceData(d) => s.device_bytes += d.len() as u64,
            Item::Command(c) => {
                // The decoder is already past the item: PACKAGED itself opened one level.
                let depth =
                    dec.package_depth() - usize::from(matches!(c, Command::Packaged { .. }));
                let mut v = json!({"offset": off, "name": c.name(), "depth": depth});
                match c {
                    Command::Ping(x) => v["value"] = json!(x),
                    Command::PostcopyAdvise(Some(a)) => {
                        v["page_size_summary"] = json!(a.page_size_summary);
                        v["target_page_size"] = json!(a.target_page_size);
                    }
                    Command::RamDiscard(d) => {
                        v["block"] = json!(d.block);
                        v["ranges"] = json!(d.ranges.len());
                        let bytes: u64 = d.ranges.iter().map(|r| r.len).sum();
                        v["bytes"] = json!(bytes);
                        let e = s.blocks.entry(d.block.to_string()).or_default();
                        e.discarded_bytes += bytes;
                        e.discard_ranges += d.ranges.len() as u64;
                    }
                    Command::Packaged { len } => v["len"] = json!(len),
                    Command::RecvBitmap { block } => v["block"] = json!(block),
                    Command::Unknown { cmd, payload } => {
                        v["cmd"] = json!(cmd);
                        v["len"] = json!(payload.len());
                    }
                    _ => {}
                }
                s.commands.push(v);
            }
            Item::Eof => s.eof = true,
            Item::Vmdesc(j) => {
                s.vmdesc_len = Some(j.len());
                s.vmdesc_devices = serde_json::from_slice::<Value>(j)
                    .ok()
                    .and_then(|v| v.get("devices").and_then(|d| d.as_array()).map(|a| a.len()));
            }
            Item::Footer(_) | Item::PackageEnd => {}
        }
        if records && filter.keeps(&item, &cur_block) {
            let len = dec.position() - off;
            if json_out {
                let v = record_json(off, &item, &cur_section, &cur_block, len);
                writeln!(out, "{v}").map_err(crate::output_error)?;
            } else {
                let line = record_line(off, &item, &cur_section, &cur_block, len);
                writeln!(out, "{line}").map_err(crate::output_error)?;
            }
        }
        if matches!(item, Item::Footer(_)) {
            cur_section = "-".into();
        }
    }
    pb.finish_and_clear();
    // Not a stream at all (empty file, wrong magic...): no summary, one error.
    if s.items == 0 {
        if let Some(e) = s.error.take() {
            return Err(CliError::wire(path, e));
        }
    }
    let rp_summary = match rp {
        Some(p) => Some(return_path_summary(p)?),
        None => None,
    };
    let stream_error = s.error.take().map(|e| CliError::wire(path, e));
    let rp_error = rp_summary.as_ref().and_then(|r| {
        r.error
            .as_ref()
            .map(|e| CliError::data(format!("return path: {e}")))
    });
    if records {
        if json_out {
            for e in [&stream_error, &rp_error].into_iter().flatten() {
                writeln!(out, "{}", json!({ "error": e.to_json() }))
                    .map_err(crate::output_error)?;
            }
        }
    } else if json_out {
        let mut v = to_json(&s, rp_summary);
        v["error"] = stream_error
            .as_ref()
            .or(rp_error.as_ref())
            .map_or(Value::Null, |e| json!(e.to_json()));
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| CliError::data(e.to_string()))?
        )
        .map_err(crate::output_error)?;
    } else {
        print_text(&mut out, &s, rp_summary.as_ref()).map_err(crate::output_error)?;
    }
    out.flush().map_err(crate::output_error)?;
    match stream_error.or(rp_error) {
        // --json carries the error in its output.
        Some(e) if json_out => Ok(ExitCode::from(e.exit_code())),
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// One `--records --json` line.
fn record_json(off: u64, item: &Item<'_>, section: &str, block: &str, len: u64) -> Value {
    let mut v = json!({"offset": off, "kind": item.kind_name(), "len": len});
    if section != "-" {
        v["section"] = json!(section);
    }
    match item {
        Item::Ram(r) => {
            v["payload"] = json!(r.payload_len());
            if r.is_page() {
                v["block"] = json!(block);
                v["page_offset"] = json!(r.offset);
                v["name_sent"] = json!(r.block.is_some());
            } else if let RamBody::MemSize(b) = &r.body {
                v["total"] = json!(r.offset);
                v["blocks"] = json!(b
                    .iter()
                    .map(|b| json!({"name": b.name, "length": b.used_length}))
                    .collect::<Vec<_>>());
            }
        }
        Item::Section(h) => {
            v["section_id"] = json!(h.section_id);
            if let Some(i) = h.ident {
                v["idstr"] = json!(i.idstr);
                v["instance"] = json!(i.instance);
                v["version"] = json!(i.version);
            }
        }
        Item::Command(c) => match c {
            Command::Ping(x) => v["value"] = json!(x),
            Command::RamDiscard(d) => {
                v["block"] = json!(d.block);
                v["ranges"] = json!(d.ranges.len());
            }
            Command::Packaged { len } => v["package_len"] = json!(len),
            _ => {}
        },
        _ => {}
    }
    v
}

fn record_line(off: u64, item: &Item<'_>, section: &str, block: &str, len: u64) -> String {
    match item {
        Item::Ram(r) => {
            let (blk, pofs) = if r.is_page() {
                (block, format!("{:#x}", r.offset))
            } else if let RamBody::MemSize(b) = &r.body {
                ("-", format!("total={:#x} blocks={}", r.offset, b.len()))
            } else {
                ("-", "-".into())
            };
            format!(
                "{off:>12} {section:<24} {blk:<24} {pofs:>14} {:<16} {}",
                r.kind().name(),
                r.payload_len()
            )
        }
        Item::Section(h) => {
            let name = h
                .ident
                .map(|i| format!("{} inst={} ver={}", i.idstr, i.instance, i.version))
                .unwrap_or_default();
            format!(
                "{off:>12} {:<24} {:<24} {:>14} {:<16} {len} {name}",
                format!("{}", h.section_id),
                "-",
                "-",
                h.kind.name()
            )
        }
        Item::Command(c) => {
            let extra = match c {
                Command::Ping(v) => format!(" value={v}"),
                Command::RamDiscard(d) => format!(" block={} ranges={}", d.block, d.ranges.len()),
                Command::Packaged { len } => format!(" len={len}"),
                _ => String::new(),
            };
            format!(
                "{off:>12} {:<24} {:<24} {:>14} {:<16} {len}{extra}",
                "-",
                "-",
                "-",
                c.name()
            )
        }
        other => format!(
            "{off:>12} {section:<24} {:<24} {:>14} {:<16} {len}",
            "-",
            "-",
            other.kind_name()
        ),
    }
}

struct RpSummary {
    counts: BTreeMap<&'static str, u64>,
    requested_bytes: u64,
    shut: Option<u32>,
    pongs: Vec<u32>,
    bitmaps: Vec<(String, usize)>,
    error: Option<String>,
    len: u64,
}

fn return_path_summary(p: &Path) -> Result<RpSummary, CliError> {
    let buf = std::fs::read(p).map_err(|e| CliError::io(p, "read", e))?;
    let mut s = RpSummary {
        counts: BTreeMap::new(),
        requested_bytes: 0,
        shut: None,
        pongs: vec![],
        bitmaps: vec![],
        error: None,
        len: buf.len() as u64,
    };
    for m in qmig_wire::ReturnPathReader::new(&buf) {
        match m {
            Ok((_, m)) => {
                *s.counts.entry(m.name()).or_default() += 1;
                match m {
                    RpMessage::Shut(v) => s.shut = Some(v),
                    RpMessage::Pong(v) => s.pongs.push(v),
                    RpMessage::ReqPages { len, .. } | RpMessage::ReqPagesId { len, .. } => {
                        s.requested_bytes += len as u64
                    }
                    RpMessage::RecvBitmap { block, bitmap } => {
                        s.bitmaps.push((block.to_string(), bitmap.len()))
                    }
                    _ => {}
                }
            }
            Err(e) => {
                s.error = Some(e.to_string());
                break;
            }
        }
    }
    Ok(s)
}

fn to_json(s: &Summary, rp: Option<RpSummary>) -> Value {
    let blocks: Vec<Value> = s
        .block_order
        .iter()
        .map(|n| {
            let b = &s.blocks[n];
            json!({
                "name": n, "length": b.length, "page_size": b.page_size, "addr": b.addr,
                "zero": b.zero, "page": b.page, "xbzrle": b.xbzrle, "compressed": b.compressed,
                "nonzero_fill": b.nonzero_fill,
                "discard_ranges": b.discard_ranges, "discarded_bytes": b.discarded_bytes,
            })
        })
        .collect();
    let sections: Vec<Value> = s
        .sections
        .iter()
        .map(|(id, (n, inst, ver, kind))| json!({"id": id, "name": n, "instance": inst, "version": ver, "kind": kind}))
        .collect();
    let mut v = json!({
        "version": s.version,
        "machine": s.machine,
        "target_page_bits": s.page_bits,
        "capabilities": s.capabilities,
        "uuid": s.uuid,
        "sections": sections,
        "section_headers": s.section_counts,
        "commands": s.commands,
        "blocks": blocks,
        "totals": s.totals,
        "ram_bytes": s.ram_bytes,
        "device_bytes": s.device_bytes,
        "eof": s.eof,
        "vmdesc": s.vmdesc_len.map(|l| json!({"length": l, "devices": s.vmdesc_devices})),
        "length": s.end,
        "error": Value::Null,
    });
    if let Some(rp) = rp {
        v["return_path"] = json!({
            "length": rp.len,
            "messages": rp.counts,
            "requested_bytes": rp.requested_bytes,
            "shut": rp.shut,
            "pongs": rp.pongs,
            "recv_bitmaps": rp.bitmaps.iter().map(|(b, l)| json!({"block": b, "bytes": l})).collect::<Vec<_>>(),
            "error": rp.error,
        });
    }
    v
}

fn print_text(out: &mut impl Write, s: &Summary, rp: Option<&RpSummary>) -> std::io::Result<()> {
    writeln!(
        out,
        "stream version {}  machine {}  target page {} bytes",
        s.version,
        s.machine,
        1u64 << s.page_bits.unwrap_or(12)
    )?;
    if !s.capabilities.is_empty() {
        writeln!(out, "capabilities: {}", s.capabilities.join(", "))?;
    }
    writeln!(out, "sections:")?;
    for (id, (n, inst, ver, kind)) in &s.sections {
        writeln!(
            out,
            "  {id:>4} {n:<40} instance {inst:<4} version {ver:<4} {kind}"
        )?;
    }
    let hc: Vec<String> = s
        .section_counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    writeln!(out, "section headers: {}", hc.join(", "))?;
    if !s.commands.is_empty() {
        writeln!(out, "commands:")?;
        for c in &s.commands {
            let mut extra = String::new();
            if let Some(o) = c.as_object() {
                for (k, v) in o {
                    if !matches!(k.as_str(), "offset" | "name" | "depth") {
                        extra.push_str(&format!(" {k}={v}"));
                    }
                }
            }
            let depth = c["depth"].as_u64().unwrap_or(0) as usize;
            writeln!(
                out,
                "  {:>12} {}{}{}",
                c["offset"],
                "  ".repeat(depth),
                c["name"].as_str().unwrap_or(""),
                extra
            )?;
        }
    }
    writeln!(out, "RAM blocks:")?;
    writeln!(
        out,
        "  {:<32} {:>12} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "name", "length", "zero", "page", "xbzrle", "compr", "page size", "discarded"
    )?;
    for n in &s.block_order {
        let b = &s.blocks[n];
        writeln!(
            out,
            "  {n:<32} {:>12} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
            b.length,
            b.zero,
            b.page,
            b.xbzrle,
            b.compressed,
            b.page_size
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            b.discarded_bytes
        )?;
    }
    let t: Vec<String> = s.totals.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(out, "totals: {}", t.join(", "))?;
    writeln!(
        out,
        "RAM bytes {}  device bytes {}  length {}  EOF {}",
        s.ram_bytes,
        s.device_bytes,
        s.end,
        if s.eof { "yes" } else { "no" }
    )?;
    match s.vmdesc_len {
        Some(l) => writeln!(
            out,
            "vmdesc: {l} bytes, {} devices",
            s.vmdesc_devices
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into())
        )?,
        None => writeln!(out, "vmdesc: none")?,
    }
    if let Some(rp) = rp {
        let m: Vec<String> = rp.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(out, "return path ({} bytes): {}", rp.len, m.join(", "))?;
        let pongs: Vec<String> = rp.pongs.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "  requested bytes {}  shut {}  pongs {}",
            rp.requested_bytes,
            rp.shut
                .map_or_else(|| "none".to_string(), |v| v.to_string()),
            if pongs.is_empty() {
                "none".to_string()
            } else {
                pongs.join(", ")
            }
        )?;
        for (b, l) in &rp.bitmaps {
            writeln!(out, "  received bitmap {b}: {l} bytes")?;
        }
    }
    Ok(())
}
