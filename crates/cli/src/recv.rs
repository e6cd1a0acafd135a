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
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use qmig_ram_dst::{Action, Layout, LocalBlock};
use qmig_wire::{Item, RpMessage, StreamReader};
use serde_json::{json, Value};

use crate::extract::{Session, StopError};

/// How long to wait for the vmdesc trailer once EOF was read.
const AFTER_EOF_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket as the stream reader sees it: every byte read is also saved
/// (`--save`), and once EOF was decoded a read timeout counts as the end.
struct Tee {
    sock: TcpStream,
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
                    && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                0
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
            return Err(format!("{}: every block needs \"name\" and \"length\"", path.display()));
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
    pb.set_style(ProgressStyle::with_template("{spinner} recv {msg} [{elapsed}]").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

pub fn run(listen: &str, outdir: &Path, blocks: Option<&Path>, save: Option<&Path>) -> Result<ExitCode, String> {
    let addr = parse_listen(listen)?;
    let layout = match blocks {
        Some(p) => read_layout(p)?,
        None => Layout::Adopt,
    };
    std::fs::create_dir_all(outdir).map_err(|e| format!("{}: {e}", outdir.display()))?;
    let mut session = Session::new(outdir, layout, listen.to_string())?;
    let save_file = match save {
        Some(p) => Some(BufWriter::with_capacity(1 << 20, File::create(p).map_err(|e| format!("{}: {e}", p.display()))?)),
        None => None,
    };
    let listener = TcpListener::bind(&addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("qmig recv: listening on {local}");
    let (sock, peer) = listener.accept().map_err(|e| format!("accept on {local}: {e}"))?;
    drop(listener);
    let _ = sock.set_nodelay(true);
    eprintln!("qmig recv: migration from {peer}");
    let mut rp_sock = sock.try_clone().map_err(|e| e.to_string())?;
    let timeout_sock = sock.try_clone().map_err(|e| e.to_string())?;
    let received = Rc::new(Cell::new(0u64));
    let after_eof = Rc::new(Cell::new(false));
    let save_error = Rc::new(Cell::new(false));
    let tee = Tee {
        sock,
        save: save_file,
        received: received.clone(),
        after_eof: after_eof.clone(),
        save_error: save_error.clone(),
    };
    let mut rd = StreamReader::new(tee);
    let pb = progress();
    let started = Instant::now();
    let mut rp_open = false;
    let mut rp_error: Option<String> = None;
    let mut pending: Vec<Action> = Vec::new();
    let mut out = Vec::new();
    let mut n = 0u32;
    let result: Result<(), StopError> = loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) => break Ok(()),
            Err(e) => break Err(StopError::Wire(e)),
        };
        n = n.wrapping_add(1);
        if n % 1024 == 0 {
            let st = session.dst.stats();
            pb.set_message(format!(
                "{:.1} MiB, {} pages, {} zero, {} xbzrle",
                received.get() as f64 / (1 << 20) as f64,
                st.page + st.compressed,
                st.zero,
                st.xbzrle
            ));
        }
        let last = matches!(ri.item, Item::Vmdesc(_));
        if matches!(ri.item, Item::Eof) {
            after_eof.set(true);
            let _ = timeout_sock.set_read_timeout(Some(AFTER_EOF_TIMEOUT));
        }
        if let Err(e) = session.handle(&ri, |a| pending.push(a)) {
            break Err(e);
        }
        for a in pending.drain(..) {
            out.clear();
            match a {
                Action::OpenReturnPath => rp_open = true,
                Action::Pong(v) if rp_open => RpMessage::Pong(v).write(&mut out),
                Action::SendRecvBitmap { block } if rp_open => {
                    session.dst.recv_bitmap_reply(block, &mut out);
                }
                Action::ResumeAck if rp_open => RpMessage::ResumeAck(1).write(&mut out),
                Action::NonZeroFill { offset, fill, .. } => {
                    pb.suspend(|| eprintln!("qmig recv: note: offset {offset}: ZERO record with fill byte {fill:#04x}"));
                }
                _ => {}
            }
            if !out.is_empty() {
                if let Err(e) = rp_sock.write_all(&out) {
                    rp_error.get_or_insert(format!("return path: {e}"));
                }
            }
        }
        if last {
            break Ok(());
        }
    };
    pb.finish_and_clear();
    if rp_open {
        out.clear();
        RpMessage::Shut(if result.is_ok() { 0 } else { 1 }).write(&mut out);
        if let Err(e) = rp_sock.write_all(&out).and_then(|_| rp_sock.flush()) {
            rp_error.get_or_insert(format!("return path: sending SHUT: {e}"));
        }
    }
    let mut tee = rd.into_inner();
    if let Some(s) = &mut tee.save {
        if s.flush().is_err() {
            save_error.set(true);
        }
    }
    let _ = rp_sock.shutdown(std::net::Shutdown::Write);
    let secs = started.elapsed().as_secs_f64();
    let extra = json!({
        "peer": peer.to_string(),
        "return_path": rp_open,
        "bytes_received": received.get(),
        "seconds": secs,
        "saved_stream": save.map(|p| p.display().to_string()),
    });
    session.finish(result.as_ref().err(), extra)?;
    let applied = session.dst.applied_up_to();
    if let Err(e) = result {
        eprintln!("qmig recv: stopped: {e}; images hold the stream applied up to offset {applied}");
        return Ok(ExitCode::from(1));
    }
    if save_error.get() {
        eprintln!("qmig recv: writing the --save file failed; the capture is incomplete");
        return Ok(ExitCode::from(1));
    }
    if let Some(e) = rp_error {
        eprintln!("qmig recv: {e}");
        return Ok(ExitCode::from(1));
    }
    let st = session.dst.stats();
    eprintln!(
        "qmig recv: complete: {} bytes in {secs:.2} s; {} pages, {} zero, {} xbzrle, {} compressed; return path: {}",
        received.get(),
        st.page,
        st.zero,
        st.xbzrle,
        st.compressed,
        if rp_open { "SHUT sent" } else { "none" }
    );
    Ok(ExitCode::SUCCESS)
}
