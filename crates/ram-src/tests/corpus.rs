//! Fidelity against real QEMU captures (`tests/data`).

use std::io::Read;

use qmig_ram_dst::{RamDst, VecMemory};
use qmig_ram_src::{Config, PageCompressor, Progress, RamSrc, SrcBlock, Template};
use qmig_wire::{Item, RamBody, SectionKind, SliceReader};

/// The memory a stream leaves behind, through the destination state machine.
fn replay(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut dst = RamDst::new(qmig_ram_dst::Config::default(), VecMemory::new()).expect("dst");
    let mut r = SliceReader::new(stream);
    while let Some(it) = r.next() {
        let (off, item) = it.expect("capture parses");
        let len = (r.decoder().position() - off) as usize;
        dst.handle_item(off, len, &item).expect("capture applies");
    }
    dst.into_memory().blocks().to_vec()
}

/// Regenerates `stream` from its own final memory, as `qmig send` does.
fn regenerate(stream: &[u8], zero_detection: bool) -> Vec<u8> {
    let mem = replay(stream);
    let t = Template::parse(stream).expect("template");
    let blocks = SrcBlock::sequential(mem.iter().map(|(n, v)| (n.as_str(), v.len() as u64)));
    let images: Vec<&[u8]> = mem.iter().map(|(_, v)| v.as_slice()).collect();
    let config = Config {
        zero_page_detection: zero_detection,
        ..Config::default()
    };
    let mut src = RamSrc::new(blocks, config).expect("layout");
    let mut out = Vec::new();
    t.write_prefix(&mut out);
    t.begin_section(SectionKind::Start, &mut out).unwrap();
    src.poll_setup(&mut out).expect("setup");
    t.end_section(&mut out);
    loop {
        t.begin_section(SectionKind::Part, &mut out).unwrap();
        let p = src
            .poll_iterate(&images, 128 << 20, &mut out)
            .expect("iterate");
        t.end_section(&mut out);
        if p == Progress::Clean {
            break;
        }
    }
    t.write_switchover(&mut out).unwrap();
    t.begin_section(SectionKind::End, &mut out).unwrap();
    src.poll_complete(&images, &mut out).expect("complete");
    t.end_section(&mut out);
    t.write_tail(&mut out);
    out
}

/// The RAM records of a stream (EOS and section framing left out), as bytes.
fn records(stream: &[u8]) -> Vec<Vec<u8>> {
    SliceReader::new(stream)
        .filter_map(|i| match i.expect("parses") {
            (_, Item::Ram(r)) if r.body != RamBody::Eos => {
                let mut b = Vec::new();
                r.write(&mut b).unwrap();
                Some(b)
            }
            _ => None,
        })
        .collect()
}

/// For every stopped-VM QEMU 10 capture (one pass, no XBZRLE or compression),
/// qmig regenerates QEMU's RAM records exactly — and in fact the whole
/// stream, byte for byte.
#[test]
fn stopped_qemu10_captures_regenerate_exactly() {
    let mut checked = Vec::new();
    for c in qmig_tests::captures() {
        let stopped = c.oracle["flow"].as_str() == Some("stopped");
        let plain = c.oracle["capabilities"]
            .as_object()
            .is_none_or(|m| m.values().all(|v| v != &serde_json::Value::Bool(true)));
        if c.qemu_major() != 10 || !stopped || !plain {
            continue;
        }
        let zpd = c.oracle["parameters"]["zero-page-detection"].as_str() != Some("none");
        let ours = regenerate(&c.stream, zpd);
        let (a, b) = (records(&c.stream), records(&ours));
        assert_eq!(a.len(), b.len(), "{}: record count", c.name);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(x == y, "{}: record #{i} differs", c.name);
        }
        assert!(ours == c.stream, "{}: stream bytes differ", c.name);
        checked.push(c.name);
    }
    assert!(
        checked.iter().any(|n| n == "q10-stopped") && checked.iter().any(|n| n == "q10-zpd-none"),
        "expected stopped captures, checked {checked:?}"
    );
}

/// Every COMPRESS_PAGE record QEMU 7.2 sent equals what qmig's compressor
/// makes of the page it inflates to, at the capture's compress-level.
#[test]
fn qemu72_compressed_pages_are_byte_identical() {
    let mut total = 0;
    for c in qmig_tests::captures() {
        if c.oracle["capabilities"]["compress"] != serde_json::Value::Bool(true) {
            continue;
        }
        let level = c.oracle["parameters"]["compress-level"]
            .as_u64()
            .unwrap_or(1) as u32;
        let mut comp = PageCompressor::new(level).expect("level");
        let mut n = 0;
        for it in SliceReader::new(&c.stream) {
            if let (_, Item::Ram(r)) = it.expect("parses") {
                if let RamBody::Compressed(z) = r.body {
                    let mut page = Vec::new();
                    flate2::read::ZlibDecoder::new(z)
                        .read_to_end(&mut page)
                        .expect("inflates");
                    assert_eq!(page.len(), 4096);
                    let ours = comp.compress(&page).expect("compresses");
                    assert!(
                        ours == z,
                        "{} level {level}: page {:#x} differs",
                        c.name,
                        r.offset
                    );
                    n += 1;
                }
            }
        }
        assert!(n > 0, "{}: no COMPRESS_PAGE records", c.name);
        total += n;
    }
    assert!(total >= 100, "only {total} compressed pages checked");
}

/// A stopped 7.2 compress capture regenerates with the same records as a
/// set (QEMU's two compression threads may reorder pages), the same
/// PAGE/ZERO choice for the first page of each block, and the same size.
#[test]
fn qemu72_compress6_same_records_modulo_thread_order() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q72-compress6")
        .expect("q72-compress6 capture");
    let mem = replay(&c.stream);
    let t = Template::parse(&c.stream).expect("template");
    let blocks = SrcBlock::sequential(mem.iter().map(|(n, v)| (n.as_str(), v.len() as u64)));
    let images: Vec<&[u8]> = mem.iter().map(|(_, v)| v.as_slice()).collect();
    let config = Config {
        compress_level: Some(6),
        ..Config::default()
    };
    let mut src = RamSrc::new(blocks, config).expect("layout");
    let mut out = Vec::new();
    t.write_prefix(&mut out);
    t.begin_section(SectionKind::Start, &mut out).unwrap();
    src.poll_setup(&mut out).expect("setup");
    t.end_section(&mut out);
    t.begin_section(SectionKind::Part, &mut out).unwrap();
    assert_eq!(
        src.poll_iterate(&images, usize::MAX, &mut out)
            .expect("iterate"),
        Progress::Clean
    );
    t.end_section(&mut out);
    t.write_switchover(&mut out).unwrap();
    t.begin_section(SectionKind::End, &mut out).unwrap();
    src.poll_complete(&images, &mut out).expect("complete");
    t.end_section(&mut out);
    t.write_tail(&mut out);
    assert_eq!(out.len(), c.stream.len());
    let (mut a, mut b) = (records(&c.stream), records(&out));
    a.sort();
    b.sort();
    assert!(a == b, "record multisets differ");
    assert_eq!(src.counters().compressed_pages, 142);
    assert_eq!(src.counters().normal, 4);
}
