//! Hostile-input regression suite (issue 14): one test per kind of attack,
//! each against the real `qmig` binary, each input built here byte by byte
//! (independently of qmig-wire's serializers).
//!
//! Every test also checks the children's peak RSS (getrusage) stays under
//! 64 MiB.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PS: u64 = 4096;
const RAM_ID: u32 = 2;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-hostile-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// A finished child: its output and its peak RSS in bytes.
struct Run {
    out: Output,
    rss: u64,
}

/// Waits for `child` with `wait4` (to get its own peak RSS) for at most
/// `limit`, reading its output meanwhile; kills it after `limit` and fails.
fn wait_measured(mut child: std::process::Child, limit: Duration) -> Run {
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let ro = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = &mut so {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let re = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = &mut se {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let pid = child.id() as libc::pid_t;
    let t = Instant::now();
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: plain syscall with valid out-pointers.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `pid` is our child, not yet reaped.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            let out = Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(status),
                stdout: ro.join().unwrap(),
                stderr: re.join().unwrap(),
            };
            if killed {
                panic!("still running after {limit:?}: {}", text(&out));
            }
            return Run {
                out,
                rss: ru.ru_maxrss as u64 * 1024,
            };
        }
        if t.elapsed() > limit && !killed {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion (at most 5 minutes), checking its peak RSS
/// stays under 64 MiB.
fn run(cmd: &mut Command, what: &str) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    checked(wait_measured(child, Duration::from_secs(300)), what)
}

fn checked(r: Run, what: &str) -> Output {
    assert!(
        r.rss < 64 << 20,
        "{what}: qmig peaked at {} bytes RSS",
        r.rss
    );
    r.out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

// ---- a tiny stream builder -------------------------------------------------------------

/// Builds a migration stream byte by byte.
struct S(Vec<u8>);

impl S {
    /// Header and configuration section for `machine`.
    fn new(machine: &str) -> S {
        let mut b = b"QEVM".to_vec();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.push(0x07);
        b.extend_from_slice(&(machine.len() as u32).to_be_bytes());
        b.extend_from_slice(machine.as_bytes());
        S(b)
    }
    fn u8(&mut self, v: u8) -> &mut S {
        self.0.push(v);
        self
    }
    fn be16(&mut self, v: u16) -> &mut S {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(&mut self, v: u32) -> &mut S {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(&mut self, v: u64) -> &mut S {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn counted(&mut self, s: &str) -> &mut S {
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn cmd(&mut self, cmd: u16, payload: &[u8]) -> &mut S {
        self.u8(0x08).be16(cmd).be16(payload.len() as u16);
        self.0.extend_from_slice(payload);
        self
    }
    fn open_return_path(&mut self) -> &mut S {
        self.cmd(1, &[])
    }
    fn ping(&mut self, v: u32) -> &mut S {
        self.cmd(2, &v.to_be_bytes())
    }
    /// RAM START section: MEM_SIZE of `blocks` (name, length, optional page size), EOS.
    fn ram_start(&mut self, blocks: &[(&str, u64, Option<u64>)]) -> &mut S {
        self.u8(0x01).be32(RAM_ID).counted("ram").be32(0).be32(4);
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.be64(total | 0x04);
        for &(n, len, ps) in blocks {
            self.counted(n).be64(len);
            if let Some(ps) = ps {
                self.be64(ps);
            }
        }
        self.be64(0x10).u8(0x7e).be32(RAM_ID)
    }
    fn ram_part(&mut self) -> &mut S {
        self.u8(0x02).be32(RAM_ID)
    }
    fn ram_section_end(&mut self) -> &mut S {
        self.be64(0x10).u8(0x7e).be32(RAM_ID)
    }
    /// ZERO record (named block unless `None`: CONTINUE).
    fn zero(&mut self, off: u64, block: Option<&str>, fill: u8) -> &mut S {
        match block {
            Some(b) => self.be64(off | 0x02).counted(b),
            None => self.be64(off | 0x02 | 0x20),
        };
        self.u8(fill)
    }
    fn page(&mut self, off: u64, block: Option<&str>, byte: u8) -> &mut S {
        match block {
            Some(b) => self.be64(off | 0x08).counted(b),
            None => self.be64(off | 0x08 | 0x20),
        };
        self.0.extend(std::iter::repeat_n(byte, PS as usize));
        self
    }
    /// RAM END section (EOS), then EOF.
    fn finish(&mut self) -> Vec<u8> {
        self.u8(0x03).be32(RAM_ID).ram_section_end().u8(0x00);
        std::mem::take(&mut self.0)
    }
}

fn write_stream(dir: &Path, bytes: &[u8]) -> PathBuf {
    let p = dir.join("stream");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn extract(dir: &Path, stream: &Path) -> (Output, Value) {
    let out = dir.join("out");
    let o = run(
        qmig().arg("extract").arg(stream).arg("-o").arg(&out),
        "extract",
    );
    let m = manifest(&out);
    (o, m)
}

// ---- linear time ---------------------------------------------------------------------

/// Issue 14 case 2: one POSTCOPY_RAM_DISCARD of 4000 ranges over a whole
/// 512 GiB block (1 TiB took about 18 minutes; blocks are now capped at
/// 512 GiB of 4 KiB pages). Each range now costs the non-zero bitmap words
/// it touches.
#[test]
fn discard_bomb() {
    const BIG: u64 = 512 << 30;
    let dir_tmp = scratch("discard");
    let dir = dir_tmp.path();
    let mut s = S::new("pc-i440fx-10.0");
    s.cmd(3, &[]); // POSTCOPY_ADVISE, 0-length
    s.ram_start(&[("pc.ram", BIG, None)]);
    s.ram_part()
        .page(BIG / 2, Some("pc.ram"), 0xaa)
        .ram_section_end();
    let mut d = vec![0u8];
    d.push(6);
    d.extend_from_slice(b"pc.ram");
    d.push(0);
    for _ in 0..4000 {
        d.extend_from_slice(&0u64.to_be_bytes());
        d.extend_from_slice(&BIG.to_be_bytes());
    }
    s.cmd(6, &d);
    let stream = write_stream(dir, &s.finish());
    let t = Instant::now();
    let (o, m) = extract(dir, &stream);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(m["complete"], true);
    eprintln!("discard bomb: extract took {:?}", t.elapsed());
    let img = dir
        .join("out")
        .join(m["blocks"][0]["file"].as_str().unwrap());
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), BIG);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "the discarded page is a hole again"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---- bounded memory ------------------------------------------------------------------

/// Issue 14 case 3: a million PINGs (9 MB). inspect kept every command
/// (816 MB peak); now it keeps the first 1000 and counts the rest.
#[test]
fn million_pings() {
    let dir_tmp = scratch("pings");
    let dir = dir_tmp.path();
    let mut s = S::new("pc-i440fx-10.0");
    s.open_return_path();
    for i in 0..1_000_000u32 {
        s.ping(i);
    }
    s.ram_start(&[("pc.ram", 16 * PS, None)]);
    let stream = write_stream(dir, &s.finish());
    let o = run(
        qmig().arg("inspect").arg(&stream).arg("--json"),
        "inspect --json",
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["commands"].as_array().unwrap().len(), 1000);
    assert_eq!(v["commands_omitted"], 1_000_001 - 1000);
    assert_eq!(v["command_counts"]["PING"], 1_000_000);
    let o = run(qmig().arg("inspect").arg(&stream), "inspect");
    assert!(o.status.success());
    assert!(
        text(&o).contains("999001 more commands not listed"),
        "{}",
        text(&o)
    );
    let (o, m) = extract(dir, &stream);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(m["complete"], true);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 14 case 3: a 1 GiB host page in a postcopy stream, all ZERO
/// records: extract applied it through a 1 GiB buffer; now target pages
/// go straight to the image.
#[test]
fn gigabyte_host_page() {
    const GIB: u64 = 1 << 30;
    let dir_tmp = scratch("hugepage");
    let dir = dir_tmp.path();
    let mut s = S::new("pc-i440fx-10.0");
    let mut adv = Vec::new();
    adv.extend_from_slice(&(PS | GIB).to_be_bytes());
    adv.extend_from_slice(&PS.to_be_bytes());
    s.open_return_path();
    s.cmd(3, &adv);
    s.ram_start(&[("mem0", GIB, Some(GIB))]);
    s.cmd(4, &[]).cmd(5, &[]); // LISTEN, RUN
    s.ram_part();
    for p in 0..GIB / PS {
        s.zero(p * PS, (p == 0).then_some("mem0"), 0);
    }
    s.ram_section_end();
    let stream = write_stream(dir, &s.finish());
    let (o, m) = extract(dir, &stream);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(m["complete"], true);
    let _ = std::fs::remove_dir_all(dir);
}

// ---- peers -----------------------------------------------------------------------------

/// Starts `qmig recv` on a free port; returns the child and the port.
fn spawn_recv(out: &Path, idle: u64) -> (std::process::Child, u16) {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = qmig()
        .args(["recv", "--listen"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("-o")
        .arg(out)
        .args(["--idle-timeout", &idle.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, port)
}

fn connect(port: u16) -> TcpStream {
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("recv did not listen on {port}");
}

/// Waits for recv, at most `limit`, checking its peak RSS.
fn wait_bounded(child: std::process::Child, limit: Duration) -> Output {
    checked(wait_measured(child, limit), "recv")
}

/// A source that connects, sends `bytes`, then goes silent (socket open).
fn silent_after(bytes: &[u8], tag: &str) {
    let dir_tmp = scratch(tag);
    let dir = dir_tmp.path();
    let out = dir.join("out");
    let (child, port) = spawn_recv(&out, 1);
    let mut s = connect(port);
    s.write_all(bytes).unwrap();
    let o = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let m = manifest(&out);
    assert_eq!(m["complete"], false);
    let err = m["error"].as_str().unwrap();
    assert!(err.contains("--idle-timeout"), "{err}");
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 14 case 2: a peer that connects and sends nothing.
#[test]
fn silent_peer() {
    silent_after(&[], "silent");
}

/// Issue 14 case 2: a peer that stops after the header.
#[test]
fn peer_stops_after_header() {
    let s = S::new("pc-i440fx-10.0");
    silent_after(&s.0, "header");
}

/// Issue 14 case 2: a peer that sends PINGs but never reads the return path:
/// recv stops after --idle-timeout with the reason in the manifest.
#[test]
fn stalled_return_path() {
    let dir_tmp = scratch("stalled");
    let dir = dir_tmp.path();
    let out = dir.join("out");
    let (child, port) = spawn_recv(&out, 1);
    let mut s = S::new("pc-i440fx-10.0");
    s.open_return_path();
    for i in 0..3_000_000u32 {
        s.ping(i);
    }
    let bytes = s.0;
    let mut sock = connect(port);
    let writer = std::thread::spawn(move || {
        // recv stops reading once it gives up: the write then fails.
        let _ = sock.write_all(&bytes);
        sock
    });
    let o = wait_bounded(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let m = manifest(&out);
    assert_eq!(m["complete"], false);
    let err = m["error"].as_str().unwrap();
    assert!(
        err.contains("return path") && err.contains("--idle-timeout"),
        "{err}"
    );
    drop(writer.join().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 14 case 3: RECV_BITMAP outside postcopy recovery. Eight of them in
/// a 222-byte stream made recv send 2 GiB of bitmaps; QEMU refuses them
/// (loadvm_handle_recv_bitmap) and so does qmig: the return path carries
/// only SHUT(1).
#[test]
fn recv_bitmap_flood() {
    let dir_tmp = scratch("recvbitmap");
    let dir = dir_tmp.path();
    let out = dir.join("out");
    let (child, port) = spawn_recv(&out, 5);
    let mut s = S::new("pc-i440fx-10.0");
    s.open_return_path();
    s.ram_start(&[("pc.ram", 512 << 30, None)]);
    let mut name = vec![6u8];
    name.extend_from_slice(b"pc.ram");
    for _ in 0..8 {
        s.cmd(10, &name);
    }
    let bytes = s.finish();
    let mut sock = connect(port);
    sock.write_all(&bytes).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rp = Vec::new();
    let _ = sock.read_to_end(&mut rp);
    let o = wait_bounded(child, Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        rp,
        [0, 1, 0, 4, 0, 0, 0, 1],
        "only SHUT(1) on the return path"
    );
    let m = manifest(&out);
    let err = m["error"].as_str().unwrap();
    assert!(err.contains("loadvm_handle_recv_bitmap"), "{err}");
    // Offline too.
    let stream = write_stream(dir, &bytes);
    let (o, m) = extract(dir, &stream);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(m["error"]
        .as_str()
        .unwrap()
        .contains("loadvm_handle_recv_bitmap"));
    let _ = std::fs::remove_dir_all(dir);
}

/// `send` to a destination that accepts the connection and never reads:
/// it gives up after --idle-timeout.
#[test]
fn send_to_a_destination_that_never_reads() {
    let dir_tmp = scratch("sendstall");
    let dir = dir_tmp.path();
    let cap = qmig_tests::data_dir().join("q10-stopped").join("stream");
    let ram = dir.join("ram");
    let o = qmig()
        .arg("extract")
        .arg(&cap)
        .arg("-o")
        .arg(&ram)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // The peer accepts and never reads, until send has ended (at most 60 s):
    // a fixed hold could end first on a loaded machine, and send would then
    // see the peer go, not its own idle timeout.
    let (done, ended) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let _ = ended.recv_timeout(Duration::from_secs(60));
        drop(s);
    });
    let t = Instant::now();
    let o = run(
        qmig()
            .args(["send", "--ram"])
            .arg(&ram)
            .arg("--template")
            .arg(&cap)
            .arg("--to")
            .arg(format!("tcp:127.0.0.1:{port}"))
            .args(["--idle-timeout", "1"]),
        "send",
    );
    let _ = done.send(());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    assert!(
        text(&o).contains("idle") || text(&o).contains("timed out"),
        "{}",
        text(&o)
    );
    holder.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// ---- parity with QEMU 10's loader ---------------------------------------------------------

/// Issue 14 case 4: a ZERO record with fill byte 0x55 in a QEMU 10.0 stream
/// is refused, as QEMU >= 8.2 refuses it; in a 7.2 stream it is applied and
/// reported as a leniency by inspect and in extract's manifest.
#[test]
fn zero_fill_0x55() {
    for (machine, strict) in [("pc-i440fx-10.0", true), ("pc-i440fx-7.2", false)] {
        let dir_tmp = scratch(&format!("fill-{machine}"));
        let dir = dir_tmp.path();
        let mut s = S::new(machine);
        s.ram_start(&[("pc.ram", 16 * PS, None)]);
        s.ram_part()
            .page(0, Some("pc.ram"), 1)
            .zero(PS, None, 0x55)
            .ram_section_end();
        let stream = write_stream(dir, &s.finish());
        let (o, m) = extract(dir, &stream);
        let v: Value = serde_json::from_slice(
            &run(qmig().arg("inspect").arg(&stream).arg("--json"), "inspect").stdout,
        )
        .unwrap();
        let l = &v["leniencies"][0];
        assert_eq!(l["records"], 1, "{v}");
        if strict {
            assert_eq!(o.status.code(), Some(1), "{}", text(&o));
            assert_eq!(m["complete"], false);
            let err = m["error"].as_str().unwrap();
            assert!(
                err.contains("ram_load_precopy") && err.contains("value 85"),
                "{err}"
            );
            assert!(l["verdict"].as_str().unwrap().starts_with("error"), "{l}");
        } else {
            assert!(o.status.success(), "{}", text(&o));
            assert_eq!(m["complete"], true);
            assert_eq!(m["leniencies"][0]["kind"], "nonzero_zero_fill", "{m}");
            assert_eq!(m["leniencies"][0]["records"], 1);
            assert!(
                l["verdict"].as_str().unwrap().starts_with("leniency"),
                "{l}"
            );
            let img = std::fs::read(
                dir.join("out")
                    .join(m["blocks"][0]["file"].as_str().unwrap()),
            )
            .unwrap();
            assert!(img[4096..8192].iter().all(|&b| b == 0x55));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Summaries keep counts, not lists: 3000 device sections give a manifest
/// listing the first 1000 and counting the rest.
#[test]
fn many_device_sections() {
    let dir_tmp = scratch("devsections");
    let dir = dir_tmp.path();
    let mut s = S::new("pc-i440fx-10.0");
    s.ram_start(&[("pc.ram", 16 * PS, None)]);
    s.u8(0x03).be32(RAM_ID).ram_section_end();
    for i in 0..3000u32 {
        s.u8(0x04).be32(10 + i).counted("timer").be32(i).be32(2);
        s.be64(0x1234).u8(0x7e).be32(10 + i);
    }
    s.u8(0x00);
    let stream = write_stream(dir, &s.0);
    let (o, m) = extract(dir, &stream);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        m["device_state"]["sections"].as_array().unwrap().len(),
        1000
    );
    assert_eq!(m["device_state"]["sections_omitted"], 2000);
    let _ = std::fs::remove_dir_all(dir);
}

/// Bitmap memory: a few kilobytes of ZERO records spread over the largest
/// block touch every page of its two bitmaps (2 bits per target page); the
/// cap on adopted pages keeps that under 64 MiB (a 1 TiB block took 70 MiB,
/// and is now refused).
#[test]
fn bitmap_spread() {
    for (len, ok) in [(512u64 << 30, true), (1 << 40, false)] {
        let dir_tmp = scratch(&format!("spread-{len}"));
        let dir = dir_tmp.path();
        let mut s = S::new("pc-i440fx-7.2");
        s.ram_start(&[("pc.ram", len, None)]);
        s.ram_part();
        let stride = 32768 * PS; // one record per bitmap page
        for i in 0..len / stride {
            s.zero(i * stride, (i == 0).then_some("pc.ram"), 0x55);
        }
        s.ram_section_end();
        let stream = write_stream(dir, &s.finish());
        let (o, m) = extract(dir, &stream);
        assert_eq!(o.status.success(), ok, "{}", text(&o));
        if !ok {
            assert!(m["error"].as_str().unwrap().contains("target pages"), "{m}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
