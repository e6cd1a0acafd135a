//! Real QEMU output from the field (`tests/data/field/`, copied from the
//! project's shared field inputs): each must be read as QEMU reads it.
//! `inspect --json` counts equal QEMU's `query-migrate` counters (from a
//! file and from a pipe), `roundtrip` is identical, and `extract` gives the
//! source's memory digests. The mapped-ram file (gzip'd here) is read
//! compressed, through a pipe and decompressed as a plain file.

use std::path::{Path, PathBuf};
use std::process::Command;

use qmig_tests::sha256;
use serde_json::Value;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// `tests/data/field/NAME`, or `tests/data/NAME` for a name with a `/`.
fn field_dir(name: &str) -> PathBuf {
    if name.contains('/') {
        qmig_tests::data_dir().join(name)
    } else {
        qmig_tests::data_dir().join("field").join(name)
    }
}

fn oracle(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(field_dir(name).join("oracle.json")).unwrap()).unwrap()
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-field-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// `inspect --json` of `bytes` given through a pipe.
fn inspect_pipe(bytes: &[u8]) -> (bool, Value) {
    let out = qmig_tests::run_with_stdin(qmig().args(["inspect", "/dev/stdin", "--json"]), bytes);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

fn inspect_file(p: &Path) -> (bool, Value) {
    let out = qmig().arg("inspect").arg(p).arg("--json").output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

fn check_counts(name: &str, how: &str, v: &Value) {
    let o = oracle(name);
    let qm = &o["query_migrate_ram"];
    assert_eq!(
        v["totals"]["page"], qm["normal"],
        "{name} ({how}): PAGE records"
    );
    assert_eq!(
        v["totals"]["zero"], qm["duplicate"],
        "{name} ({how}): ZERO records"
    );
    // The oracle's `page_size`, or QEMU's own `page-size` counter.
    let ps = if o["page_size"].is_null() {
        &qm["page-size"]
    } else {
        &o["page_size"]
    };
    assert!(!ps.is_null(), "{name}: oracle without a page size");
    assert_eq!(
        v["target_page_size"], *ps,
        "{name} ({how}): target page size"
    );
    assert!(v["error"].is_null(), "{name} ({how}): {}", v["error"]);
}

fn check_extract(name: &str, stream: &Path) {
    let dir = scratch(name);
    let out_dir = dir.path().join("out");
    let out = qmig()
        .arg("extract")
        .arg(stream)
        .arg("-o")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: extract: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = oracle(name);
    let ranges = o["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty());
    for r in ranges {
        let block = r["block"].as_str().unwrap();
        let img = std::fs::read(out_dir.join(format!("{block}.img"))).unwrap();
        let (off, len) = (
            r["offset"].as_u64().unwrap() as usize,
            r["length"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            sha256::hex(&img[off..off + len]),
            r["sha256"].as_str().unwrap(),
            "{name}: {block} [{off:#x}, +{len:#x})"
        );
    }
    for (block, len) in o["lengths"].as_object().unwrap() {
        let m = std::fs::metadata(out_dir.join(format!("{block}.img"))).unwrap();
        assert_eq!(Some(m.len()), len.as_u64(), "{name}: {block} length");
    }
}

fn check_all(name: &str) {
    check_all_at(name, &field_dir(name).join("stream"));
}

fn check_all_at(name: &str, stream: &Path) {
    let stream = stream.to_path_buf();
    let (ok, v) = inspect_file(&stream);
    assert!(ok, "{name}: inspect of the file failed: {}", v["error"]);
    check_counts(name, "file", &v);
    let (ok, v) = inspect_pipe(&std::fs::read(&stream).unwrap());
    assert!(ok, "{name}: inspect through a pipe failed: {}", v["error"]);
    check_counts(name, "pipe", &v);
    let out = qmig().arg("roundtrip").arg(&stream).output().unwrap();
    assert!(out.status.success(), "{name}: roundtrip");
    check_extract(name, &stream);
}

/// 32-bit ARM `versatilepb`: 1 KiB target pages, announced by no subsection.
#[test]
fn arm_1k_target_pages() {
    check_all("arm-1k-target-pages");
    let (_, v) = inspect_file(&field_dir("arm-1k-target-pages").join("stream"));
    assert_eq!(v["target_page_size_source"], "vmdesc");
    let (_, v) =
        inspect_pipe(&std::fs::read(field_dir("arm-1k-target-pages").join("stream")).unwrap());
    // From a pipe the vmdesc comes last: the machine type decided first,
    // and the vmdesc agreed.
    assert_eq!(v["target_page_size"], 1024);
}

/// QEMU 10 `migrate file:` with `mapped-ram`: per-block headers, bitmaps
/// and pages at fixed file offsets outside the record stream. Pages with
/// their bit set are QEMU's `normal`, the rest its `duplicate` (zero pages
/// clear their bit).
#[test]
fn mapped_ram_file() {
    let name = "mapped-ram-file";
    let gz = field_dir(name).join("stream.gz");
    check_all_at(name, &gz);
    let (_, v) = inspect_file(&gz);
    let pc_ram = v["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "pc.ram")
        .unwrap();
    assert_eq!(pc_ram["mapped_ram"]["bitmap_offset"], 142);
    assert_eq!(pc_ram["mapped_ram"]["pages_offset"], 1 << 20);
    assert_eq!(v["section_headers"]["START"], 1);
    // The same file decompressed: read in place (seekable, mapped by extract).
    let dir_tmp = scratch("mapped-ram-plain");
    let dir = dir_tmp.path();
    let plain = dir.join("stream");
    let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap());
    std::io::copy(&mut dec, &mut std::fs::File::create(&plain).unwrap()).unwrap();
    check_all_at(name, &plain);
    // A hostile header: pc.ram's pages offset (bytes 134..142) moved off
    // its 1 MiB alignment. Refused at the block entry (offset 99), from the
    // file and from a pipe, before any page is read.
    let mut bytes = std::fs::read(&plain).unwrap();
    bytes[134..142].copy_from_slice(&((1u64 << 20) + 4096).to_be_bytes());
    std::fs::write(&plain, &bytes).unwrap();
    for (how, (ok, v)) in [
        ("file", inspect_file(&plain)),
        ("pipe", inspect_pipe(&bytes)),
    ] {
        assert!(!ok, "{how}");
        // `--json` carries the error as an object with its message.
        let e = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            e.contains("offset 99: mapped-ram block \"pc.ram\"") && e.contains("aligned"),
            "{how}: {e}"
        );
    }
    let out = qmig()
        .arg("extract")
        .arg(&plain)
        .arg("-o")
        .arg(dir.join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// QEMU 10 `migrate file:` with `mapped-ram` and `multifd` (4 channels):
/// the channels write the pages at their offsets; the file has the same
/// layout and reads the same way.
#[test]
fn mapped_ram_multifd_file() {
    let name = "multifd/mapped-ram-multifd4";
    check_all_at(name, &field_dir(name).join("stream.gz"));
    let (_, v) = inspect_file(&field_dir(name).join("stream.gz"));
    assert_eq!(v["totals"]["multifd_flush"], 0);
}

/// QEMU 7.2 with `send-configuration=off`.
#[test]
fn no_configuration_section() {
    check_all("no-configuration-section");
    let (_, v) = inspect_file(&field_dir("no-configuration-section").join("stream"));
    assert_eq!(v["configuration_section"], false);
}

/// The guest wrote a footer, a RAM PART section and another footer into its
/// CMOS RAM: the RTC section is read whole from a file and a pipe, and the
/// fake bytes are part of its payload.
#[test]
fn guest_fake_footer_is_device_state() {
    let name = "guest-fake-footer";
    check_all(name);
    let o = oracle(name);
    let fake = hex_bytes(o["fake_bytes_hex"].as_str().unwrap());
    let rtc = o["rtc_section_id"].as_u64().unwrap();
    let stream = field_dir(name).join("stream");
    let bytes = std::fs::read(&stream).unwrap();
    // The fake bytes occur twice: in the guest's own code (a RAM page, at
    // the oracle's `fake_stream_offset`) and in the RTC's CMOS RAM.
    let at: Vec<u64> = bytes
        .windows(fake.len())
        .enumerate()
        .filter(|(_, w)| *w == &fake[..])
        .map(|(i, _)| i as u64)
        .collect();
    assert_eq!(at.len(), 2, "{at:?}");
    assert_eq!(at[0], o["fake_stream_offset"].as_u64().unwrap());
    let fake_at = at[1];
    let (_, v) = inspect_file(&stream);
    assert_eq!(v["device_sections_delimited_by"], "vmdesc");
    // The RAM section is read once: one START, one END.
    assert_eq!(v["section_headers"]["START"], 1);
    assert_eq!(v["section_headers"]["END"], 1);
    // The record listing shows the RTC payload spanning the fake bytes.
    let out = qmig()
        .args(["inspect", "--records"])
        .arg(&stream)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let spans: Vec<(u64, u64)> = text
        .lines()
        .filter(|l| l.contains("DEVICE_DATA"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let off = f.first()?.parse().ok()?;
            let len = f.last()?.parse().ok()?;
            Some((off, len))
        })
        .collect();
    assert!(
        spans
            .iter()
            .any(|&(off, len)| off <= fake_at && fake_at + fake.len() as u64 <= off + len),
        "RTC section {rtc}: no device payload spans the fake bytes at {fake_at}: {spans:?}"
    );
}

/// The same stream without its vmdesc trailer: nothing delimits the RTC
/// section but its footer, and the guest's fake footer is refused by the
/// stream's structure (no RAM PART after the RAM END) or reported as
/// ambiguous; the fake RAM record is never applied.
#[test]
fn guest_fake_footer_without_vmdesc() {
    let name = "guest-fake-footer";
    let bytes = std::fs::read(field_dir(name).join("stream")).unwrap();
    let t = qmig_wire::vmdesc::find_trailer(&bytes).expect("trailer");
    let stripped = &bytes[..=t];
    let dir_tmp = scratch("fake-stripped");
    let dir = dir_tmp.path();
    let p = dir.join("stream");
    std::fs::write(&p, stripped).unwrap();
    for (how, (ok, v)) in [("file", inspect_file(&p)), ("pipe", inspect_pipe(stripped))] {
        if ok {
            check_counts(name, how, &v);
            assert_eq!(
                v["section_headers"]["PART"],
                json_count(&bytes, "PART"),
                "{how}"
            );
        } else {
            let e = v["error"].to_string();
            assert!(
                e.contains("ambiguous") || e.contains("device section"),
                "{how}: {e}"
            );
        }
    }
}

/// PART sections in the real stream (read with its vmdesc).
fn json_count(bytes: &[u8], kind: &str) -> Value {
    let dir_tmp = scratch("fake-count");
    let dir = dir_tmp.path();
    let p = dir.join("stream");
    std::fs::write(&p, bytes).unwrap();
    inspect_file(&p).1["section_headers"][kind].clone()
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// `--target-page-size` overrides every source: the right size reads the
/// ARM stream, a wrong one is refused with an offset (the records do not
/// parse), and a size QEMU cannot have is a usage error.
#[test]
fn target_page_size_override() {
    let s = field_dir("arm-1k-target-pages").join("stream");
    let out = qmig()
        .arg("inspect")
        .arg(&s)
        .args(["--json", "--target-page-size", "1K"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["target_page_size_source"], "override");
    check_counts("arm-1k-target-pages", "override", &v);
    let out = qmig()
        .arg("inspect")
        .arg(&s)
        .args(["--target-page-size", "4K"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("offset"));
    let out = qmig()
        .arg("inspect")
        .arg(&s)
        .args(["--target-page-size", "3K"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A postcopy capture has no vmdesc: `--vmdesc-from` another capture of the
/// same QEMU and machine type delimits its (packaged) device sections
/// exactly, with the same result as the footer reading; a vmdesc of another
/// machine is refused, never used to misread.
#[test]
fn vmdesc_from_another_capture() {
    let data = qmig_tests::data_dir();
    let s = data.join("q10-postcopy").join("stream");
    let (ok, plain) = inspect_file(&s);
    assert!(ok);
    assert_eq!(plain["device_sections_delimited_by"], "footer");
    let out = qmig()
        .arg("inspect")
        .arg(&s)
        .arg("--json")
        .arg("--vmdesc-from")
        .arg(data.join("q10-stopped").join("stream"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device_sections_delimited_by"], "vmdesc");
    assert_eq!(v["totals"], plain["totals"]);
    assert_eq!(v["device_bytes"], plain["device_bytes"]);
    let out = qmig()
        .arg("roundtrip")
        .arg(&s)
        .arg("--vmdesc-from")
        .arg(data.join("q10-stopped").join("stream"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = qmig()
        .arg("inspect")
        .arg(&s)
        .arg("--vmdesc-from")
        .arg(data.join("arm-versatilepb").join("stream"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// A Xen device-state file (QMP `xen-save-devices-state` of a real QEMU
/// 10): no configuration section, FULL sections only, no vmdesc. Read from
/// a file and a pipe alike, and re-serialized identically.
#[test]
fn xen_device_state_file() {
    let s = qmig_tests::data_dir()
        .join("xen")
        .join("device-state")
        .join("stream");
    let bytes = std::fs::read(&s).unwrap();
    for (how, (ok, v)) in [("file", inspect_file(&s)), ("pipe", inspect_pipe(&bytes))] {
        assert!(ok, "{how}: {}", v["error"]);
        assert_eq!(v["configuration_section"], false, "{how}");
        assert_eq!(v["section_headers"]["FULL"], 30, "{how}");
        assert_eq!(v["eof"], true, "{how}");
        assert_eq!(v["device_sections_delimited_by"], "footer", "{how}");
    }
    let out = qmig().arg("roundtrip").arg(&s).output().unwrap();
    assert!(out.status.success());
}
