//! `qmig recv`: a live precopy destination for a real QEMU source.
//!
//! Listens on `tcp:` or `unix:` (or reads a `file:` / an `exec:` command's
//! output, like QEMU's `-incoming`), takes one incoming migration and
//! applies it as it arrives with the same code as `qmig extract` (block
//! images in DIR, `device-state.bin`, `vmdesc.json`, `manifest.json`). If the
//! source opens a return path (sockets only) it answers PINGs and, once the
//! stream is complete, sends SHUT(0) (SHUT(1) after an error), which QEMU
//! waits for before it reports `completed`. The end of the stream is found by
//! the decoder (EOF, then the vmdesc trailer), not by the socket closing: a
//! source with a return path keeps the socket open until it gets SHUT.
//! SIGINT/SIGTERM stop it between items (socket reads wake up to check), with
//! an interrupted manifest and without the cut-off `device-state.bin`.
//!
//! Postcopy recovery and preempt (`crate::recover`): a connection that
//! breaks after POSTCOPY_RUN pauses the migration ([`pause_and_recover`]);
//! the next connection on the same (or `--recover-listen`) address continues
//! it, read with `Decoder::continuation`, for as many cuts as come; a
//! connection waiting at POSTCOPY_LISTEN or POSTCOPY_RESUME is the
//! postcopy-preempt channel.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmig_ram_dst::{Event, Layout, LocalBlock, Placement, PostcopyState, RamDstError};
use qmig_wire::{Item, StreamReader};

use crate::error::{CliError, CliResult};
use crate::extract::{Session, StopError};
use crate::manifest::{Manifest, RecoveryTiming, RecvInfo};
use crate::postcopy::{lock, Inner, RecvMemory, Running, Touch};
use crate::uri::MigUri;

/// How long to wait for the vmdesc trailer once EOF was read.
const AFTER_EOF_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a blocked accept or socket read looks at the signal flag.
pub(crate) const POLL: Duration = Duration::from_millis(200);

/// The incoming stream as the stream reader sees it: every byte read is
/// also saved (`--save`); a socket read wakes up every [`POLL`] to look at
/// the signal flag, and once EOF was decoded, [`AFTER_EOF_TIMEOUT`] without
/// data counts as the end. Before that, `idle` without data
/// (`--idle-timeout`) is a `TimedOut` error naming the option.
pub(crate) struct Tee {
    pub(crate) src: Box<dyn Read>,
    /// Whether `src` is a socket with a [`POLL`] read timeout.
    pub(crate) polled: bool,
    /// `--idle-timeout` (sockets only).
    pub(crate) idle: Duration,
    /// When data last arrived (or the connection was accepted).
    pub(crate) last_data: Instant,
    pub(crate) save: Option<SaveFile>,
    pub(crate) received: Rc<Cell<u64>>,
    pub(crate) after_eof: Rc<Cell<Option<Instant>>>,
    /// The first failed `--save` write: stream offset and OS error.
    pub(crate) save_error: Rc<RefCell<Option<(u64, std::io::Error)>>>,
    /// Set by the postcopy fault handler when it failed: the migration
    /// cannot go on (checked every [`POLL`] on sockets).
    pub(crate) abort: Arc<AtomicBool>,
}

/// The error a read returns when a signal arrived (not `Interrupted`, which
/// the stream reader retries).
fn interrupted_io(sig: i32) -> std::io::Error {
    std::io::Error::other(format!("interrupted by {}", crate::error::signal_name(sig)))
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = loop {
            match self.src.read(buf) {
                Ok(n) => break n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) && (self.polled || e.kind() == std::io::ErrorKind::Interrupted) =>
                {
                    if let Some(sig) = crate::signals::pending() {
                        return Err(interrupted_io(sig));
                    }
                    if self.abort.load(Ordering::Acquire) {
                        return Err(std::io::Error::other("the postcopy fault handler failed"));
                    }
                    match self.after_eof.get() {
                        Some(t) if t.elapsed() >= AFTER_EOF_TIMEOUT => break 0,
                        None if self.polled
                            && self.last_data.elapsed() >= self.idle
                            && !crate::multifd_recv::channels_active(self.idle) =>
                        {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "the source sent nothing for {} s (--idle-timeout)",
                                    self.idle.as_secs_f64()
                                ),
                            ))
                        }
                        _ => {}
                    }
                }
                Err(e) => return Err(e),
            }
        };
        self.last_data = Instant::now();
        self.received.set(self.received.get() + n as u64);
        if let Some(s) = &mut self.save {
            s.write(&buf[..n]);
        }
        Ok(n)
    }
}

impl Drop for Tee {
    /// Waits for `--save`'s writer: the file is complete (or its error
    /// known, in `save_error`) once the connection's reader is gone.
    fn drop(&mut self) {
        if let Some(e) = self.save.take().and_then(SaveFile::finish) {
            self.save_error.borrow_mut().get_or_insert(e);
        }
    }
}

/// How many chunks (each what one socket read returned: at most the free
/// part of the stream reader's buffer, 1 MiB unless an item needed more)
/// `--save` queues for its writer before the reader waits.
const SAVE_QUEUE: usize = 16;

/// A `--save` file written by a thread of its own, so that the stream
/// reader (in postcopy: the main channel's pages, which a requested page
/// may wait behind) never waits for the file system. Memory: at most
/// [`SAVE_QUEUE`] + 1 chunks queued; the reader waits when the writer is
/// that far behind.
pub(crate) struct SaveFile {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Written chunks handed back for reuse.
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<Option<(u64, std::io::Error)>>>,
}

impl SaveFile {
    /// Starts the writer of `file`.
    pub(crate) fn new(file: File) -> SaveFile {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(SAVE_QUEUE);
        let (back, free) = std::sync::mpsc::sync_channel::<Vec<u8>>(SAVE_QUEUE + 1);
        let writer = std::thread::Builder::new()
            .name("qmig-save".into())
            .spawn(move || {
                let mut file = file;
                let mut at = 0u64;
                for b in rx {
                    let mut done = 0;
                    while done < b.len() {
                        match file.write(&b[done..]) {
                            Ok(0) => {
                                let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                                return Some((at + done as u64, e));
                            }
                            Ok(k) => done += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Some((at + done as u64, e)),
                        }
                    }
                    at += b.len() as u64;
                    let _ = back.try_send(b);
                }
                None
            });
        match writer {
            Ok(h) => SaveFile {
                tx: Some(tx),
                free,
                writer: Some(h),
            },
            // No thread: nothing is saved, and `finish` says why.
            Err(e) => {
                let (_, free) = std::sync::mpsc::sync_channel(0);
                let h = std::thread::spawn(move || Some((0, e)));
                SaveFile {
                    tx: None,
                    free,
                    writer: Some(h),
                }
            }
        }
    }

    /// Queues `bytes` for the file (after a write error: drops them, the
    /// error is reported by [`SaveFile::finish`]).
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        let Some(tx) = &self.tx else {
            return;
        };
        let mut b = self.free.try_recv().unwrap_or_default();
        b.clear();
        b.extend_from_slice(bytes);
        if tx.send(b).is_err() {
            // The writer stopped at an error.
            self.tx = None;
        }
    }

    /// Waits until everything queued is written: the first error, with the
    /// file offset it happened at.
    pub(crate) fn finish(mut self) -> Option<(u64, std::io::Error)> {
        self.tx = None;
        self.writer.take().and_then(|h| {
            h.join()
                .unwrap_or_else(|_| Some((0, std::io::Error::other("the --save writer panicked"))))
        })
    }
}

/// Reads a block layout (`{"blocks":[{"name","length", "max_length"?, "page_size"?, "resizable"?}]}`,
/// e.g. a manifest.json written by extract or recv).
fn read_layout(path: &Path) -> Result<Layout, CliError> {
    let m = Manifest::read_file(path)?;
    if m.blocks.is_empty() {
        return Err(CliError::data(format!(
            "{}: no blocks in the layout",
            path.display()
        )));
    }
    Ok(Layout::Fixed(
        m.blocks
            .into_iter()
            .map(|b| {
                let mut lb = LocalBlock::fixed(&b.name, b.length);
                if let Some(m) = b.max_length {
                    lb.max_length = m;
                }
                if let Some(p) = b.page_size {
                    lb.page_size = p;
                }
                if let Some(r) = b.resizable {
                    lb.resizable = r;
                }
                lb
            })
            .collect(),
    ))
}

/// Sets SO_RCVBUF of the socket `fd` to `bytes` (the kernel doubles it and
/// stops autotuning it).
///
/// # Errors
/// `bytes` beyond `c_int`, or the OS error of `setsockopt`.
pub(crate) fn set_rcvbuf(fd: std::os::fd::RawFd, bytes: usize) -> std::io::Result<()> {
    let n = libc::c_int::try_from(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("SO_RCVBUF {bytes} is too large"),
        )
    })?;
    let p: *const libc::c_int = &n;
    // SAFETY: SO_RCVBUF takes an int, which `p` points to for the call; an
    // fd that is not an open socket only makes the call fail.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            p.cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `--postcopy-rcvbuf`: SO_RCVBUF (bytes, before the kernel doubles it)
/// given to a TCP main connection at POSTCOPY_LISTEN and to every
/// connection accepted after POSTCOPY_ADVISE, unless `--rcvbuf` was given;
/// 0: left to autotuning. (Process-wide: one `recv` per process.)
///
/// A QEMU source sends a requested page on the preempt channel only while
/// it is still dirty: a page already queued on the main channel is served
/// there, behind everything buffered in between (QEMU's send buffer, up to
/// `tcp_wmem`'s maximum, and this receive buffer, autotuned up to
/// `tcp_rmem`'s, 32 MiB here). Without preempt every requested page waits
/// behind the receive buffer. See scripts/bench_recovery_preempt.py.
pub(crate) static POSTCOPY_RCVBUF: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_POSTCOPY_RCVBUF);

/// The default `--postcopy-rcvbuf`.
pub const DEFAULT_POSTCOPY_RCVBUF: usize = 128 << 10;

/// Applies [`POSTCOPY_RCVBUF`] to the socket `fd` (errors are ignored: the
/// buffer only bounds a queue, the migration works without it).
pub(crate) fn postcopy_rcvbuf(fd: std::os::fd::RawFd) {
    let n = POSTCOPY_RCVBUF.load(Ordering::Relaxed);
    if n > 0 {
        let _ = set_rcvbuf(fd, n);
    }
}

/// Where the migration comes from, before it arrives.
pub(crate) enum Listener {
    /// `tcp:`
    Tcp(TcpListener),
    /// `unix:` (the socket file is removed at the end).
    Unix(UnixListener, PathBuf),
    /// `file:`
    File(PathBuf),
    /// `exec:`
    Exec(String),
}

/// One accepted migration: the stream, the return path (sockets only), a
/// description of the peer, and the `exec:` child to reap.
struct Incoming {
    src: Box<dyn Read>,
    /// Shuts the socket down (sockets only).
    kick: Option<crate::recover::Kick>,
    polled: bool,
    rp: Option<Box<dyn Write + Send>>,
    peer: String,
    child: Option<Child>,
    /// The TCP socket (its receive buffer is bounded at POSTCOPY_LISTEN).
    tcp_fd: Option<std::os::fd::RawFd>,
}

impl Listener {
    /// `--rcvbuf`: sets SO_RCVBUF on a TCP listener, before any connection
    /// (so the window it advertises is small from the start). Postcopy's
    /// requested pages come behind everything buffered in the one stream;
    /// a small buffer bounds that queue (see scripts/bench_postcopy_latency.py).
    fn set_rcvbuf(&self, bytes: usize) -> Result<(), CliError> {
        let Listener::Tcp(l) = self else {
            return Err(CliError::Usage("--rcvbuf applies to tcp: only".into()));
        };
        set_rcvbuf(std::os::fd::AsRawFd::as_raw_fd(l), bytes)
            .map_err(|e| CliError::io(self.describe(), "setsockopt(SO_RCVBUF)", e))
    }

    /// Binds / checks the URI (before anything is written to the output).
    pub(crate) fn open(uri: &MigUri) -> Result<Listener, CliError> {
        match uri {
            MigUri::Tcp { host, port } => {
                let l = if host.is_empty() {
                    TcpListener::bind(("::", *port))
                        .or_else(|_| TcpListener::bind(("0.0.0.0", *port)))
                } else {
                    TcpListener::bind((host.as_str(), *port))
                };
                l.map(Listener::Tcp)
                    .map_err(|e| CliError::io(uri.to_string(), "listen", e))
            }
            MigUri::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(p);
                    }
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(|e| CliError::io(p, "listen", e))
            }
            MigUri::File(p) => {
                std::fs::metadata(p).map_err(|e| CliError::io(p, "open", e))?;
                Ok(Listener::File(p.clone()))
            }
            MigUri::Exec(c) => Ok(Listener::Exec(c.clone())),
        }
    }

    /// Where it listens, for the "listening on" line.
    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => p.display().to_string(),
            Listener::File(p) => p.display().to_string(),
            Listener::Exec(c) => format!("exec:{c}"),
        }
    }

    /// Waits for the migration, looking at the signal flag every [`POLL`].
    /// Sockets get [`POLL`] as read timeout (the idle timeout is counted by
    /// [`Tee`]) and `idle` as write timeout: a return path nobody reads
    /// cannot stall the migration forever.
    fn accept(&self, idle: Duration) -> Result<Incoming, CliError> {
        let wait = |e: std::io::Error| -> Result<(), CliError> {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(CliError::io(self.describe(), "accept", e));
            }
            if let Some(signal) = crate::signals::pending() {
                return Err(CliError::Interrupted {
                    signal,
                    detail: Some("no migration arrived".into()),
                });
            }
            std::thread::sleep(POLL / 4);
            Ok(())
        };
        let io = |op, e| CliError::io(self.describe(), op, e);
        match self {
            Listener::Tcp(l) => {
                l.set_nonblocking(true).map_err(|e| io("listen", e))?;
                let (sock, peer) = loop {
                    match l.accept() {
                        Ok(x) => break x,
                        Err(e) => wait(e)?,
                    }
                };
                sock.set_nonblocking(false).map_err(|e| io("accept", e))?;
                let _ = sock.set_nodelay(true);
                sock.set_read_timeout(Some(POLL))
                    .and_then(|()| sock.set_write_timeout(Some(idle)))
                    .map_err(|e| io("accept", e))?;
                let rp = sock.try_clone().map_err(|e| io("accept", e))?;
                let k = sock.try_clone().map_err(|e| io("accept", e))?;
                let tcp_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&sock));
                Ok(Incoming {
                    src: Box::new(sock),
                    kick: Some(Arc::new(move || {
                        let _ = k.shutdown(std::net::Shutdown::Both);
                    })),
                    polled: true,
                    rp: Some(Box::new(SocketRp(rp))),
                    peer: peer.to_string(),
                    child: None,
                    tcp_fd,
                })
            }
            Listener::Unix(l, p) => {
                l.set_nonblocking(true).map_err(|e| io("listen", e))?;
                let sock = loop {
                    match l.accept() {
                        Ok((s, _)) => break s,
                        Err(e) => wait(e)?,
                    }
                };
                sock.set_nonblocking(false).map_err(|e| io("accept", e))?;
                sock.set_read_timeout(Some(POLL))
                    .and_then(|()| sock.set_write_timeout(Some(idle)))
                    .map_err(|e| io("accept", e))?;
                let rp = sock.try_clone().map_err(|e| io("accept", e))?;
                let k = sock.try_clone().map_err(|e| io("accept", e))?;
                Ok(Incoming {
                    src: Box::new(sock),
                    kick: Some(Arc::new(move || {
                        let _ = k.shutdown(std::net::Shutdown::Both);
                    })),
                    polled: true,
                    rp: Some(Box::new(SocketRp(rp))),
                    peer: format!("unix:{}", p.display()),
                    child: None,
                    tcp_fd: None,
                })
            }
            Listener::File(p) => Ok(Incoming {
                src: Box::new(File::open(p).map_err(|e| CliError::io(p, "open", e))?),
                kick: None,
                polled: false,
                rp: None,
                peer: format!("file:{}", p.display()),
                child: None,
                tcp_fd: None,
            }),
            Listener::Exec(c) => {
                let mut child = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(c)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| CliError::io("/bin/sh", "run", e))?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| CliError::Usage("exec: no stdout".into()))?;
                Ok(Incoming {
                    src: Box::new(out),
                    kick: None,
                    polled: false,
                    rp: None,
                    peer: format!("exec:{c}"),
                    child: Some(child),
                    tcp_fd: None,
                })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A stream socket whose writing half can be closed on its own.
pub(crate) trait HalfClose: Write {
    /// Half-closes for writing (errors ignored: the peer may be gone).
    fn close_write(&self);
}

impl HalfClose for TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl HalfClose for UnixStream {
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// The return path over a TCP or Unix socket, half-closed for writing when
/// dropped so the source sees its end.
pub(crate) struct SocketRp<S: HalfClose>(pub(crate) S);

impl<S: HalfClose> Write for SocketRp<S> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<S: HalfClose> Drop for SocketRp<S> {
    fn drop(&mut self) {
        self.0.close_write();
    }
}

/// Runs `qmig recv`.
pub fn run(
    listen: &MigUri,
    outdir: &Path,
    blocks: Option<&Path>,
    save: Option<&Path>,
    idle: Duration,
    touch: Touch,
    recover: RecoverArgs<'_>,
) -> CliResult {
    let rcvbuf = recover.rcvbuf;
    let layout = match blocks {
        Some(p) => read_layout(p)?,
        None => Layout::Adopt,
    };
    if idle.is_zero() {
        return Err(CliError::Usage(
            "--idle-timeout must be at least 1 second".into(),
        ));
    }
    crate::files::output_dir(outdir)?;
    let listener = Listener::open(listen)?;
    if let Some(n) = rcvbuf {
        listener.set_rcvbuf(n)?;
        // The user's size stays.
        POSTCOPY_RCVBUF.store(0, Ordering::Relaxed);
    } else {
        POSTCOPY_RCVBUF.store(recover.postcopy_rcvbuf, Ordering::Relaxed);
    }
    if recover.timeout.is_zero() {
        return Err(CliError::Usage(
            "--recover-timeout must be at least 1 second".into(),
        ));
    }
    let recover_listener = match recover.listen {
        Some(u @ (MigUri::Tcp { .. } | MigUri::Unix(_))) => Some(Listener::open(u)?),
        Some(u) => {
            return Err(CliError::Usage(format!(
                "--recover-listen {u}: a recovery connection comes on tcp: or unix: only"
            )))
        }
        None => None,
    };
    crate::signals::install();
    receive(
        listener,
        outdir,
        layout,
        save,
        &listen.to_string(),
        touch,
        Recover {
            idle,
            listener: recover_listener,
            timeout: recover.timeout,
        },
    )
}

/// `--rcvbuf`, `--recover-listen` and `--recover-timeout` as given.
#[derive(Debug, Clone, Copy)]
pub struct RecoverArgs<'a> {
    /// `--rcvbuf`: SO_RCVBUF of the listener.
    pub rcvbuf: Option<usize>,
    /// `--postcopy-rcvbuf`: SO_RCVBUF from POSTCOPY_LISTEN on (0: autotuned).
    pub postcopy_rcvbuf: usize,
    /// Where to wait for the recovery connection (default: the `--listen` address).
    pub listen: Option<&'a MigUri>,
    /// How long a paused migration waits for it.
    pub timeout: Duration,
}

/// Connection settings of [`receive`]: the idle timeout and postcopy recovery.
pub(crate) struct Recover {
    /// `--idle-timeout`.
    pub(crate) idle: Duration,
    /// A listener of its own for recovery connections (`--recover-listen`).
    pub(crate) listener: Option<Listener>,
    /// How long a paused migration waits for the recovery connection.
    pub(crate) timeout: Duration,
}

/// The default `--recover-timeout`, seconds.
pub const DEFAULT_RECOVER_TIMEOUT: u64 = 600;

/// How long POSTCOPY_RESUME waits for the new preempt channel of a source
/// that used one (see `Recovery::accept_preempt_after_resume`).
const PREEMPT_AFTER_RESUME: Duration = Duration::from_secs(5);

/// How long the end of a migration waits for `--touch` threads.
const TOUCH_WAIT: Duration = Duration::from_secs(10);

/// Takes one migration from `listener` (see the module documentation).
pub(crate) fn receive(
    listener: Listener,
    outdir: &Path,
    layout: Layout,
    save: Option<&Path>,
    listen: &str,
    touch: impl Into<Touch>,
    recover: Recover,
) -> CliResult {
    let idle = recover.idle;
    let mem = RecvMemory::create(outdir).map_err(|e| CliError::io(outdir, "create", e))?;
    let save_file = match save {
        Some(p) => {
            let p = crate::multifd_recv::save_main_path(p);
            Some(File::create(&p).map_err(|e| CliError::io(&p, "create", e))?)
        }
        None => None,
    };
    if matches!(listener, Listener::Tcp(_) | Listener::Unix(..)) {
        eprintln!("qmig recv: listening on {}", listener.describe());
    }
    let inc = listener.accept(idle)?;
    // The directory is marked incomplete only now: a recv that never got a
    // migration leaves an earlier result alone. Emit: postcopy host pages
    // are placed by the host (UFFDIO_COPY once registered), which reports
    // each placement back.
    let session = Session::new(
        outdir,
        mem,
        layout,
        Placement::Emit,
        "recv",
        listen.to_string(),
    )?;
    if !crate::progress::quiet() {
        eprintln!("qmig recv: migration from {}", inc.peer);
    }
    let Incoming {
        src,
        kick,
        polled,
        rp,
        peer,
        child,
        tcp_fd,
    } = inc;
    let mut recover_listener = recover.listener;
    let mut recovery: Option<crate::recover::Recovery> = None;
    let mut main_n = 1usize;
    // Postcopy recovery timings: the one under way (accepted at) and the done ones.
    let mut recovering: Option<(Instant, RecoveryTiming)> = None;
    let mut recoveries: Vec<RecoveryTiming> = Vec::new();
    let received = Rc::new(Cell::new(0u64));
    let after_eof = Rc::new(Cell::new(None));
    let save_error = Rc::new(RefCell::new(None));
    let abort = Arc::new(AtomicBool::new(false));
    // Multifd: the listener is kept for the channel connections.
    let mut mfd = crate::multifd_recv::MultifdRecv::new(listener, save, abort.clone(), idle);
    let tee = Tee {
        src,
        polled,
        idle,
        last_data: Instant::now(),
        save: save_file.map(SaveFile::new),
        received: received.clone(),
        after_eof: after_eof.clone(),
        save_error: save_error.clone(),
        abort: abort.clone(),
    };
    let rp = rp.map(|w| -> Box<dyn Write + Send> {
        Box::new(crate::recover::RpTee {
            inner: w,
            path: save.map(|s| crate::recover::conn_path(s, "rp", 1)),
            file: None,
        })
    });
    let inner = Arc::new(Mutex::new(Inner::new(session, rp, idle)));
    let host = Running::start(&inner, abort.clone(), touch);
    let mut rd = StreamReader::new(tee);
    crate::input::configure(rd.decoder_mut());
    let pb = crate::progress::bytes(0, "recv");
    let started = Instant::now();
    let mut pending: Vec<Event> = Vec::new();
    let mut out = Vec::new();
    let mut n = 0u32;
    let result = loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) if !paused_state(&inner) => break Ok(()),
            Err(e)
                if !paused_state(&inner)
                    || crate::signals::pending().is_some()
                    || abort.load(Ordering::Acquire)
                    || !is_cut(&e) =>
            {
                break Err(match (crate::signals::pending(), e) {
                    (Some(sig), _) => StopError::Interrupted(sig),
                    // Only the idle timeout makes Tee return TimedOut.
                    (None, qmig_wire::WireError::Io { offset, source })
                        if source.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        StopError::Peer {
                            message: source.to_string(),
                            offset,
                        }
                    }
                    (None, e) => StopError::Wire(e),
                });
            }
            // The connection broke after POSTCOPY_RUN: pause and wait for
            // the source's recovery connection.
            cut => {
                let why = match cut {
                    Err(e) => e.to_string(),
                    _ => "the source closed the connection".into(),
                };
                let Some(rec) = recovery.as_ref() else {
                    break Err(StopError::Postcopy(format!(
                        "{why} (no recovery possible on this input)"
                    )));
                };
                main_n += 1;
                match pause_and_recover(&inner, rec, &rd, &why, main_n, save, idle) {
                    Ok((mut tee, dec)) => {
                        recovering = Some((Instant::now(), RecoveryTiming::default()));
                        tee.received = received.clone();
                        tee.after_eof = after_eof.clone();
                        tee.save_error = save_error.clone();
                        tee.abort = abort.clone();
                        rd = StreamReader::with_decoder(tee, dec);
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        if let Err(e) = mfd.before_item(&ri, &inner) {
            break Err(e);
        }
        let mut g = crate::postcopy::lock_background(&inner);
        n = n.wrapping_add(1);
        if n.is_multiple_of(256) {
            let st = g.session.dst.stats();
            pb.set_position(received.get());
            pb.set_message(format!(
                "recv {} pages, {} zero, {} xbzrle, {} requested",
                st.page + st.compressed,
                st.zero,
                st.xbzrle,
                st.page_requests
            ));
        }
        let last = matches!(ri.item, Item::Vmdesc(_));
        let eof = matches!(ri.item, Item::Eof);
        if eof {
            after_eof.set(Some(Instant::now()));
        }
        let bitmap_t0 = matches!(
            ri.item,
            Item::Command(qmig_wire::Command::RecvBitmap { .. })
        )
        .then(Instant::now);
        if let Err(e) = g.session.handle(&ri, |a| pending.push(a)) {
            break Err(e);
        }
        for a in &pending {
            match a {
                // From ADVISE on, later connections are the preempt channel
                // and recovery connections: an acceptor thread takes them.
                Event::PostcopyState(PostcopyState::Advised) if recovery.is_none() => {
                    let mut ls: Vec<Listener> = mfd.take_listener().into_iter().collect();
                    ls.extend(recover_listener.take());
                    if !ls.is_empty() {
                        recovery = Some(crate::recover::Recovery::start(
                            ls,
                            &inner,
                            save,
                            idle,
                            abort.clone(),
                            recover.timeout,
                            kick.clone(),
                        ));
                    }
                }
                Event::PostcopyState(PostcopyState::Listening) => {
                    // The first connection is still open (it is being read).
                    if let Some(fd) = tcp_fd.filter(|_| main_n == 1) {
                        postcopy_rcvbuf(fd);
                    }
                    if let Some(r) = &recovery {
                        r.set_template(ri.decoder);
                        r.accept_preempt();
                    }
                }
                // POSTCOPY_RESUME on a recovery connection.
                Event::PostcopyState(PostcopyState::Running) if main_n > 1 => {
                    if let Some(r) = &recovery {
                        r.accept_preempt_after_resume(PREEMPT_AFTER_RESUME);
                    }
                }
                _ => {}
            }
        }
        let mut r = Ok(());
        for a in pending.drain(..) {
            if r.is_ok() {
                r = g.execute(a, &host.ctl, &mut |m| {
                    pb.suspend(|| eprintln!("qmig recv: note: {m}"))
                });
            }
        }
        if r.is_ok() {
            r = g.execute_placements(crate::postcopy::Via::Main);
        }
        g.flush_transmit(&mut out);
        if let Some((t0, rt)) = recovering.as_mut() {
            if let Some(b) = bitmap_t0 {
                rt.recv_bitmap_us += b.elapsed().as_micros() as u64;
                rt.recv_bitmap_bytes += out.len() as u64;
            }
            if g.session.dst.postcopy_state() == PostcopyState::Running {
                rt.accept_to_resume_ack_us = t0.elapsed().as_micros() as u64;
                recoveries.extend(recovering.take().map(|(_, rt)| rt));
            }
        }
        if let Err(e) = r {
            break Err(e);
        }
        if g.rp_dead && recovery.is_some() && paused_state_of(&g) {
            // The return path broke after POSTCOPY_RUN: the connection is
            // gone; shutting it down makes the next read end, and pause.
            if let Some(r) = &recovery {
                r.kick_main();
            }
        } else if g.rp_dead
            && recovery.is_some()
            && matches!(
                g.session.dst.postcopy_state(),
                PostcopyState::Advised | PostcopyState::Discarding | PostcopyState::Listening
            )
        {
            // The return path broke after POSTCOPY_ADVISE but before RUN was
            // read: RUN may be in the bytes this connection already
            // delivered (a destination that is slow to read still holds
            // them in its socket buffer when the cut comes, and the source
            // that sent them pauses, not fails). Read on, replies dropped
            // (nothing stalls): the main connection ends too, pausing after
            // RUN or failing before it, as QEMU's destination does.
        } else if g.rp_dead {
            // A peer that does not read its return path would stall every
            // later reply: stop here, with the reason in the manifest.
            let why = g.rp_error.clone().unwrap_or_default();
            break Err(StopError::Peer {
                message: why,
                offset: rd.decoder().position(),
            });
        }
        if let Some(e) = &g.host.error {
            break Err(StopError::Postcopy(format!("fault handler: {e}")));
        }
        // A postcopy stream has no vmdesc trailer: it is complete at EOF.
        if last || (eof && g.session.dst.postcopy_state() == PostcopyState::End) {
            break Ok(());
        }
    };
    let result = mfd.finish(result);
    let mut saved: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(r) = recovery.take() {
        saved = r.finish();
    }
    // The fault handler may have failed while the reader was blocked (and
    // made it stop through `abort`): report that, not the read error.
    let result = match (result, lock(&inner).host.error.clone()) {
        (Err(_), Some(e)) => Err(StopError::Postcopy(format!("fault handler: {e}"))),
        (r, _) => r,
    };
    pb.finish_and_clear();
    let mut postcopy = host.stop(&inner, result.is_ok(), TOUCH_WAIT);
    postcopy.recoveries = recoveries;
    let mut g = lock(&inner);
    // The state machine decides SHUT: 0 for a complete stream, 1 after any
    // error (its own, already queued, or ours).
    let result = match result {
        Ok(()) => g.session.dst.handle_end_of_input().map_err(StopError::Dst),
        Err(e) => {
            g.session.dst.handle_failure();
            Err(e)
        }
    };
    out.clear();
    g.session.dst.poll_transmit(&mut out);
    if g.rp_open && !g.rp_dead && !out.is_empty() {
        if let Some(w) = g.rp_sock() {
            if let Err(e) = w.write_all(&out).and_then(|_| w.flush()) {
                g.rp_error
                    .get_or_insert(format!("return path: sending SHUT: {e}"));
            }
        }
    }
    let tee = rd.into_inner();
    g.close_rp();
    drop(tee);
    if let Some(mut c) = child {
        if result.is_err() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    let secs = started.elapsed().as_secs_f64();
    let rp_open = g.rp_open;
    let info = RecvInfo {
        peer,
        return_path: rp_open,
        bytes_received: received.get(),
        seconds: secs,
        saved_stream: save.map(|p| p.display().to_string()),
        postcopy: Some(postcopy),
    };
    // Every userfaultfd is closed (host.stop): the memory reads safely now.
    let tps = g.session.dst.page_size();
    let at = g.session.dst.applied_up_to();
    let (mem, blocks) = g.session.dst.split_mut();
    let images = mem
        .write_images(blocks, tps)
        .map_err(|source| StopError::Dst(RamDstError::Memory { offset: at, source }));
    let result = result.and(images);
    let state = g.session.dst.postcopy_state();
    if result.is_err()
        && matches!(
            state,
            PostcopyState::Listening
                | PostcopyState::Running
                | PostcopyState::Paused
                | PostcopyState::Recovering
        )
    {
        eprintln!(
            "qmig recv: the migration failed during postcopy ({state:?}): the source held \
             the only copy of the pages it had not sent; they are zero in the images"
        );
    }
    g.session.finish(result, Some(info), listen)?;
    if let Some((offset, source)) = save_error.borrow_mut().take() {
        return Err(CliError::Io {
            path: save.map(|p| p.display().to_string()).unwrap_or_default(),
            op: "write (--save; the capture is incomplete)",
            offset: Some(offset),
            source,
        });
    }
    if let Some(e) = g.rp_error.take() {
        return Err(CliError::data(e));
    }
    let st = g.session.dst.stats();
    if let (Some(s), false) = (save, saved.is_empty() || crate::progress::quiet()) {
        let mut mains = vec![crate::multifd_recv::save_main_path(s).display().to_string()];
        let mut rest = String::new();
        for (role, p) in &saved {
            match *role {
                "main" => mains.push(p.display().to_string()),
                r => rest.push_str(&format!(" --{r} {}", p.display())),
            }
        }
        eprintln!(
            "qmig recv: capture set: qmig extract {}{} -o DIR",
            mains.join(" "),
            rest.replace("--preempt", "--preempt-channel")
                .replace("--rp", "--return-path")
        );
    }
    if st.pauses > 0 && !crate::progress::quiet() {
        eprintln!(
            "qmig recv: postcopy paused {} times, resumed {} times; {} page requests sent again",
            st.pauses, st.resumes, st.requests_resent
        );
    }
    if !crate::progress::quiet() {
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
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a read error is the connection breaking (it ended inside an
/// item, or the socket failed), which pauses a postcopy migration; not the
/// idle timeout, and not a stream that breaks a rule (that fails it: qmig
/// pauses only for the network, where QEMU pauses for any load error).
fn is_cut(e: &qmig_wire::WireError) -> bool {
    match e {
        qmig_wire::WireError::Truncated { .. } => true,
        qmig_wire::WireError::Io { source, .. } => source.kind() != std::io::ErrorKind::TimedOut,
        _ => false,
    }
}

/// Whether a broken connection pauses the migration (QEMU pauses only
/// after POSTCOPY_RUN, and again during a recovery).
fn paused_state(inner: &Mutex<Inner>) -> bool {
    paused_state_of(&lock(inner))
}

fn paused_state_of(g: &Inner) -> bool {
    matches!(
        g.session.dst.postcopy_state(),
        PostcopyState::Running | PostcopyState::Recovering
    )
}

/// The main connection broke in postcopy: pauses the state machine (the
/// touch threads stay blocked on their faults, which are recorded), waits
/// for the recovery connection (`--recover-timeout`), and returns the
/// reader parts for it: a [`Tee`] (its counters are the caller's) and the
/// continuation decoder.
fn pause_and_recover(
    inner: &Arc<Mutex<Inner>>,
    rec: &crate::recover::Recovery,
    rd: &StreamReader<Tee>,
    why: &str,
    n: usize,
    save: Option<&Path>,
    idle: Duration,
) -> Result<(Tee, qmig_wire::Decoder), StopError> {
    let dec = rd.decoder().continuation().map_err(StopError::Wire)?;
    {
        let mut g = lock(inner);
        g.session
            .dst
            .handle_connection_lost()
            .map_err(StopError::Dst)?;
        while g.session.dst.poll_event().is_some() {}
        g.close_rp();
        g.rp_dead = false;
        // The old connection's return-path error is what paused it.
        g.rp_error = None;
    }
    rec.stop_preempt(Duration::from_secs(1));
    rec.drop_pending();
    eprintln!(
        "qmig recv: postcopy paused at offset {} of main connection {} ({why}); waiting up to {} s \
         for the recovery connection (--recover-timeout)",
        rd.decoder().position(),
        n - 1,
        rec.timeout.as_secs()
    );
    let conn = match rec.wait_recovery() {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Err(StopError::Postcopy(format!(
                "postcopy paused ({why}) and no recovery connection came within {} s \
                 (--recover-timeout)",
                rec.timeout.as_secs()
            )))
        }
        Err(sig) => return Err(StopError::Interrupted(sig)),
    };
    eprintln!("qmig recv: recovery connection {n} from {}", conn.peer);
    let save_file = match save {
        Some(s) => {
            let p = crate::recover::conn_path(s, "main", n);
            let f = File::create(&p).map_err(|e| StopError::Io {
                path: p.clone(),
                op: "create (--save)",
                offset: 0,
                source: e,
            })?;
            rec.shared
                .saved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(("main", p));
            Some(f)
        }
        None => None,
    };
    rec.new_main(n, conn.kick.clone());
    {
        let mut g = lock(inner);
        g.set_rp(Box::new(crate::recover::RpTee {
            inner: conn.rp,
            path: save.map(|s| crate::recover::conn_path(s, "rp", n)),
            file: None,
        }));
        g.session
            .dst
            .handle_recovery_connection()
            .map_err(StopError::Dst)?;
        while g.session.dst.poll_event().is_some() {}
    }
    rec.set_template(&dec);
    let tee = Tee {
        src: conn.src,
        polled: true,
        idle,
        last_data: Instant::now(),
        save: save_file.map(SaveFile::new),
        received: Rc::new(Cell::new(0)),
        after_eof: Rc::new(Cell::new(None)),
        save_error: Rc::new(RefCell::new(None)),
        abort: Arc::new(AtomicBool::new(false)),
    };
    Ok((tee, dec))
}

#[cfg(test)]
mod tests {
    //! `receive` against a fake source: a thread that sends a real capture
    //! (tests/data) over loopback TCP and reads the return path.

    use super::*;
    use qmig_wire::RpMessage;
    use serde_json::Value;

    fn capture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(name)
            .join("stream");
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// A fresh scratch directory, removed with its contents when the returned
    /// `TempDir` drops (also when the test panics).
    fn tmpdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("qmig-recv-test-{}-", tag.replace('/', "_")))
            .tempdir()
            .unwrap()
    }

    /// Runs `receive` while a source thread sends `stream` (then keeps the socket
    /// open, as QEMU does with a return path, until SHUT or `close_after`).
    /// Returns the exit code, the manifest, the return-path bytes and the
    /// scratch directory (`out/`: the output, `saved`: the `--save` copy).
    fn run_with(
        stream: Vec<u8>,
        layout: Layout,
        tag: &str,
        close_after: bool,
    ) -> (u8, Value, Vec<u8>, tempfile::TempDir) {
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
    ) -> (u8, Value, Vec<u8>, tempfile::TempDir) {
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
        let dir = tmpdir(tag);
        let out = dir.path().join("out");
        let save = dir.path().join("saved");
        std::fs::create_dir_all(&out).unwrap();
        let code = match receive(
            Listener::Tcp(listener),
            &out,
            layout,
            Some(&save),
            "test",
            touch,
            Recover {
                idle: Duration::from_secs(60),
                listener: None,
                timeout: Duration::from_secs(5),
            },
        ) {
            Ok(_) => 0,
            Err(e) => e.exit_code(),
        };
        let rp = src.join().unwrap();
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        (code, m, rp, dir)
    }

    #[test]
    fn return_path_gets_pong_and_shut_while_the_socket_stays_open() {
        let stream = capture("q10-return-path");
        let (code, m, rp, dir) = run_with(stream.clone(), Layout::Adopt, "rp", false);
        assert_eq!(code, 0);
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
            std::fs::read(dir.path().join("saved")).unwrap(),
            stream,
            "--save is byte for byte"
        );
    }

    #[test]
    fn truncated_stream_fails_with_offset_and_shut_1() {
        let stream = capture("q10-return-path");
        let cut = stream.len() / 2;
        let (code, m, rp, _) = run_with(stream[..cut].to_vec(), Layout::Adopt, "cut", true);
        assert_ne!(code, 0);
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
        assert_ne!(code, 0);
        let err = m["error"].as_str().unwrap();
        assert!(err.contains("pc.ram") && err.contains("offset"), "{err}");
    }

    #[test]
    fn file_uri_is_received_without_return_path() {
        let stream = capture("q10-stopped");
        let dir_tmp = tmpdir("file");
        let dir = dir_tmp.path();
        std::fs::create_dir_all(dir).unwrap();
        let input = dir.join("in.stream");
        std::fs::write(&input, &stream).unwrap();
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let uri = MigUri::File(input);
        let l = Listener::open(&uri).unwrap();
        receive(
            l,
            &out,
            Layout::Adopt,
            None,
            &uri.to_string(),
            0,
            Recover {
                idle: Duration::from_secs(60),
                listener: None,
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        let m = Manifest::read(&out).unwrap();
        assert!(m.complete);
        assert!(!m.recv.unwrap().return_path);
        assert_eq!(m.applied_up_to, Some(stream.len() as u64));
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
        let (code, m, rp, dir) = run_touch(stream.clone(), Layout::Adopt, "pc", false, 2, hold);
        assert_eq!(code, 0, "{m}");
        assert_eq!(m["complete"], true);
        assert_eq!(m["postcopy_state"], "end");
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
            // Every request answered and placed; the counters count
            // placements that succeeded, the phases split each round trip.
            assert_eq!(pc["outstanding_requests"], 0);
            let n = pc["request_latency_us"]["count"].as_u64().unwrap();
            assert_eq!(n, reqs.len() as u64, "{pc}");
            assert!(pc["placed_host_pages"].as_u64().unwrap() >= n, "{pc}");
            let phases = pc["request_phases_us"].as_array().unwrap();
            assert_eq!(phases.len(), 3, "{pc}");
            for ph in phases {
                assert_eq!(ph["count"].as_u64().unwrap(), n, "{pc}");
            }
            // No preempt channel: every page came on the main channel.
            assert_eq!(pc["request_latency_main_us"]["count"].as_u64(), Some(n));
            assert_eq!(pc["request_latency_preempt_us"]["count"].as_u64(), Some(0));
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
        same_images_as_extract(&m, &dir.path().join("out"), "pc", "q10-postcopy");
    }

    /// Where POSTCOPY_RUN ends in a capture (the fake source holds the rest
    /// back until a page is asked for).
    fn after_postcopy_run(stream: &[u8]) -> Option<usize> {
        let mut rd = qmig_wire::SliceReader::new(stream);
        while let Some(r) = rd.next() {
            let (_, item) = r.unwrap();
            if matches!(item, Item::Command(qmig_wire::Command::PostcopyRun)) {
                return Some(rd.decoder().position() as usize);
            }
        }
        None
    }

    /// A block with 2 MiB pages (hugetlbfs on the source) is demand-paged
    /// in 2 MiB host pages: in hugetlbfs memory when huge pages are free,
    /// else in anonymous memory placed 2 MiB at a time; the touch threads
    /// fault on it, the requests for it are whole 2 MiB pages, and the images
    /// are right.
    #[test]
    fn hugepage_postcopy_is_demand_paged_in_2mib_pages() {
        let stream = capture("q10-hugepage-postcopy");
        let hold = after_postcopy_run(&stream);
        assert!(hold.is_some(), "the capture has POSTCOPY_RUN");
        let uffd = qmig_uffd_host::probe().is_ok();
        let (code, m, rp, dir) = run_touch(stream, Layout::Adopt, "hp", false, 2, hold);
        assert_eq!(code, 0, "{m}");
        let pc = &m["postcopy"];
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        assert!(
            matches!(msgs.last(), Some((_, RpMessage::Shut(0)))),
            "{msgs:?}"
        );
        eprintln!("postcopy: {pc}");
        if uffd {
            assert_eq!(pc["mode"], "userfaultfd", "{pc}");
            let hp = pc["backing"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["host_page_size"] == 2 << 20)
                .unwrap_or_else(|| panic!("no 2 MiB block: {pc}"));
            assert!(
                hp["backing"] == "hugetlbfs" || hp["backing"] == "anonymous",
                "{hp}"
            );
            let huge_reqs = msgs
                .iter()
                .filter(|(_, x)| {
                    matches!(x, RpMessage::ReqPages { len, .. } | RpMessage::ReqPagesId { len, .. }
                        if *len == 2 << 20)
                })
                .count();
            assert!(huge_reqs > 0, "no 2 MiB request: {msgs:?}");
            assert_eq!(pc["touch_threads_unfinished"], 0, "{pc}");
            assert_eq!(pc["touch_pattern"], "random");
            assert_eq!(pc["fault_latency_dist_us"].as_array().unwrap().len(), 26);
        } else {
            assert!(pc["mode"].as_str().unwrap().starts_with("passive"), "{pc}");
        }
        same_images_as_extract(&m, &dir.path().join("out"), "hp", "q10-hugepage-postcopy");
    }

    /// A recovered postcopy migration replayed by a fake source from the
    /// real capture set (tests/data/recovery/q10-postcopy-relay-cut): the
    /// first main connection is sent and closed (cut inside a record), the
    /// destination pauses; a second connection to the same address sends the
    /// recovery connection. The return path of the second connection carries
    /// QEMU 10's own RECV_BITMAP replies and RESUME_ACK byte for byte, the
    /// migration completes with SHUT(0), pc.ram equals the source's pmemsave
    /// (oracle digests), and `--save` recorded the capture set.
    #[test]
    fn recovery_connection_on_the_same_address_completes() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/recovery/q10-postcopy-relay-cut");
        let gz = |f: &str| qmig_tests::gunzip(&std::fs::read(d.join(f)).unwrap());
        let (main1, main2, rp2) = (gz("main-1.bin.gz"), gz("main-2.bin.gz"), gz("rp-2.bin.gz"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let m1 = main1.clone();
        let src = std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(&m1).unwrap();
            // The cut: FIN follows the last byte of main-1, so the
            // destination reads all of it (the bitmaps it replies later are
            // those of the whole first connection) before the stream ends
            // inside a record. Its return path is read meanwhile (a socket
            // closed with unread bytes sends RST, which would discard main-1
            // bytes the destination has not read yet) until the destination
            // closes it, which it does when it pauses.
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut rp1 = Vec::new();
            s.read_to_end(&mut rp1)
                .expect("the destination ends the return path when it pauses");
            qmig_wire::parse_return_path(&rp1).expect("return path of main-1");
            drop(s);
            // Like a real source, try again when the recovery connection is
            // closed unanswered: one that arrives between the pause and the
            // destination dropping connections "opened before the pause"
            // is closed. The pause has happened (the return path ended), so
            // only that short window is retried, for at most 30 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let mut rp = Vec::new();
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let _ = s.write_all(&main2);
                let _ = s.read_to_end(&mut rp);
                if !rp.is_empty() || std::time::Instant::now() > deadline {
                    break rp;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let dir = tmpdir("recover");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let save = dir.path().join("saved");
        let r = receive(
            Listener::Tcp(listener),
            &out,
            Layout::Adopt,
            Some(&save),
            "test",
            0,
            Recover {
                idle: Duration::from_secs(60),
                listener: None,
                timeout: Duration::from_secs(20),
            },
        );
        let rp = src.join().unwrap();
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert!(r.is_ok(), "{m}");
        assert_eq!(m["complete"], true);
        assert_eq!(m["postcopy"]["pauses"], 1);
        assert_eq!(m["postcopy"]["resumes"], 1);
        let ours = qmig_wire::parse_return_path(&rp).unwrap();
        let theirs = qmig_wire::parse_return_path(&rp2).unwrap();
        let ack = ours
            .iter()
            .position(|(_, x)| matches!(x, RpMessage::ResumeAck(1)))
            .unwrap();
        assert!(ack > 0);
        let strip = |v: &[(u64, RpMessage<'_>)]| {
            v.iter().map(|(_, x)| format!("{x:?}")).collect::<Vec<_>>()
        };
        assert_eq!(strip(&ours[..=ack]), strip(&theirs[..=ack]));
        assert!(
            matches!(ours.last(), Some((_, RpMessage::Shut(0)))),
            "{ours:?}"
        );
        let o: Value =
            serde_json::from_slice(&std::fs::read(d.join("oracle.json")).unwrap()).unwrap();
        let img = std::fs::read(out.join(m["blocks"][0]["file"].as_str().unwrap())).unwrap();
        for dg in o["digests"].as_array().unwrap() {
            let (at, len) = (
                dg["offset"].as_u64().unwrap() as usize,
                dg["length"].as_u64().unwrap() as usize,
            );
            let mut buf = img[at.min(img.len())..(at + len).min(img.len())].to_vec();
            buf.resize(len, 0);
            assert_eq!(
                qmig_tests::sha256::hex(&buf),
                dg["sha256"].as_str().unwrap()
            );
        }
        assert_eq!(std::fs::read(&save).unwrap(), main1);
        let rec = crate::recover::conn_path(&save, "main", 2);
        assert_eq!(std::fs::read(rec).unwrap(), gz("main-2.bin.gz"));
        assert_eq!(
            std::fs::read(crate::recover::conn_path(&save, "rp", 2)).unwrap(),
            rp
        );
    }

    /// The images `run_touch(.., tag, ..)` wrote to `out` equal `extract`'s of the capture.
    fn same_images_as_extract(m: &Value, out: &Path, tag: &str, name: &str) {
        let ex_tmp = tmpdir(&format!("{tag}-extract"));
        let ex = ex_tmp.path();
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(name)
            .join("stream");
        crate::extract::run(&p, ex, &[]).unwrap();
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
