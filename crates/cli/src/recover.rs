//! Postcopy recovery and postcopy-preempt for `qmig recv` (wire-format
//! §11, §12).
//!
//! From POSTCOPY_ADVISE on, [`Recovery`] holds the listener (and the
//! `--recover-listen` one) and sorts new connections as QEMU's destination
//! does, by when they arrive, never by their bytes:
//! * while the migration is paused, the next connection is the source's
//!   recovery connection (the stream reader waits for it for at most
//!   `--recover-timeout`);
//! * when the main channel reaches POSTCOPY_LISTEN, or POSTCOPY_RESUME on a
//!   recovery connection, a connection already waiting is that main
//!   connection's postcopy-preempt channel: a QEMU source opens it before it
//!   sends the package (8.0+ machine types; 7.2: at connect) and re-opens it
//!   before POSTCOPY_RESUME, and waits until it is connected. It is read by
//!   a thread of its own (page records only, through
//!   [`RamDst::handle_preempt_item`](qmig_ram_dst::RamDst::handle_preempt_item)).
//!
//! `--save`: every connection is recorded (main connections, preempt
//! channels, return paths), see [`conn_path`].

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmig_ram_dst::PostcopyState;
use qmig_wire::{Decoder, StreamReader, WireError};

use crate::postcopy::{lock, Inner};
use crate::recv::{Listener, Tee};

/// How often the acceptor looks for connections and its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Shuts a connection down (both directions), waking its reader.
pub(crate) type Kick = Arc<dyn Fn() + Send + Sync>;

/// An accepted connection.
pub(crate) struct Conn {
    pub(crate) src: Box<dyn Read + Send>,
    pub(crate) rp: Box<dyn Write + Send>,
    pub(crate) peer: String,
    pub(crate) kick: Kick,
}

/// Where `--save` records a connection other than the first main one:
/// `DIR/KIND-N.bin` when `--save` names a directory, else
/// `FILE.KIND-N.bin` beside it (`KIND`: `main` for recovery connections,
/// `preempt`, `rp` for return paths; `N` 1-based, the main connection's
/// number for its return path and preempt channel).
pub(crate) fn conn_path(save: &Path, kind: &str, n: usize) -> PathBuf {
    if save.is_dir() {
        save.join(format!("{kind}-{n}.bin"))
    } else {
        let mut s = save.as_os_str().to_owned();
        s.push(format!(".{kind}-{n}.bin"));
        PathBuf::from(s)
    }
}

/// A return path that also records what it sends (`--save`). The file is
/// created at the first write.
pub(crate) struct RpTee {
    pub(crate) inner: Box<dyn Write + Send>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) file: Option<File>,
}

impl Write for RpTee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        if let Some(p) = &self.path {
            if self.file.is_none() {
                self.file = File::create(p).ok();
            }
            if let Some(f) = &mut self.file {
                if f.write_all(&b[..n]).is_err() {
                    self.file = None;
                    self.path = None;
                }
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Accepts one connection waiting on `l`, if any (non-blocking), as a
/// [`Conn`] with a [`crate::recv::POLL`] read timeout and `idle` write timeout.
pub(crate) fn try_accept(l: &Listener, idle: Duration) -> std::io::Result<Option<Conn>> {
    match l {
        Listener::Tcp(t) => {
            t.set_nonblocking(true)?;
            let (s, peer) = match t.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            let _ = s.set_nodelay(true);
            // Recovery connections are postcopy from their first byte.
            crate::recv::postcopy_rcvbuf(std::os::fd::AsRawFd::as_raw_fd(&s));
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(crate::recv::POLL))?;
            s.set_write_timeout(Some(idle))?;
            let rp = s.try_clone()?;
            let k = s.try_clone()?;
            Ok(Some(Conn {
                src: Box::new(s),
                rp: Box::new(crate::recv::SocketRp(rp)),
                peer: peer.to_string(),
                kick: Arc::new(move || {
                    let _ = k.shutdown(Shutdown::Both);
                }),
            }))
        }
        Listener::Unix(u, p) => {
            u.set_nonblocking(true)?;
            let s = match u.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(crate::recv::POLL))?;
            s.set_write_timeout(Some(idle))?;
            let rp = s.try_clone()?;
            let k = s.try_clone()?;
            Ok(Some(Conn {
                src: Box::new(s),
                rp: Box::new(crate::recv::SocketRp(rp)),
                peer: format!("unix:{}", p.display()),
                kick: Arc::new(move || {
                    let _ = k.shutdown(Shutdown::Both);
                }),
            }))
        }
        _ => Ok(None),
    }
}

/// One preempt channel reader.
struct PreemptReader {
    stop: Arc<AtomicBool>,
    kick: Kick,
    handle: JoinHandle<()>,
}

/// State shared by the stream reader, the acceptor and the preempt readers.
pub(crate) struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// The main channel's decoder at POSTCOPY_LISTEN (or of the recovery
    /// connection): the RAM context a preempt channel is read with.
    template: Mutex<Option<Decoder>>,
    /// Number of the current main connection (1-based).
    main_index: AtomicUsize,
    /// Main connection number whose preempt channel was accepted last.
    preempt_for: AtomicUsize,
    preempt: Mutex<Vec<PreemptReader>>,
    save: Option<PathBuf>,
    idle: Duration,
    /// Set when a preempt channel fails: the stream reader stops.
    abort: Arc<AtomicBool>,
    /// Shuts the current main connection down (a preempt channel that broke
    /// makes the main one pause too, as in QEMU).
    main_kick: Mutex<Option<Kick>>,
    /// Recorded connection files (role, path), in order.
    pub(crate) saved: Mutex<Vec<(&'static str, PathBuf)>>,
}

/// The recovery side of one `qmig recv`, from POSTCOPY_ADVISE on.
pub(crate) struct Recovery {
    pub(crate) shared: Arc<Shared>,
    listeners: Vec<Listener>,
    pub(crate) timeout: Duration,
}

impl Recovery {
    /// Starts the acceptor over `listeners`.
    pub(crate) fn start(
        listeners: Vec<Listener>,
        inner: &Arc<Mutex<Inner>>,
        save: Option<&Path>,
        idle: Duration,
        abort: Arc<AtomicBool>,
        timeout: Duration,
        main_kick: Option<Kick>,
    ) -> Self {
        let shared = Arc::new(Shared {
            inner: inner.clone(),
            template: Mutex::new(None),
            main_index: AtomicUsize::new(1),
            preempt_for: AtomicUsize::new(0),
            preempt: Mutex::new(Vec::new()),
            save: save.map(Path::to_path_buf),
            idle,
            abort,
            main_kick: Mutex::new(main_kick),
            saved: Mutex::new(Vec::new()),
        });
        Recovery {
            shared,
            listeners,
            timeout,
        }
    }

    /// The main channel reached POSTCOPY_LISTEN (or a recovery connection
    /// was accepted): preempt channels are read with `dec`'s RAM context.
    pub(crate) fn set_template(&self, dec: &Decoder) {
        *self
            .shared
            .template
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(dec.clone());
    }

    /// Stops and shuts down every preempt channel reader (pause, or end).
    pub(crate) fn stop_preempt(&self, wait: Duration) {
        let readers: Vec<PreemptReader> = self
            .shared
            .preempt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for r in &readers {
            r.stop.store(true, Ordering::Release);
            (r.kick)();
        }
        let t0 = Instant::now();
        for r in readers {
            while !r.handle.is_finished() && t0.elapsed() < wait {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.handle.is_finished() {
                let _ = r.handle.join();
            }
        }
    }

    /// Closes every connection already waiting on the listeners: when the
    /// main connection pauses, those were opened before the cut (e.g. the
    /// broken connection's preempt channel, not yet accepted) and would be
    /// taken for the recovery connection. A source that reconnected that fast
    /// sees its recovery connection cut and retries (QEMU's `migrate-recover`
    /// listens afresh, so it never sees them either). Returns how many.
    pub(crate) fn drop_pending(&self) -> usize {
        let mut n = 0;
        for l in &self.listeners {
            while let Ok(Some(c)) = try_accept(l, self.shared.idle) {
                eprintln!(
                    "qmig recv: note: a connection from {} opened before the pause: closed",
                    c.peer
                );
                (c.kick)();
                n += 1;
            }
        }
        n
    }

    /// Waits for the source's recovery connection, at most the recover
    /// timeout; `Ok(None)` when it did not come, `Err(signal)` on a signal.
    pub(crate) fn wait_recovery(&self) -> Result<Option<Conn>, i32> {
        let t0 = Instant::now();
        loop {
            if let Some(sig) = crate::signals::pending() {
                return Err(sig);
            }
            for l in &self.listeners {
                match try_accept(l, self.shared.idle) {
                    Ok(Some(c)) => return Ok(Some(c)),
                    Ok(None) => {}
                    Err(e) => eprintln!("qmig recv: note: accept: {e}"),
                }
            }
            if t0.elapsed() >= self.timeout {
                return Ok(None);
            }
            std::thread::sleep(ACCEPT_POLL);
        }
    }

    /// The main channel reached POSTCOPY_LISTEN or POSTCOPY_RESUME: a
    /// connection waiting now is the current main connection's preempt
    /// channel (see the module documentation); it is read from now on.
    pub(crate) fn accept_preempt(&self) {
        let main = self.shared.main_index.load(Ordering::Acquire);
        for l in &self.listeners {
            loop {
                let c = match try_accept(l, self.shared.idle) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("qmig recv: note: accept: {e}");
                        break;
                    }
                };
                if self.shared.preempt_for.load(Ordering::Acquire) >= main {
                    eprintln!(
                        "qmig recv: note: a second connection from {} beside the preempt \
                         channel of main connection {main}: closed",
                        c.peer
                    );
                    (c.kick)();
                    continue;
                }
                self.shared.preempt_for.store(main, Ordering::Release);
                if !crate::progress::quiet() {
                    eprintln!("qmig recv: postcopy-preempt channel {main} from {}", c.peer);
                }
                start_preempt(&self.shared, c, main);
            }
        }
    }

    /// POSTCOPY_RESUME on a recovery connection: when the source used a
    /// preempt channel before the cut, it has opened a new one before it
    /// sent the command (QEMU's destination waits for it there too), but
    /// through a proxy it may reach the listener a little later: waits for
    /// it, at most `timeout`. Without this, the requested pages the source
    /// writes on it would never be read.
    pub(crate) fn accept_preempt_after_resume(&self, timeout: Duration) {
        if self.shared.preempt_for.load(Ordering::Acquire) == 0 {
            // No preempt channel so far: the source does not use one.
            return;
        }
        let t0 = Instant::now();
        loop {
            self.accept_preempt();
            let main = self.shared.main_index.load(Ordering::Acquire);
            if self.shared.preempt_for.load(Ordering::Acquire) >= main {
                return;
            }
            if t0.elapsed() >= timeout {
                eprintln!(
                    "qmig recv: note: no postcopy-preempt channel for main connection {main} \
                     within {} s of POSTCOPY_RESUME",
                    timeout.as_secs_f64()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A recovery connection was accepted: it is main connection `n`.
    pub(crate) fn new_main(&self, n: usize, kick: Kick) {
        self.shared.main_index.store(n, Ordering::Release);
        *self
            .shared
            .main_kick
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(kick);
    }

    /// Shuts the current main connection down (its reader then pauses).
    pub(crate) fn kick_main(&self) {
        if let Some(k) = self
            .shared
            .main_kick
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            k();
        }
    }

    /// Stops the acceptor and the preempt readers.
    pub(crate) fn finish(self) -> Vec<(&'static str, PathBuf)> {
        self.stop_preempt(Duration::from_secs(2));
        std::mem::take(&mut *self.shared.saved.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn start_preempt(sh: &Arc<Shared>, c: Conn, n: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let kick = c.kick.clone();
    let (sh2, stop2) = (sh.clone(), stop.clone());
    let handle = std::thread::Builder::new()
        .name(format!("qmig-preempt-{n}"))
        .spawn(move || preempt_reader(&sh2, c, n, &stop2));
    if let Ok(handle) = handle {
        sh.preempt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(PreemptReader { stop, kick, handle });
    }
}

/// Reads preempt channel `n`: page records applied under the lock, with
/// the channel's own host page and last block.
fn preempt_reader(sh: &Shared, c: Conn, n: usize, stop: &Arc<AtomicBool>) {
    let dec = loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(d) = sh
            .template
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            break d.preempt_channel();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let save = sh.save.as_ref().and_then(|s| {
        let p = conn_path(s, "preempt", n);
        let f = File::create(&p).ok()?;
        sh.saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(("preempt", p));
        Some(crate::recv::SaveFile::new(f))
    });
    // The preempt channel carries nothing back; keep its writing half open.
    let _rp = c.rp;
    let tee = Tee {
        src: c.src,
        polled: true,
        idle: Duration::MAX,
        last_data: Instant::now(),
        save,
        received: Rc::new(Cell::new(0)),
        after_eof: Rc::new(Cell::new(None)),
        save_error: Rc::new(RefCell::new(None)),
        abort: stop.clone(),
    };
    let mut rd = StreamReader::with_decoder(tee, dec);
    let mut out = Vec::new();
    loop {
        let ri = match rd.next_item() {
            Ok(Some(ri)) => ri,
            Ok(None) => return,
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                // A broken preempt channel: QEMU pauses the migration;
                // shutting the main connection down makes the reader pause.
                let state = lock(&sh.inner).session.dst.postcopy_state();
                if matches!(state, PostcopyState::Running | PostcopyState::Recovering) {
                    if !matches!(e, WireError::Truncated { .. } | WireError::Io { .. }) {
                        eprintln!("qmig recv: preempt channel {n}: {e}");
                    }
                    if let Some(k) = sh
                        .main_kick
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                    {
                        k();
                    }
                }
                return;
            }
        };
        let mut g = crate::postcopy::lock_urgent(&sh.inner);
        // Bytes the cut channel delivered after the main connection paused
        // (or after `stop_preempt`) are dropped: the source sends whatever
        // the received bitmap lacks again after the resume.
        if stop.load(Ordering::Acquire)
            || matches!(
                g.session.dst.postcopy_state(),
                PostcopyState::Paused | PostcopyState::Recovering
            )
        {
            return;
        }
        let mut r = g
            .session
            .dst
            .handle_preempt_item(ri.offset, &ri.item)
            .map_err(|e| format!("preempt channel {n}: {e}"));
        if r.is_ok() {
            r = g
                .execute_placements(crate::postcopy::Via::Preempt)
                .map_err(|e| e.to_string());
        }
        g.flush_transmit(&mut out);
        if let Err(e) = r {
            g.host.error.get_or_insert(e);
            drop(g);
            sh.abort.store(true, Ordering::Release);
            return;
        }
    }
}
