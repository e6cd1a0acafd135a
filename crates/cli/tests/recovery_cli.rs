//! Recovered postcopy migrations recorded connection by connection by real
//! QEMU 10 (`tests/data/recovery/`, scripts/capture_recovery.py): `extract`
//! of the connection list equals the destination's `pmemsave`, `inspect`
//! shows the recovery handshake and counts what QEMU's `query-migrate`
//! counts, `roundtrip` reproduces every connection, and a connection is
//! only read as a continuation when the user lists it after another.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const SCENARIOS: [&str; 3] = [
    "q10-postcopy-recover",
    "q10-postcopy-relay-cut",
    "q10-preempt-recover",
];

fn dir(name: &str) -> PathBuf {
    qmig_tests::data_dir().join("recovery").join(name)
}

fn oracle(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir(name).join("oracle.json")).unwrap()).unwrap()
}

/// The connection files of a capture: (mains, preempts, return paths), in order.
fn files(name: &str) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let o = oracle(name);
    let (mut m, mut p, mut r) = (vec![], vec![], vec![]);
    for c in o["connections"].as_array().unwrap() {
        let f = &c["files"];
        match c["role"].as_str().unwrap() {
            "main" => {
                m.push(dir(name).join(f["main"]["file"].as_str().unwrap()));
                r.push(dir(name).join(f["rp"]["file"].as_str().unwrap()));
            }
            _ => p.push(dir(name).join(f["preempt"]["file"].as_str().unwrap())),
        }
    }
    (m, p, r)
}

fn qmig(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(args)
        .output()
        .unwrap()
}

fn args<'a>(
    head: &'a [&'a str],
    mains: &'a [PathBuf],
    preempt: &'a [PathBuf],
) -> Vec<&'a std::ffi::OsStr> {
    let mut v: Vec<&std::ffi::OsStr> = head.iter().map(|s| s.as_ref()).collect();
    v.extend(mains.iter().map(|p| p.as_os_str()));
    for p in preempt {
        v.push("--preempt-channel".as_ref());
        v.push(p.as_os_str());
    }
    v
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-recovery-{}-", tag.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// `extract` of the connection list: every digest of the destination's
/// pmemsave (pc.ram outside the VGA hole) equals the extracted image.
#[test]
fn extract_of_connection_list_equals_pmemsave() {
    for sc in SCENARIOS {
        let (m, p, _) = files(sc);
        assert!(m.len() == 2, "{sc}: two main connections");
        assert_eq!(p.len(), if sc.contains("preempt") { 2 } else { 0 });
        let out_tmp = tmpdir(sc);
        let out = out_tmp.path();
        let mut a = args(&["extract", "-q"], &m, &p);
        a.push("-o".as_ref());
        a.push(out.as_os_str());
        let r = qmig(&a);
        assert!(
            r.status.success(),
            "{sc}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let man: Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(man["complete"], true, "{sc}");
        let o = oracle(sc);
        assert_eq!(
            o["pmemsave"]["source_sha256"],
            o["pmemsave"]["destination_sha256"]
        );
        let digests = o["digests"].as_array().unwrap();
        assert!(digests.len() >= 2);
        for d in digests {
            let block = d["block"].as_str().unwrap();
            let file = man["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == block)
                .and_then(|b| b["file"].as_str())
                .unwrap();
            let img = std::fs::read(out.join(file)).unwrap();
            let (off, len) = (
                d["offset"].as_u64().unwrap() as usize,
                d["length"].as_u64().unwrap() as usize,
            );
            assert_eq!(
                qmig_tests::sha256::hex(&img[off..off + len]),
                d["sha256"].as_str().unwrap(),
                "{sc}: {block}@{off:#x}+{len:#x}"
            );
        }
        // Without the second main connection the migration is incomplete.
        let out1_tmp = tmpdir(&format!("{sc}-one"));
        let out1 = out1_tmp.path();
        let r = qmig(&[
            "extract".as_ref(),
            "-q".as_ref(),
            m[0].as_os_str(),
            "-o".as_ref(),
            out1.as_os_str(),
        ]);
        assert_eq!(r.status.code(), Some(1), "{sc}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("truncated"),
            "{sc}"
        );
        let _ = std::fs::remove_dir_all(out);
        let _ = std::fs::remove_dir_all(out1);
    }
}

/// `inspect --json` of the list: the recovery connection's RECV_BITMAP per
/// block and POSTCOPY_RESUME, page records equal to query-migrate's
/// `normal` and `duplicate`, and the return paths' recovery messages pass
/// the layout checks.
#[test]
fn inspect_shows_recovery_commands_and_counts() {
    for sc in SCENARIOS {
        let (m, p, rp) = files(sc);
        let mut a = args(&["inspect", "--json"], &m, &p);
        for r in &rp {
            a.push("--return-path".as_ref());
            a.push(r.as_os_str());
        }
        let r = qmig(&a);
        assert!(
            r.status.success(),
            "{sc}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let v: Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["error"], Value::Null, "{sc}");
        assert_eq!(v["complete"], true);
        let o = oracle(sc);
        let q = &o["query_migrate_ram"];
        if sc.contains("relay-cut") {
            // The relay cut the source's side too: what the source had
            // written into it was lost, counted by QEMU, sent again after
            // the resume (and counted again). Never fewer counted than recorded.
            assert!(v["totals"]["page"].as_u64() <= q["normal"].as_u64(), "{sc}");
            assert!(
                v["totals"]["zero"].as_u64() <= q["duplicate"].as_u64(),
                "{sc}"
            );
        } else {
            // migrate-pause: nothing was lost in flight.
            assert_eq!(v["totals"]["page"], q["normal"], "{sc}");
            assert_eq!(v["totals"]["zero"], q["duplicate"], "{sc}");
        }
        let conns = v["connections"].as_array().unwrap();
        let rec = conns.iter().find(|c| c["role"] == "recovery").unwrap();
        let blocks = v["blocks"].as_array().unwrap().len() as u64;
        assert_eq!(
            rec["command_counts"]["RECV_BITMAP"].as_u64(),
            Some(blocks),
            "{sc}"
        );
        assert_eq!(rec["command_counts"]["POSTCOPY_RESUME"], 1);
        assert_eq!(rec["commands"][0]["name"], "RECV_BITMAP");
        assert_eq!(rec["eof"], true);
        let first = conns.iter().find(|c| c["connection"] == "main-1").unwrap();
        assert!(first["cut"].is_object(), "{sc}: main-1 was cut");
        assert_eq!(first["command_counts"]["POSTCOPY_RUN"], 1);
        let rps = v["return_paths"].as_array().unwrap();
        assert_eq!(rps[1]["messages"]["RECV_BITMAP"].as_u64(), Some(blocks));
        assert_eq!(rps[1]["messages"]["RESUME_ACK"], 1);
        for b in rps[1]["recv_bitmaps"].as_array().unwrap() {
            assert!(b["received"].as_u64() <= b["pages"].as_u64());
        }
        // Text mode names the handshake too.
        let mut a = args(&["inspect"], &m, &p);
        a.extend(["--return-path".as_ref(), rp[1].as_os_str()]);
        a.extend(["--return-path".as_ref(), rp[0].as_os_str()]);
        let t = String::from_utf8_lossy(&qmig(&a).stdout).into_owned();
        assert!(t.contains("RECV_BITMAP requested for: pc.ram"), "{t}");
        assert!(t.contains("POSTCOPY_RESUME 1"), "{t}");
    }
}

#[test]
fn roundtrip_of_connection_list() {
    for sc in SCENARIOS {
        let (m, p, _) = files(sc);
        let r = qmig(&args(&["roundtrip"], &m, &p));
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(
            r.status.success(),
            "{sc}: {out} {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(out.contains("identical:"), "{out}");
    }
}

/// A recovery connection alone, or first, is not a stream: the error of
/// the issue, naming offset 0 (content never makes it a continuation).
/// Listed in the wrong order, the first connection is refused as a
/// continuation (it starts with a QEVM header, not a command).
#[test]
fn continuation_only_when_listed_after_another() {
    let (m, _, _) = files("q10-postcopy-recover");
    let r = qmig(&["inspect".as_ref(), m[1].as_os_str()]);
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(e.contains("offset 0: bad magic 0x08000a00"), "{e}");
    let rev = [m[1].clone(), m[0].clone()];
    let r = qmig(&args(&["inspect"], &rev, &[]));
    assert_eq!(r.status.code(), Some(1));
    // Main twice: the second copy starts with a header where the recovery
    // handshake should be.
    let twice = [m[0].clone(), m[0].clone()];
    let r = qmig(&args(&["roundtrip"], &twice, &[]));
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(e.contains("offset 0"), "{e}");
    // A precopy capture cut in two cannot be continued: QEMU would have failed, not paused.
    let s = std::fs::read(qmig_tests::data_dir().join("q10-stopped/stream")).unwrap();
    let d_tmp = tmpdir("precopy-cut");
    let d = d_tmp.path();
    std::fs::create_dir_all(d).unwrap();
    let (a, b) = (d.join("a"), d.join("b"));
    std::fs::write(&a, &s[..s.len() / 2]).unwrap();
    std::fs::write(&b, &s[s.len() / 2..]).unwrap();
    let r = qmig(&args(&["extract", "-o"], &[d.join("out"), a, b], &[]));
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(e.contains("before POSTCOPY_RUN"), "{e}");
    // More preempt channels than main connections: usage.
    let p = [m[0].clone(), m[0].clone()];
    let r = qmig(&args(&["inspect"], &m[..1], &p));
    assert_eq!(r.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(d);
    let _: &Path = d;
}

/// The destination state machine, fed the connections recorded before the
/// cut (main-1 and its preempt channel), has received exactly the pages
/// QEMU's destination said it had when the source asked (the RECV_BITMAP
/// replies of the recovery connection's return path), block by block, bit
/// by bit.
#[test]
fn received_bitmaps_at_the_pause_equal_qemus() {
    use qmig_ram_dst::{Config, RamDst, VecMemory};
    use qmig_wire::recovery::parse_recv_bitmap_reply;
    use qmig_wire::{Decoder, ReturnPathReader, RpMessage, SliceReader};
    for sc in SCENARIOS {
        let (m, p, rp) = files(sc);
        let read = |f: &PathBuf| qmig_tests::gunzip(&std::fs::read(f).unwrap());
        let mut dst = RamDst::new(Config::default(), VecMemory::new()).unwrap();
        let m1 = read(&m[0]);
        let mut rd = SliceReader::with_decoder(&m1, Decoder::new(Default::default()));
        let mut cut = None;
        while let Some(r) = rd.next() {
            match r {
                Ok((off, item)) => {
                    let len = (rd.decoder().position() - off) as usize;
                    dst.handle_item(off, len, &item).unwrap();
                }
                Err(e) => cut = Some(e),
            }
        }
        assert!(
            cut.is_some_and(|e| e.is_truncation()),
            "{sc}: main-1 was cut"
        );
        if let Some(p1) = p.first() {
            let b = read(p1);
            let mut rd = SliceReader::with_decoder(&b, rd.decoder().preempt_channel());
            while let Some(r) = rd.next() {
                let (off, item) = r.unwrap();
                let len = (rd.decoder().position() - off) as usize;
                dst.handle_item(off, len, &item).unwrap();
            }
        }
        let tps = dst.page_size();
        let rp2 = read(&rp[1]);
        let mut compared = 0;
        for r in ReturnPathReader::new(&rp2) {
            let (off, msg) = r.unwrap();
            if let RpMessage::RecvBitmap { .. } = msg {
                let pages = |n: &str| {
                    dst.block_index(n)
                        .map(|i| dst.blocks()[i].used_length() / tps)
                };
                let (reply, _) = parse_recv_bitmap_reply(&rp2[off as usize..], off, pages).unwrap();
                let i = dst.block_index(reply.block).unwrap();
                assert_eq!(
                    &reply.bitmap,
                    dst.blocks()[i].received(),
                    "{sc}: received bitmap of {} ({} pages received by QEMU, {} by qmig)",
                    reply.block,
                    reply.bitmap.count_ones(),
                    dst.blocks()[i].received().count_ones()
                );
                compared += 1;
            }
        }
        assert_eq!(compared, dst.blocks().len(), "{sc}");
    }
}

/// Hostile recovery messages in real captures: a RECV_BITMAP for a block the
/// migration does not have, RAM before POSTCOPY_RESUME, a RESUME_ACK of 2, a
/// reply with a broken end marker; each a typed error naming the file and
/// the offset.
#[test]
fn hostile_recovery_messages_are_typed_errors() {
    let (m, _, rp) = files("q10-postcopy-recover");
    let d_tmp = tmpdir("hostile");
    let d = d_tmp.path();
    std::fs::create_dir_all(d).unwrap();
    let raw = |f: &PathBuf| qmig_tests::gunzip(&std::fs::read(f).unwrap());
    // RECV_BITMAP "pc.xam" at offset 0 of the recovery connection.
    let mut m2 = raw(&m[1]);
    assert_eq!(&m2[6..12], b"pc.ram");
    m2[9] = b'x';
    let bad = d.join("main-2-unknown.bin");
    std::fs::write(&bad, &m2).unwrap();
    let r = qmig(&args(&["inspect"], &[m[0].clone(), bad.clone()], &[]));
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(
        e.contains("main-2-unknown.bin")
            && e.contains("offset 0: RECV_BITMAP command names RAM block \"pc.xam\""),
        "{e}"
    );
    // RAM before POSTCOPY_RESUME: drop the RESUME command.
    let m2 = raw(&m[1]);
    let at = m2.windows(5).position(|w| w == [8, 0, 9, 0, 0]).unwrap();
    let mut cut = m2[..at].to_vec();
    cut.extend_from_slice(&m2[at + 5..]);
    let bad = d.join("main-2-noresume.bin");
    std::fs::write(&bad, &cut).unwrap();
    let r = qmig(&args(
        &["extract", "-q", "-o"],
        &[d.join("out"), m[0].clone(), bad.clone()],
        &[],
    ));
    assert_eq!(r.status.code(), Some(1));
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(
        e.contains(&format!("offset {at}: postcopy recovery")),
        "{e}"
    );
    // RESUME_ACK 2, and a broken end marker, on the return path.
    let rp2 = raw(&rp[1]);
    let ack = rp2
        .windows(8)
        .position(|w| w == [0, 6, 0, 4, 0, 0, 0, 1])
        .unwrap();
    let mut two = rp2.clone();
    two[ack + 7] = 2;
    let end = rp2
        .windows(8)
        .position(|w| w == [1, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef])
        .unwrap();
    let mut marker = rp2.clone();
    marker[end] = 0;
    for (name, bytes, want) in [
        (
            "rp-ack2.bin",
            two,
            format!("offset {ack}: RESUME_ACK value 2"),
        ),
        (
            "rp-marker.bin",
            marker,
            format!("offset {end}: received bitmap end marker"),
        ),
    ] {
        let f = d.join(name);
        std::fs::write(&f, &bytes).unwrap();
        let mut a = args(&["inspect"], &m[..], &[]);
        a.extend([
            "--return-path".as_ref(),
            rp[0].as_os_str(),
            "--return-path".as_ref(),
            f.as_os_str(),
        ]);
        let r = qmig(&a);
        assert_eq!(r.status.code(), Some(1), "{name}");
        let e = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(e.contains(&want), "{name}: {e}");
    }
    let _ = std::fs::remove_dir_all(d);
}
