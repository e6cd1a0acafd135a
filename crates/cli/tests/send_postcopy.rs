//! `qmig send --postcopy` against a fake destination on a Unix socket:
//! hostile page requests, hostile recovery replies and a destination that
//! dies mid-postcopy (no recovery within `--recover-timeout`) end the send
//! with a clear error (exit 1), never a panic or a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qmig_wire::RpMessage;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-sendpc-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
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
    with_fake_destination_and(name, &[], move |s, _| then(s))
}

/// As [`with_fake_destination`], with extra `send` arguments; `then` also
/// gets the listener, to take recovery connections.
fn with_fake_destination_and(
    name: &str,
    extra: &[&str],
    then: impl FnOnce(&mut std::os::unix::net::UnixStream, &UnixListener) + Send + 'static,
) -> (i32, String, Duration) {
    let dir_tmp = scratch(name);
    let dir = dir_tmp.path();
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
        then(&mut s, &l);
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
        .args(extra)
        .output()
        .unwrap();
    let took = t0.elapsed();
    fake.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
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
    // the background scan (64 KiB/s) still has most of RAM to send, and
    // never listens again: send pauses, retries, and gives up after
    // --recover-timeout.
    let (rc, err, took) =
        with_fake_destination_and("killed", &["--recover-timeout", "2"], |s, _| {
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
    assert_eq!(rc, 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("postcopy paused"), "{err}");
    assert!(
        err.contains("postcopy recovery failed: no resumed connection within --recover-timeout 2s"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "took {took:?}: {err}"
    );
}

/// Cuts the connection after RUN, takes the recovery connection, checks
/// that it opens with RECV_BITMAP commands (no QEVM header), and answers
/// the first with `reply`.
fn bad_recovery_reply(
    name: &str,
    reply: impl FnOnce(&mut Vec<u8>) + Send + 'static,
) -> (i32, String, Duration) {
    with_fake_destination_and(name, &["--recover-timeout", "5"], move |s, l| {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let (mut r, _) = l.accept().unwrap();
        r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut first = [0u8; 3];
        r.read_exact(&mut first).unwrap();
        // QEMU_VM_COMMAND, be16 MIG_CMD_RECV_BITMAP (10).
        assert_eq!(first, [0x08, 0x00, 0x0a], "recovery opening");
        let mut b = Vec::new();
        reply(&mut b);
        r.write_all(&b).unwrap();
        let mut sink = [0u8; 65536];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    })
}

#[test]
fn recovery_reply_for_an_unknown_block_fails_the_migration() {
    let (rc, err, took) = bad_recovery_reply("rb-unknown", |b| {
        RpMessage::RecvBitmap {
            block: "nope",
            bitmap: &[0; 8],
        }
        .write(b)
        .unwrap()
    });
    assert_clean_failure(rc, &err, took, "RECV_BITMAP reply for unknown block");
}

#[test]
fn recovery_reply_of_the_wrong_size_fails_the_migration() {
    // pc.ram of q10-stopped: 2 MiB, 512 pages, 64 bytes of bitmap.
    let (rc, err, took) = bad_recovery_reply("rb-size", |b| {
        RpMessage::RecvBitmap {
            block: "pc.ram",
            bitmap: &[0; 8],
        }
        .write(b)
        .unwrap()
    });
    assert_clean_failure(rc, &err, took, "512 pages need 64");
}

#[test]
fn recovery_reply_with_a_wrong_end_marker_fails_the_migration() {
    let (rc, err, took) = bad_recovery_reply("rb-marker", |b| {
        RpMessage::RecvBitmap {
            block: "pc.ram",
            bitmap: &[0; 64],
        }
        .write(b)
        .unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
    });
    assert_clean_failure(rc, &err, took, "end marker");
}

#[test]
fn resume_ack_before_resume_fails_the_migration() {
    let (rc, err, took) = bad_recovery_reply("rb-ack", |b| {
        qmig_wire::recovery::write_resume_ack(b);
    });
    assert_clean_failure(rc, &err, took, "RESUME_ACK in state recovering");
}
