//! The `qmig` binary on every committed real QEMU capture: `roundtrip` exits
//! 0, `inspect --json` has QEMU's counts, `extract` gives the source's memory.

use std::path::{Path, PathBuf};
use std::process::Command;

use qmig_tests::{captures, sha256, Capture};

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-cli-test-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// A path to the plain stream (decompressing `.gz` captures into `dir`).
fn stream_file(c: &Capture, dir: &Path) -> PathBuf {
    if c.stream_path.extension().is_some_and(|e| e == "gz") {
        let p = dir.join("stream");
        std::fs::write(&p, &c.stream).unwrap();
        p
    } else {
        c.stream_path.clone()
    }
}

#[test]
fn roundtrip_inspect_extract_every_capture() {
    let caps = captures();
    assert!(caps.len() >= 8, "corpus present");
    for c in caps {
        let dir_tmp = scratch(&c.name);
        let dir = dir_tmp.path();
        let s = stream_file(&c, dir);

        let out = qmig().arg("roundtrip").arg(&s).output().unwrap();
        assert!(
            out.status.success(),
            "{}: roundtrip: {}",
            c.name,
            String::from_utf8_lossy(&out.stdout)
        );

        let out = qmig()
            .arg("inspect")
            .arg(&s)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: inspect failed", c.name);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (k, want) in c.expectations() {
            let key = k.trim_start_matches("totals.");
            assert_eq!(v["totals"][key].as_u64(), Some(want), "{}: {k}", c.name);
        }
        for k in ["zero", "page", "xbzrle", "compressed", "eos"] {
            assert!(v["totals"][k].is_u64(), "{}: totals.{k}", c.name);
        }
        // Per-block counts add up to the totals.
        let blocks = v["blocks"].as_array().unwrap();
        for k in ["zero", "page", "xbzrle", "compressed"] {
            let sum: u64 = blocks.iter().map(|b| b[k].as_u64().unwrap()).sum();
            assert_eq!(
                sum,
                v["totals"][k].as_u64().unwrap(),
                "{}: sum of blocks' {k}",
                c.name
            );
        }
        for b in blocks {
            assert!(
                b["name"].is_string() && b["length"].as_u64().unwrap() > 0,
                "{}: block {b}",
                c.name
            );
        }

        let outdir = dir.join("out");
        let out = qmig()
            .arg("extract")
            .arg(&s)
            .arg("-o")
            .arg(&outdir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: extract: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(outdir.join("manifest.json")).unwrap()).unwrap();
        let digests = c.digests();
        assert!(!digests.is_empty(), "{}: oracle digests", c.name);
        for (block, off, len, sha) in digests {
            let e = m["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == block.as_str());
            let e = e.unwrap_or_else(|| panic!("{}: block {block} not extracted", c.name));
            let img = std::fs::read(outdir.join(e["file"].as_str().unwrap())).unwrap();
            assert_eq!(img.len() as u64, e["length"].as_u64().unwrap());
            let part = &img[off as usize..(off + len) as usize];
            assert_eq!(
                sha256::hex(part),
                sha,
                "{}: {block} [{off:#x}, +{len:#x}) differs from the source's memory",
                c.name
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A stream cut in the middle: non-zero exit, a message with the offset, the
/// manifest records where it stopped, and the pages applied so far are there.
#[test]
fn extract_of_truncated_stream_reports_offset_and_keeps_applied_pages() {
    let c = captures()
        .into_iter()
        .find(|c| c.name == "q10-stopped")
        .expect("q10-stopped");
    let dir_tmp = scratch("trunc");
    let dir = dir_tmp.path();
    let cut = c.stream.len() / 2 + 1234;
    let s = dir.join("cut");
    std::fs::write(&s, &c.stream[..cut]).unwrap();
    let outdir = dir.join("out");
    let out = qmig()
        .arg("extract")
        .arg(&s)
        .arg("-o")
        .arg(&outdir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offset"), "{err}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outdir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["complete"], false);
    let stop = m["applied_up_to"].as_u64().unwrap();
    assert!(stop > 0 && stop <= cut as u64, "applied_up_to {stop}");
    // Every page record that ends before the stop offset is in the images.
    let mut cur = String::new();
    let mut checked = 0;
    for it in qmig_wire::SliceReader::new(&c.stream) {
        let (off, it) = it.unwrap();
        if off >= stop {
            break;
        }
        if let qmig_wire::Item::Ram(r) = it {
            if let Some(b) = r.block {
                cur = b.to_string();
            }
            if let qmig_wire::RamBody::Page(d) = r.body {
                let e = m["blocks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["name"] == cur.as_str())
                    .unwrap();
                let img = std::fs::read(outdir.join(e["file"].as_str().unwrap())).unwrap();
                assert_eq!(&img[r.offset as usize..r.offset as usize + d.len()], d);
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// `extract --sync` (images, device state and metadata fsynced) writes the
/// same files as the default, unsynced extract, complete and identical.
#[test]
fn extract_with_sync_writes_the_same_output() {
    for name in ["q10-stopped", "q10-passes", "q10-xbzrle"] {
        let c = captures()
            .into_iter()
            .find(|c| c.name == name)
            .expect("capture");
        let dir_tmp = scratch(&format!("sync-{name}"));
        let dir = dir_tmp.path();
        let s = stream_file(&c, dir);
        let mut files = Vec::new();
        for (sub, sync) in [("plain", false), ("sync", true)] {
            let outdir = dir.join(sub);
            let mut cmd = qmig();
            cmd.arg("extract").arg(&s).arg("-o").arg(&outdir);
            if sync {
                cmd.arg("--sync");
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{name} {sub}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut names: Vec<_> = std::fs::read_dir(&outdir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            let contents: Vec<_> = names
                .iter()
                .map(|n| (n.clone(), std::fs::read(outdir.join(n)).unwrap()))
                .collect();
            files.push(contents);
        }
        assert!(
            files[0].len() >= 4,
            "{name}: images, manifest, device state"
        );
        assert_eq!(files[0], files[1], "{name}: --sync output differs");
        let m: serde_json::Value = serde_json::from_slice(
            &files[1]
                .iter()
                .find(|(n, _)| n == "manifest.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(m["complete"], true, "{name}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn roundtrip_reports_parse_errors_with_offset() {
    let c = captures()
        .into_iter()
        .find(|c| c.name == "q10-stopped")
        .unwrap();
    let dir_tmp = scratch("corrupt");
    let dir = dir_tmp.path();
    let mut bytes = c.stream.clone();
    // Corrupt the RAM START section's idstr length: a zero-length name.
    let at = bytes.windows(4).position(|w| w == b"\x03ram").unwrap();
    bytes[at] = 0;
    let s = dir.join("bad");
    std::fs::write(&s, &bytes).unwrap();
    let out = qmig().arg("roundtrip").arg(&s).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.starts_with("qmig: roundtrip: "), "{msg}");
    assert!(msg.contains(&format!("offset {at}")), "{msg}");
    assert!(out.stdout.is_empty(), "error printed once, on stderr");
    let _ = std::fs::remove_dir_all(dir);
}
