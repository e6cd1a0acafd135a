//! `qmig recv`: a live precopy destination for a real QEMU source.
//!
//! Listens on `tcp:HOST:PORT`, takes one incoming migration and applies it
//! as it arrives with the same code as `qmig extract` (block images mapped in
//! DIR, `device-state.bin`, `vmdesc.json`, `manifest.json`). If the source
//! opens a return path it answers PINGs and, once the stream is complete, sends
//! SHUT(0) (SHUT(1) after an error), which QEMU waits for before it reports
//! `completed`. The end of the stream is found by the decoder (EOF, then the
//! vmdesc trailer), not by the socket closing: a source with a return path
//! keeps the socket open until it gets SHUT.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use qmig_ram_dst::{Action, Layout, LocalBlock, Placement, PostcopyState};
use qmig_wire::{Item, RpMessage, StreamReader};
use serde_json::{json, Value};

use crate::extract::{Session, StopError};
use crate::postcopy::{lock, Inner, RecvMemory, Running};

/// How long to wait for the vmdesc trailer once EOF was read.
const AFTER_EOF_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket as the stream reader sees it: every byte read is also saved
/// (`--save`), and once EOF was decoded a read timeout counts as the end;
/// before that, a read timeout (`--idle-timeout`) is an error naming it.
struct Tee {
    sock: TcpStream,
    idle: Duration,
    save: Option<BufWriter<File>>,
    received: Rc<Cell<u64>>,
    after_eof: Rc<Cell<bool>>,
    save_error: Rc<Cell<bool>>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.sock.read(buf) {
            Ok(n) => n,
            Err(e)
                if self.after_eof.get()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                0
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the source sent nothing for {} s (--idle-timeout)",
                        self.idle.as_secs_f64()
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        self.received.set(self.received.get() + n as u64);
        if let Some(s) = &mut self.save {
            if s.write_all(&buf[..n]).is_err() {
                self.save_error.set(true);
                self.save = None;
            }
        }
        Ok(n)
    }
}

/// Parses `tcp:HOST:PORT`.
fn parse_listen(s: &str) -> Result<String, String> {
    let Some(rest) = s.strip_prefix("tcp:") else {
        return Err(format!("--listen {s}: only tcp:HOST:PORT is supported"));
    };
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(rest.to_string()),
        _ => Err(format!("--listen {s}: expected tcp:HOST:PORT")),
    }
}

/// Reads a block layout (`{"blocks":[{"name","length", "max_length"?, "page_size"?, "resizable"?}]}`,
/// e.g. a manifest.json written by extract or recv).
fn read_layout(path: &Path) -> Result<Layout, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(list) = v.get("blocks").and_then(Value::as_array) else {
        return Err(format!("{}: no \"blocks\" array", path.display()));
    };
    let mut blocks = Vec::new();
    for b in list {
        let name = b.get("name").and_then(Value::as_str);
        let len = b.get("length").and_then(Value::as_u64);
        let (Some(name), Some(len)) = (name, len) else {
            return Err(format!(
                "{}: every block needs \"name\" and \"length\"",
                path.display()
            ));
        };
        let mut lb = LocalBlock::fixed(name, len);
        if let Some(m) = b.get("max_length").and_then(Value::as_u64) {
            lb.max_length = m;
        }
        if let Some(p) = b.get("page_size").and_then(Value::as_u64) {
            lb.page_size = p;
        }
        if let Some(r) = b.get("resizable").and_then(Value::as_bool) {
            lb.resizable = r;
        }
        blocks.push(lb);
    }
    Ok(Layout::Fixed(blocks))
}

fn progress() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} recv {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

pub fn run(
    listen: &str,
    outdir: &Path,
    blocks: Option<&Path>,
    save: Option<&Path>,
    idle: Duration,
    touch: usize,
) -> Result<ExitCode, String> {
    let addr = parse_listen(listen)?;
    let layout = match blocks {
        Some(p) => read_layout(p)?,
        None => Layout::Adopt,
    };
    let listener = TcpListener::bind(&addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    receive(listener, outdir, layout, save, listen, idle, touch)
}

/// How long the end of a migration waits for `--touch` threads.
const TOUCH_WAIT: Duration = Duration::from_secs(10);

/// Takes one migration on `listener` (see the module documentation).
fn receive(
    listener: TcpListener,
    outdir: &Path,
    layout: Layout,
    save: Option<&Path>,
    listen: &str,
    idle: Duration,
    touch: usize,
) -> Result<ExitCode, String> {
    if idle.is_zero() {
        return Err("--idle-timeout must be at least 1 second".into());
    }
    std::fs::create_dir_all(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    let mem = RecvMemory::create(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    // Emit: postcopy host pages are placed by the host (UFFDIO_COPY once
    // registered), which reports each placement back.
    let session = Session::new(outdir, mem, layout, Placement::Emit, listen.to_string())?;
    let save_file = match save {
        Some(p) => Some(BufWriter::with_capacity(
            1 << 20,
            File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => None,
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("qmig recv: listening on {local}");
    let (sock, peer) = listener
        .accept()
        .map_err(|e| format!("accept on {local}: {e}"))?;
    drop(listener);
    let _ = sock.set_nodelay(true);
    // A source that stops sending, or a return path nobody reads, ends the
    // migration after `idle` instead of stalling it forever.
    sock.set_read_timeout(Some(idle))
        .and_then(|()| sock.set_write_timeout(Some(idle)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    eprintln!("qmig recv: migration from {peer}");
    let rp_sock = sock.try_clone().map_err(|e| e.to_string())?;
    let timeout_sock = sock.try_clone().map_err(|e| e.to_string())?;
    let ctl_sock = sock.try_clone().map_err(|e| e.to_string())?;
    let received = Rc::new(Cell::new(0u64));
    let after_eof = Rc::new(Cell::new(false));
    let save_error = Rc::new(Cell::new(false));
    let tee = Tee {
        sock,
        idle,
        save: save_file,
        received: received.clone(),
        after_eof: after_eof.clone(),
        save_error: save_error.clone(),
    };
    let inner = Arc::new(Mutex::new(Inner::new(session, rp_sock, idle)));
    let host = Running::start(&inner, ctl_sock, touch);
    let mut rd = StreamReader::new(tee);
    let pb = progress();
    let started = Instant::now();
    let mut pending: Vec<Action> = Vec::new();
    let mut out = Vec::new();
    let mut n = 0u32;
    let result: Result<(), StopError> = loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) => break Ok(()),
            Err(e) => break Err(StopError::Wire(e)),
        };
        let mut g = lock(&inner);
        n = n.wrapping_add(1);
        if n.is_multiple_of(1024) {
            let st = g.session.dst.stats();
            pb.set_message(format!(
                "{:.1} MiB, {} pages, {} zero, {} xbzrle, {} requested",
                received.get() as f64 / (1 << 20) as f64,
                st.page + st.compressed,
                st.zero,
                st.xbzrle,
                st.page_requests
            ));
        }
        let last = matches!(ri.item, Item::Vmdesc(_));
        let eof = matches!(ri.item, Item::Eof);
        if eof {
            after_eof.set(true);
            let _ = timeout_sock.set_read_timeout(Some(AFTER_EOF_TIMEOUT));
        }
        if let Err(e) = g.session.handle(&ri, |a| pending.push(a)) {
            break Err(e);
        }
        let mut r = Ok(());
        for a in pending.drain(..) {
            if r.is_ok() {
                r = g.execute(a, &host.ctl, &mut |m| {
                    pb.suspend(|| eprintln!("qmig recv: note: {m}"))
                });
            }
        }
        g.flush_transmit(&mut out);
        if let Err(e) = r {
            break Err(e);
        }
        if g.rp_dead {
            // A peer that does not read its return path would stall every
            // later reply: stop here, with the reason in the manifest.
            let why = g.rp_error.clone().unwrap_or_default();
            break Err(StopError::Io(why));
        }
        if let Some(e) = &g.host.error {
            break Err(StopError::Postcopy(format!("fault handler: {e}")));
        }
        // A postcopy stream has no vmdesc trailer: it is complete at EOF.
        if last || (eof && g.session.dst.postcopy_state() == PostcopyState::End) {
            break Ok(());
        }
    };
    // The fault handler may have failed while the reader was blocked (and
    // woke it by shutting the socket down): report that, not the read error.
    let result = match (result, lock(&inner).host.error.clone()) {
        (Err(_), Some(e)) => Err(StopError::Postcopy(format!("fault handler: {e}"))),
        (r, _) => r,
    };
    pb.finish_and_clear();
    let postcopy = host.stop(&inner, result.is_ok(), TOUCH_WAIT);
    let mut g = lock(&inner);
    if g.rp_open && !g.rp_dead {
        out.clear();
        let written = RpMessage::Shut(if result.is_ok() { 0 } else { 1 })
            .write(&mut out)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let rp = &mut g.rp_sock();
        if let Err(e) = written
            .and_then(|()| rp.write_all(&out))
            .and_then(|_| rp.flush())
        {
            g.rp_error
                .get_or_insert(format!("return path: sending SHUT: {e}"));
        }
    }
    let mut tee = rd.into_inner();
    if let Some(s) = &mut tee.save {
        if s.flush().is_err() {
            save_error.set(true);
        }
    }
    let _ = g.rp_sock().shutdown(std::net::Shutdown::Write);
    let secs = started.elapsed().as_secs_f64();
    let rp_open = g.rp_open;
    let extra = json!({
        "peer": peer.to_string(),
        "return_path": rp_open,
        "bytes_received": received.get(),
        "seconds": secs,
        "saved_stream": save.map(|p| p.display().to_string()),
        "postcopy": postcopy,
    });
    // Every userfaultfd is closed (host.stop): the memory reads safely now.
    let tps = g.session.dst.page_size();
    let (mem, blocks) = g.session.dst.split_mut();
    let images = mem
        .write_images(blocks, tps)
        .map_err(|e| StopError::Io(format!("block images: {e}")));
    let result = g.session.finish(result.and(images), extra)?;
    let applied = g.session.dst.applied_up_to();
    if let Err(e) = result {
        let state = g.session.dst.postcopy_state();
        if matches!(state, PostcopyState::Listening | PostcopyState::Running) {
            eprintln!(
                "qmig recv: the migration failed during postcopy ({state:?}): the source held \
                 the only copy of the pages it had not sent; they are zero in the images"
            );
        }
        eprintln!("qmig recv: stopped: {e}; images hold the stream applied up to offset {applied}");
        return Ok(ExitCode::from(1));
    }
    if save_error.get() {
        eprintln!("qmig recv: writing the --save file failed; the capture is incomplete");
        return Ok(ExitCode::from(1));
    }
    if let Some(e) = &g.rp_error {
        eprintln!("qmig recv: {e}");
        return Ok(ExitCode::from(1));
    }
    let st = g.session.dst.stats();
    eprintln!(
        "qmig recv: complete: {} bytes in {secs:.2} s; {} pages, {} zero, {} xbzrle, {} compressed; \
         {} page requests; return path: {}",
        received.get(),
        st.page,
        st.zero,
        st.xbzrle,
        st.compressed,
        st.page_requests,
        if rp_open { "SHUT sent" } else { "none" }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    //! `receive` against a fake source: a thread that sends a real capture
    //! (tests/data) over loopback TCP and reads the return path.

    use super::*;
    use std::io::Read;
    use std::path::PathBuf;

    fn capture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(name)
            .join("stream");
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qmig-recv-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Runs `receive` while a source thread sends `stream` (then keeps the socket
    /// open, as QEMU does with a return path, until SHUT or `close_after`).
    /// Returns the exit code, the manifest and the return-path bytes.
    fn run_with(
        stream: Vec<u8>,
        layout: Layout,
        tag: &str,
        close_after: bool,
    ) -> (ExitCode, Value, Vec<u8>, PathBuf) {
        run_touch(stream, layout, tag, close_after, 0, None)
    }

    /// Whether `rp` holds a page request (parsing the complete messages).
    fn has_request(rp: &[u8]) -> bool {
        let mut at = 0;
        while rp.len() >= at + 4 {
            let len = u16::from_be_bytes([rp[at + 2], rp[at + 3]]) as usize;
            if rp.len() < at + 4 + len {
                break;
            }
            if let Ok(m) = qmig_wire::parse_return_path(&rp[at..at + 4 + len]) {
                if m.iter().any(|(_, x)| {
                    matches!(x, RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. })
                }) {
                    return true;
                }
            }
            at += 4 + len;
        }
        false
    }

    fn run_touch(
        stream: Vec<u8>,
        layout: Layout,
        tag: &str,
        close_after: bool,
        touch: usize,
        hold_at: Option<usize>,
    ) -> (ExitCode, Value, Vec<u8>, PathBuf) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let src = std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut early = Vec::new();
            let mut rest = &stream[..];
            if let Some(k) = hold_at {
                // Send up to `k`, then hold the rest back until a page is
                // asked for (at most 10 s): the destination must fault.
                let _ = s.write_all(&stream[..k]);
                rest = &stream[k..];
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = [0u8; 4096];
                while !has_request(&early) {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => early.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                s.set_read_timeout(None).unwrap();
            }
            // The receiver may refuse the stream and close early (layout
            // mismatch): a failed write is then expected, not a test failure.
            let _ = s.write_all(rest);
            if close_after {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            let mut rp = early;
            let _ = s.read_to_end(&mut rp);
            rp
        });
        let out = tmpdir(tag);
        let save = out.with_extension("saved");
        let code = receive(
            listener,
            &out,
            layout,
            Some(&save),
            "test",
            Duration::from_secs(60),
            touch,
        )
        .unwrap();
        let rp = src.join().unwrap();
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        (code, m, rp, save)
    }

    #[test]
    fn return_path_gets_pong_and_shut_while_the_socket_stays_open() {
        let stream = capture("q10-return-path");
        let (code, m, rp, save) = run_with(stream.clone(), Layout::Adopt, "rp", false);
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(m["complete"], true);
        assert_eq!(m["return_path"], true);
        assert_eq!(m["applied_up_to"], stream.len() as u64);
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        assert!(
            matches!(msgs.first(), Some((_, RpMessage::Pong(1)))),
            "{msgs:?}"
        );
        assert!(
            matches!(msgs.last(), Some((_, RpMessage::Shut(0)))),
            "{msgs:?}"
        );
        assert_eq!(
            std::fs::read(&save).unwrap(),
            stream,
            "--save is byte for byte"
        );
    }

    #[test]
    fn truncated_stream_fails_with_offset_and_shut_1() {
        let stream = capture("q10-return-path");
        let cut = stream.len() / 2;
        let (code, m, rp, _) = run_with(stream[..cut].to_vec(), Layout::Adopt, "cut", true);
        assert_ne!(code, ExitCode::SUCCESS);
        assert_eq!(m["complete"], false);
        assert!(m["error_offset"].as_u64().is_some_and(|o| o <= cut as u64));
        assert!(m["applied_up_to"].as_u64().is_some_and(|o| o <= cut as u64));
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        assert!(
            matches!(msgs.last(), Some((_, RpMessage::Shut(1)))),
            "{msgs:?}"
        );
    }

    #[test]
    fn layout_mismatch_is_refused_by_name() {
        let stream = capture("q10-stopped");
        let layout = Layout::Fixed(vec![LocalBlock::fixed("pc.ram", 1 << 20)]);
        let (code, m, _, _) = run_with(stream, layout, "layout", true);
        assert_ne!(code, ExitCode::SUCCESS);
        let err = m["error"].as_str().unwrap();
        assert!(err.contains("pc.ram") && err.contains("offset"), "{err}");
    }

    #[test]
    fn listen_address_is_checked() {
        assert!(parse_listen("tcp:127.0.0.1:4444").is_ok());
        assert!(parse_listen("tcp:[::1]:4444").is_ok());
        assert!(parse_listen("unix:/x").is_err());
        assert!(parse_listen("tcp:127.0.0.1").is_err());
    }

    /// A real postcopy capture replayed by a fake source, with touch threads
    /// faulting on guest memory: pages the threads need are asked for on the
    /// return path (REQ_PAGES_ID / REQ_PAGES, whole host pages) and resolved by the
    /// capture's pages as they arrive; the images equal `extract`'s. Without a
    /// usable userfaultfd, postcopy is received passively (no requests) and
    /// the images are the same.
    #[test]
    fn postcopy_capture_with_touch_threads_requests_pages_and_completes() {
        let stream = capture("q10-postcopy");
        // Hold the stream back right after POSTCOPY_RUN (inside PACKAGED).
        let mut rd = qmig_wire::SliceReader::new(&stream);
        let mut hold = None;
        while let Some(r) = rd.next() {
            let (_, item) = r.unwrap();
            if matches!(item, Item::Command(qmig_wire::Command::PostcopyRun)) {
                hold = Some(rd.decoder().position() as usize);
                break;
            }
        }
        let uffd = qmig_uffd_host::probe().is_ok();
        let (code, m, rp, _) = run_touch(stream.clone(), Layout::Adopt, "pc", false, 2, hold);
        assert_eq!(code, ExitCode::SUCCESS, "{m}");
        assert_eq!(m["complete"], true);
        assert_eq!(m["postcopy_state"], "End");
        let pc = &m["postcopy"];
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        let reqs: Vec<_> = msgs
            .iter()
            .filter(|(_, x)| matches!(x, RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. }))
            .collect();
        assert_eq!(reqs.len() as u64, pc["page_requests"].as_u64().unwrap());
        assert!(
            matches!(msgs.last(), Some((_, RpMessage::Shut(0)))),
            "{msgs:?}"
        );
        assert!(hold.is_some(), "the capture has POSTCOPY_RUN");
        if uffd {
            assert_eq!(pc["mode"], "userfaultfd");
            assert!(
                !reqs.is_empty(),
                "the touch threads faulted, nothing was asked: {pc}"
            );
            assert!(
                pc["fault_latency_us"]["count"].as_u64().unwrap() > 0,
                "{pc}"
            );
            assert_eq!(pc["touch_threads_unfinished"], 0);
            assert!(pc["touched_pages"].as_u64().unwrap() > 0, "{pc}");
            for (_, r) in &reqs {
                let (RpMessage::ReqPages { start, len } | RpMessage::ReqPagesId { start, len, .. }) =
                    r
                else {
                    unreachable!()
                };
                assert!(*len == 4096 && start % 4096 == 0, "{r:?}");
            }
            if let Some((_, first)) = reqs.first() {
                assert!(
                    matches!(first, RpMessage::ReqPagesId { .. }),
                    "first names its block"
                );
            }
        } else {
            assert!(pc["mode"].as_str().unwrap().starts_with("passive"), "{pc}");
        }
        same_images_as_extract(&m, "pc", "q10-postcopy");
    }

    /// A block with 2 MiB pages (hugetlbfs on the source) is not registered:
    /// postcopy is received passively, touch threads are not run, and the
    /// images are still right.
    #[test]
    fn hugepage_postcopy_is_received_passively() {
        let stream = capture("q10-hugepage-postcopy");
        let (code, m, rp, _) = run_touch(stream, Layout::Adopt, "hp", false, 2, None);
        assert_eq!(code, ExitCode::SUCCESS, "{m}");
        let pc = &m["postcopy"];
        let mode = pc["mode"].as_str().unwrap();
        assert!(
            mode.starts_with("passive") && mode.contains("hugetlbfs"),
            "{pc}"
        );
        assert_eq!(pc["page_requests"], 0);
        assert_eq!(pc["touched_pages"], 0);
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        assert!(
            matches!(msgs.last(), Some((_, RpMessage::Shut(0)))),
            "{msgs:?}"
        );
        same_images_as_extract(&m, "hp", "q10-hugepage-postcopy");
    }

    /// The images `run_touch(.., tag, ..)` wrote equal `extract`'s of the capture.
    fn same_images_as_extract(m: &Value, tag: &str, name: &str) {
        // run_touch's output directory (tmpdir would remove it).
        let out = std::env::temp_dir().join(format!("qmig-recv-test-{tag}-{}", std::process::id()));
        let ex = tmpdir(&format!("{tag}-extract"));
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(name)
            .join("stream");
        crate::extract::run(&p, &ex).unwrap();
        let mx: Value =
            serde_json::from_str(&std::fs::read_to_string(ex.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(
            m["blocks"].as_array().unwrap().len(),
            mx["blocks"].as_array().unwrap().len()
        );
        assert!(!mx["blocks"].as_array().unwrap().is_empty());
        for (a, b) in m["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .zip(mx["blocks"].as_array().unwrap())
        {
            assert_eq!(a["name"], b["name"]);
            let ia = std::fs::read(out.join(a["file"].as_str().unwrap())).unwrap();
            let ib = std::fs::read(ex.join(b["file"].as_str().unwrap())).unwrap();
            assert!(ia == ib, "block {} differs from extract", a["name"]);
        }
    }
}
