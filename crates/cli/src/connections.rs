//! A migration recorded as several connections, read as one (the walk
//! over the connection list is [`qmig_wire::connections`]): `extract`,
//! `roundtrip` and `inspect` of a connection list, with the files opened as
//! every CLI input ([`crate::input`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qmig_wire::recovery::check_rp_message;
use qmig_wire::{Command, Decoder, Item, RamBody, ReturnPathReader, RpMessage, StreamReader};
use serde_json::{json, Value};

pub use qmig_wire::connections::{Conn, Event, Plan, WalkError};

use crate::error::{CliError, CliResult};
use crate::input::Input;

/// [`qmig_wire::connections::walk`] with the files opened as every CLI
/// input (containers peeled; the first main connection read seekably when
/// it is a plain file; `--target-page-size`/`--vmdesc-from` applied).
pub fn walk<E>(
    plan: &Plan<'_>,
    f: impl FnMut(Event<'_, '_>) -> Result<(), E>,
) -> Result<BTreeMap<String, u64>, WalkError<CliError, E>> {
    qmig_wire::connections::walk(plan, open_conn, f)
}

/// Opens one connection of a plan (see [`walk`]).
fn open_conn(conn: &Conn, dec: Option<Decoder>) -> Result<StreamReader<Input>, CliError> {
    Ok(match dec {
        None => crate::input::open_stream(&conn.path)?.0,
        Some(dec) => StreamReader::with_decoder(crate::input::open_input(&conn.path)?.0, dec),
    })
}

fn usage_check(plan: &Plan<'_>) -> Result<(), CliError> {
    plan.check().map_err(CliError::Usage)?;
    if let Some(p) = plan
        .mains
        .iter()
        .chain(plan.preempt)
        .find(|p| crate::input::is_stdin(p))
    {
        return Err(CliError::Usage(format!(
            "{}: stdin cannot be one of several connections; give files",
            p.display()
        )));
    }
    Ok(())
}

fn names(plan: &Plan<'_>) -> String {
    plan.mains
        .iter()
        .chain(plan.preempt)
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}

// --- extract -------------------------------------------------------------

/// `qmig extract MAIN1 MAIN2... [--preempt-channel P]... -o DIR`: the
/// connections applied in order to block images, through the destination
/// state machine (`qmig-ram-dst`) as for one stream.
///
/// The recovery handshake (RECV_BITMAP, POSTCOPY_RESUME) is checked here
/// (known blocks, order) and not given to the state machine, which has no
/// paused state: what it needs of a pause (the received pages) it already
/// has, and a 4 KiB page record is whole or absent at a cut.
pub fn extract(plan: &Plan<'_>, outdir: &Path) -> CliResult {
    use crate::extract::{Session, StopError};
    use qmig_ram_dst::{FileMemory, Layout as DstLayout, Placement};
    usage_check(plan)?;
    crate::files::output_dir(outdir)?;
    crate::signals::install();
    let mem = FileMemory::create(outdir).map_err(|e| CliError::io(outdir, "create", e))?;
    let mut s = Session::new(
        outdir,
        mem,
        DstLayout::Adopt,
        Placement::Apply,
        "extract",
        names(plan),
    )?;
    let mut current = plan.mains[0].display().to_string();
    let r = walk(plan, |ev| -> Result<(), StopError> {
        if let Some(sig) = crate::signals::pending() {
            return Err(StopError::Interrupted(sig));
        }
        match ev {
            Event::Item { conn, ri, recovery } => {
                current = conn.path.display().to_string();
                if recovery {
                    return Ok(());
                }
                s.handle(ri, |_| {})
            }
            Event::Cut { .. } | Event::End { .. } => Ok(()),
        }
    });
    let (result, input) = match r {
        Ok(_) => (Ok(()), current),
        Err(WalkError::Open(e)) => return Err(e),
        Err(WalkError::Wire { file, err }) => (Err(StopError::Wire(err)), file),
        Err(WalkError::Visit(e)) => (Err(e), current),
    };
    s.finish(result, None, &input)?;
    if !crate::progress::quiet() {
        eprintln!(
            "extracted {} blocks from {} connections to {}",
            s.dst.blocks().len(),
            plan.mains.len() + plan.preempt.len(),
            outdir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

// --- roundtrip -----------------------------------------------------------

/// `qmig roundtrip MAIN1 MAIN2... [--preempt-channel P]...`: every whole
/// item of every connection re-serializes to its bytes. A connection cut
/// inside an item (all but the last main connection, and their preempt
/// channels) ends with those bytes, reported but not a difference.
pub fn roundtrip(plan: &Plan<'_>) -> CliResult {
    usage_check(plan)?;
    // One re-reader per connection: a preempt channel is read in the middle
    // of its main connection.
    let mut origs: HashMap<String, Box<dyn Read>> = HashMap::new();
    let mut out = Vec::new();
    let mut want = Vec::new();
    let mut report = Vec::new();
    let mut items = 0u64;
    let mut diff: Option<String> = None;
    let r = walk(plan, |ev| -> Result<(), CliError> {
        let conn = match &ev {
            Event::Item { conn, .. } | Event::Cut { conn, .. } | Event::End { conn, .. } => *conn,
        };
        let label = conn.label();
        if !origs.contains_key(&label) {
            let (input, _) = crate::input::open_input(&conn.path)?;
            origs.insert(label.clone(), Box::new(std::io::BufReader::new(input)));
        }
        let Some(o) = origs.get_mut(&label) else {
            return Ok(());
        };
        let file = conn.path.display().to_string();
        match ev {
            Event::Item { ri, .. } => {
                out.clear();
                ri.item.write(&mut out).map_err(|e| CliError::Data {
                    message: format!(
                        "{file}: offset {}: {} does not re-serialize: {e}",
                        ri.offset,
                        ri.item.kind_name()
                    ),
                    offset: Some(ri.offset),
                })?;
                want.resize(out.len(), 0);
                o.read_exact(&mut want).map_err(|e| CliError::Io {
                    path: file.clone(),
                    op: "re-read",
                    offset: Some(ri.offset),
                    source: e,
                })?;
                if out != want && diff.is_none() {
                    let i = out.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                    diff = Some(format!(
                        "difference in {file} ({label}) at offset {}: item at {} ({})",
                        ri.offset + i as u64,
                        ri.offset,
                        ri.item.kind_name()
                    ));
                }
                items += 1;
            }
            Event::Cut { at, end, .. } => report.push(format!(
                "{label} ({file}): identical up to offset {at}; cut there, {} bytes of an unfinished item follow",
                end - at
            )),
            Event::End { end, .. } => {
                let mut extra = [0u8; 1];
                if o.read(&mut extra).map_err(|e| CliError::io(&conn.path, "re-read", e))? != 0
                    && diff.is_none()
                {
                    diff = Some(format!(
                        "difference: {file} has bytes after the last item at offset {end}"
                    ));
                }
                report.push(format!("{label} ({file}): identical, {end} bytes"));
            }
        }
        Ok(())
    });
    match r {
        Ok(_) => {}
        Err(WalkError::Open(e)) | Err(WalkError::Visit(e)) => return Err(e),
        Err(WalkError::Wire { file, err }) => return Err(CliError::wire(Path::new(&file), err)),
    }
    if let Some(d) = diff {
        println!("{d}");
        return Ok(ExitCode::from(1));
    }
    for l in &report {
        println!("{l}");
    }
    println!("identical: {items} items in {} connections", report.len());
    Ok(ExitCode::SUCCESS)
}

// --- inspect -------------------------------------------------------------

#[derive(Default)]
struct ConnSummary {
    label: String,
    file: String,
    role: &'static str,
    items: u64,
    bytes: u64,
    cut: Option<(u64, u64)>,
    eof: bool,
    commands: Vec<Value>,
    command_counts: BTreeMap<&'static str, u64>,
    sections: u64,
    /// Per block: (zero, page, other RAM records).
    blocks: BTreeMap<String, (u64, u64, u64)>,
}

const KEEP: usize = 1000;

/// Largest return-path file read with a connection list (bytes).
const MAX_RP_FILE: u64 = 64 << 20;

/// `qmig inspect MAIN1 MAIN2... [--preempt-channel P]... [--return-path RP]...`:
/// one summary per connection (role, bytes, cut or end, commands, page
/// records per block), the totals, and per return-path file its messages,
/// with every RECV_BITMAP reply and RESUME_ACK checked against the layout.
/// With `records`, one line per item, prefixed with the connection.
pub fn inspect(plan: &Plan<'_>, json_out: bool, records: bool, rps: &[PathBuf]) -> CliResult {
    usage_check(plan)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut conns: Vec<ConnSummary> = Vec::new();
    let mut cur_block: HashMap<String, String> = HashMap::new();
    let mut write_err: Option<CliError> = None;
    let r = walk(plan, |ev| -> Result<(), CliError> {
        let conn = match &ev {
            Event::Item { conn, .. } | Event::Cut { conn, .. } | Event::End { conn, .. } => *conn,
        };
        let label = conn.label();
        // A preempt channel is read in the middle of its main connection
        // (before the last one's EOF): find the connection's own summary.
        let i = match conns.iter().position(|c| c.label == label) {
            Some(i) => i,
            None => {
                conns.push(ConnSummary {
                    label: label.clone(),
                    file: conn.path.display().to_string(),
                    role: conn.role.name(),
                    ..Default::default()
                });
                conns.len() - 1
            }
        };
        let c = &mut conns[i];
        match ev {
            Event::Item { ri, .. } => {
                c.items += 1;
                c.bytes = ri.decoder.position();
                let blk = cur_block.entry(label.clone()).or_insert_with(|| "-".into());
                match &ri.item {
                    Item::Command(cmd) => {
                        *c.command_counts.entry(cmd.name()).or_default() += 1;
                        if c.commands.len() < KEEP {
                            let mut v = json!({"offset": ri.offset, "name": cmd.name()});
                            match cmd {
                                Command::RecvBitmap { block } => v["block"] = json!(block),
                                Command::Ping(x) => v["value"] = json!(x),
                                Command::RamDiscard(d) => {
                                    v["block"] = json!(d.block);
                                    v["ranges"] = json!(d.ranges.len());
                                }
                                Command::Packaged { len } => v["len"] = json!(len),
                                _ => {}
                            }
                            c.commands.push(v);
                        }
                    }
                    Item::Section(_) => c.sections += 1,
                    Item::Eof => c.eof = true,
                    Item::Ram(r) => {
                        if let Some(b) = r.block {
                            *blk = b.to_string();
                        }
                        if r.is_page() {
                            let e = c.blocks.entry(blk.clone()).or_default();
                            match r.body {
                                RamBody::Zero { .. } => e.0 += 1,
                                RamBody::Page(_) => e.1 += 1,
                                _ => e.2 += 1,
                            }
                        }
                    }
                    _ => {}
                }
                if records && write_err.is_none() {
                    let len = ri.decoder.position() - ri.offset;
                    let (po, bn) = match &ri.item {
                        Item::Ram(r) if r.is_page() => (format!("{:#x}", r.offset), blk.clone()),
                        Item::Command(Command::RecvBitmap { block }) => {
                            ("-".into(), block.to_string())
                        }
                        _ => ("-".into(), "-".into()),
                    };
                    let line = if json_out {
                        json!({"connection": label, "offset": ri.offset, "kind": ri.item.kind_name(),
                               "block": bn, "page_offset": po, "len": len})
                        .to_string()
                    } else {
                        format!(
                            "{label:<10} {:>12} {:<24} {:>14} {:<20} {len}",
                            ri.offset,
                            bn,
                            po,
                            ri.item.kind_name()
                        )
                    };
                    if let Err(e) = writeln!(out, "{line}") {
                        write_err = Some(crate::output_error(e));
                    }
                }
            }
            Event::Cut { at, end, .. } => {
                c.bytes = end;
                c.cut = Some((at, end));
            }
            Event::End { end, .. } => c.bytes = end,
        }
        Ok(())
    });
    if let Some(e) = write_err {
        return Err(e);
    }
    let (pages, stream_error) = match r {
        Ok(p) => (p, None),
        Err(WalkError::Open(e)) | Err(WalkError::Visit(e)) => return Err(e),
        Err(WalkError::Wire { file, err }) => {
            (BTreeMap::new(), Some(CliError::wire(Path::new(&file), err)))
        }
    };
    let rp: Vec<Value> = rps
        .iter()
        .map(|p| return_path(p, &pages))
        .collect::<Result<_, _>>()?;
    let rp_error = rp
        .iter()
        .find_map(|v| v["error"].as_str().map(|e| CliError::data(e.to_string())));
    if !records {
        let conn_json: Vec<Value> = conns
            .iter()
            .map(|c| {
                json!({
                    "connection": c.label, "file": c.file, "role": c.role, "bytes": c.bytes,
                    "items": c.items, "eof": c.eof,
                    "cut": c.cut.map(|(at, end)| json!({"at": at, "unfinished_bytes": end - at})),
                    "sections": c.sections, "commands": c.commands,
                    "command_counts": c.command_counts,
                    "blocks": c.blocks.iter().map(|(b, (z, p, o))| json!({"name": b, "zero": z, "page": p, "other": o})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in &conns {
            for (b, (z, p, _)) in &c.blocks {
                let t = totals.entry(b.clone()).or_default();
                t.0 += z;
                t.1 += p;
            }
        }
        let complete = stream_error.is_none() && conns.iter().any(|c| c.eof);
        if json_out {
            let v = json!({
                "connections": conn_json,
                "complete": complete,
                "totals": {
                    "zero": totals.values().map(|t| t.0).sum::<u64>(),
                    "page": totals.values().map(|t| t.1).sum::<u64>(),
                },
                "blocks": totals.iter().map(|(b, (z, p))| json!({"name": b, "pages": pages.get(b), "zero": z, "page": p})).collect::<Vec<_>>(),
                "return_paths": rp,
                "error": stream_error.as_ref().or(rp_error.as_ref()).map_or(Value::Null, |e| json!(e.to_json())),
            });
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            )
            .map_err(crate::output_error)?;
        } else {
            text(&mut out, &conns, &totals, &rp, complete).map_err(crate::output_error)?;
        }
    }
    out.flush().map_err(crate::output_error)?;
    match stream_error.or(rp_error) {
        Some(e) if json_out && !records => Ok(ExitCode::from(e.exit_code())),
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn text(
    out: &mut impl Write,
    conns: &[ConnSummary],
    totals: &BTreeMap<String, (u64, u64)>,
    rp: &[Value],
    complete: bool,
) -> std::io::Result<()> {
    writeln!(
        out,
        "migration of {} connections: {}",
        conns.len(),
        if complete {
            "complete (EOF read)"
        } else {
            "not complete"
        }
    )?;
    for c in conns {
        let end = match c.cut {
            Some((at, end)) if at == end => format!("cut at offset {at}, between items"),
            Some((at, end)) => format!(
                "cut at offset {at} ({} bytes of an unfinished item follow)",
                end - at
            ),
            None if c.eof => "EOF".into(),
            None => "end of input".into(),
        };
        writeln!(
            out,
            "{} ({}, {}): {} bytes, {} items, {} sections; {end}",
            c.label, c.role, c.file, c.bytes, c.items, c.sections
        )?;
        if !c.command_counts.is_empty() {
            let cc: Vec<String> = c
                .command_counts
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            writeln!(out, "  commands: {}", cc.join(", "))?;
            let bitmaps: Vec<&str> = c
                .commands
                .iter()
                .filter(|v| v["name"] == "RECV_BITMAP")
                .filter_map(|v| v["block"].as_str())
                .collect();
            if !bitmaps.is_empty() {
                writeln!(out, "  RECV_BITMAP requested for: {}", bitmaps.join(", "))?;
            }
        }
        for (b, (z, p, o)) in &c.blocks {
            writeln!(
                out,
                "  {b}: {z} zero, {p} page{}",
                if *o > 0 {
                    format!(", {o} other")
                } else {
                    String::new()
                }
            )?;
        }
    }
    writeln!(out, "totals over all connections:")?;
    for (b, (z, p)) in totals {
        writeln!(out, "  {b}: {z} zero, {p} page")?;
    }
    for v in rp {
        writeln!(
            out,
            "return path {}: {} bytes, messages {}",
            v["file"].as_str().unwrap_or("?"),
            v["bytes"],
            v["messages"]
        )?;
        if let Some(r) = v["recv_bitmaps"].as_array() {
            for x in r {
                writeln!(
                    out,
                    "  RECV_BITMAP reply {}: {} of {} pages received",
                    x["block"].as_str().unwrap_or("?"),
                    x["received"],
                    x["pages"]
                )?;
            }
        }
        if let Some(e) = v["error"].as_str() {
            writeln!(out, "  error: {e}")?;
        }
    }
    Ok(())
}

/// A return-path file of the migration: messages by name, RECV_BITMAP
/// replies (block, pages received) and RESUME_ACK checked against the
/// layout (`pages`: block → target pages).
fn return_path(p: &Path, pages: &BTreeMap<String, u64>) -> Result<Value, CliError> {
    let mut raw = Vec::new();
    crate::input::open_input(p)?
        .0
        .take(MAX_RP_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CliError::io(p, "read", e))?;
    if raw.len() as u64 > MAX_RP_FILE {
        return Err(CliError::data(format!(
            "{}: a return path of more than {MAX_RP_FILE} bytes (read in memory: summarise it alone with `qmig inspect MAIN --return-path FILE`)",
            p.display()
        )));
    }
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut bitmaps = Vec::new();
    let mut error = None;
    for m in ReturnPathReader::new(&raw) {
        let (off, m) = match m {
            Ok(x) => x,
            Err(e) => {
                error = Some(format!("{}: {e}", p.display()));
                break;
            }
        };
        *counts.entry(m.name()).or_default() += 1;
        if let Err(e) = check_rp_message(&m, off, |b| pages.get(b).copied()) {
            error = Some(format!("{}: {e}", p.display()));
            break;
        }
        if let RpMessage::RecvBitmap { block, bitmap } = m {
            if bitmaps.len() < KEEP {
                let n = pages.get(block).copied().unwrap_or(0);
                let received: u64 = bitmap.iter().map(|b| b.count_ones() as u64).sum();
                bitmaps
                    .push(json!({"offset": off, "block": block, "pages": n, "received": received}));
            }
        }
    }
    Ok(json!({
        "file": p.display().to_string(),
        "bytes": raw.len(),
        "messages": counts,
        "recv_bitmaps": bitmaps,
        "error": error,
    }))
}
