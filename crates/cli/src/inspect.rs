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
    error: Option<String>,
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
    pongs: Vec<u32>,
    bitmaps: Vec<(String, usize)>,
    error: Option<String>,
    len: u64,
}

fn return_path_summary(p: &Path) -> Result<RpSummary, String> {
    let buf = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
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
        "error": s.error,
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
        writeln!(
            out,
            "  requested bytes {}  shut {:?}  pongs {:?}",
            rp.requested_bytes, rp.shut, rp.pongs
        )?;
        for (b, l) in &rp.bitmaps {
            writeln!(out, "  received bitmap {b}: {l} bytes")?;
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
fn stream_vmdesc(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let (input, seekable) = crate::input::open_input(path)?;
    if let (crate::input::Input::Plain(mut f), true) = (input, seekable) {
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
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

/// The vmdesc held by `--vmdesc FILE`: a bare JSON (e.g. `recv`'s
/// `vmdesc.json`) or another capture of the same QEMU and machine type.
fn file_vmdesc(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
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
            return Err(format!("{}: vmdesc JSON over {cap} bytes", path.display()));
        }
        return Ok(j);
    }
    stream_vmdesc(path)?.ok_or_else(|| {
        format!(
            "{}: neither a vmdesc JSON nor a stream with a vmdesc trailer",
            path.display()
        )
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
pub fn run_vmdesc(path: &Path, file: Option<&Path>) -> Result<ExitCode, String> {
    let json = match file {
        Some(f) => file_vmdesc(f)?,
        None => stream_vmdesc(path)?
            .ok_or_else(|| format!("{}: no vmdesc trailer (postcopy stream?)", path.display()))?,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&json)
        .map_err(|e| format!("vmdesc is not valid JSON: {e}"))?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    reindent(&json, &mut out).map_err(crate::output_error)?;
    writeln!(out).map_err(crate::output_error)?;
    out.flush().map_err(crate::output_error)?;
    if let Err(e) = qmig_wire::VmDesc::parse(&json) {
        eprintln!("qmig: {e}");
        return Ok(ExitCode::from(1));
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
pub fn run_devices(path: &Path, json_out: bool, vmdesc: Option<&Path>) -> Result<ExitCode, String> {
    let mut desc = match vmdesc {
        Some(f) => Some(file_vmdesc(f)?),
        None => {
            let (input, seekable) = crate::input::open_input(path)?;
            match (input, seekable) {
                (crate::input::Input::Plain(mut f), true) => {
                    tail_vmdesc(&mut f).map_err(|e| format!("{}: {e}", path.display()))?
                }
                _ => None,
            }
        }
    }
    .map(|j| qmig_wire::VmDesc::parse(&j))
    .transpose()
    .map_err(|e| format!("vmdesc: {e}"))?;
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
                read_error = Some(e.to_string());
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
                        return Err(format!(
                            "{}: device sections exceed {MAX_BUFFERED_DEVICE_BYTES} bytes",
                            path.display()
                        ));
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
                    desc = Some(qmig_wire::VmDesc::parse(j).map_err(|e| format!("vmdesc: {e}"))?);
                }
            }
            _ => cur = None,
        }
    }
    let Some(desc) = desc else {
        return Err(format!(
            "{}: no vmdesc trailer (postcopy stream?); pass --vmdesc FILE with a capture of the same QEMU and machine type",
            path.display()
        ));
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
            None => e.to_string(),
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
                Shown::Error(e) => {
                    writeln!(out, "{head}: error: {e}").map_err(crate::output_error)?
                }
            }
        }
    }
    out.flush().map_err(crate::output_error)?;
    let errors = errors.into_inner();
    for (k, e) in &errors {
        eprintln!("qmig: section {k}: {e}");
    }
    if let Some(e) = &read_error {
        eprintln!("qmig: {e}");
    }
    if !errors.is_empty() || read_error.is_some() {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
