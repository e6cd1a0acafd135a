//! `qmig inspect`: a summary of a stream (text or JSON), or a listing of
//! every item with `--records`.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use qmig_wire::{Command, ConfigBody, Item, MappedRam, RamBody, RamKind, RpMessage};
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
    /// mapped-ram: file offsets of the bitmap and of the first page.
    mapped_ram: Option<(u64, u64)>,
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
    /// Target page size in force (bytes) and where it came from.
    page_size: u64,
    page_source: Option<&'static str>,
    has_configuration: Option<bool>,
    vmdesc_delimits: bool,
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
    items: u64,
    error: Option<qmig_wire::WireError>,
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
    libvirt_xml: bool,
    filter: &Filter,
    channels: &[std::path::PathBuf],
) -> CliResult {
    let opened = crate::input::open(path)?;
    if libvirt_xml {
        return print_libvirt_xml(path, &opened.layers);
    }
    let container = crate::input::describe(&opened.layers);
    let container_json = crate::input::layers_json(&opened.layers);
    let consumed = opened.consumed.clone();
    let (mut rd, total) = crate::input::reader_for(opened.input, opened.seekable, path)?;
    let pb = crate::progress::input(total, consumed, "inspect");
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
        s.page_size = dec.ram_context().page_size() as u64;
        s.page_source = dec.page_size_source().map(|p| p.name());
        s.has_configuration = dec.has_configuration();
        s.vmdesc_delimits = dec.has_vmdesc();
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
            Item::MappedRam(m) => {
                s.ram_bytes += dec.position() - off;
                match m {
                    MappedRam::MemSize { .. } => *s.totals.entry("mem_size").or_default() += 1,
                    MappedRam::Block { block, header } => {
                        cur_block = block.name.to_string();
                        let e = s.block(block.name);
                        e.length = block.used_length;
                        e.addr = block.addr;
                        e.mapped_ram = Some((header.bitmap_offset, header.pages_offset));
                    }
                    // Pages with their bit set are in the file (counted as
                    // PAGE, QEMU's `normal`); the others were zero when
                    // saved (QEMU's `duplicate`).
                    MappedRam::Bitmap(bm) => {
                        let pages =
                            s.blocks.get(&cur_block).map_or(0, |b| b.length) / s.page_size.max(1);
                        let set = qmig_wire::mapped_ram::count_set(bm, pages);
                        let e = s.block(&cur_block);
                        e.page += set;
                        e.zero += pages - set;
                        *s.totals.entry("page").or_default() += set;
                        *s.totals.entry("zero").or_default() += pages - set;
                    }
                    MappedRam::Padding(_) | MappedRam::Pages { .. } => {}
                }
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
    let chans: Vec<crate::channels::ChannelSummary> = channels
        .iter()
        .map(|c| crate::channels::summarize(c, s.page_size))
        .collect();
    let chan_error = chans
        .iter()
        .find_map(|c| c.error.clone())
        .map(|e| CliError::data(format!("multifd channel: {e}")));
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
            .or(chan_error.as_ref())
            .map_or(Value::Null, |e| json!(e.to_json()));
        v["container"] = container_json;
        if !chans.is_empty() {
            let normal: u64 = chans.iter().map(|c| c.normal_pages).sum();
            let zero: u64 = chans.iter().map(|c| c.zero_pages).sum();
            v["multifd"] = json!({
                "channels": chans.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
                "normal_pages": normal,
                "zero_pages": zero,
                // QEMU's query-migrate `normal` / `duplicate` count both.
                "normal_with_main": normal + s.totals.get("page").copied().unwrap_or(0),
                "zero_with_main": zero + s.totals.get("zero").copied().unwrap_or(0),
            });
        }
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| CliError::data(e.to_string()))?
        )
        .map_err(crate::output_error)?;
    } else {
        for line in &container {
            writeln!(out, "{line}").map_err(crate::output_error)?;
        }
        print_text(&mut out, &s, rp_summary.as_ref()).map_err(crate::output_error)?;
        if !chans.is_empty() {
            writeln!(out, "multifd channels:").map_err(crate::output_error)?;
            for c in &chans {
                writeln!(out, "{}", c.line()).map_err(crate::output_error)?;
            }
        }
    }
    out.flush().map_err(crate::output_error)?;
    match stream_error.or(rp_error).or(chan_error) {
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

/// `inspect --libvirt-xml`: the domain XML of a libvirt save image, then its
/// save cookie (if any) after a `<!-- save cookie -->` line.
fn print_libvirt_xml(path: &Path, layers: &[qmig_container::Layer]) -> CliResult {
    let Some(img) = layers.iter().find_map(|l| match l {
        qmig_container::Layer::Libvirt(i) => Some(i),
        qmig_container::Layer::Compressed(_) => None,
    }) else {
        return Err(CliError::data(format!(
            "{}: not a libvirt save image (no LibvirtQemudSave/LibvirtQemudPart magic)",
            path.display()
        )));
    };
    let mut out = std::io::stdout().lock();
    let mut w = |t: &str| -> Result<(), CliError> {
        out.write_all(t.as_bytes())
            .and_then(|()| {
                if t.ends_with('\n') {
                    Ok(())
                } else {
                    out.write_all(b"\n")
                }
            })
            .map_err(crate::output_error)
    };
    w(&img.data.xml)?;
    if let Some(c) = &img.data.cookie {
        w("<!-- save cookie -->")?;
        w(c)?;
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
        Item::MappedRam(m) => {
            let (blk, pofs) = match m {
                MappedRam::MemSize { total } => ("-".to_string(), format!("total={total:#x}")),
                MappedRam::Block {
                    block: b,
                    header: h,
                } => (
                    b.name.to_string(),
                    format!("bitmap@{} pages@{}", h.bitmap_offset, h.pages_offset),
                ),
                MappedRam::Pages { first, .. } => (block.to_string(), format!("page {first}")),
                _ => (block.to_string(), "-".into()),
            };
            format!(
                "{off:>12} {section:<24} {blk:<24} {pofs:>14} {:<16} {len}",
                m.kind_name()
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

fn return_path_summary(p: &Path) -> Result<RpSummary, CliError> {
    let f = std::fs::File::open(p).map_err(|e| CliError::io(p, "open", e))?;
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
                "mapped_ram": b.mapped_ram.map(|(bo, po)| json!({"bitmap_offset": bo, "pages_offset": po})),
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
        "target_page_size": s.page_size,
        "target_page_size_source": s.page_source,
        "configuration_section": s.has_configuration,
        "device_sections_delimited_by": if s.vmdesc_delimits { "vmdesc" } else { "footer" },
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
        "error": Value::Null,
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
        "stream version {}  machine {}  target page {} bytes ({})",
        s.version,
        if s.has_configuration == Some(false) {
            "(no configuration section)"
        } else {
            &s.machine
        },
        s.page_size,
        s.page_source.unwrap_or("not needed")
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
    for n in &s.block_order {
        if let Some((bo, po)) = s.blocks[n].mapped_ram {
            writeln!(
                out,
                "  mapped-ram {n}: bitmap at file offset {bo}, pages at {po} .. {}",
                po.saturating_add(s.blocks[n].length)
            )?;
        }
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
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// `inspect --devices` and `inspect --vmdesc`: device state decoded from the
// vmdesc, and the vmdesc itself, like QEMU's `analyze-migration.py -d state`
// and `-d desc`.

/// Cap on the device payload bytes buffered while the vmdesc has not been read
/// yet (pipes, gzip'd captures).
const MAX_BUFFERED_DEVICE_BYTES: usize = 64 << 20;

/// Reads the vmdesc JSON from the end of a regular, uncompressed stream file.
fn tail_vmdesc(f: &mut std::fs::File) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    let end = f.seek(SeekFrom::End(0))?;
    let mut found = None;
    for window in [
        1u64 << 20,
        u64::from(qmig_wire::vmdesc::DEFAULT_MAX_VMDESC) + 6,
    ] {
        let n = window.min(end);
        f.seek(SeekFrom::Start(end - n))?;
        let mut t = vec![0; n as usize];
        f.read_exact(&mut t)?;
        if let Some(h) = qmig_wire::vmdesc::find_trailer(&t) {
            found = Some(t[h + 6..].to_vec());
            break;
        }
        if n == end {
            break;
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(found)
}

/// The vmdesc of a stream: from the tail of a regular file, else by reading
/// the stream up to its trailer. `Ok(None)`: the stream has none (postcopy).
fn stream_vmdesc(path: &Path) -> Result<Option<Vec<u8>>, CliError> {
    let err = |e: std::io::Error| CliError::io(path, "read", e);
    let (input, seekable) = crate::input::open_input(path)?;
    if let (crate::input::Input::Plain { file: mut f, .. }, true) = (input, seekable) {
        if let Some(j) = tail_vmdesc(&mut f).map_err(err)? {
            return Ok(Some(j));
        }
    }
    let (mut rd, _) = crate::input::open_stream(path)?;
    loop {
        match rd.next_item() {
            Ok(Some(ri)) => {
                if let Item::Vmdesc(j) = ri.item {
                    return Ok(Some(j.to_vec()));
                }
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(CliError::wire(path, e)),
        }
    }
}

/// The vmdesc held by `--vmdesc FILE`: a bare JSON (e.g. `recv`'s
/// `vmdesc.json`) or another capture of the same QEMU and machine type.
pub(crate) fn file_vmdesc(path: &Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let err = |e: std::io::Error| CliError::io(path, "read", e);
    let mut head = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(4096)
        .read_to_end(&mut head)
        .map_err(err)?;
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let cap = u64::from(qmig_wire::vmdesc::DEFAULT_MAX_VMDESC);
        let mut j = Vec::new();
        std::fs::File::open(path)
            .map_err(err)?
            .take(cap + 1)
            .read_to_end(&mut j)
            .map_err(err)?;
        if j.len() as u64 > cap {
            return Err(CliError::data(format!(
                "{}: vmdesc JSON over {cap} bytes",
                path.display()
            )));
        }
        return Ok(j);
    }
    stream_vmdesc(path)?.ok_or_else(|| {
        CliError::data(format!(
            "{}: neither a vmdesc JSON nor a stream with a vmdesc trailer",
            path.display()
        ))
    })
}

/// Writes JSON text re-indented with 4 spaces, keeping key order and every
/// token as written (what `analyze-migration.py -d desc` prints, modulo its
/// escaping of non-ASCII text). `json` must be valid JSON.
fn reindent(json: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    fn nl(out: &mut impl Write, depth: usize) -> std::io::Result<()> {
        out.write_all(b"\n")?;
        for _ in 0..depth {
            out.write_all(b"    ")?;
        }
        Ok(())
    }
    let next_sig = |mut k: usize| {
        while k < json.len() && json[k].is_ascii_whitespace() {
            k += 1;
        }
        k
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < json.len() {
        let b = json[i];
        match b {
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                out.write_all(&json[start..(i + 1).min(json.len())])?;
            }
            b'{' | b'[' => {
                let k = next_sig(i + 1);
                if k < json.len() && (json[k] == b'}' || json[k] == b']') {
                    out.write_all(&[b, json[k]])?;
                    i = k;
                } else {
                    out.write_all(&[b])?;
                    depth += 1;
                    nl(out, depth)?;
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                nl(out, depth)?;
                out.write_all(&[b])?;
            }
            b',' => {
                out.write_all(b",")?;
                nl(out, depth)?;
            }
            b':' => out.write_all(b": ")?,
            c if c.is_ascii_whitespace() => {}
            c => out.write_all(&[c])?,
        }
        i += 1;
    }
    Ok(())
}

/// `qmig inspect STREAM --vmdesc [FILE]`: prints the description.
pub fn run_vmdesc(path: &Path, file: Option<&Path>) -> CliResult {
    let json = match file {
        Some(f) => file_vmdesc(f)?,
        None => stream_vmdesc(path)?.ok_or_else(|| {
            CliError::data(format!(
                "{}: no vmdesc trailer (postcopy stream?)",
                path.display()
            ))
        })?,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&json)
        .map_err(|e| CliError::data(format!("vmdesc is not valid JSON: {e}")))?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    reindent(&json, &mut out).map_err(crate::output_error)?;
    writeln!(out).map_err(crate::output_error)?;
    out.flush().map_err(crate::output_error)?;
    if let Err(e) = qmig_wire::VmDesc::parse(&json) {
        // The text is printed; the description does not follow QEMU's schema.
        return Err(CliError::data(format!("vmdesc: {e}")));
    }
    Ok(ExitCode::SUCCESS)
}

/// One introduced section, in stream order.
struct DevSection {
    id: u32,
    idstr: String,
    instance: u32,
    version: u32,
    kind: &'static str,
    /// Offset of the first payload byte.
    offset: u64,
    payload: Vec<u8>,
    /// MEM_SIZE blocks of a RAM section: (name, used_length).
    ram_sizes: Vec<(String, u64)>,
    /// Payload bytes in later PART/END sections (not decoded).
    later_bytes: u64,
}

/// What `--devices` prints for one section.
enum Shown {
    Ram(Vec<(String, u64)>),
    /// An iterative section other than RAM whose payload qmig delimits but
    /// which is not VMState (`spapr/htab`, `s390-storage_attributes`):
    /// analyze-migration.py shows it as an empty string.
    Iterative(u64),
    State(qmig_wire::DeviceState),
    Error(String),
}

impl serde::Serialize for Shown {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Shown::Ram(sizes) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("section sizes", &RamSizes(sizes))?;
                m.end()
            }
            Shown::State(st) => st.serialize(s),
            Shown::Iterative(_) => s.serialize_str(""),
            Shown::Error(e) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("error", e)?;
                m.end()
            }
        }
    }
}

struct RamSizes<'a>(&'a [(String, u64)]);

impl serde::Serialize for RamSizes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (n, l) in self.0 {
            m.serialize_entry(n, &format!("0x{l:016x}"))?;
        }
        m.end()
    }
}

/// The `--devices --json` object: `"idstr (section id)"` → state, each
/// section decoded as it is written.
struct Top<'a> {
    secs: &'a [DevSection],
    key: &'a dyn Fn(&DevSection) -> String,
    shown: &'a dyn Fn(&DevSection) -> Shown,
}

impl serde::Serialize for Top<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.secs.len()))?;
        for sec in self.secs {
            m.serialize_entry(&(self.key)(sec), &(self.shown)(sec))?;
        }
        m.end()
    }
}

fn show(sec: &DevSection, desc: &qmig_wire::VmDesc) -> Shown {
    if sec.idstr == "ram" && sec.instance == 0 {
        return Shown::Ram(sec.ram_sizes.clone());
    }
    if qmig_wire::iterative::known(&sec.idstr) && desc.device(&sec.idstr, sec.instance).is_none() {
        return Shown::Iterative(sec.payload.len() as u64 + sec.later_bytes);
    }
    let Some(dev) = desc.device(&sec.idstr, sec.instance) else {
        return Shown::Error(format!(
            "{} section without a vmdesc entry: {} payload bytes not decoded",
            sec.kind,
            sec.payload.len() as u64 + sec.later_bytes
        ));
    };
    if dev.vmsd_name().is_some() && dev.version() != sec.version {
        return Shown::Error(format!(
            "section version {} but the vmdesc describes version {} (a vmdesc from another QEMU?)",
            sec.version,
            dev.version()
        ));
    }
    match dev.decode(&sec.payload, sec.offset) {
        Ok(st) => Shown::State(st),
        Err(e) => Shown::Error(e.to_string()),
    }
}

/// `qmig inspect STREAM --devices [--json] [--vmdesc FILE]`.
pub fn run_devices(path: &Path, json_out: bool, vmdesc: Option<&Path>) -> CliResult {
    let mut desc = match vmdesc {
        Some(f) => Some(file_vmdesc(f)?),
        None => {
            let (input, seekable) = crate::input::open_input(path)?;
            match (input, seekable) {
                (crate::input::Input::Plain { file: mut f, .. }, true) => {
                    tail_vmdesc(&mut f).map_err(|e| CliError::io(path, "read", e))?
                }
                _ => None,
            }
        }
    }
    .map(|j| qmig_wire::VmDesc::parse(&j))
    .transpose()
    .map_err(|e| CliError::data(format!("vmdesc: {e}")))?;
    let (mut rd, _) = crate::input::open_stream(path)?;
    let mut secs: Vec<DevSection> = Vec::new();
    let mut by_id: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    // Where DeviceData items go: the payload of the FULL/START section just
    // read, or the undecoded count of a later PART/END of a device section.
    let mut cur: Option<(usize, bool)> = None;
    let mut buffered = 0usize;
    let mut read_error = None;
    loop {
        let ri = match rd.next_item() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                read_error = Some(CliError::wire(path, e));
                break;
            }
        };
        match ri.item {
            Item::Section(h) => {
                cur = None;
                if let (true, Some(id)) = (h.kind.introduces(), h.ident) {
                    let s = DevSection {
                        id: h.section_id,
                        idstr: id.idstr.to_string(),
                        instance: id.instance,
                        version: id.version,
                        kind: h.kind.name(),
                        offset: ri.offset + ri.len as u64,
                        payload: Vec::new(),
                        ram_sizes: Vec::new(),
                        later_bytes: 0,
                    };
                    // A re-declared id replaces the earlier entry in place, as
                    // analyze-migration.py's dict does.
                    let i = match by_id.get(&h.section_id) {
                        Some(&i) => {
                            secs[i] = s;
                            i
                        }
                        None => {
                            by_id.insert(h.section_id, secs.len());
                            secs.push(s);
                            secs.len() - 1
                        }
                    };
                    cur = Some((i, true));
                } else if let Some(&i) = by_id.get(&h.section_id) {
                    cur = Some((i, false));
                }
            }
            Item::DeviceData(d) => match cur {
                Some((i, true)) => {
                    let s = &mut secs[i];
                    if s.payload.is_empty() {
                        s.offset = ri.offset;
                    }
                    buffered += d.len();
                    if buffered > MAX_BUFFERED_DEVICE_BYTES {
                        return Err(CliError::Data {
                            message: format!(
                                "{}: device sections exceed {MAX_BUFFERED_DEVICE_BYTES} bytes",
                                path.display()
                            ),
                            offset: Some(ri.offset),
                        });
                    }
                    s.payload.extend_from_slice(d);
                }
                Some((i, false)) => secs[i].later_bytes += d.len() as u64,
                None => {}
            },
            Item::Ram(r) => {
                if let (RamBody::MemSize(blocks), Some((i, _))) = (&r.body, cur) {
                    let sizes = &mut secs[i].ram_sizes;
                    for b in blocks {
                        match sizes.iter_mut().find(|(n, _)| n == b.name) {
                            Some(e) => e.1 = b.used_length,
                            None => sizes.push((b.name.to_string(), b.used_length)),
                        }
                    }
                }
            }
            Item::Vmdesc(j) => {
                if desc.is_none() {
                    desc = Some(
                        qmig_wire::VmDesc::parse(j)
                            .map_err(|e| CliError::data(format!("vmdesc: {e}")))?,
                    );
                }
            }
            _ => cur = None,
        }
    }
    let Some(desc) = desc else {
        // Usage: the stream alone cannot be decoded, the user must name a
        // description.
        return Err(CliError::Usage(format!(
            "{}: no vmdesc trailer (postcopy stream?); pass --vmdesc FILE with a capture of the same QEMU and machine type",
            path.display()
        )));
    };
    // Each section is decoded when it is printed and dropped after, so
    // only one decoded state is held at a time.
    let errors: std::cell::RefCell<Vec<(String, String)>> = Default::default();
    let key = |s: &DevSection| format!("{} ({})", s.idstr, s.id);
    let shown = |s: &DevSection| {
        let sh = show(s, &desc);
        if let Shown::Error(e) = &sh {
            errors.borrow_mut().push((key(s), e.clone()));
        }
        sh
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if json_out {
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        let top = Top {
            secs: &secs,
            key: &key,
            shown: &shown,
        };
        serde::Serialize::serialize(&top, &mut ser).map_err(|e| match e.io_error_kind() {
            Some(k) => crate::output_error(k.into()),
            None => CliError::data(e.to_string()),
        })?;
        writeln!(out).map_err(crate::output_error)?;
    } else {
        for s in &secs {
            let head = format!(
                "section {}: {} instance {} version {}",
                key(s),
                s.kind,
                s.instance,
                s.version
            );
            match shown(s) {
                Shown::Ram(sizes) => {
                    writeln!(out, "{head}: RAM").map_err(crate::output_error)?;
                    for (n, l) in sizes {
                        writeln!(out, "  {n}: {l:#x} bytes").map_err(crate::output_error)?;
                    }
                }
                Shown::State(st) => {
                    let vmsd = desc
                        .device(&s.idstr, s.instance)
                        .and_then(|d| d.vmsd_name())
                        .unwrap_or("(old-style)");
                    writeln!(
                        out,
                        "{head}: vmsd {vmsd}, {} bytes at offset {}",
                        s.payload.len(),
                        s.offset
                    )
                    .map_err(crate::output_error)?;
                    for line in st.to_text().lines() {
                        writeln!(out, "  {line}").map_err(crate::output_error)?;
                    }
                }
                Shown::Iterative(n) => writeln!(
                    out,
                    "{head}: iterative section, {n} payload bytes (not VMState)"
                )
                .map_err(crate::output_error)?,
                Shown::Error(e) => {
                    writeln!(out, "{head}: error: {e}").map_err(crate::output_error)?
                }
            }
        }
    }
    out.flush().map_err(crate::output_error)?;
    // The decoded sections are already on stdout: errors go to stderr only,
    // so `--json` output stays one document.
    let errors = errors.into_inner();
    for (k, e) in &errors {
        eprintln!("qmig: inspect: section {k}: {e}");
    }
    if let Some(e) = &read_error {
        eprintln!("qmig: inspect: {e}");
        return Ok(ExitCode::from(e.exit_code()));
    }
    if !errors.is_empty() {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
