//! `qmig send --postcopy` against a fake destination on a Unix socket:
//! hostile page requests and a destination that dies mid-postcopy end the
//! send with a clear error (exit 1), never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qmig_wire::RpMessage;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qmig-sendpc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// POSTCOPY_RUN as it is on the wire: the switchover is over when it went by.
const RUN: [u8; 5] = [0x08, 0x00, 0x05, 0x00, 0x00];

/// Starts `qmig send --postcopy` to a fake destination that reads the
/// stream up to POSTCOPY_RUN, then does `then` with the socket; returns
/// send's exit code, its stderr and how long it ran.
fn with_fake_destination(
    name: &str,
    then: impl FnOnce(&mut std::os::unix::net::UnixStream) + Send + 'static,
) -> (i32, String, Duration) {
    let dir = scratch(name);
    let cap = qmig_tests::data_dir().join("q10-stopped").join("stream");
    let ram = dir.join("ram");
    let st = qmig()
        .arg("extract")
        .arg(&cap)
        .arg("-o")
        .arg(&ram)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let sock = dir.join("mig.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 65536];
        while !seen.windows(RUN.len()).any(|w| w == RUN) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended before POSTCOPY_RUN");
            seen.extend_from_slice(&buf[..n]);
        }
        then(&mut s);
    });
    let t0 = Instant::now();
    let out = qmig()
        .args([
            "send",
            "--postcopy",
            "--postcopy-after",
            "0",
            "--max-bandwidth",
            "64K",
        ])
        .args(["--idle-timeout", "10", "--ram"])
        .arg(&ram)
        .arg("--template")
        .arg(&cap)
        .arg("--to")
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    let took = t0.elapsed();
    fake.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    )
}

fn send_request(msg: RpMessage<'static>) -> impl FnOnce(&mut std::os::unix::net::UnixStream) {
    move |s| {
        let mut b = Vec::new();
        msg.write(&mut b).unwrap();
        s.write_all(&b).unwrap();
        // Keep reading until the source gives up.
        let mut sink = [0u8; 65536];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
}

fn assert_clean_failure(rc: i32, err: &str, took: Duration, want: &str) {
    assert_eq!(rc, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(want), "expected \"{want}\" in: {err}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
}

#[test]
fn request_for_an_unknown_block_fails_the_migration() {
    let (rc, err, took) = with_fake_destination(
        "unknown",
        send_request(RpMessage::ReqPagesId {
            start: 0,
            len: 4096,
            block: "nope",
        }),
    );
    assert_clean_failure(rc, &err, took, "unknown block");
    assert!(err.contains("return-path offset 0"), "{err}");
}

#[test]
fn req_pages_before_any_block_fails_the_migration() {
    let (rc, err, took) = with_fake_destination(
        "noblock",
        send_request(RpMessage::ReqPages {
            start: 0,
            len: 4096,
        }),
    );
    assert_clean_failure(rc, &err, took, "before any REQ_PAGES_ID");
}

#[test]
fn request_outside_the_block_fails_the_migration() {
    let (rc, err, took) = with_fake_destination(
        "outside",
        send_request(RpMessage::ReqPagesId {
            start: 2 << 20,
            len: 4096,
            block: "pc.ram",
        }),
    );
    assert_clean_failure(rc, &err, took, "past the block's used length");
}

#[test]
fn unaligned_request_fails_the_migration() {
    let (rc, err, took) = with_fake_destination(
        "unaligned",
        send_request(RpMessage::ReqPagesId {
            start: 0x1234,
            len: 4096,
            block: "pc.ram",
        }),
    );
    assert_clean_failure(rc, &err, took, "not aligned");
}

#[test]
fn destination_killed_mid_postcopy_is_a_clear_error() {
    // The fake destination drops the connection right after RUN, while
    // the background scan (64 KiB/s) still has most of RAM to send.
    let (rc, err, took) = with_fake_destination("killed", |s| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    assert_eq!(rc, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("closed its return path during postcopy")
            || err.contains("closed the connection"),
        "{err}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
}
