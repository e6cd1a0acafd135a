//! `qmig convert` end to end: libvirt save images stay libvirt save images
//! (same XML and cookie), `--compress-output`, stdin input, `--report
//! --json`, and the temporary name: a failed conversion leaves neither OUT
//! nor temporary files behind; mapped-ram files both ways (`--format
//! mapped-ram`, mapped-ram input) and `send --mapped-ram`. Memory is
//! compared through `qmig extract`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-convert-cli-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

fn data(p: &str) -> PathBuf {
    qmig_tests::data_dir().join(p)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    qmig()
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The images a complete extract wrote into `dir`: (block name, bytes), in
/// the manifest's order.
fn images(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let m: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap())
        .expect("manifest");
    assert_eq!(m["complete"], true);
    m["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                std::fs::read(dir.join(b["file"].as_str().unwrap())).unwrap(),
            )
        })
        .collect()
}

/// `qmig extract`'s images of `stream`: (block name, bytes).
fn extract(stream: &Path, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let o = run(&[&"extract", &stream, &"-o", &dir]);
    ok(&o);
    images(dir)
}

/// The directory holds exactly `names` (no temporary files left).
fn only(dir: &Path, names: &[&str]) {
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "files in {}", dir.display());
}

fn inspect_json(p: &Path) -> Value {
    let o = run(&[&"inspect", &"--json", &p]);
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn libvirt_images_stay_libvirt_images() {
    for name in ["raw", "gzip", "bzip2", "xz"] {
        let d_tmp = scratch(&format!("libvirt-{name}"));
        let d = d_tmp.path();
        let out_dir = d.join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let input = data(&format!("libvirt-save/{name}.sav"));
        let out = out_dir.join("converted.sav");
        ok(&run(&[&"convert", &input, &out]));
        only(&out_dir, &["converted.sav"]);
        // Same domain XML and cookie.
        let xml = |p: &Path| {
            let o = run(&[&"inspect", &p, &"--libvirt-xml"]);
            ok(&o);
            o.stdout
        };
        assert_eq!(xml(&out), xml(&input), "{name}: XML differs");
        let j = inspect_json(&out);
        let c = &j["container"][0];
        assert_eq!(c["kind"], "libvirt", "{name}: {j}");
        assert_eq!(c["format"], "raw", "{name}");
        let i = &inspect_json(&input)["container"];
        let lv = i
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["kind"] == "libvirt")
            .unwrap();
        for k in [
            "data_len",
            "cookie_offset",
            "was_running",
            "version",
            "byte_order",
        ] {
            assert_eq!(c[k], lv[k], "{name}: {k}");
        }
        assert_eq!(
            extract(&out, &d.join("a")),
            extract(&input, &d.join("b")),
            "{name}: memory differs"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn compressed_outputs() {
    let input = data("q10-xbzrle/stream");
    let d_tmp = scratch("compress");
    let d = d_tmp.path();
    let want = extract(&input, &d.join("want"));
    for (c, magic) in [
        ("gzip", &[0x1f, 0x8b][..]),
        ("zstd", &[0x28, 0xb5, 0x2f, 0xfd][..]),
        ("xz", &[0xfd, b'7', b'z', b'X', b'Z', 0][..]),
    ] {
        let out = d.join(format!("out.{c}"));
        ok(&run(&[&"convert", &input, &out, &"--compress-output", &c]));
        let b = std::fs::read(&out).unwrap();
        assert!(b.starts_with(magic), "{c}: magic");
        assert_eq!(extract(&out, &d.join(c)), want, "{c}: memory differs");
    }
    // A libvirt image with a compressed payload: format field set to match.
    let out = d.join("lv.sav");
    ok(&run(&[
        &"convert",
        &data("libvirt-save/raw.sav"),
        &out,
        &"--compress-output",
        &"zstd",
    ]));
    let j = inspect_json(&out);
    assert_eq!(j["container"][0]["kind"], "libvirt");
    assert_eq!(j["container"][0]["format"], "zstd");
    assert_eq!(
        extract(&out, &d.join("lv")),
        extract(&data("libvirt-save/raw.sav"), &d.join("lv-in"))
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn report_json_and_stdin() {
    let input = data("q10-xbzrle/stream");
    let bytes = std::fs::read(&input).unwrap();
    let d_tmp = scratch("report");
    let d = d_tmp.path();
    let out = d.join("out");
    let mut child = qmig()
        .args(["convert", "-"])
        .arg(&out)
        .args(["--report", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let o = child.wait_with_output().unwrap();
    w.join().unwrap();
    ok(&o);
    let r: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let before = &r["pages_before"];
    let after = &r["pages_after"];
    // QEMU's own counters for this capture (oracle.json): 1280 XBZRLE pages.
    assert_eq!(before["xbzrle"], 1280);
    assert_eq!(after["xbzrle"], 0);
    assert_eq!(after["compressed"], 0);
    // pc.ram 2 MiB + ROM blocks: every page of every block once.
    let pages: u64 = r["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["length"].as_u64().unwrap() / 4096)
        .sum();
    assert_eq!(after["total"].as_u64().unwrap(), pages);
    assert_eq!(
        r["output_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    let ratio = r["compaction_ratio"].as_f64().unwrap();
    assert!(ratio > 1.4, "ratio {ratio}");
    let i = inspect_json(&out);
    assert_eq!(i["totals"]["page"], after["page"]);
    assert_eq!(i["totals"]["zero"], after["zero"]);
    // Text form names the same numbers.
    let o = run(&[&"convert", &input, &d.join("out2"), &"--report"]);
    ok(&o);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("compaction ratio"), "{t}");
    assert!(t.contains("xbzrle"), "{t}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn failed_conversion_leaves_nothing() {
    let d_tmp = scratch("fail");
    let d = d_tmp.path();
    let stream = std::fs::read(data("q10-passes/stream")).unwrap();
    let cut = d.join("cut.stream");
    std::fs::write(&cut, &stream[..stream.len() / 2]).unwrap();
    let out_dir = d.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // An existing OUT is not touched by a failed conversion.
    std::fs::write(out_dir.join("keep"), b"old").unwrap();
    let o = run(&[&"convert", &cut, &out_dir.join("keep")]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("offset"), "{e}");
    assert!(e.contains("nothing written"), "{e}");
    assert_eq!(std::fs::read(out_dir.join("keep")).unwrap(), b"old");
    only(&out_dir, &["keep"]);
    // mapped-ram output that cannot be: refused with the reason, nothing left.
    for (input, extra, want) in [
        (
            data("q10-passes/stream"),
            &["--compress-output", "zstd"][..],
            "cannot be compressed",
        ),
        (data("libvirt-save/raw.sav"), &[][..], "libvirt save image"),
        (
            data("q72-no-config/stream"),
            &[][..],
            "no configuration section",
        ),
    ] {
        if !input.exists() {
            panic!("{} missing", input.display());
        }
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"convert", &input, &"--format", &"mapped-ram"];
        let target = out_dir.join("m");
        args.push(&target);
        for e in extra {
            args.push(e);
        }
        let o = run(&args);
        assert!(!o.status.success(), "{}", input.display());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{}: {e}", input.display());
        only(&out_dir, &["keep"]);
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// Allocated bytes of a file (sparse files allocate less than their length).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn mapped_ram_both_ways() {
    let d_tmp = scratch("mapped");
    let d = d_tmp.path();
    // Streams (one pass, several passes, XBZRLE, COMPRESS_PAGE, postcopy) to
    // mapped-ram files, and QEMU 10's mapped-ram files (plain and multifd)
    // to streams and to mapped-ram again: each output re-serializes to its
    // bytes and leaves the memory of its input.
    for (i, name) in [
        "q10-stopped/stream",
        "q10-passes/stream",
        "q10-xbzrle/stream",
        "q72-compress/stream",
        "q10-postcopy/stream",
        "field/mapped-ram-file/stream.gz",
        "multifd/mapped-ram-multifd4/stream.gz",
    ]
    .iter()
    .enumerate()
    {
        let input = data(name);
        let want = extract(&input, &d.join(format!("want{i}")));
        let in_mapped = name.contains("mapped-ram");
        for format in ["mapped-ram", "stream"] {
            if format == "stream" && !in_mapped {
                continue; // covered by the stream tests
            }
            let out = d.join(format!("out{i}.{format}"));
            let o = run(&[
                &"convert",
                &input,
                &out,
                &"--format",
                &format,
                &"--report",
                &"--json",
            ]);
            ok(&o);
            let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(rep["format"], format, "{name}");
            let o = run(&[&"roundtrip", &out]);
            ok(&o);
            let j = inspect_json(&out);
            let caps: Vec<&str> = j["capabilities"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert_eq!(
                caps.contains(&"mapped-ram"),
                format == "mapped-ram",
                "{name}"
            );
            if format == "mapped-ram" {
                assert_eq!(j["totals"]["page"], rep["pages_after"]["page"], "{name}");
                let len = std::fs::metadata(&out).unwrap().len();
                assert!(allocated(&out) < len, "{name}: not sparse");
            }
            let got = extract(&out, &d.join(format!("got{i}{format}")));
            assert_eq!(got.len(), want.len(), "{name}");
            for ((n, a), (m, b)) in got.iter().zip(&want) {
                assert_eq!(n, m);
                assert!(a == b, "{name} -> {format}: block {n} differs");
            }
            only_no_temp(d);
        }
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// No temporary name of convert is left in `dir`.
fn only_no_temp(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains("qmig-convert"), "left behind: {n}");
    }
}

#[test]
fn send_mapped_ram_writes_the_ram() {
    let d_tmp = scratch("send-mapped");
    let d = d_tmp.path();
    let tpl = data("q10-xbzrle/stream");
    let want = extract(&tpl, &d.join("ram"));
    let out = d.join("out.mapped");
    let to = format!("file:{}", out.display());
    let o = run(&[
        &"send",
        &"--ram",
        &d.join("ram"),
        &"--template",
        &tpl,
        &"--to",
        &to,
        &"--mapped-ram",
        &"--json",
    ]);
    ok(&o);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["mapped_ram"], true);
    ok(&run(&[&"roundtrip", &out]));
    let got = extract(&out, &d.join("got"));
    assert_eq!(got, want);
    let i = inspect_json(&out);
    assert_eq!(i["totals"]["page"], j["normal"]);
    // Only to a file, and not with options of a streamed migration.
    let ram = d.join("ram");
    for extra in [&["--xbzrle"][..], &["--passes", "2"][..]] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"send",
            &"--ram",
            &ram,
            &"--template",
            &tpl,
            &"--to",
            &to,
            &"--mapped-ram",
        ];
        for e in extra {
            args.push(e);
        }
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}");
    }
    let o = run(&[
        &"send",
        &"--ram",
        &ram,
        &"--template",
        &tpl,
        &"--to",
        &"tcp:127.0.0.1:1",
        &"--mapped-ram",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("file:"));
    std::fs::remove_dir_all(d).unwrap();
}

/// Every committed capture, from a plain file (so `convert` maps it and its
/// image refers to the input's pages instead of copying them): the
/// converted stream's memory equals the input's, for XBZRLE (pages
/// materialized before decoding), COMPRESS_PAGE, postcopy discards and
/// multi-pass inputs alike; the mapped-ram output of the multi-pass ones too.
#[test]
fn every_capture_from_a_mapped_file_keeps_its_memory() {
    let caps = qmig_tests::captures();
    assert!(caps.len() >= 20, "corpus missing: {} captures", caps.len());
    let d_tmp = scratch("every");
    let d = d_tmp.path();
    for c in &caps {
        let input = d.join(format!("{}.stream", c.name));
        std::fs::write(&input, &c.stream).unwrap();
        let want = extract(&input, &d.join(format!("{}.want", c.name)));
        let out = d.join(format!("{}.conv", c.name));
        ok(&run(&[&"-q", &"convert", &input, &out]));
        let got = extract(&out, &d.join(format!("{}.got", c.name)));
        assert!(got == want, "{}: memory differs after convert", c.name);
        if ["q10-xbzrle", "q10-passes", "q10-postcopy", "q72-compress"].contains(&c.name.as_str()) {
            let mr = d.join(format!("{}.mr", c.name));
            ok(&run(&[
                &"-q",
                &"convert",
                &input,
                &mr,
                &"--format",
                &"mapped-ram",
            ]));
            let got = extract(&mr, &d.join(format!("{}.mrgot", c.name)));
            // Pages that stayed zero are holes of the mapped-ram file.
            for ((n, a), (m, b)) in got.iter().zip(&want) {
                assert_eq!(n, m);
                assert!(
                    a == b,
                    "{}: {n} differs after convert --format mapped-ram",
                    c.name
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(d);
}

/// The files of a committed capture set as `qmig` arguments: the main
/// connections in order (`main-N.bin.gz`, or `conn-0.bin.gz` of a multifd
/// set, or `stream.gz`), then `--preempt-channel preempt-N.bin.gz` and
/// `--multifd-channel conn-N.bin.gz` (N ≥ 1).
fn capture_set_args(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // main-1 < main-2 < ... (one digit in the committed sets; sorted by number).
    let num = |n: &str| -> u32 {
        n.trim_end_matches(".bin.gz")
            .rsplit('-')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    names.sort_by_key(|n| (num(n), n.clone()));
    let mut mains = Vec::new();
    let mut opts = Vec::new();
    for n in &names {
        let p = dir.join(n);
        if n.starts_with("main-") || n == "conn-0.bin.gz" || n == "stream.gz" {
            mains.push(p);
        } else if n.starts_with("preempt-") {
            opts.push(PathBuf::from("--preempt-channel"));
            opts.push(p);
        } else if n.starts_with("conn-") {
            opts.push(PathBuf::from("--multifd-channel"));
            opts.push(p);
        }
    }
    assert!(!mains.is_empty(), "{}: no main connection", dir.display());
    mains.extend(opts);
    mains
}

/// `qmig extract` of a whole capture set (several files).
fn extract_set(set: &[PathBuf], dir: &Path) -> Vec<(String, Vec<u8>)> {
    let o = qmig()
        .arg("-q")
        .arg("extract")
        .args(set)
        .arg("-o")
        .arg(dir)
        .output()
        .unwrap();
    ok(&o);
    images(dir)
}

/// Every committed capture set of several connections (recovered postcopy:
/// main connections, preempt channels; multifd: main stream and channels)
/// converts to one plain precopy stream, and to a mapped-ram file, whose
/// memory `extract` finds byte-equal to the set's, that re-serializes to
/// its bytes, and that holds no multifd, recovery or postcopy command.
#[test]
fn every_capture_set_converts_to_one_stream() {
    let d_tmp = scratch("sets");
    let d = d_tmp.path();
    let mut sets = Vec::new();
    for group in ["recovery", "multifd"] {
        for e in std::fs::read_dir(data(group)).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sets.push(p);
            }
        }
    }
    sets.sort();
    assert!(sets.len() >= 7, "capture sets missing: {sets:?}");
    let (mut recovered, mut multifd) = (0, 0);
    for (i, dir) in sets.iter().enumerate() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let set = capture_set_args(dir);
        let several_mains = set
            .iter()
            .filter(|p| p.to_string_lossy().contains("main-"))
            .count()
            > 1;
        let has_multifd = set.iter().any(|p| p == Path::new("--multifd-channel"));
        recovered += usize::from(several_mains);
        multifd += usize::from(has_multifd);
        let want = extract_set(&set, &d.join(format!("want{i}")));
        for format in ["stream", "mapped-ram"] {
            let out = d.join(format!("{name}.{format}"));
            let o = qmig()
                .arg("convert")
                .args(&set)
                .arg(&out)
                .args(["--format", format, "--report", "--json"])
                .output()
                .unwrap();
            ok(&o);
            let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
            let dropped = &rep["dropped_commands"];
            if has_multifd {
                assert!(
                    dropped["MULTIFD_FLUSH"].as_u64().unwrap_or(0) > 0,
                    "{name}: {rep}"
                );
            }
            if several_mains {
                assert!(dropped["POSTCOPY_RUN"].as_u64() == Some(1), "{name}: {rep}");
            }
            let o = run(&[&"roundtrip", &out]);
            ok(&o);
            assert!(
                String::from_utf8_lossy(&o.stdout).contains("identical"),
                "{name}"
            );
            let j = inspect_json(&out);
            assert_eq!(j["totals"]["multifd_flush"], 0, "{name}");
            let cmds: Vec<&str> = j["command_counts"]
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            assert!(
                cmds.iter().all(|c| *c == "SWITCHOVER_START"),
                "{name} -> {format}: commands left {cmds:?}"
            );
            let got = extract(&out, &d.join(format!("got{i}{format}")));
            assert_eq!(got.len(), want.len(), "{name}");
            for ((n, a), (m, b)) in got.iter().zip(&want) {
                assert_eq!(n, m, "{name}");
                assert!(a == b, "{name} -> {format}: block {n} differs");
            }
            only_no_temp(d);
        }
    }
    assert!(recovered >= 3 && multifd >= 3, "{recovered} {multifd}");
    std::fs::remove_dir_all(d).unwrap();
}
