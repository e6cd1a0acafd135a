//! `qmig inspect --devices` and `--vmdesc` on the committed captures.

use std::path::PathBuf;
use std::process::{Command, Output};

fn qmig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args(args)
        .output()
        .expect("run qmig")
}

fn data(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(p)
        .to_string_lossy()
        .into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            String::from_utf8_lossy(&o.stderr)
                .chars()
                .take(500)
                .collect::<String>()
        )
    })
}

#[test]
fn devices_json_has_cpu_registers_and_subsections() {
    let o = qmig(&[
        "inspect",
        &data("q10-stopped/stream"),
        "--devices",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 32, "ram + 31 devices");
    let cpu = &v["cpu (4)"];
    assert_eq!(cpu["env.regs"].as_array().unwrap().len(), 16);
    assert_eq!(cpu["env.eip"], "0x0000000000007c8a");
    assert_eq!(cpu["env.segs"].as_array().unwrap().len(), 6);
    assert!(cpu["cpu/poll_control_msr"]["env.poll_control_msr"].is_string());
    assert_eq!(
        v["ram (1)"]["section sizes"]["pc.ram"],
        "0x0000000000200000"
    );
    // Key order is the stream's section order, as analyze-migration.py prints it.
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.find("\"timer (0)\"").unwrap() < text.find("\"cpu (4)\"").unwrap());
}

#[test]
fn gzip_input_buffers_devices_until_the_vmdesc() {
    let a = qmig(&[
        "inspect",
        &data("q10-zpd-none/stream.gz"),
        "--devices",
        "--json",
    ]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(json(&a).as_object().unwrap().len(), 32);
}

#[test]
fn text_listing() {
    let o = qmig(&["inspect", &data("q10-stopped/stream"), "--devices"]);
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("section cpu (4): FULL instance 0 version 12: vmsd cpu"),
        "{t}"
    );
    assert!(t.contains("  env.eip = 0x0000000000007c8a (uint64)"), "{t}");
    assert!(
        t.contains("subsection cpu/poll_control_msr version 1:"),
        "{t}"
    );
}

#[test]
fn postcopy_stream_needs_and_takes_another_captures_vmdesc() {
    let s = data("q10-postcopy/stream");
    let o = qmig(&["inspect", &s, "--devices"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--vmdesc FILE"));
    let o = qmig(&[
        "inspect",
        &s,
        "--devices",
        "--json",
        "--vmdesc",
        &data("q10-stopped/stream"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(json(&o)["cpu (4)"]["env.regs"].is_array());
    // A bare JSON works as well.
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-devices-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let vj = dir.join("vmdesc.json");
    let d = qmig(&["inspect", &data("q10-stopped/stream"), "--vmdesc"]);
    assert!(d.status.success());
    std::fs::write(&vj, &d.stdout).unwrap();
    let o2 = qmig(&[
        "inspect",
        &s,
        "--devices",
        "--json",
        "--vmdesc",
        vj.to_str().unwrap(),
    ]);
    assert!(o2.status.success());
    assert_eq!(o.stdout, o2.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vmdesc_of_another_machine_is_reported_per_section() {
    let o = qmig(&[
        "inspect",
        &data("q35-backends/stream"),
        "--devices",
        "--json",
        "--vmdesc",
        &data("q10-stopped/stream"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    let errors = v
        .as_object()
        .unwrap()
        .values()
        .filter(|x| x.get("error").is_some())
        .count();
    assert!(errors > 0);
    assert!(String::from_utf8_lossy(&o.stderr).contains("without a vmdesc entry"));
}

#[test]
fn vmdesc_prints_the_trailer() {
    let o = qmig(&["inspect", &data("q72-plain/stream"), "--vmdesc"]);
    assert!(o.status.success());
    let printed = json(&o);
    let raw = std::fs::read(data("q72-plain/stream")).unwrap();
    let h = qmig_wire::vmdesc::find_trailer(&raw).unwrap();
    let trailer: serde_json::Value = serde_json::from_slice(&raw[h + 6..]).unwrap();
    assert_eq!(printed, trailer);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("{\n    \"page_size\": 4096,"));
}
