//! `qmig inspect`: a summary of a stream (text or JSON), or a listing of
//! every item with `--records`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Command, ConfigBody, Item, RamBody, RamKind, RpMessage};
use serde_json::{json, Value};

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

/// How many commands, sections, blocks, PONGs and received bitmaps are kept
/// for display; the rest are only counted (so a stream of a million PINGs
/// takes no more memory than one of a thousand).
const KEEP: usize = 1000;

#[derive(Default)]
struct Summary {
    version: u32,
    machine: String,
    page_bits: Option<u32>,
    capabilities: Vec<String>,
    uuid: Option<String>,
    sections: BTreeMap<u32, (String, u32, u32, &'static str)>,
    section_counts: BTreeMap<&'static str, u64>,
    /// The first [`KEEP`] commands, for display.
    commands: Vec<Value>,
    /// Every command, counted by name.
    command_counts: BTreeMap<&'static str, u64>,
    /// Commands, sections or blocks that were counted but not kept.
    commands_omitted: u64,
    sections_omitted: u64,
    /// Blocks past the first [`KEEP`] names, counted together.
    other_blocks: BlockStats,
    blocks_omitted: u64,
    block_order: Vec<String>,
    blocks: BTreeMap<String, BlockStats>,
    totals: BTreeMap<&'static str, u64>,
    device_bytes: u64,
    ram_bytes: u64,
    vmdesc_len: Option<usize>,
    vmdesc_devices: Option<usize>,
    eof: bool,
    end: u64,
    error: Option<String>,
}

impl Summary {
    /// The counters of block `name`: its own for the first [`KEEP`] names,
    /// a shared "other blocks" entry after that.
    fn block(&mut self, name: &str) -> &mut BlockStats {
        if !self.blocks.contains_key(name) {
            if self.blocks.len() >= KEEP {
                self.blocks_omitted += 1;
                return &mut self.other_blocks;
            }
            self.block_order.push(name.to_string());
        }
        self.blocks.entry(name.to_string()).or_default()
    }
}

pub fn run(
    path: &Path,
    json_out: bool,
    records: bool,
    rp: Option<&Path>,
) -> Result<ExitCode, String> {
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
    if records {
        writeln!(
            out,
            "{:>12} {:<24} {:<24} {:>14} {:<16} payload",
            "offset", "section", "block", "page offset", "kind"
        )
        .map_err(crate::output_error)?;
    }
    let mut cur_section = String::from("-");
    let mut cur_block = String::from("-");
    loop {
        let ri = match rd.next_item() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e.to_string());
                break;
            }
        };
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
                if let Some(id) = h.ident.filter(|_| {
                    let keep = s.sections.len() < KEEP || s.sections.contains_key(&h.section_id);
                    if !keep {
                        s.sections_omitted += 1;
                    }
                    keep
                }) {
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
                        let e = s.block(b.name);
                        e.length = b.used_length;
                        e.page_size = b.page_size;
                        e.addr = b.addr;
                    }
                }
                if r.is_page() {
                    let e = s.block(&cur_block);
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
                        let bytes = d.ranges.iter().fold(0u64, |a, r| a.saturating_add(r.len));
                        v["bytes"] = json!(bytes);
                        let e = s.block(d.block);
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
                *s.command_counts.entry(c.name()).or_default() += 1;
                if s.commands.len() < KEEP {
                    s.commands.push(v);
                } else {
                    s.commands_omitted += 1;
                }
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
        if records {
            let line = record_line(off, &item, &cur_section, &cur_block, dec.position() - off);
            writeln!(out, "{line}").map_err(crate::output_error)?;
        }
        if matches!(item, Item::Footer(_)) {
            cur_section = "-".into();
        }
    }
    pb.finish_and_clear();
    let rp_summary = match rp {
        Some(p) => Some(return_path_summary(p)?),
        None => None,
    };
    if records {
        if let Some(e) = &s.error {
            writeln!(out, "error: {e}").map_err(crate::output_error)?;
        }
    } else if json_out {
        let v = to_json(&s, rp_summary);
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        )
        .map_err(crate::output_error)?;
    } else {
        print_text(&mut out, &s, rp_summary.as_ref()).map_err(crate::output_error)?;
    }
    out.flush().map_err(crate::output_error)?;
    if let Some(e) = &s.error {
        eprintln!("qmig: {e}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
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
    /// The first [`KEEP`] PONG values.
    pongs: Vec<u32>,
    pongs_omitted: u64,
    /// The first [`KEEP`] received bitmaps: block and size in bytes.
    bitmaps: Vec<(String, usize)>,
    bitmaps_omitted: u64,
    error: Option<String>,
    len: u64,
}

fn return_path_summary(p: &Path) -> Result<RpSummary, String> {
    let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut s = RpSummary {
        counts: BTreeMap::new(),
        requested_bytes: 0,
        shut: None,
        pongs: vec![],
        pongs_omitted: 0,
        bitmaps: vec![],
        bitmaps_omitted: 0,
        error: None,
        len: 0,
    };
    let mut rd = std::io::BufReader::new(f);
    loop {
        match next_rp_message(&mut rd, s.len, &mut s) {
            Ok(Some(n)) => s.len += n,
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e);
                break;
            }
        }
    }
    Ok(s)
}

/// Reads one return-path message at offset `at` from `rd` and counts it in
/// `s`; returns its length, `None` at a clean end. A RECV_BITMAP's bitmap is
/// skipped, not kept: memory stays bounded whatever its announced size (up
/// to the wire limit, which is checked before anything is skipped).
fn next_rp_message(
    rd: &mut impl std::io::Read,
    at: u64,
    s: &mut RpSummary,
) -> Result<Option<u64>, String> {
    use std::io::Read;
    let trunc = |what: &str| format!("offset {at}: return-path message truncated ({what})");
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match rd.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(trunc("header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut buf = head.to_vec();
    buf.resize(4 + len, 0);
    rd.read_exact(&mut buf[4..]).map_err(|_| trunc("payload"))?;
    let mut total = buf.len() as u64;
    let mut bitmap_len = None;
    if u16::from_be_bytes([head[0], head[1]]) == qmig_wire::return_path::msg::RECV_BITMAP {
        let mut size = [0u8; 8];
        rd.read_exact(&mut size).map_err(|_| trunc("bitmap size"))?;
        buf.extend_from_slice(&size);
        // Header, name and size alone: the wire parser checks the size
        // against its cap and says "truncated" when it is acceptable.
        if let Err(e) = qmig_wire::decode_rp_message(&buf, at) {
            return Err(e.to_string());
        }
        let size = u64::from_be_bytes(size);
        let skipped =
            std::io::copy(&mut rd.take(size), &mut std::io::sink()).map_err(|e| e.to_string())?;
        if skipped != size {
            return Err(trunc("bitmap"));
        }
        let mut end = [0u8; 8];
        rd.read_exact(&mut end)
            .map_err(|_| trunc("bitmap end marker"))?;
        let end_at = at + buf.len() as u64 + size;
        if u64::from_be_bytes(end) != qmig_wire::return_path::RECV_BITMAP_ENDING {
            return Err(format!(
                "offset {end_at}: received bitmap end marker is {:#018x}",
                u64::from_be_bytes(end)
            ));
        }
        // Parse it again as an empty bitmap with its end marker.
        let n = buf.len();
        buf[n - 8..].copy_from_slice(&0u64.to_be_bytes());
        buf.extend_from_slice(&end);
        total += 16 + size;
        bitmap_len = Some(size);
    }
    let m = match qmig_wire::decode_rp_message(&buf, at) {
        Ok(Some((m, _))) => m,
        Ok(None) => return Err(trunc("message")),
        Err(e) => return Err(e.to_string()),
    };
    *s.counts.entry(m.name()).or_default() += 1;
    match m {
        RpMessage::Shut(v) => s.shut = Some(v),
        RpMessage::Pong(v) if s.pongs.len() < KEEP => s.pongs.push(v),
        RpMessage::Pong(_) => s.pongs_omitted += 1,
        RpMessage::ReqPages { len, .. } | RpMessage::ReqPagesId { len, .. } => {
            s.requested_bytes = s.requested_bytes.saturating_add(len as u64)
        }
        RpMessage::RecvBitmap { block, .. } if s.bitmaps.len() < KEEP => s
            .bitmaps
            .push((block.to_string(), bitmap_len.unwrap_or(0) as usize)),
        RpMessage::RecvBitmap { .. } => s.bitmaps_omitted += 1,
        _ => {}
    }
    Ok(Some(total))
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
        "command_counts": s.command_counts,
        "commands_omitted": s.commands_omitted,
        "sections_omitted": s.sections_omitted,
        "blocks_omitted": s.blocks_omitted,
        "other_blocks": (s.blocks_omitted > 0).then(|| {
            let b = &s.other_blocks;
            json!({"zero": b.zero, "page": b.page, "xbzrle": b.xbzrle, "compressed": b.compressed,
                   "nonzero_fill": b.nonzero_fill, "discard_ranges": b.discard_ranges,
                   "discarded_bytes": b.discarded_bytes})
        }),
        "blocks": blocks,
        "totals": s.totals,
        "ram_bytes": s.ram_bytes,
        "device_bytes": s.device_bytes,
        "eof": s.eof,
        "leniencies": leniencies(s),
        "vmdesc": s.vmdesc_len.map(|l| json!({"length": l, "devices": s.vmdesc_devices})),
        "length": s.end,
        "error": s.error,
    });
    if let Some(rp) = rp {
        v["return_path"] = json!({
            "length": rp.len,
            "messages": rp.counts,
            "requested_bytes": rp.requested_bytes,
            "shut": rp.shut,
            "pongs": rp.pongs,
            "pongs_omitted": rp.pongs_omitted,
            "recv_bitmaps_omitted": rp.bitmaps_omitted,
            "recv_bitmaps": rp.bitmaps.iter().map(|(b, l)| json!({"block": b, "bytes": l})).collect::<Vec<_>>(),
            "error": rp.error,
        });
    }
    v
}

/// Records a QEMU 10 loader would refuse, or that qmig accepts only because
/// the machine type does not prove a QEMU >= 8.2 source.
fn leniencies(s: &Summary) -> Vec<Value> {
    let fills: u64 =
        s.blocks.values().map(|b| b.nonzero_fill).sum::<u64>() + s.other_blocks.nonzero_fill;
    if fills == 0 {
        return vec![];
    }
    let v = qmig_ram_dst::machine_qemu_version(&s.machine);
    let refused = v.is_some_and(|v| v >= (8, 2));
    vec![json!({
        "kind": "nonzero_zero_fill",
        "records": fills,
        "qemu_rule": "ram_load_precopy/ram_load_postcopy: QEMU >= 8.2 refuses a ZERO record whose fill byte is not 0",
        "machine_qemu_version": v.map(|(a, b)| format!("{a}.{b}")),
        "verdict": if refused {
            "error: the machine type says QEMU >= 8.2; extract and recv refuse this stream"
        } else {
            "leniency: the stream may predate QEMU 8.2; extract applies these as fills"
        },
    })]
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
    if s.sections_omitted > 0 {
        writeln!(
            out,
            "  ... {} section headers of further ids not listed (only the first {KEEP} ids are kept)",
            s.sections_omitted
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
        if s.commands_omitted > 0 {
            writeln!(
                out,
                "  ... {} more commands not listed (only the first {KEEP} are kept)",
                s.commands_omitted
            )?;
        }
        let cc: Vec<String> = s
            .command_counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(out, "command counts: {}", cc.join(", "))?;
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
    if s.blocks_omitted > 0 {
        let b = &s.other_blocks;
        writeln!(
            out,
            "  {:<32} {:>12} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
            format!("({} more mentions of other blocks)", s.blocks_omitted),
            "-",
            b.zero,
            b.page,
            b.xbzrle,
            b.compressed,
            "-",
            b.discarded_bytes
        )?;
    }
    for l in leniencies(s) {
        writeln!(
            out,
            "note: {} ZERO records with a non-zero fill byte: {} ({})",
            l["records"],
            l["verdict"].as_str().unwrap_or(""),
            l["qemu_rule"].as_str().unwrap_or("")
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
        writeln!(
            out,
            "  requested bytes {}  shut {:?}  pongs {:?}",
            rp.requested_bytes, rp.shut, rp.pongs
        )?;
        if rp.pongs_omitted > 0 {
            writeln!(out, "  ... {} more pongs not listed", rp.pongs_omitted)?;
        }
        for (b, l) in &rp.bitmaps {
            writeln!(out, "  received bitmap {b}: {l} bytes")?;
        }
        if rp.bitmaps_omitted > 0 {
            writeln!(
                out,
                "  ... {} more received bitmaps not listed",
                rp.bitmaps_omitted
            )?;
        }
        if let Some(e) = &rp.error {
            writeln!(out, "  error: {e}")?;
        }
    }
    if let Some(e) = &s.error {
        writeln!(out, "error: {e}")?;
    }
    Ok(())
}
