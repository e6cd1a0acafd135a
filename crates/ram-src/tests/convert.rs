//! `convert`: over every committed real capture (tests/data, the field
//! inputs and the mapped-ram files) and over generated streams with several
//! passes, XBZRLE, postcopy discards and a PACKAGED blob, the converted
//! stream, and the converted mapped-ram file likewise,
//! - leaves the same memory as the input (`extract(convert(x)) == extract(x)`,
//!   compared by SHA-256 per block, and against the source's own digests
//!   where the capture has them),
//! - re-serializes to its own bytes (`roundtrip(convert(x))`),
//! - holds each page at most once, as ZERO or PAGE only,
//! - keeps every non-RAM item (header, configuration, device sections,
//!   EOF, vmdesc) byte for byte and in order.

use std::path::Path;

use proptest::prelude::*;
use qmig_ram_dst::{RamDst, VecMemory};
use qmig_ram_src::convert::{ConvertError, Converter, Format, Options, Report, ZeroPages};
use qmig_ram_src::{Config, Progress, RamSrc, SrcBlock};
use qmig_tests::sha256;
use qmig_wire::ram::flags;
use qmig_wire::{
    Advise, Command, Configuration, Discard, DiscardRange, Item, MemBlock, RamBody, RamRecord,
    ReadItem, SectionHeader, SectionIdent, SectionKind, SliceReader, StreamReader,
};

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn spool_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-convert-test-{}-", tag.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// Converts `stream` (read incrementally, as from a pipe).
fn convert(stream: &[u8], zero_pages: ZeroPages) -> (Vec<u8>, Report) {
    let dir_tmp = spool_dir("c");
    let dir = dir_tmp.path();
    let opts = Options {
        zero_pages,
        // Small sections, so that PART splitting is exercised.
        section_bytes: 64 << 10,
        ..Options::default()
    };
    let mut conv = Converter::new(VecMemory::new(), dir, opts).expect("converter");
    let mut rd = StreamReader::new(stream);
    while let Some(ri) = rd.next_item().expect("input parses") {
        conv.handle(&ri).expect("input converts");
    }
    let mut out = Vec::new();
    let report = conv.finish(&mut out).expect("finish");
    drop(conv);
    std::fs::remove_dir_all(dir).expect("spool files removed with the converter");
    assert_eq!(report.output_stream_bytes, out.len() as u64);
    (out, report)
}

/// Converts `stream` to a mapped-ram file (written through a seekable
/// in-memory cursor: gaps read back as zeros, as holes do).
fn convert_mapped(stream: &[u8]) -> Result<(Vec<u8>, Report), ConvertError> {
    let dir_tmp = spool_dir("m");
    let dir = dir_tmp.path();
    let opts = Options {
        format: Format::MappedRam,
        ..Options::default()
    };
    let mut conv = Converter::new(VecMemory::new(), dir, opts).expect("converter");
    let mut rd = StreamReader::new(stream);
    while let Some(ri) = rd.next_item().expect("input parses") {
        conv.handle(&ri).expect("input converts");
    }
    let r = conv.finish_mapped_ram(std::io::Cursor::new(Vec::new()));
    drop(conv);
    std::fs::remove_dir_all(dir).expect("spool files removed with the converter");
    let (report, cur) = r?;
    let out = cur.into_inner();
    assert_eq!(report.output_stream_bytes, out.len() as u64);
    Ok((out, report))
}

/// The mapped-ram checks of one input: the file parses as mapped-ram (the
/// configuration lists it, the layout passes the reader's checks), holds
/// no page record, re-serializes to itself, leaves the same memory, and
/// keeps every non-RAM item but the configuration byte for byte; its
/// bitmaps count the report's pages.
fn check_mapped(name: &str, stream: &[u8], want: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    if !has_configuration(stream) {
        // Nowhere to list the capability: refused, nothing written.
        let r = convert_mapped(stream);
        assert!(
            matches!(r, Err(ConvertError::Unsupported { .. })),
            "{name}: mapped-ram output without a configuration section: {:?}",
            r.map(|(_, r)| r)
        );
        return None;
    }
    let (out, report) = convert_mapped(stream).expect("converts to mapped-ram");
    assert!(
        roundtrips(&out),
        "{name}: roundtrip(convert --format mapped-ram) differs"
    );
    let mut set = 0;
    let mut cfg = false;
    for it in SliceReader::new(&out) {
        match it.expect("parses").1 {
            Item::Configuration(c) => cfg = c.has_capability("mapped-ram"),
            Item::Ram(r) if !matches!(r.body, RamBody::Eos) => {
                panic!("{name}: {:?} record in a mapped-ram file", r.kind())
            }
            Item::MappedRam(qmig_wire::MappedRam::Bitmap(b)) => {
                set += qmig_wire::mapped_ram::count_set(b, b.len() as u64 * 8);
            }
            _ => {}
        }
    }
    assert!(cfg, "{name}: mapped-ram not listed");
    assert_eq!(set, report.output.page, "{name}: bitmaps vs report");
    let after = replay(&out);
    assert_eq!(after.len(), want.len(), "{name}: blocks");
    for ((n, a), (m, b)) in after.iter().zip(want) {
        assert_eq!(n, m, "{name}");
        assert!(
            a == b,
            "{name}: block {n}: extract(convert --format mapped-ram) differs"
        );
    }
    assert_eq!(
        container_items(&out, true),
        container_items(stream, true),
        "{name}: container not kept"
    );
    Some(out)
}

fn has_configuration(stream: &[u8]) -> bool {
    SliceReader::new(stream)
        .take(3)
        .any(|it| matches!(it, Ok((_, Item::Configuration(_)))))
}

/// The memory a stream leaves behind (what `qmig extract` writes).
fn replay(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut dst = RamDst::new(qmig_ram_dst::Config::default(), VecMemory::new()).expect("dst");
    let mut r = SliceReader::new(stream);
    while let Some(it) = r.next() {
        let (offset, item) = it.expect("stream parses");
        let decoder = r.decoder();
        let len = (decoder.position() - offset) as usize;
        dst.handle_read_item(&ReadItem {
            offset,
            len,
            item,
            decoder,
        })
        .expect("stream applies");
    }
    dst.into_memory().blocks().to_vec()
}

/// `serialize(parse(s)) == s`.
fn roundtrips(stream: &[u8]) -> bool {
    let mut out = Vec::with_capacity(stream.len());
    for it in SliceReader::new(stream) {
        let (_, item) = it.expect("stream parses");
        item.write(&mut out).expect("writes");
    }
    out == stream
}

/// The non-RAM items (no RAM records or mapped-ram layout, no `ram`
/// section framing, no commands; without the configuration when
/// `skip_config`, since mapped-ram is listed there), serialized, in order.
fn container_items(stream: &[u8], skip_config: bool) -> Vec<Vec<u8>> {
    let mut ram_id = None;
    let mut out = Vec::new();
    for it in SliceReader::new(stream) {
        let (_, item) = it.expect("parses");
        match &item {
            Item::Section(h) => {
                if h.ident.is_some_and(|i| i.idstr == "ram") {
                    ram_id = Some(h.section_id);
                }
                if Some(h.section_id) == ram_id {
                    continue;
                }
            }
            Item::Footer(id) if Some(*id) == ram_id => continue,
            Item::Ram(_) | Item::MappedRam(_) | Item::Command(_) | Item::PackageEnd => continue,
            Item::Configuration(_) if skip_config => continue,
            _ => {}
        }
        let mut b = Vec::new();
        item.write(&mut b).expect("writes");
        out.push(b);
    }
    out
}

/// Checks the output's RAM records: ZERO/PAGE only, each page at most once.
fn check_records(out: &[u8]) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut block: Option<String> = None;
    let (mut zero, mut page) = (0, 0);
    for it in SliceReader::new(out) {
        let (off, item) = it.expect("parses");
        if let Item::Ram(rec) = item {
            match rec.body {
                RamBody::Zero { fill } => {
                    assert_eq!(fill, 0, "offset {off}");
                    zero += 1
                }
                RamBody::Page(_) => page += 1,
                RamBody::MemSize(ref b) => {
                    assert!(b.iter().all(|b| b.page_size.is_none()), "page-size field");
                    continue;
                }
                RamBody::Eos => continue,
                other => panic!("offset {off}: {other:?} in converted output"),
            }
            if let Some(n) = rec.block {
                block = Some(n.to_string());
            }
            let key = (
                block.clone().expect("first record names its block"),
                rec.offset,
            );
            assert!(seen.insert(key), "offset {off}: page written twice");
        }
    }
    (zero, page)
}

/// Blocks and their contents.
type Memory = Vec<(String, Vec<u8>)>;

/// Everything the conversion must keep, for one input. Returns the
/// report, the output and the memory it leaves.
fn check(name: &str, stream: &[u8]) -> (Report, Vec<u8>, Memory) {
    let (out, report) = convert(stream, ZeroPages::Zero);
    assert!(roundtrips(&out), "{name}: roundtrip(convert(x)) differs");
    let before = replay(stream);
    let after = replay(&out);
    // Block names and lengths, then contents (compared whole: a SHA-256 of
    // each would say the same, slower).
    let layout = |m: &[(String, Vec<u8>)]| -> Vec<(String, usize)> {
        m.iter().map(|(n, v)| (n.clone(), v.len())).collect()
    };
    assert_eq!(layout(&after), layout(&before), "{name}: blocks differ");
    for ((n, a), (_, b)) in after.iter().zip(&before) {
        assert!(
            a == b,
            "{name}: block {n}: extract(convert(x)) != extract(x)"
        );
    }
    // A mapped-ram input's configuration loses the capability.
    let mapped_in = SliceReader::new(stream)
        .take(3)
        .any(|it| matches!(it, Ok((_, Item::Configuration(c))) if c.has_capability("mapped-ram")));
    assert_eq!(
        container_items(&out, mapped_in),
        container_items(stream, mapped_in),
        "{name}: container not kept byte for byte"
    );
    let (zero, page) = check_records(&out);
    assert_eq!(
        (zero, page),
        (report.output.zero, report.output.page),
        "{name}"
    );
    check_mapped(name, stream, &after);
    (report, out, after)
}

fn field_streams() -> Vec<(String, Vec<u8>)> {
    let dir = qmig_tests::data_dir().join("field");
    let mut out = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/data/field")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    // QEMU 10's mapped-ram file written by 4 multifd channels.
    dirs.push(qmig_tests::data_dir().join("multifd/mapped-ram-multifd4"));
    dirs.sort();
    for d in dirs {
        let n = d.file_name().unwrap().to_string_lossy().into_owned();
        let read = |p: &Path| std::fs::read(p).ok();
        let s = read(&d.join("stream"))
            .or_else(|| read(&d.join("stream.gz")).map(|b| qmig_tests::gunzip(&b)))
            .unwrap_or_else(|| panic!("{n}: no stream"));
        out.push((n, s));
    }
    out
}

#[test]
fn every_committed_capture_converts_faithfully() {
    let caps = qmig_tests::captures();
    assert!(caps.len() >= 20, "corpus missing: {} captures", caps.len());
    let mut lines = Vec::new();
    for c in &caps {
        let (r, _, mem) = check(&c.name, &c.stream);
        // The converted stream leaves the memory the real QEMU source had.
        let mut checked = 0;
        for (block, offset, length, want) in c.digests() {
            let Some((_, img)) = mem.iter().find(|(n, _)| *n == block) else {
                panic!("{}: no block {block}", c.name);
            };
            let got = sha256::hex(&img[offset as usize..(offset + length) as usize]);
            assert_eq!(
                got, want,
                "{}: {block}+{offset:#x} differs from the source",
                c.name
            );
            checked += 1;
        }
        // One record per page at most; multi-pass inputs (XBZRLE pages
        // come only after a first pass, postcopy re-sends) shrink.
        assert!(r.output.total() <= r.input.total(), "{}: {r:?}", c.name);
        assert_eq!(r.output.xbzrle + r.output.compressed, 0);
        if r.input.xbzrle > 0 || r.postcopy {
            assert!(r.output.total() < r.input.total(), "{}: {r:?}", c.name);
        }
        lines.push(format!(
            "{}: {} -> {} records, {} -> {} bytes, {checked} source digests",
            c.name,
            r.input.total(),
            r.output.total(),
            r.input_stream_bytes,
            r.output_stream_bytes
        ));
    }
    for (n, s) in field_streams() {
        let (r, _, _) = check(&n, &s);
        lines.push(format!("field/{n}: {} records", r.output.total()));
    }
    eprintln!("{}", lines.join("\n"));
}

#[test]
fn single_pass_stopped_capture_is_unchanged() {
    // One pass of ZERO/PAGE records with nothing to drop: the output is the input.
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-stopped")
        .expect("q10-stopped");
    let dir_tmp = spool_dir("s");
    let dir = dir_tmp.path();
    let mut conv = Converter::new(VecMemory::new(), dir, Options::default()).unwrap();
    let mut rd = StreamReader::new(&c.stream[..]);
    while let Some(ri) = rd.next_item().unwrap() {
        conv.handle(&ri).unwrap();
    }
    let mut out = Vec::new();
    conv.finish(&mut out).unwrap();
    assert!(out == c.stream, "q10-stopped changed");
    drop(conv);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn postcopy_capture_becomes_precopy() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-postcopy")
        .expect("q10-postcopy");
    let (out, r) = convert(&c.stream, ZeroPages::Zero);
    assert!(r.postcopy && !r.vmdesc && r.discarded_pages > 0);
    for k in [
        "OPEN_RETURN_PATH",
        "PING",
        "POSTCOPY_ADVISE",
        "POSTCOPY_RAM_DISCARD",
        "PACKAGED",
        "POSTCOPY_LISTEN",
        "POSTCOPY_RUN",
    ] {
        assert!(r.dropped_commands.contains_key(k), "{k} not dropped: {r:?}");
    }
    let mut cmds = 0;
    let mut after_end = false;
    let mut full_after_end = 0;
    for it in SliceReader::new(&out) {
        match it.unwrap().1 {
            Item::Command(c) => {
                assert_eq!(c, Command::SwitchoverStart);
                cmds += 1;
            }
            Item::Section(h) if h.kind == SectionKind::End => after_end = true,
            Item::Section(h) if h.kind == SectionKind::Full => {
                assert!(after_end, "device section before ram END");
                full_after_end += 1;
            }
            Item::Vmdesc(_) => panic!("vmdesc written for a postcopy input"),
            _ => {}
        }
    }
    assert_eq!(cmds, 1);
    assert_eq!(full_after_end, 31);
}

#[test]
fn skip_leaves_zero_pages_out() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-xbzrle")
        .expect("q10-xbzrle");
    let (out, r) = convert(&c.stream, ZeroPages::Skip);
    assert_eq!(r.output.zero, 0);
    assert!(r.skipped_zero_pages > 0);
    // On a zeroed destination the memory is the same.
    assert_eq!(replay(&out), replay(&c.stream));
}

#[test]
fn truncated_input_is_refused() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-passes")
        .expect("q10-passes");
    // Cut right after the first RAM START section: items parse, EOF never comes.
    let cut = c.stream.len() / 2;
    let dir_tmp = spool_dir("t");
    let dir = dir_tmp.path();
    let mut conv = Converter::new(VecMemory::new(), dir, Options::default()).unwrap();
    let mut rd = StreamReader::new(&c.stream[..cut]);
    let mut failed = false;
    loop {
        match rd.next_item() {
            Ok(Some(ri)) => conv.handle(&ri).unwrap(),
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset() <= cut as u64);
                failed = true;
                break;
            }
        }
    }
    let mut out = Vec::new();
    let r = conv.finish(&mut out);
    assert!(
        matches!(
            r,
            Err(qmig_ram_src::convert::ConvertError::Incomplete { .. })
        ),
        "{r:?}"
    );
    assert!(out.is_empty() || failed);
    drop(conv);
    let _ = std::fs::remove_dir_all(dir);
}

// ---- generated streams ----------------------------------------------------

const PS: usize = 4096;
const RAM_ID: u32 = 2;

/// Discard ranges (block, first page, pages) and postcopy pages (index
/// into the discarded pages, value or zero).
type Postcopy = (Vec<(usize, usize, usize)>, Vec<(usize, Option<u8>)>);

/// What a generated scenario does.
#[derive(Debug, Clone)]
struct Scenario {
    /// Block lengths in pages.
    blocks: Vec<usize>,
    /// Initial page contents: (seed, kind) per page, flattened.
    init: Vec<(u8, u8)>,
    /// Passes after the first: pages changed (flat index, byte position, value, zero it).
    passes: Vec<Vec<(usize, usize, u8, bool)>>,
    xbzrle: bool,
    /// Postcopy: discard ranges (block, first page, pages), then pages sent
    /// in postcopy mode (index into the discarded pages, value or zero);
    /// QEMU sends only discarded pages there, each once.
    postcopy: Option<Postcopy>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(1usize..12, 1..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(blocks, xbzrle, postcopy)| {
            let total: usize = blocks.iter().sum();
            let init = prop::collection::vec((any::<u8>(), 0u8..4), total);
            let change = (0..total, 0..PS, any::<u8>(), prop::bool::weighted(0.15));
            let passes = prop::collection::vec(prop::collection::vec(change, 0..8), 1..4);
            let nb = blocks.len();
            let bl = blocks.clone();
            let discards =
                prop::collection::vec((0..nb, 0usize..12, 1usize..4), 0..4).prop_map(move |v| {
                    v.into_iter()
                        .map(|(b, p, n)| {
                            let p = p % bl[b];
                            (b, p, n.min(bl[b] - p))
                        })
                        .collect::<Vec<_>>()
                });
            let post = prop::collection::vec((0..64usize, prop::option::of(any::<u8>())), 0..6);
            let pc = if postcopy {
                (discards, post).prop_map(Some).boxed()
            } else {
                Just(None).boxed()
            };
            (Just(blocks), init, passes, Just(xbzrle), pc).prop_map(
                |(blocks, init, passes, xbzrle, postcopy)| Scenario {
                    blocks,
                    init,
                    passes,
                    xbzrle,
                    postcopy,
                },
            )
        })
}

fn locate(blocks: &[usize], flat: usize) -> (usize, usize) {
    let mut f = flat;
    for (b, &n) in blocks.iter().enumerate() {
        if f < n {
            return (b, f);
        }
        f -= n;
    }
    unreachable!("flat index inside the blocks")
}

fn section(kind: SectionKind, out: &mut Vec<u8>) {
    SectionHeader {
        kind,
        section_id: RAM_ID,
        ident: (kind == SectionKind::Start).then_some(SectionIdent {
            idstr: "ram",
            instance: 0,
            version: 4,
        }),
    }
    .write(out)
    .unwrap();
}

fn footer(out: &mut Vec<u8>) {
    qmig_wire::section::write_footer(out, RAM_ID);
}

/// A device FULL section (section id 3, "dev", payload `n` bytes) with footer.
fn device(out: &mut Vec<u8>, n: usize) {
    SectionHeader {
        kind: SectionKind::Full,
        section_id: 3,
        ident: Some(SectionIdent {
            idstr: "dev",
            instance: 0,
            version: 1,
        }),
    }
    .write(out)
    .unwrap();
    out.extend((0..n).map(|i| 0x40 + (i % 16) as u8));
    qmig_wire::section::write_footer(out, 3);
}

/// Builds the stream of a scenario with the source state machine, and the
/// memory it must leave (the model).
fn build(sc: &Scenario) -> (Vec<u8>, Vec<Vec<u8>>) {
    let names: Vec<String> = (0..sc.blocks.len()).map(|i| format!("blk{i}")).collect();
    let mut mem: Vec<Vec<u8>> = sc.blocks.iter().map(|&n| vec![0u8; n * PS]).collect();
    for (flat, &(seed, kind)) in sc.init.iter().enumerate() {
        let (b, p) = locate(&sc.blocks, flat);
        let page = &mut mem[b][p * PS..(p + 1) * PS];
        match kind {
            0 => {}
            1 => page[seed as usize * 7 % PS] = seed | 1,
            _ => page
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i as u8).wrapping_mul(seed)),
        }
    }
    let blocks = SrcBlock::sequential(
        names
            .iter()
            .map(String::as_str)
            .zip(sc.blocks.iter().map(|&n| (n * PS) as u64)),
    );
    let config = Config {
        xbzrle_cache_size: sc.xbzrle.then_some(16 * PS as u64),
        ..Config::default()
    };
    let mut src = RamSrc::new(blocks, config).unwrap();
    let mut s = Vec::new();
    qmig_wire::header::write_header(&mut s);
    Configuration {
        machine: "pc-i440fx-10.0",
        subsections: vec![],
    }
    .write(&mut s)
    .unwrap();
    if sc.postcopy.is_some() {
        Command::OpenReturnPath.write(&mut s).unwrap();
        Command::Ping(1).write(&mut s).unwrap();
        Command::PostcopyAdvise(Some(Advise {
            page_size_summary: PS as u64,
            target_page_size: PS as u64,
        }))
        .write(&mut s)
        .unwrap();
    }
    section(SectionKind::Start, &mut s);
    src.poll_setup(&mut s).unwrap();
    footer(&mut s);
    let iterate = |src: &mut RamSrc, mem: &Vec<Vec<u8>>, s: &mut Vec<u8>| loop {
        section(SectionKind::Part, s);
        let p = src.poll_iterate(mem, 3 * PS, s).unwrap();
        footer(s);
        if p == Progress::Clean {
            break;
        }
    };
    iterate(&mut src, &mem, &mut s);
    let last = sc.passes.len() - 1;
    for (i, pass) in sc.passes.iter().enumerate() {
        for &(flat, at, v, zero) in pass {
            let (b, p) = locate(&sc.blocks, flat);
            let page = &mut mem[b][p * PS..(p + 1) * PS];
            if zero {
                page.fill(0);
            } else {
                page[at] = v;
            }
            src.handle_dirty_page(b, p as u64).unwrap();
        }
        if i < last || sc.postcopy.is_some() {
            src.handle_sync().unwrap();
            iterate(&mut src, &mem, &mut s);
        }
    }
    Command::SwitchoverStart.write(&mut s).unwrap();
    match &sc.postcopy {
        None => {
            section(SectionKind::End, &mut s);
            src.poll_complete(&mem, &mut s).unwrap();
            footer(&mut s);
            device(&mut s, 24);
            s.push(0); // EOF
        }
        Some((discards, post)) => {
            for &(b, p, n) in discards {
                Command::RamDiscard(Discard {
                    block: &names[b],
                    ranges: vec![DiscardRange {
                        start: (p * PS) as u64,
                        len: (n * PS) as u64,
                    }],
                })
                .write(&mut s)
                .unwrap();
                mem[b][p * PS..(p + n) * PS].fill(0);
            }
            Command::Ping(2).write(&mut s).unwrap();
            let mut pkg = Vec::new();
            Command::PostcopyListen.write(&mut pkg).unwrap();
            device(&mut pkg, 24);
            device(&mut pkg, 7);
            Command::Ping(3).write(&mut pkg).unwrap();
            Command::PostcopyRun.write(&mut pkg).unwrap();
            Command::Packaged {
                len: pkg.len() as u32,
            }
            .write(&mut s)
            .unwrap();
            s.extend_from_slice(&pkg);
            Command::Ping(4).write(&mut s).unwrap();
            section(SectionKind::Part, &mut s);
            let mut discarded: Vec<(usize, usize)> = discards
                .iter()
                .flat_map(|&(b, p, n)| (p..p + n).map(move |q| (b, q)))
                .collect();
            discarded.sort_unstable();
            discarded.dedup();
            let mut sent = std::collections::HashSet::new();
            for &(k, v) in post {
                if discarded.is_empty() {
                    break;
                }
                let (b, p) = discarded[k % discarded.len()];
                if !sent.insert((b, p)) {
                    continue;
                }
                let page = &mut mem[b][p * PS..(p + 1) * PS];
                match v {
                    None => {
                        page.fill(0);
                        RamRecord::zero((p * PS) as u64, Some(&names[b]))
                    }
                    Some(v) => {
                        page.fill(v);
                        RamRecord::page((p * PS) as u64, Some(&names[b]), page)
                    }
                }
                .write(&mut s)
                .unwrap();
            }
            s.extend_from_slice(&flags::EOS.to_be_bytes());
            footer(&mut s);
            section(SectionKind::End, &mut s);
            s.extend_from_slice(&flags::EOS.to_be_bytes());
            footer(&mut s);
            s.push(0); // EOF
        }
    }
    (s, mem)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Generated multi-pass (XBZRLE or not, postcopy with discards or not)
    /// streams: the converted stream leaves the model's memory, the input's
    /// memory, holds each page once, and keeps the container.
    #[test]
    fn generated_streams_convert_faithfully(sc in scenario()) {
        let (stream, model) = build(&sc);
        let input_mem = replay(&stream);
        let model: Vec<(String, Vec<u8>)> = model
            .into_iter()
            .enumerate()
            .map(|(i, m)| (format!("blk{i}"), m))
            .collect();
        prop_assert_eq!(&input_mem, &model, "generator and destination disagree");
        let (r, _, out_mem) = check("generated", &stream);
        prop_assert_eq!(out_mem, model);
        let pages: usize = sc.blocks.iter().sum();
        prop_assert!(r.output.total() as usize <= pages);
        prop_assert_eq!(r.postcopy, sc.postcopy.is_some());
        if sc.postcopy.is_none() {
            // Precopy: every page was sent in the first pass, so each is written once.
            prop_assert_eq!(r.output.total() as usize, pages);
        }
    }
}

/// MEM_SIZE with page-size fields (16-byte ADVISE): the fields go, the rest stays.
#[test]
fn mem_size_page_size_fields_are_dropped() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-hugepage-postcopy")
        .expect("q10-hugepage-postcopy");
    let (out, _) = convert(&c.stream, ZeroPages::Zero);
    let blocks_of = |s: &[u8]| -> Vec<(String, u64, Option<u64>)> {
        SliceReader::new(s)
            .find_map(|it| match it.unwrap().1 {
                Item::Ram(RamRecord {
                    body: RamBody::MemSize(b),
                    ..
                }) => Some(
                    b.iter()
                        .map(|m: &MemBlock<'_>| (m.name.to_string(), m.used_length, m.addr))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(blocks_of(&out), blocks_of(&c.stream));
}

/// A multifd migration's main channel (MULTIFD_FLUSH in START, as QEMU 8.2+
/// writes it) is refused, naming the record's offset: its pages are elsewhere.
#[test]
fn multifd_main_channel_is_refused() {
    let mut s = Vec::new();
    qmig_wire::header::write_header(&mut s);
    Configuration {
        machine: "pc-i440fx-10.0",
        subsections: vec![],
    }
    .write(&mut s)
    .unwrap();
    section(SectionKind::Start, &mut s);
    RamRecord::mem_size(vec![MemBlock {
        name: "pc.ram",
        used_length: 4 * PS as u64,
        page_size: None,
        addr: None,
    }])
    .write(&mut s)
    .unwrap();
    let flush_at = s.len() as u64;
    s.extend_from_slice(&flags::MULTIFD_FLUSH.to_be_bytes());
    s.extend_from_slice(&flags::EOS.to_be_bytes());
    footer(&mut s);
    section(SectionKind::End, &mut s);
    s.extend_from_slice(&flags::EOS.to_be_bytes());
    footer(&mut s);
    s.push(0);
    let dir_tmp = spool_dir("m");
    let dir = dir_tmp.path();
    let mut conv = Converter::new(VecMemory::new(), dir, Options::default()).unwrap();
    let mut rd = StreamReader::new(&s[..]);
    let mut err = None;
    while let Some(ri) = rd.next_item().unwrap() {
        if let Err(e) = conv.handle(&ri) {
            err = Some(e);
            break;
        }
    }
    match err {
        Some(qmig_ram_src::convert::ConvertError::Unsupported { offset, why }) => {
            assert_eq!(offset, flush_at);
            assert!(why.contains("multifd"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    drop(conv);
    let _ = std::fs::remove_dir_all(dir);
    // With the channels applied by the caller (`Options::multifd_channels`),
    // MULTIFD_FLUSH is a sync point: dropped, and the output has none.
    let dir_tmp = spool_dir("mf");
    let dir = dir_tmp.path();
    let opts = Options {
        multifd_channels: true,
        ..Options::default()
    };
    let mut conv = Converter::new(VecMemory::new(), dir, opts).unwrap();
    let mut rd = StreamReader::new(&s[..]);
    while let Some(ri) = rd.next_item().unwrap() {
        conv.handle(&ri).unwrap();
    }
    let mut out = Vec::new();
    let report = conv.finish(&mut out).unwrap();
    assert_eq!(report.dropped_commands.get("MULTIFD_FLUSH"), Some(&1));
    let mut rd = StreamReader::new(&out[..]);
    let mut items = 0;
    while let Some(ri) = rd.next_item().unwrap() {
        items += 1;
        assert!(
            !matches!(&ri.item, qmig_wire::Item::Ram(r) if matches!(r.body, qmig_wire::RamBody::MultifdFlush)),
            "MULTIFD_FLUSH at {} in the output",
            ri.offset
        );
    }
    assert!(items > 5, "{items} items");
    drop(conv);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mapped_ram_output_is_the_layout_qemu_writes() {
    // QEMU 10's own mapped-ram file, converted to mapped-ram: byte for byte
    // the same file (header, every block header, bitmap and page at the
    // same offset, device state, vmdesc), except that QEMU's empty `ram`
    // PART section (an EOS between footers) is not written.
    let d = qmig_tests::data_dir().join("field/mapped-ram-file");
    let qemu = qmig_tests::gunzip(&std::fs::read(d.join("stream.gz")).unwrap());
    let (ours, r) = convert_mapped(&qemu).unwrap();
    assert_eq!(
        (r.output.page, r.output.zero),
        (99, 16415),
        "query-migrate normal/duplicate"
    );
    let mut part = None;
    for it in SliceReader::new(&qemu) {
        let (off, item) = it.unwrap();
        if let Item::Section(h) = item {
            if h.kind == SectionKind::Part {
                part = Some(off as usize);
            }
        }
    }
    let part = part.expect("QEMU's file has a PART section");
    // PART header (5) + EOS (8) + footer (5).
    let cut = part + 18;
    assert_eq!(ours.len(), qemu.len() - 18);
    assert!(
        ours[..part] == qemu[..part],
        "differs before the PART section"
    );
    assert!(
        ours[part..] == qemu[cut..],
        "differs after the PART section"
    );
}

#[test]
fn stream_to_mapped_ram_and_back_is_the_original() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-stopped")
        .expect("q10-stopped");
    let (mapped, _) = convert_mapped(&c.stream).unwrap();
    let dir_tmp = spool_dir("b");
    let dir = dir_tmp.path();
    let mut conv = Converter::new(VecMemory::new(), dir, Options::default()).unwrap();
    let mut rd = StreamReader::new(&mapped[..]);
    while let Some(ri) = rd.next_item().unwrap() {
        conv.handle(&ri).unwrap();
    }
    let mut back = Vec::new();
    conv.finish(&mut back).unwrap();
    drop(conv);
    let _ = std::fs::remove_dir_all(dir);
    assert!(
        back == c.stream,
        "q10-stopped -> mapped-ram -> stream changed"
    );
}
