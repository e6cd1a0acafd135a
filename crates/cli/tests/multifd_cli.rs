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
    let d = std::env::temp_dir().join(format!("qmig-multifd-cli-{}", std::process::id()));
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
