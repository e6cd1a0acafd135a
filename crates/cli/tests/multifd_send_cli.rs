//! `qmig send --multifd N` without QEMU: into `qmig recv` over loopback
//! TCP (the RAM of a real QEMU 10 multifd capture set, its main connection
//! as template), every compression, several passes: recv's images equal
//! the RAM send reports as final, and recv saw N channels. And the option
//! combinations QEMU refuses are refused, naming the capability. (The live
//! cases against a QEMU 10 destination are in scripts/send_interop.py.)

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn tmp(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-mfsend-{}-", tag.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// q10-zstd's files uncompressed into `d` and its RAM extracted to
/// `d/ram`: (main connection, RAM directory).
fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let src = qmig_tests::data_dir().join("multifd").join("q10-zstd");
    let mut files = Vec::new();
    for i in 0..3 {
        let raw = qmig_tests::gunzip(&std::fs::read(src.join(format!("conn-{i}.bin.gz"))).unwrap());
        let p = d.join(format!("conn-{i}.bin"));
        std::fs::write(&p, raw).unwrap();
        files.push(p);
    }
    let ram = d.join("ram");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .arg("extract")
        .arg("-q")
        .arg(&files[0])
        .arg("--multifd-channel")
        .arg(&files[1])
        .arg("--multifd-channel")
        .arg(&files[2])
        .arg("-o")
        .arg(&ram)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (files[0].clone(), ram)
}

fn send_into_recv(tag: &str, extra: &[&str], channels: u32) -> Value {
    let d_tmp = tmp(tag);
    let d = d_tmp.path();
    let (template, ram) = setup(d);
    let (out, fin) = (d.join("out"), d.join("final"));
    let mut recv = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args([
            "recv",
            "--listen",
            "tcp:127.0.0.1:0",
            "--idle-timeout",
            "30",
            "-o",
        ])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(recv.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let send = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .arg("send")
        .arg("--ram")
        .arg(&ram)
        .arg("--template")
        .arg(&template)
        .arg("--to")
        .arg(format!("tcp:{addr}"))
        .arg("--final-ram")
        .arg(&fin)
        .args(["--json", "--idle-timeout", "30", "--multifd"])
        .arg(channels.to_string())
        .args(extra)
        .output()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let st = recv.wait().unwrap();
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(st.success(), "recv: {rest}");
    assert!(
        rest.contains(&format!("{channels} multifd channel connections")),
        "{rest}"
    );
    let man: Value =
        serde_json::from_slice(&std::fs::read(fin.join("manifest.json")).unwrap()).unwrap();
    let blocks = man["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 6);
    for b in blocks {
        let f = b["file"].as_str().unwrap();
        let want = std::fs::read(fin.join(f)).unwrap();
        let got = std::fs::read(out.join(f)).unwrap();
        assert!(want == got, "{tag}: block {} differs", b["name"]);
    }
    let v: Value = serde_json::from_slice(&send.stdout).unwrap();
    let _ = std::fs::remove_dir_all(d);
    v
}

#[test]
fn send_multifd_into_recv_every_compression() {
    for (comp, ch) in [("none", 4), ("zlib", 2), ("zstd", 3)] {
        let v = send_into_recv(
            comp,
            &[
                "--multifd-compression",
                comp,
                "--passes",
                "3",
                "--dirty-fraction",
                "0.05",
            ],
            ch,
        );
        let m = &v["multifd"];
        assert_eq!(m["channels"], ch, "{comp}");
        assert_eq!(m["compression"], comp);
        // 64 MiB of RAM: at least 128 packets of 128 pages.
        assert!(m["packets"].as_u64().unwrap() >= 128, "{v}");
        assert_eq!(
            m["sync_packets"].as_u64().unwrap(),
            m["syncs"].as_u64().unwrap() * u64::from(ch)
        );
        assert!(v["dirty_sync_count"].as_u64().unwrap() >= 3);
    }
}

#[test]
fn send_multifd_legacy_zero_pages_into_recv() {
    let v = send_into_recv("legacy", &["--zero-page-detection", "legacy"], 2);
    // Zero pages went as ZERO records on the main channel.
    assert_eq!(v["multifd"]["zero_pages"], 0, "{v}");
    assert!(v["duplicate"].as_u64().unwrap() > 10_000, "{v}");
}

#[test]
fn combinations_qemu_refuses_are_refused_naming_the_capability() {
    let d_tmp = tmp("refuse");
    let d = d_tmp.path();
    let (template, ram) = setup(d);
    let cases: [(&[&str], &str); 5] = [
        (&["--xbzrle"], "xbzrle"),
        (&["--compress", "1"], "compress"),
        (&["--postcopy"], "postcopy-ram"),
        (
            &["--no-zero-detection", "--zero-page-detection", "legacy"],
            "zero-page-detection",
        ),
        (&["--multifd-level", "3"], "multifd-compression"),
    ];
    for (extra, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
            .arg("send")
            .arg("--ram")
            .arg(&ram)
            .arg("--template")
            .arg(&template)
            .args(["--to", "tcp:127.0.0.1:9", "--multifd", "2"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .arg("send")
        .arg("--ram")
        .arg(&ram)
        .arg("--template")
        .arg(&template)
        .arg("--to")
        .arg(format!("file:{}", d.join("x").display()))
        .args(["--multifd", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("tcp: or unix:"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}
