//! `qmig recv` of multifd migrations (wire-format §13): the extra channel
//! connections, applied in one thread each alongside the main stream.
//!
//! A QEMU source connects its multifd channels right after the main
//! connection, and has written every channel's first SYNC packet before the
//! MULTIFD_FLUSH of its RAM setup section reaches the main stream. So the
//! listener is kept after the main connection, and at the main stream's
//! first sync point every connection waiting on it is accepted as a
//! channel (identified by its header: magic, version, UUID, id). Each
//! channel thread reads packets, inflates them without holding the
//! destination's lock, and applies them under it. At a SYNC packet a
//! channel waits until the main stream reaches the sync point it pairs
//! with; the main stream does not pass that point until every channel has
//! delivered its SYNC (QEMU's `multifd_recv_sync_main`).
//!
//! Refused, naming the capability: multifd with postcopy-ram, TLS, and
//! the qpl, uadk and qatzip compression methods.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmig_ram_dst::multifd::{ChannelDecoder, ChannelStats, MultifdError, SyncPairing, SyncPoint};
use qmig_ram_dst::PostcopyState;
use qmig_wire::{Item, ReadItem};

use crate::extract::StopError;
use crate::multifd_apply::{check_init, Channel, PacketReader, Reached};
use crate::postcopy::{lock, Inner};
use crate::recv::Listener;

/// How often a blocked channel read or sync wait looks at the stop flag
/// and the signals.
const POLL: Duration = Duration::from_millis(200);

/// When a channel last made progress, in milliseconds since [`epoch`]
/// (0: never). The main stream's `--idle-timeout` counts only time when
/// neither it nor a channel received anything: during a long first pass
/// every page may travel on the channels.
static LAST_CHANNEL_DATA_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn channel_progress() {
    let ms = epoch().elapsed().as_millis() as u64 + 1;
    LAST_CHANNEL_DATA_MS.store(ms, Ordering::Relaxed);
}

/// Whether a multifd channel received data within `idle`.
pub(crate) fn channels_active(idle: Duration) -> bool {
    let last = LAST_CHANNEL_DATA_MS.load(Ordering::Relaxed);
    last != 0 && epoch().elapsed().as_millis() as u64 + 1 - last < idle.as_millis() as u64
}

/// Where `--save` puts the main stream: `DIR/conn-0.bin` when `--save`
/// names an existing directory, else the path itself.
pub(crate) fn save_main_path(save: &Path) -> PathBuf {
    if save.is_dir() {
        save.join("conn-0.bin")
    } else {
        save.to_path_buf()
    }
}

/// Where `--save` puts channel connection `n` (1, 2, ... in accept
/// order): `DIR/conn-N.bin`, or `FILE.conn-N.bin` beside the main stream.
pub(crate) fn save_channel_path(save: &Path, n: usize) -> PathBuf {
    if save.is_dir() {
        save.join(format!("conn-{n}.bin"))
    } else {
        let mut s = save.as_os_str().to_owned();
        s.push(format!(".conn-{n}.bin"));
        PathBuf::from(s)
    }
}

/// State shared by the main stream and the channel threads.
#[derive(Default)]
struct State {
    pairing: SyncPairing,
    /// Channel ids by connection index (once their header is read).
    ids: Vec<Option<u32>>,
    /// Whether each channel's connection has ended.
    ended: Vec<bool>,
    /// The first channel error.
    error: Option<MultifdError>,
    /// Channel headers seen: id → connection.
    seen: BTreeMap<u8, String>,
    uuid: Option<[u8; 16]>,
    /// Set when the channels must stop (end of the migration, or error).
    stop: bool,
    /// When a channel last made progress (for `--idle-timeout`).
    progress: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The multifd side of one `qmig recv`.
pub(crate) struct MultifdRecv {
    listener: Option<Listener>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<(u32, ChannelStats)>>,
    point: Option<SyncPoint>,
    started: bool,
    save: Option<PathBuf>,
    abort: Arc<AtomicBool>,
    idle: Duration,
}

/// A channel socket read that wakes up every [`POLL`] to look at the stop
/// flag and the signals.
struct ChannelSock {
    sock: Box<dyn Read + Send>,
    shared: Arc<Shared>,
}

impl Read for ChannelSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.sock.read(buf) {
                Ok(n) => {
                    channel_progress();
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.lock().stop {
                        return Err(std::io::Error::other("stopped"));
                    }
                    if let Some(sig) = crate::signals::pending() {
                        return Err(std::io::Error::other(format!(
                            "interrupted by {}",
                            crate::error::signal_name(sig)
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl MultifdRecv {
    /// Keeps `listener` (sockets only) for the channels; `abort` stops the
    /// main stream's reader when a channel fails.
    pub(crate) fn new(
        listener: Listener,
        save: Option<&Path>,
        abort: Arc<AtomicBool>,
        idle: Duration,
    ) -> Self {
        let listener = match listener {
            l @ (Listener::Tcp(_) | Listener::Unix(..)) => Some(l),
            _ => None,
        };
        MultifdRecv {
            listener,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                cv: Condvar::new(),
            }),
            threads: Vec::new(),
            point: None,
            started: false,
            save: save.map(Path::to_path_buf),
            abort,
            idle,
        }
    }

    /// Called for every main-stream item before it is applied: at a sync
    /// point, accepts the channels (the first time) and waits until every
    /// channel delivered the SYNC that pairs with it, then lets them go on.
    ///
    /// # Errors
    /// A channel's error, a refused combination, a signal, or no channel
    /// progress for the idle timeout.
    pub(crate) fn before_item(
        &mut self,
        ri: &ReadItem<'_>,
        inner: &Arc<Mutex<Inner>>,
    ) -> Result<(), StopError> {
        let Item::Ram(rec) = &ri.item else {
            return Ok(());
        };
        if !matches!(
            rec.body,
            qmig_wire::RamBody::Eos | qmig_wire::RamBody::MultifdFlush
        ) {
            return Ok(());
        }
        let point = match self.point {
            Some(p) => p,
            None => {
                let p = SyncPoint::for_machine(lock(inner).session.dst.machine_version());
                self.point = Some(p);
                p
            }
        };
        if !point.matches(&rec.body) {
            return Ok(());
        }
        if !self.started {
            self.started = true;
            self.start(ri.offset, inner)?;
        }
        if self.threads.is_empty() {
            return Ok(());
        }
        let mut st = self.shared.lock();
        st.progress = Some(Instant::now());
        loop {
            if let Some(e) = st.error.take() {
                return Err(StopError::Multifd(e));
            }
            if st.pairing.all_synced() {
                break;
            }
            let k = st.pairing.released + 1;
            if let Some(i) = (0..st.ended.len()).find(|&i| st.ended[i] && st.pairing.synced[i] < k)
            {
                let ch = st.ids[i].map_or(format!("connection {}", i + 1), |id| {
                    format!("channel {id}")
                });
                return Err(StopError::Multifd(MultifdError::Rule {
                    stream: "main".into(),
                    offset: ri.offset,
                    rule: "multifd_recv_sync_main",
                    why: format!(
                        "{ch} closed before its SYNC {k}, which pairs with this sync point"
                    ),
                }));
            }
            if let Some(sig) = crate::signals::pending() {
                return Err(StopError::Interrupted(sig));
            }
            if st.progress.is_some_and(|t| t.elapsed() > self.idle) {
                let waiting: Vec<String> = (0..st.ids.len())
                    .filter(|&i| st.pairing.synced[i] < k)
                    .map(|i| st.ids[i].map_or(format!("connection {}", i + 1), |id| id.to_string()))
                    .collect();
                return Err(StopError::Peer {
                    message: format!(
                        "no SYNC {k} from multifd channel(s) {} for {} s (--idle-timeout)",
                        waiting.join(", "),
                        self.idle.as_secs()
                    ),
                    offset: ri.offset,
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.pairing.released += 1;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Gives the listener up (postcopy: later connections are the preempt
    /// channel and recovery connections), if no channel took it.
    pub(crate) fn take_listener(&mut self) -> Option<Listener> {
        self.listener.take()
    }

    /// Accepts every connection waiting on the listener as a channel and
    /// starts its thread.
    fn start(&mut self, at: u64, inner: &Arc<Mutex<Inner>>) -> Result<(), StopError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let mut socks: Vec<Box<dyn Read + Send>> = Vec::new();
        let accept_err = |e: std::io::Error| {
            StopError::Multifd(MultifdError::Rule {
                stream: "main".into(),
                offset: at,
                rule: "multifd",
                why: format!("accepting the channel connections: {e}"),
            })
        };
        match &listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true).map_err(accept_err)?;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).map_err(accept_err)?;
                            s.set_read_timeout(Some(POLL)).map_err(accept_err)?;
                            let _ = s.set_nodelay(true);
                            socks.push(Box::new(s) as Box<dyn Read + Send>);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(accept_err(e)),
                    }
                }
            }
            Listener::Unix(l, _) => {
                l.set_nonblocking(true).map_err(accept_err)?;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).map_err(accept_err)?;
                            s.set_read_timeout(Some(POLL)).map_err(accept_err)?;
                            socks.push(Box::new(s) as Box<dyn Read + Send>);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(accept_err(e)),
                    }
                }
            }
            _ => {}
        }
        drop(listener);
        if socks.is_empty() {
            return Ok(());
        }
        let (page_size, postcopy) = {
            let g = lock(inner);
            (g.session.dst.page_size(), g.session.dst.postcopy_state())
        };
        if postcopy != PostcopyState::None {
            return Err(StopError::Multifd(MultifdError::Rule {
                stream: "main".into(),
                offset: at,
                rule: "postcopy-ram",
                why: format!(
                    "{} multifd channels with postcopy-ram: qmig recv does not support multifd together with postcopy",
                    socks.len()
                ),
            }));
        }
        {
            let mut st = self.shared.lock();
            let n = socks.len();
            st.pairing.synced = vec![0; n];
            st.ids = vec![None; n];
            st.ended = vec![false; n];
        }
        if !crate::progress::quiet() {
            eprintln!("qmig recv: {} multifd channel connections", socks.len());
        }
        for (i, sock) in socks.into_iter().enumerate() {
            let save = match &self.save {
                Some(p) => {
                    let path = save_channel_path(p, i + 1);
                    let f = File::create(&path).map_err(|e| StopError::Io {
                        path: path.clone(),
                        op: "create (--save)",
                        offset: at,
                        source: e,
                    })?;
                    Some((path, f))
                }
                None => None,
            };
            let shared = self.shared.clone();
            let inner = inner.clone();
            let abort = self.abort.clone();
            let sock = ChannelSock {
                sock,
                shared: shared.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("multifd-recv-{i}"))
                .spawn(move || channel_thread(i, sock, save, page_size, inner, shared, abort))
                .map_err(|e| {
                    StopError::Multifd(MultifdError::Rule {
                        stream: "main".into(),
                        offset: at,
                        rule: "multifd",
                        why: format!("starting a channel thread: {e}"),
                    })
                })?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// Stops and joins the channel threads; a channel error takes the
    /// place of the main stream's result (the main reader was aborted
    /// because of it).
    pub(crate) fn finish(&mut self, result: Result<(), StopError>) -> Result<(), StopError> {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        let mut stats = Vec::new();
        for h in self.threads.drain(..) {
            if let Ok(s) = h.join() {
                stats.push(s);
            }
        }
        stats.sort_by_key(|s| s.0);
        crate::multifd_apply::report(&stats);
        let err = self.shared.lock().error.take();
        match (result, err) {
            (Ok(()), Some(e)) | (Err(StopError::Wire(_)), Some(e)) => Err(StopError::Multifd(e)),
            (r, _) => r,
        }
    }
}

/// One channel: header, then packets up to each SYNC, waiting there for
/// the main stream.
fn channel_thread(
    i: usize,
    sock: ChannelSock,
    save: Option<(PathBuf, File)>,
    page_size: u64,
    inner: Arc<Mutex<Inner>>,
    shared: Arc<Shared>,
    abort: Arc<AtomicBool>,
) -> (u32, ChannelStats) {
    let label = i as u32 + 1;
    let mut stats = (label, ChannelStats::default());
    let r = (|| -> Result<(), MultifdError> {
        let mut rd = PacketReader::new(sock, label, page_size, save);
        let init = rd.init();
        let init = match init {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Err(MultifdError::Rule {
                    stream: format!("connection {label}"),
                    offset: 0,
                    rule: "multifd_recv_initial_packet",
                    why: "closed before its channel header".into(),
                })
            }
            Err(e) => return Err(e),
        };
        {
            let mut st = shared.lock();
            let st = &mut *st;
            check_init(
                &init,
                &mut st.seen,
                &mut st.uuid,
                Path::new(&format!("connection {label}")),
            )?;
            st.ids[i] = Some(u32::from(init.id));
        }
        stats.0 = u32::from(init.id);
        let mut ch = Channel {
            rd,
            dec: ChannelDecoder::new(u32::from(init.id), page_size),
        };
        let r = (|| loop {
            let reached = ch.run_to_sync(|id, d| {
                let r = lock(&inner).session.dst.apply_multifd(id, d);
                shared.lock().progress = Some(Instant::now());
                r
            })?;
            match reached {
                Reached::End(_) => {
                    shared.lock().ended[i] = true;
                    shared.cv.notify_all();
                    return Ok(());
                }
                Reached::Sync(at) => {
                    let mut st = shared.lock();
                    st.pairing.sync(i, u32::from(init.id), at)?;
                    st.progress = Some(Instant::now());
                    shared.cv.notify_all();
                    while st.pairing.released < st.pairing.synced[i] && !st.stop {
                        st = shared
                            .cv
                            .wait_timeout(st, POLL)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    if st.stop {
                        return Ok(());
                    }
                }
            }
        })();
        let _ = ch.rd.flush_save();
        stats.1 = ch.dec.stats;
        r
    })();
    if let Err(e) = r {
        let mut st = shared.lock();
        if !st.stop {
            if st.error.is_none() {
                st.error = Some(e);
            }
            abort.store(true, Ordering::SeqCst);
        }
        st.ended[i] = true;
        shared.cv.notify_all();
    }
    stats
}
