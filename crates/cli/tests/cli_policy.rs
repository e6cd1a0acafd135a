//! The `qmig` binary as a user and a script see it (issue 15): integrity on
//! interruption and full disks, planted symlinks, one exit-code policy for
//! every subcommand, errors once on stderr (or as JSON), QEMU's size
//! suffixes and URIs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qmig_wire::header::Configuration;
use qmig_wire::{Item, MemBlock, RamRecord, SectionHeader};

const PS: u64 = 4096;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-policy-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

fn capture(name: &str) -> PathBuf {
    qmig_tests::data_dir().join(name).join("stream")
}

/// Exit code, stdout, stderr.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("manifest.json: {e}: {text:?}"))
}

/// A valid stream with one block `pc.ram` of `pages` pages, every page a
/// PAGE record of non-zero bytes, in PART sections of 256 pages.
fn generated_stream(pages: u64) -> Vec<u8> {
    let page: Vec<Vec<u8>> = (0..16u8)
        .map(|i| (0..PS as usize).map(|j| (j as u8) ^ i ^ 0x5a).collect())
        .collect();
    let mut s = Vec::with_capacity(((pages + 16) * (PS + 16)) as usize);
    let head = [
        Item::Header { version: 3 },
        Item::Configuration(Configuration {
            machine: "pc-i440fx-7.2",
            subsections: vec![],
        }),
        Item::Section(SectionHeader::start(2, "ram", 0, 4)),
        Item::Ram(RamRecord::mem_size(vec![MemBlock {
            name: "pc.ram",
            used_length: pages * PS,
            page_size: None,
            addr: None,
        }])),
        Item::Ram(RamRecord::eos()),
        Item::Footer(2),
    ];
    for i in &head {
        i.write(&mut s).unwrap();
    }
    for chunk in (0..pages).collect::<Vec<_>>().chunks(256) {
        Item::Section(SectionHeader::part(2)).write(&mut s).unwrap();
        for (k, &p) in chunk.iter().enumerate() {
            let block = (k == 0).then_some("pc.ram");
            Item::Ram(RamRecord::page(p * PS, block, &page[(p % 16) as usize]))
                .write(&mut s)
                .unwrap();
        }
        Item::Ram(RamRecord::eos()).write(&mut s).unwrap();
        Item::Footer(2).write(&mut s).unwrap();
    }
    for i in [
        Item::Section(SectionHeader::end(2)),
        Item::Ram(RamRecord::eos()),
        Item::Footer(2),
        Item::Eof,
    ] {
        i.write(&mut s).unwrap();
    }
    s
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The "manifest that lies" scenario: extract A into D, then Ctrl-C an
/// extract of B into D in the middle; the manifest must say incomplete and
/// interrupted (how far it got), device-state.bin must be gone, and send
/// must refuse D unless --allow-incomplete.
#[test]
fn interrupted_extract_leaves_an_honest_manifest_and_send_refuses_it() {
    let dir_tmp = scratch("sigint");
    let dir = dir_tmp.path();
    let d = dir.join("out");
    let a = capture("q10-stopped");
    let (rc, _, err) = run(qmig().arg("extract").arg(&a).arg("-o").arg(&d));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(manifest(&d)["complete"], true);

    // B: 8 MiB of pages through a pipe; only the first quarter is written
    // before SIGINT, so the extract is certainly mid-stream.
    let pages = 2048;
    let b = generated_stream(pages);
    let mut child = qmig()
        .args(["extract", "/dev/stdin", "-o"])
        .arg(&d)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let part = b.len() / 4;
    stdin.write_all(&b[..part]).unwrap();
    stdin.flush().unwrap();
    // Wait until the new run has marked the directory and is applying pages.
    let t0 = Instant::now();
    loop {
        let m = std::fs::read_to_string(d.join("manifest.json")).unwrap_or_default();
        if m.contains("\"in_progress\": true") && d.join("pc.ram.img").exists() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "extract never started: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill with a valid pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.starts_with("qmig: extract: interrupted by SIGINT"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one error line: {err}");

    let m = manifest(&d);
    assert_eq!(m["complete"], false, "{m}");
    assert_eq!(m["interrupted"], true, "{m}");
    assert_eq!(m["source"], "/dev/stdin", "not A's manifest: {m}");
    let applied = m["applied_up_to"].as_u64().unwrap();
    assert!(
        applied > 0 && applied <= part as u64,
        "applied_up_to {applied} of {part}"
    );
    assert!(m.get("in_progress").is_none(), "{m}");
    assert!(
        !d.join("device-state.bin").exists(),
        "a cut-off device state is not left behind"
    );
    assert!(!d.join("pc.bios.img").exists(), "A's images were removed");

    // send refuses the mixture, and names the way out.
    let (rc, _, err) = run(qmig()
        .args(["send", "--ram"])
        .arg(&d)
        .arg("--template")
        .arg(&a)
        .arg("--to")
        .arg(format!("file:{}", dir.join("x").display())));
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("incomplete")
            && err.contains("interrupted")
            && err.contains("--allow-incomplete"),
        "{err}"
    );
    assert!(!dir.join("x").exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// Symlinks planted in the output directory are replaced, never followed.
#[test]
fn planted_symlinks_are_not_followed() {
    let dir_tmp = scratch("symlink");
    let dir = dir_tmp.path();
    let d = dir.join("out");
    std::fs::create_dir_all(&d).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for name in [
        "pc.ram.img",
        "device-state.bin",
        "manifest.json",
        "vmdesc.json",
    ] {
        std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
    }
    let (rc, _, err) = run(qmig()
        .arg("extract")
        .arg(capture("q10-stopped"))
        .arg("-o")
        .arg(&d));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for name in [
        "pc.ram.img",
        "device-state.bin",
        "manifest.json",
        "vmdesc.json",
    ] {
        let t = std::fs::symlink_metadata(d.join(name)).unwrap().file_type();
        assert!(t.is_file(), "{name} is a regular file now");
    }
    assert_eq!(manifest(&d)["complete"], true);
    let _ = std::fs::remove_dir_all(dir);
}

/// A full disk: a 1 MiB tmpfs, gone when dropped. Any user the kernel
/// gives user namespaces mounts it in a user and mount namespace of its
/// own (`unshare -rm`, the holder process then sleeps) and reaches it here
/// through `/proc/PID/root` of that process; root without user namespaces
/// mounts it directly.
enum FullDisk {
    /// The process holding the namespace (killed on drop) and the tmpfs
    /// as seen from here.
    Namespace(std::process::Child, PathBuf),
    /// Mounted here (root); unmounted on drop.
    Mounted(PathBuf),
}

impl FullDisk {
    /// Mounts the tmpfs on the empty directory `mnt`, or says why not.
    fn new(mnt: &Path) -> Result<FullDisk, String> {
        let why = match Command::new("unshare")
            .args(["-rm", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=1m none "$0" && echo ready && exec sleep 600"#)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(mut c) => {
                let mut line = String::new();
                // The shell prints `ready` or ends (its stdout closes).
                let _ = BufReader::new(c.stdout.take().unwrap()).read_line(&mut line);
                if line.trim() == "ready" {
                    let seen = Path::new(&format!("/proc/{}/root", c.id()))
                        .join(mnt.strip_prefix("/").unwrap());
                    return Ok(FullDisk::Namespace(c, seen));
                }
                let _ = c.kill();
                let out = c.wait_with_output().unwrap();
                format!(
                    "unshare -rm + mount -t tmpfs: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            }
            Err(e) => format!("unshare: {e}"),
        };
        if !is_root() {
            return Err(format!("{why}; not root either"));
        }
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "none"])
            .arg(mnt)
            .status();
        match st {
            Ok(s) if s.success() => Ok(FullDisk::Mounted(mnt.to_path_buf())),
            st => Err(format!("{why}; mount -t tmpfs as root: {st:?}")),
        }
    }

    /// The tmpfs's root as this process reaches it.
    fn path(&self) -> &Path {
        match self {
            FullDisk::Namespace(_, p) | FullDisk::Mounted(p) => p,
        }
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        match self {
            FullDisk::Namespace(c, _) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            FullDisk::Mounted(p) => {
                let _ = Command::new("umount").arg(&*p).status();
            }
        }
    }
}

/// A full disk (a 1 MiB tmpfs, [`FullDisk`]: any user with user
/// namespaces, or root): the image write that failed is reported
/// with its path, stream offset and OS error, once; the manifest stays
/// parseable and says incomplete. send --to file: reports the real byte
/// count and removes the partial file unless --keep-partial.
#[test]
fn full_disk_is_reported_where_it_happened() {
    let dir_tmp = scratch("enospc");
    let dir = dir_tmp.path();
    let mnt_dir = dir.join("mnt");
    std::fs::create_dir_all(&mnt_dir).unwrap();
    let disk = match FullDisk::new(&mnt_dir) {
        Ok(d) => d,
        Err(why) => {
            // Nothing here can make a disk full without filling a real one.
            eprintln!("full_disk_is_reported_where_it_happened: SKIPPED: no tmpfs to fill: {why}");
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
    };
    let mnt = disk.path().to_path_buf();
    let stream = dir.join("big.stream");
    std::fs::write(&stream, generated_stream(1024)).unwrap();

    let d = mnt.join("out");
    let (rc, out, err) = run(qmig().arg("extract").arg(&stream).arg("-o").arg(&d));
    assert_eq!(rc, 2, "{err}");
    assert!(out.is_empty());
    assert!(err.starts_with("qmig: extract: "), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("pc.ram.img"),
        "the failing file is named: {err}"
    );
    assert!(err.contains("stream offset"), "{err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    let first = err.find("No space left on device").unwrap();
    assert!(
        err.find("manifest").is_none_or(|m| m > first),
        "the image write error comes first: {err}"
    );
    let m = manifest(&d);
    assert_eq!(m["complete"], false, "{m}");
    assert!(!d.join(".manifest.json.tmp").exists());

    // The RAM of the same stream, on a disk with room, sent to the full one.
    let ram = dir.join("ram");
    let (rc, _, err) = run(qmig().arg("extract").arg(&stream).arg("-o").arg(&ram));
    assert_eq!(rc, 0, "{err}");
    std::fs::remove_dir_all(&d).unwrap();
    let target = mnt.join("sent.stream");
    for keep in [false, true] {
        let mut cmd = qmig();
        cmd.args(["send", "--ram"])
            .arg(&ram)
            .arg("--template")
            .arg(&stream)
            .arg("--to")
            .arg(format!("file:{}", target.display()));
        if keep {
            cmd.arg("--keep-partial");
        }
        let (rc, _, err) = run(&mut cmd);
        assert_eq!(rc, 2, "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        let n: u64 = err
            .split("stream offset ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count: {err}"));
        assert!(
            n > 512 << 10,
            "the real byte count, not a buffer start: {n}"
        );
        if keep {
            assert_eq!(std::fs::metadata(&target).unwrap().len(), n);
        } else {
            assert!(!target.exists(), "partial output removed");
        }
    }
    drop(disk);
    let _ = std::fs::remove_dir_all(dir);
}

/// Every subcommand follows the same policy: 0 success, 1 the data says
/// no, 2 usage or environment; the error once on stderr as
/// `qmig: <command>: ...`, nothing on stdout.
#[test]
fn exit_codes_per_subcommand() {
    let dir_tmp = scratch("codes");
    let dir = dir_tmp.path();
    let good = capture("q10-stopped");
    let other = capture("q10-passes");
    let missing = dir.join("missing");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let truncated = dir.join("truncated");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, b"x").unwrap();
    let ram = dir.join("ram");
    assert_eq!(
        run(qmig().arg("extract").arg(&good).arg("-o").arg(&ram)).0,
        0
    );
    let rp_bad = dir.join("rp-bad");
    std::fs::write(&rp_bad, [0u8, 3, 0, 4, 0]).unwrap();
    let p = |x: &Path| x.display().to_string();
    let to = format!("file:{}", dir.join("sent").display());

    // Each case is a command line with {name} placeholders, split on spaces.
    let vars = [
        ("{good}", p(&good)),
        ("{other}", p(&other)),
        ("{missing}", p(&missing)),
        ("{empty}", p(&empty)),
        ("{truncated}", p(&truncated)),
        ("{a_file}", p(&a_file)),
        ("{ram}", p(&ram)),
        ("{rp_bad}", p(&rp_bad)),
        ("{to}", to.clone()),
        ("{dir}", p(dir)),
    ];
    let line = |t: &str| -> Vec<String> {
        t.split_whitespace()
            .map(|w| vars.iter().fold(w.to_string(), |w, (k, v)| w.replace(k, v)))
            .collect()
    };
    let send = "send --ram {ram} --template {good} --to";
    let mut cases: Vec<(Vec<String>, i32)> = [
        ("inspect {good}", 0),
        ("inspect {missing}", 2),
        ("inspect {dir}", 2),
        ("inspect {empty}", 1),
        ("inspect {truncated}", 1),
        ("inspect --records {truncated}", 1),
        ("inspect {good} --return-path {rp_bad}", 1),
        ("inspect --bogus", 2),
        ("roundtrip {good}", 0),
        ("roundtrip {missing}", 2),
        ("roundtrip {dir}", 2),
        ("roundtrip {truncated}", 1),
        ("diff {good} {good}", 0),
        ("diff {good} {other}", 1),
        ("diff {good} {truncated}", 1),
        ("diff {good} {missing}", 2),
        ("extract {good} -o {dir}/x1", 0),
        ("extract {missing} -o {dir}/x2", 2),
        ("extract {good} -o {a_file}", 2),
        ("extract {truncated} -o {dir}/x3", 1),
        ("recv --listen file:{good} -o {dir}/r1", 0),
        ("recv --listen file:{truncated} -o {dir}/r2", 1),
        ("recv --listen file:{missing} -o {dir}/r3", 2),
        ("recv --listen tcp:127.0.0.1 -o {dir}/r4", 2),
        ("recv --listen file:{good} -o {dir}/r5 --save /dev/full", 2),
        ("send --ram {ram} --template {good} --to {to}", 0),
        ("send --ram {missing} --template {good} --to {to}", 2),
        ("send --ram {ram} --template {truncated} --to {to}", 1),
        ("send --ram {ram} --template {good} --to udp:x:1", 2),
        ("send --ram {ram} --template {good} --to {to} --passes 0", 2),
        (
            "send --ram {ram} --template {good} --to {to} --dirty-fraction 5",
            2,
        ),
        (
            "send --ram {ram} --template {good} --to {to} --dirty-fraction nan",
            2,
        ),
        (
            "send --ram {ram} --template {good} --to {to} --compress 1",
            2,
        ),
        ("completions bash", 0),
        ("completions tcsh", 2),
        ("man", 0),
    ]
    .iter()
    .map(|&(t, code)| (line(t), code))
    .collect();
    // A URI with a space: appended whole, not split.
    let mut exec = line(send);
    exec.push("exec:exit 3".into());
    cases.push((exec, 1));
    for (args, want) in cases {
        let (rc, out, err) = run(qmig().args(&args));
        assert_eq!(rc, want, "qmig {args:?}: {out}{err}");
        // "Streams differ" is diff's answer (on stdout), not an error.
        if want != 0 && !(args[0] == "diff" && args[2] == p(&other)) {
            let cmd = &args[0];
            let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("qmig: ")).collect();
            assert!(
                errors.len() == 1 && errors[0].starts_with(&format!("qmig: {cmd}: ")),
                "qmig {args:?}: one error as `qmig: {cmd}: ...`: {err}"
            );
            assert!(!err.contains("Some(") && !err.contains("None"), "{err}");
            // What parsed before a corrupt spot is data worth printing
            // (diff's counts, inspect's summary or listing); every other
            // failure prints nothing on stdout.
            let partial_report = (cmd == "diff" && want == 1)
                || (cmd == "inspect"
                    && (args.contains(&p(&truncated)) || args.contains(&p(&rp_bad))));
            if !partial_report {
                assert!(out.is_empty(), "qmig {args:?}: stdout: {out}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// An empty file is not a stream: no fake summary, the error once.
#[test]
fn empty_input_prints_no_summary_and_json_carries_the_error() {
    let dir_tmp = scratch("empty");
    let dir = dir_tmp.path();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (rc, out, err) = run(qmig().arg("inspect").arg(&empty));
    assert_eq!(rc, 1);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (rc, out, err) = run(qmig().arg("inspect").arg(&empty).arg("--json"));
    assert_eq!(rc, 1);
    assert!(err.is_empty(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "data");
    assert_eq!(v["error"]["exit_code"], 1);
    assert!(v["error"]["offset"].is_u64());
    let (rc, out, _) = run(qmig().arg("inspect").arg(dir.join("nope")).arg("--json"));
    assert_eq!(rc, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "io");
    let (rc, out, _) = run(qmig()
        .args(["send", "--json", "--ram"])
        .arg(dir.join("nope"))
        .arg("--template")
        .arg(capture("q10-stopped"))
        .args(["--to", "file:/dev/null"]));
    assert_eq!(rc, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["exit_code"], 2);
    // A truncated stream in --json: the summary with an error object.
    let bytes = std::fs::read(capture("q10-stopped")).unwrap();
    let t = dir.join("t");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    let (rc, out, err) = run(qmig().arg("inspect").arg(&t).arg("--json"));
    assert_eq!(rc, 1);
    assert!(err.is_empty(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "data");
    assert!(v["totals"]["page"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// inspect --records --json: one JSON object per line, with filters.
#[test]
fn records_json_lines_with_filters() {
    let s = capture("q10-stopped");
    let (rc, out, err) = run(qmig()
        .args([
            "inspect",
            "--records",
            "--json",
            "--block",
            "pc.ram",
            "--kind",
            "page",
        ])
        .arg(&s));
    assert_eq!(rc, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for v in &lines {
        assert_eq!(v["kind"], "PAGE");
        assert_eq!(v["block"], "pc.ram");
        assert!(v["offset"].is_u64() && v["page_offset"].is_u64());
    }
    let (_, all, _) = run(qmig().args(["inspect", "--json", "--records"]).arg(&s));
    let n_all = all.lines().count();
    assert!(n_all > lines.len());
    let v: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    assert_eq!(v["kind"], "HEADER");
    let (rc, _, err) = run(qmig().args(["inspect", "--kind", "PAGE"]).arg(&s));
    assert_eq!(rc, 2, "--kind needs --records: {err}");
}

/// Sizes with QEMU's suffixes; ranges checked by the parser.
#[test]
fn size_suffixes_are_accepted() {
    let dir_tmp = scratch("sizes");
    let dir = dir_tmp.path();
    let cap = capture("q10-stopped");
    let ram = dir.join("ram");
    assert_eq!(
        run(qmig().arg("extract").arg(&cap).arg("-o").arg(&ram)).0,
        0
    );
    let to = format!("file:{}", dir.join("out").display());
    let base = |extra: &[&str]| {
        let mut c = qmig();
        c.args(["send", "--passes", "2", "--ram"])
            .arg(&ram)
            .arg("--template")
            .arg(&cap)
            .args(["--to", &to])
            .args(extra);
        c
    };
    let (rc, _, err) = run(&mut base(&[
        "--xbzrle",
        "--cache-size",
        "64M",
        "--max-bandwidth",
        "1G",
    ]));
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = run(&mut base(&["--xbzrle", "--cache-size", "0.5M"]));
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = run(&mut base(&["--xbzrle", "--cache-size", "64X"]));
    assert_eq!(rc, 2);
    assert!(err.contains("\"X\""), "{err}");
    let (rc, _, err) = run(&mut base(&["--max-bandwidth", "-1"]));
    assert_eq!(rc, 2, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// --compress is refused for a QEMU >= 9.1 machine type (with the reason),
/// accepted for QEMU 7.2; a layout that does not match the template is an
/// error unless --force.
#[test]
fn send_safety_checks() {
    let dir_tmp = scratch("safety");
    let dir = dir_tmp.path();
    let q72 = capture("q72-plain");
    let q10 = capture("q10-stopped");
    let ram = dir.join("ram");
    assert_eq!(
        run(qmig().arg("extract").arg(&q72).arg("-o").arg(&ram)).0,
        0
    );
    let to = format!("file:{}", dir.join("out").display());
    let send = |tpl: &Path, extra: &[&str]| {
        run(qmig()
            .args(["send", "--ram"])
            .arg(&ram)
            .arg("--template")
            .arg(tpl)
            .args(["--to", &to])
            .args(extra))
    };
    let (rc, _, err) = send(&q72, &["--compress", "1"]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = send(&q10, &["--compress", "1"]);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("pc-i440fx-10.0") && err.contains("9.1"),
        "{err}"
    );

    // A layout that differs: one block shorter than the template's.
    let small = dir.join("small");
    assert_eq!(
        run(qmig().arg("extract").arg(&q72).arg("-o").arg(&small)).0,
        0
    );
    let mpath = small.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    let b = m["blocks"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|b| b["name"] == "pc.ram")
        .unwrap();
    b["length"] = serde_json::json!(1 << 20);
    let file = small.join(b["file"].as_str().unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let send_small = |extra: &[&str]| {
        run(qmig()
            .args(["send", "--ram"])
            .arg(&small)
            .arg("--template")
            .arg(&q72)
            .args(["--to", &to])
            .args(extra))
    };
    let (rc, _, err) = send_small(&[]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("pc.ram") && err.contains("--force"), "{err}");
    let (rc, _, err) = send_small(&["--force"]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("warning"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// send --to unix:PATH and recv --listen unix:PATH / tcp::PORT.
#[test]
fn unix_and_all_interfaces_uris() {
    let dir_tmp = scratch("uris");
    let dir = dir_tmp.path();
    let cap = capture("q10-stopped");
    let ram = dir.join("ram");
    assert_eq!(
        run(qmig().arg("extract").arg(&cap).arg("-o").arg(&ram)).0,
        0
    );

    // send to a Unix socket: the bytes are the capture, regenerated.
    let sock = dir.join("dst.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    });
    let (rc, _, err) = run(qmig()
        .args(["send", "--ram"])
        .arg(&ram)
        .arg("--template")
        .arg(&cap)
        .arg("--to")
        .arg(format!("unix:{}", sock.display())));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(reader.join().unwrap(), std::fs::read(&cap).unwrap());

    // recv on a Unix socket.
    let bytes = std::fs::read(&cap).unwrap();
    let rsock = dir.join("recv.sock");
    let out = dir.join("r-unix");
    let mut child = qmig()
        .args(["recv", "--listen"])
        .arg(format!("unix:{}", rsock.display()))
        .arg("-o")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&rsock) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("recv never listened: {e}"),
        }
    };
    s.write_all(&bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success());
    assert_eq!(manifest(&out)["complete"], true);
    assert!(!rsock.exists(), "the socket file is removed");

    // recv on tcp::0 (every interface): the port is on the listening line.
    let out = dir.join("r-tcp");
    let mut child = qmig()
        .args(["recv", "--listen", "tcp::0", "-o"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port: u16 = first
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success());
    assert_eq!(manifest(&out)["complete"], true);
    let _ = std::fs::remove_dir_all(dir);
}

/// Completions and the man page come from the clap definitions.
#[test]
fn completions_and_man_page() {
    for sh in ["bash", "zsh", "fish"] {
        let (rc, out, err) = run(qmig().args(["completions", sh]));
        assert_eq!(rc, 0, "{err}");
        assert!(out.contains("qmig") && out.contains("extract"), "{sh}");
    }
    let (rc, out, _) = run(qmig().arg("man"));
    assert_eq!(rc, 0);
    assert!(
        out.contains(".TH qmig") || out.contains(".TH QMIG"),
        "{}",
        &out[..200.min(out.len())]
    );
    let (rc, out, _) = run(qmig().arg("--help"));
    assert_eq!(rc, 0);
    assert!(out.contains("Exit status") && out.contains("130"), "{out}");
}

/// Ctrl-C during recv: exit 130, the manifest says interrupted and how far
/// it got, and the cut-off device-state.bin is removed.
#[test]
fn interrupted_recv_removes_device_state() {
    let dir_tmp = scratch("recv-int");
    let dir = dir_tmp.path();
    let bytes = std::fs::read(capture("q10-stopped")).unwrap();
    let sock = dir.join("recv.sock");
    let out = dir.join("out");
    let mut child = qmig()
        .args(["recv", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("-o")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("recv never listened: {e}"),
        }
    };
    let half = bytes.len() / 2;
    s.write_all(&bytes[..half]).unwrap();
    // Wait until recv has applied what it got (it then blocks on the socket).
    let t0 = Instant::now();
    while !out.join("pc.ram.img").exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "recv never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill with a valid pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(143), "{err}");
    assert!(err.contains("qmig: recv: interrupted by SIGTERM"), "{err}");
    let m = manifest(&out);
    assert_eq!(m["complete"], false);
    assert_eq!(m["interrupted"], true);
    let applied = m["applied_up_to"].as_u64().unwrap();
    assert!(applied > 0 && applied <= half as u64, "{applied}");
    assert!(m["device_state"].is_null(), "{m}");
    assert!(!out.join("device-state.bin").exists());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
