//! `qmig inspect MAIN --multifd-channel FILE...` on real QEMU 10 multifd
//! captures (`tests/data/multifd/`): page counts over the main stream and
//! the channels equal QEMU's `query-migrate` counters; a truncated channel
//! is an error naming its offset.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    qmig_tests::data_dir().join("multifd").join(name)
}

fn inspect(name: &str, extra: &[PathBuf]) -> (bool, Value, String) {
    let d = dir(name);
    let o: Value = serde_json::from_slice(&std::fs::read(d.join("oracle.json")).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmig"));
    cmd.arg("inspect").arg("--json");
    for c in o["connections"].as_array().unwrap() {
        let f = d.join(format!("{}.gz", c["file"].as_str().unwrap()));
        if c["kind"] == "main" {
            cmd.arg(f);
        } else {
            cmd.arg("--multifd-channel").arg(f);
        }
    }
    for e in extra {
        cmd.arg("--multifd-channel").arg(e);
    }
    let out = cmd.output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(name: &str, compression: &str) {
    let o: Value =
        serde_json::from_slice(&std::fs::read(dir(name).join("oracle.json")).unwrap()).unwrap();
    let (ok, v, err) = inspect(name, &[]);
    assert!(ok, "{name}: {err}");
    let m = &v["multifd"];
    let qm = &o["query_migrate_ram"];
    assert_eq!(m["normal_with_main"], qm["normal"], "{name}");
    assert_eq!(m["zero_with_main"], qm["duplicate"], "{name}");
    let chans = m["channels"].as_array().unwrap();
    let want: Vec<&Value> = o["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "multifd")
        .collect();
    assert_eq!(chans.len(), want.len());
    for (c, w) in chans.iter().zip(want) {
        assert_eq!(c["channel_id"], w["channel_id"], "{name}");
        assert_eq!(c["bytes"], w["bytes"], "{name}");
        assert_eq!(c["sync_packets"], v["totals"]["multifd_flush"], "{name}");
        assert!(c["error"].is_null());
    }
    assert!(chans.iter().any(|c| c["compression"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == compression)));
}

#[test]
fn inspect_channels_none() {
    check("q10-none", "none");
}

#[test]
fn inspect_channels_zlib() {
    check("q10-zlib", "zlib");
}

#[test]
fn inspect_channels_zstd() {
    check("q10-zstd", "zstd");
}

#[test]
fn truncated_channel_is_an_error() {
    let raw = qmig_tests::gunzip(&std::fs::read(dir("q10-none").join("conn-1.bin.gz")).unwrap());
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-multifd-cli-")
        .tempdir()
        .unwrap();
    let d = tmp.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("cut.bin");
    std::fs::write(&p, &raw[..5000]).unwrap();
    let (ok, v, err) = inspect("q10-none", std::slice::from_ref(&p));
    assert!(!ok);
    // With --json the error is in the output's `error` object.
    let msg = format!("{err}{}", v["error"]);
    assert!(msg.contains("offset 4096"), "{msg}");
    let last = v["multifd"]["channels"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(last["error"].as_str().unwrap().contains("inside a packet"));
    let _ = std::fs::remove_dir_all(&d);
}

// ---- extract / roundtrip / recv of capture sets -------------------------

fn oracle(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir(name).join("oracle.json")).unwrap()).unwrap()
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn tmp(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-mfd-{}-", tag.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// The capture set's files, uncompressed into `d`: main, then channels.
fn unpack(name: &str, d: &std::path::Path) -> (PathBuf, Vec<PathBuf>) {
    let o = oracle(name);
    let mut main = None;
    let mut chans = Vec::new();
    for c in o["connections"].as_array().unwrap() {
        let f = c["file"].as_str().unwrap();
        let raw = qmig_tests::gunzip(&std::fs::read(dir(name).join(format!("{f}.gz"))).unwrap());
        let p = d.join(f);
        std::fs::write(&p, raw).unwrap();
        if c["kind"] == "main" {
            main = Some(p);
        } else {
            chans.push(p);
        }
    }
    (main.unwrap(), chans)
}

fn qmig(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(args)
        .output()
        .unwrap()
}

fn extract(
    main: &std::path::Path,
    chans: &[PathBuf],
    out: &std::path::Path,
) -> std::process::Output {
    let mut a: Vec<&std::ffi::OsStr> = vec![
        "extract".as_ref(),
        main.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ];
    for c in chans {
        a.push("--multifd-channel".as_ref());
        a.push(c.as_os_str());
    }
    qmig(&a)
}

fn pc_ram(out: &std::path::Path) -> Vec<u8> {
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let b = m["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "pc.ram")
        .unwrap();
    std::fs::read(out.join(b["file"].as_str().unwrap())).unwrap()
}

/// Whether pc.ram equals the source's memory (the oracle's pmemsave
/// ranges, without the [640 KiB, 1 MiB) hole).
fn matches_oracle(name: &str, ram: &[u8]) -> bool {
    oracle(name)["ranges"].as_array().unwrap().iter().all(|r| {
        let (o, n) = (
            r["offset"].as_u64().unwrap() as usize,
            r["length"].as_u64().unwrap() as usize,
        );
        qmig_tests::sha256::hex(&ram[o..o + n]) == r["sha256"].as_str().unwrap()
    })
}

fn extract_set(name: &str) {
    let d_tmp = tmp(&format!("x-{name}"));
    let d = d_tmp.path();
    let (main, mut chans) = unpack(name, d);
    // Channels are identified by their header, not by the order given.
    chans.reverse();
    let out = d.join("out");
    let r = extract(&main, &chans, &out);
    assert!(
        r.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        matches_oracle(name, &pc_ram(&out)),
        "{name}: pc.ram differs from pmemsave"
    );
    // The source was started with -S: pc.ram is zero, the firmware blocks
    // are not, and their pages travel only in the channels.
    let alone = d.join("alone");
    assert!(extract(&main, &[], &alone).status.success());
    let bios = |o: &std::path::Path| std::fs::read(o.join("pc.bios.img")).unwrap();
    assert!(bios(&out).iter().any(|&b| b != 0), "{name}: pc.bios empty");
    assert!(
        bios(&alone).iter().all(|&b| b == 0),
        "{name}: main stream has pages"
    );
    // roundtrip: main stream and every channel byte-identical.
    let mut a: Vec<&std::ffi::OsStr> = vec!["roundtrip".as_ref(), main.as_os_str()];
    for c in &chans {
        a.push("--multifd-channel".as_ref());
        a.push(c.as_os_str());
    }
    let r = qmig(&a);
    let so = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{name}: {so}");
    assert_eq!(so.matches("identical").count(), 1 + chans.len(), "{so}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn extract_capture_set_none() {
    extract_set("q10-none");
}

#[test]
fn extract_capture_set_zlib() {
    extract_set("q10-zlib");
}

#[test]
fn extract_capture_set_zstd() {
    extract_set("q10-zstd");
}

/// (offset, flags, normal_pages, length) of every packet of a channel file.
fn packets(b: &[u8]) -> Vec<(usize, u32, u32, usize)> {
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut v = Vec::new();
    let mut at = 64;
    while at < b.len() {
        let (f, normal, size) = (be32(at + 8), be32(at + 16), be32(at + 20));
        let len = 320 + 8 * 128 + size as usize;
        v.push((at, f, normal, len));
        at += len;
    }
    v
}

/// Extracts q10-none with channel 1 replaced by `bytes`; returns the error text.
fn hostile(tag: &str, bytes: &[u8], twice: bool) -> String {
    let d_tmp = tmp(&format!("h-{tag}"));
    let d = d_tmp.path();
    let (main, mut chans) = unpack("q10-none", d);
    std::fs::write(&chans[1], bytes).unwrap();
    if twice {
        chans[1] = chans[0].clone();
    }
    let r = extract(&main, &chans, &d.join("out"));
    assert!(!r.status.success(), "{tag}: hostile channel accepted");
    let m: Value =
        serde_json::from_slice(&std::fs::read(d.join("out/manifest.json")).unwrap()).unwrap();
    assert!(!m["complete"].as_bool().unwrap());
    let _ = std::fs::remove_dir_all(d);
    format!("{}{}", String::from_utf8_lossy(&r.stderr), m["error"])
}

fn channel2() -> Vec<u8> {
    qmig_tests::gunzip(&std::fs::read(dir("q10-none").join("conn-2.bin.gz")).unwrap())
}

#[test]
fn page_offset_outside_the_block_names_channel_and_offset() {
    let mut b = channel2();
    let (at, ..) = *packets(&b).iter().find(|p| p.2 > 0).unwrap();
    b[at + 320..at + 328].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let e = hostile("oob", &b, false);
    assert!(
        e.contains(&format!("offset {at}")) && e.contains("outside RAM block"),
        "{e}"
    );
    assert!(e.contains("multifd channel 1"), "{e}");
}

#[test]
fn unsupported_compression_and_tls_are_named() {
    let mut b = channel2();
    let (at, ..) = packets(&b)[1];
    b[at + 8..at + 12].copy_from_slice(&0x20u32.to_be_bytes());
    let e = hostile("qatzip", &b, false);
    assert!(
        e.contains("qatzip") && e.contains("multifd-compression"),
        "{e}"
    );
    let mut tls = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    tls.resize(600, 0);
    let e = hostile("tls", &tls, false);
    assert!(e.contains("tls-creds"), "{e}");
}

#[test]
fn channel_ending_before_its_sync_breaks_the_pairing_rule() {
    let b = channel2();
    let syncs: Vec<_> = packets(&b).into_iter().filter(|p| p.1 & 1 != 0).collect();
    let last = syncs.last().unwrap().0;
    let e = hostile("nosync", &b[..last], false);
    assert!(
        e.contains("multifd_recv_sync_main") && e.contains(&format!("offset {last}")),
        "{e}"
    );
    let e = hostile("twice", &b, true);
    assert!(e.contains("also in"), "{e}");
}

/// `qmig recv` of a capture set sent over loopback TCP the way a QEMU
/// source connects (main first, then the channels): same memory as the
/// oracle, and `--save DIR` records every connection byte for byte.
#[test]
fn recv_over_tcp_applies_channels_and_saves_the_set() {
    use std::io::{BufRead, Write};
    let d_tmp = tmp("recv");
    let d = d_tmp.path();
    let (main, chans) = unpack("q10-zstd", d);
    let (out, save) = (d.join("out"), d.join("save"));
    std::fs::create_dir_all(&save).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args([
            "recv",
            "--listen",
            "tcp:127.0.0.1:0",
            "--idle-timeout",
            "20",
            "-o",
        ])
        .arg(&out)
        .arg("--save")
        .arg(&save)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(line.contains("listening on"), "{line}");
    // As QEMU: every connection is made before the main stream's setup
    // section (and its first sync point) is written.
    let socks: Vec<_> = std::iter::once(&main)
        .chain(&chans)
        .map(|f| {
            (
                std::net::TcpStream::connect(&addr).unwrap(),
                std::fs::read(f).unwrap(),
            )
        })
        .collect();
    let threads: Vec<_> = socks
        .into_iter()
        .map(|(mut s, bytes)| {
            std::thread::spawn(move || {
                let _ = s.write_all(&bytes);
                let _ = s.shutdown(std::net::Shutdown::Write);
                s
            })
        })
        .collect();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{rest}");
    assert!(rest.contains("2 multifd channel connections"), "{rest}");
    assert!(matches_oracle("q10-zstd", &pc_ram(&out)));
    for (i, f) in std::iter::once(&main).chain(&chans).enumerate() {
        assert_eq!(
            std::fs::read(save.join(format!("conn-{i}.bin"))).unwrap(),
            std::fs::read(f).unwrap(),
            "--save conn-{i}.bin"
        );
    }
    drop(threads);
    let _ = std::fs::remove_dir_all(d);
}
