//! Issue 14, case 1: a guest writes, into its own CMOS RAM, bytes that spell
//! the RTC section's footer, a RAM PART section with one XBZRLE record, EOS,
//! a footer and a fresh FULL header for the RTC section. Built here from the
//! real `q10-stopped` capture (the CMOS bytes sit inside the RTC device
//! section, whose length is unchanged), aimed at every RAM block in turn.
//! The fake record is never applied: with the vmdesc the stream reads as
//! QEMU reads it (from a file and from a pipe), and without it the reader
//! either reads it the same way or refuses.

use std::path::{Path, PathBuf};
use std::process::Command;

use qmig_wire::section::{write_footer, SectionHeader};
use qmig_wire::{Item, RamBody, RamRecord, SliceReader, VmDesc};

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-cmos-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// Where the RTC's `cmos_data` lies in the stream, the RAM section id, and
/// the RAM block names.
fn layout(s: &[u8]) -> (usize, u32, Vec<String>) {
    let t = qmig_wire::vmdesc::find_trailer(s).unwrap();
    let desc = VmDesc::parse(&s[t + 6..]).unwrap();
    let mut rtc = None;
    let mut ram_id = None;
    let mut blocks = Vec::new();
    let mut pending_rtc = false;
    for it in SliceReader::new(s) {
        let (off, it) = it.unwrap();
        match it {
            Item::Section(h) => {
                if let Some(id) = h.ident {
                    pending_rtc = id.idstr == "mc146818rtc";
                    if id.idstr == "ram" {
                        ram_id = Some(h.section_id);
                    }
                }
            }
            Item::DeviceData(_) if pending_rtc => {
                rtc = Some(off as usize);
                pending_rtc = false;
            }
            Item::Ram(RamRecord {
                body: RamBody::MemSize(b),
                ..
            }) => blocks = b.iter().map(|b| b.name.to_string()).collect(),
            _ => {}
        }
    }
    let dev = desc.device("mc146818rtc", 0).unwrap();
    let mut at = 0u64;
    for f in dev.body().fields() {
        if f.name() == "cmos_data" {
            break;
        }
        let n = match f.layout() {
            qmig_wire::vmstate::Layout::Array(n) => n as u64,
            _ => 1,
        };
        at += f.size() * n;
    }
    (rtc.unwrap() + at as usize, ram_id.unwrap(), blocks)
}

/// The guest's bytes: RTC footer, PART ram { XBZRLE page 0x7000 of `block`
/// (16 bytes 0xEE at 0x100), EOS }, footer, FULL header of the RTC section.
fn fake(rtc_id: u32, ram_id: u32, block: &str) -> Vec<u8> {
    let mut f = Vec::new();
    write_footer(&mut f, rtc_id);
    SectionHeader::part(ram_id).write(&mut f).unwrap();
    let mut enc = vec![0x80, 0x02, 16];
    enc.extend_from_slice(&[0xEE; 16]);
    RamRecord::xbzrle(0, Some(block), &enc)
        .write(&mut f)
        .unwrap();
    RamRecord::eos().write(&mut f).unwrap();
    write_footer(&mut f, ram_id);
    SectionHeader::full(rtc_id, "mc146818rtc", 0, 3)
        .write(&mut f)
        .unwrap();
    f
}

fn extract(stream: &Path, dir: &Path) -> Option<PathBuf> {
    let out = dir.join("out");
    let st = qmig()
        .arg("extract")
        .arg(stream)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    st.status.success().then_some(out)
}

fn inspect_pipe(bytes: &[u8]) -> (bool, serde_json::Value) {
    let out = qmig_tests::run_with_stdin(qmig().args(["inspect", "-", "--json"]), bytes);
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or_default(),
    )
}

#[test]
fn fake_ram_records_in_cmos_are_never_applied() {
    let c = qmig_tests::captures()
        .into_iter()
        .find(|c| c.name == "q10-stopped")
        .unwrap();
    let s = &c.stream;
    let (cmos, ram_id, blocks) = layout(s);
    // The RTC section id: the FULL header just before its payload.
    let rtc_id = SliceReader::new(s)
        .filter_map(Result::ok)
        .find_map(|(_, it)| match it {
            Item::Section(h) if h.ident.is_some_and(|i| i.idstr == "mc146818rtc") => {
                Some(h.section_id)
            }
            _ => None,
        })
        .unwrap();
    let dir_tmp = scratch("orig");
    let dir = dir_tmp.path();
    let orig = dir.join("stream");
    std::fs::write(&orig, s).unwrap();
    let want = extract(&orig, dir).expect("original extracts");
    let (_, want_json) = inspect_pipe(s);
    assert!(!blocks.is_empty());
    for block in &blocks {
        let f = fake(rtc_id, ram_id, block);
        // CMOS RAM holds 128 bytes; the clock registers come first.
        assert!(f.len() <= 128 - 14, "{block}: {} bytes", f.len());
        let mut evil = s.clone();
        evil[cmos + 14..cmos + 14 + f.len()].copy_from_slice(&f);
        let d_tmp = scratch(&block.replace('/', "_"));
        let d = d_tmp.path();
        let p = d.join("stream");
        std::fs::write(&p, &evil).unwrap();
        // With the vmdesc: exactly the original memory, file and pipe.
        let out = extract(&p, d).unwrap_or_else(|| panic!("{block}: extract refused"));
        let img = format!("{block}.img").replace('/', "_");
        let got = std::fs::read(out.join(&img)).or_else(|_| {
            // Image names are sanitised by the manifest; find it there.
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
            let e = m["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == block.as_str())
                .unwrap()
                .clone();
            std::fs::read(out.join(e["file"].as_str().unwrap()))
        });
        let mw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(want.join("manifest.json")).unwrap()).unwrap();
        let file = mw["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == block.as_str())
            .unwrap()["file"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            got.unwrap() == std::fs::read(want.join(&file)).unwrap(),
            "{block}: memory differs from the real stream's"
        );
        let (ok, v) = inspect_pipe(&evil);
        assert!(ok, "{block}: pipe: {}", v["error"]);
        assert_eq!(v["totals"], want_json["totals"], "{block}: pipe counts");
        assert_eq!(
            v["totals"]["xbzrle"], 0,
            "{block}: the fake XBZRLE was read"
        );
        // Without the vmdesc: read the same way, or refused.
        let t = qmig_wire::vmdesc::find_trailer(&evil).unwrap();
        let (ok, v) = inspect_pipe(&evil[..=t]);
        if ok {
            assert_eq!(v["totals"], want_json["totals"], "{block}: no vmdesc");
        } else {
            let e = v["error"].to_string();
            assert!(
                e.contains("ambiguous") || e.contains("section"),
                "{block}: {e}"
            );
        }
    }
}
