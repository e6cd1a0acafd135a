//! The postcopy host of `qmig recv`: guest RAM in anonymous mappings
//! ([`RecvMemory`]), registered with userfaultfd at POSTCOPY_LISTEN, a fault
//! handler thread that turns faults into page requests through the state
//! machine ([`RamDst::handle_page_fault`]), placement of the host pages the
//! state machine assembles, and `--touch` threads that read every page once
//! from POSTCOPY_RUN on, as vCPUs would.
//!
//! Locking: the state machine, the return-path socket and the regions live
//! in one [`Inner`] under one mutex, taken by the stream reader for each item
//! and by the fault threads for each fault (served on the fault thread
//! itself: the request goes out without waking another thread); placements
//! and return-path writes happen under it, so a fault never sees a page half
//! placed.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmig_ram_dst::{
    BlockState, Event, FaultOutcome, FileMemory, GuestMemory, ImageFile, Place, PostcopyState,
};
use qmig_uffd_host::{
    AnonMemory, Backing, Blocktime, BlocktimeHandle, Fault, FaultFn, FaultThread, Latency,
    LiveMemory,
};

use crate::extract::{Images, Session, StopError};
use crate::manifest::{BlockBacking, LatencySummary, PostcopyInfo, VcpuBlocktime};

/// The order in which `--touch` threads read pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TouchPattern {
    /// A pseudo-random permutation of each thread's pages (xorshift64,
    /// seeded by the thread number): faults all over guest memory.
    #[default]
    Random,
    /// Each thread's pages in address order.
    Sequential,
}

impl TouchPattern {
    fn name(self) -> &'static str {
        match self {
            TouchPattern::Random => "random",
            TouchPattern::Sequential => "sequential",
        }
    }
}

/// The `--touch` workload: how many vCPU stand-ins, reading in which order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touch {
    /// Threads started at POSTCOPY_RUN (0: none).
    pub threads: usize,
    /// Page order.
    pub pattern: TouchPattern,
}

impl From<usize> for Touch {
    fn from(threads: usize) -> Self {
        Touch {
            threads,
            pattern: TouchPattern::Random,
        }
    }
}

/// Guest memory of `qmig recv`: anonymous mappings (which userfaultfd can
/// register) while the migration runs, written to sparse image files in the
/// output directory at the end ([`GuestMemory::flush`], only once every
/// region is gone: a registered page that was never placed would block).
pub(crate) struct RecvMemory {
    pub(crate) anon: AnonMemory,
    files: FileMemory,
}

impl RecvMemory {
    pub(crate) fn create(dir: &Path) -> io::Result<Self> {
        Ok(RecvMemory {
            anon: AnonMemory::new(),
            files: FileMemory::create(dir)?,
        })
    }
}

impl RecvMemory {
    /// Copies into the image files every non-zero target page whose
    /// received bit is set (no other page can hold data: pages never
    /// received were never written, and discarded pages were dropped), so
    /// the cost follows what was received, not the block sizes. Call it once
    /// every region is gone: a registered page that is missing would block.
    pub(crate) fn write_images(&mut self, blocks: &[BlockState], tps: u64) -> io::Result<()> {
        let mut buf = vec![0u8; tps as usize];
        for (i, b) in blocks.iter().enumerate() {
            for p in b.received().iter_ones() {
                let at = p * tps;
                self.anon.read(i, at, &mut buf)?;
                if buf.iter().any(|&x| x != 0) {
                    self.files.write(i, at, &buf)?;
                }
            }
        }
        Ok(())
    }
}

impl GuestMemory for RecvMemory {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()> {
        self.anon.set_block_len(index, name, len)?;
        self.files.set_block_len(index, name, len)
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        self.anon.bytes_mut(index, offset, len)
    }

    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        self.anon.zero_page(index, offset, len)
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        self.anon.discard(index, offset, len)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.files.flush()
    }
}

impl Images for RecvMemory {
    fn images(&self) -> Vec<ImageFile> {
        self.files.files()
    }

    fn sync_images(&mut self) -> io::Result<()> {
        self.files.sync_all()
    }
}

/// Where the placements being carried out come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// Records of the main channel (the background stream).
    Main,
    /// Records of a postcopy-preempt channel (requested pages).
    Preempt,
    /// A fault decided locally (a zero page, nothing asked for).
    Local,
}

/// Postcopy bookkeeping kept under the lock.
#[derive(Default)]
pub(crate) struct Host {
    /// How postcopy is served: "userfaultfd", "passive (...)" or unset.
    mode: Option<String>,
    /// Guest memory shared with the fault and touch threads (from LISTEN).
    live: Option<Arc<LiveMemory>>,
    /// Blocktime of every fault thread (one accounting: "all vCPUs blocked"
    /// spans blocks).
    blocktime: Option<BlocktimeHandle>,
    /// How each block was backed at LISTEN.
    backing: Vec<BlockBacking>,
    fault_threads: Vec<FaultThread>,
    /// Host pages asked of the source and not placed yet, with the time the
    /// fault thread read the fault that caused the request.
    waiting: HashMap<(usize, u64), Instant>,
    /// Requests written and not placed: when the current span started.
    request_sent: HashMap<(usize, u64), Instant>,
    /// `request_latency` in spans: fault → request written → page parsed →
    /// placed (the manifest's `request_phases_us`).
    request_phases: [Latency; 3],
    /// Round trips fault → request → placed.
    request_latency: Latency,
    /// The same round trips, by the channel whose record was placed:
    /// `[0]` the main channel, `[1]` a postcopy-preempt channel.
    request_latency_by: [Latency; 2],
    /// Faults handed to the state machine.
    faults_handled: u64,
    /// The first error of the fault handler.
    pub(crate) error: Option<String>,
    touch: Vec<JoinHandle<u64>>,
    /// The return-path bytes of the fault handling (kept to reuse).
    rp_buf: Vec<u8>,
}

/// Everything the stream reader and the fault handler share.
pub(crate) struct Inner {
    pub(crate) session: Session<RecvMemory>,
    /// The return path (sockets only).
    rp: Option<Box<dyn Write + Send>>,
    pub(crate) rp_open: bool,
    pub(crate) rp_error: Option<String>,
    pub(crate) rp_dead: bool,
    idle: Duration,
    pub(crate) host: Host,
}

/// What the host needs besides [`Inner`]: what the fault threads serve
/// faults with, and the `--touch` configuration.
pub(crate) struct Ctl {
    /// The shared state, for the fault threads (weak: they are owned by it).
    inner: Weak<Mutex<Inner>>,
    /// Set when a fault could not be served: the stream reader stops.
    abort: Arc<AtomicBool>,
    touch: Touch,
    touch_stop: Arc<AtomicBool>,
    touched: Arc<AtomicU64>,
    /// Set when the fault handler must stop (end of the migration or error).
    stop: Arc<AtomicBool>,
}

pub(crate) fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Threads waiting for the lock to serve a requested page (fault threads,
/// preempt channel readers): see [`lock_urgent`].
static URGENT: AtomicUsize = AtomicUsize::new(0);

/// Takes the lock for a requested page: the main channel's reader, which
/// takes it once per record of the background stream, lets this thread in
/// first (see [`lock_background`]).
pub(crate) fn lock_urgent(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    URGENT.fetch_add(1, Ordering::AcqRel);
    let g = lock(m);
    URGENT.fetch_sub(1, Ordering::AcqRel);
    g
}

/// Takes the lock for a record of the background stream. A mutex is not
/// fair: the reader, which releases and retakes it for every record,
/// would mostly win it back before a woken fault thread or preempt reader
/// runs (on a loaded machine for milliseconds). It yields while such a
/// thread waits (at most [`URGENT_YIELDS`] times).
pub(crate) fn lock_background(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    let mut n = 0;
    while URGENT.load(Ordering::Acquire) > 0 && n < URGENT_YIELDS {
        std::thread::yield_now();
        n += 1;
    }
    lock(m)
}

/// How often [`lock_background`] yields at most before it takes the lock.
const URGENT_YIELDS: u32 = 1000;

impl Inner {
    pub(crate) fn new(
        session: Session<RecvMemory>,
        rp: Option<Box<dyn Write + Send>>,
        idle: Duration,
    ) -> Self {
        Inner {
            session,
            rp,
            rp_open: false,
            rp_error: None,
            rp_dead: false,
            idle,
            host: Host::default(),
        }
    }

    /// The return path (none for `file:` and `exec:`).
    pub(crate) fn rp_sock(&mut self) -> Option<&mut (dyn Write + Send + 'static)> {
        self.rp.as_deref_mut()
    }

    /// A new return path (a recovery connection's); it is open (the source
    /// opened its return path on the first connection).
    pub(crate) fn set_rp(&mut self, rp: Box<dyn Write + Send>) {
        self.rp = Some(rp);
        self.rp_open = true;
        self.rp_dead = false;
    }

    /// Closes the return path (half-closing a socket for writing).
    pub(crate) fn close_rp(&mut self) {
        self.rp = None;
    }

    /// Writes what the state machine wants sent on the return path.
    pub(crate) fn flush_transmit(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if self.session.dst.poll_transmit(out) {
            self.send(out);
        }
    }

    /// Writes `bytes` on the return path, if it is open and alive.
    fn send(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.rp_dead || !self.rp_open {
            return;
        }
        let Some(rp) = self.rp.as_mut() else {
            return;
        };
        if let Err(e) = rp.write_all(bytes) {
            let why = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!(
                    "return path: the source read nothing for {} s (--idle-timeout)",
                    self.idle.as_secs_f64()
                )
            } else {
                format!("return path: {e}")
            };
            self.rp_error.get_or_insert(why);
            self.rp_dead = true;
        }
    }

    /// The host placed `len` bytes at `offset` of `block`: tell the state
    /// machine (fault latencies are closed by the region itself).
    fn placed(&mut self, block: usize, offset: u64, len: u64, via: Via) -> Result<(), StopError> {
        self.session
            .dst
            .handle_placed(block, offset, len)
            .map_err(StopError::Dst)?;
        if let Some(t) = self.host.request_sent.remove(&(block, offset)) {
            self.host.request_phases[2].record(t.elapsed());
        }
        if let Some(t) = self.host.waiting.remove(&(block, offset)) {
            let d = t.elapsed();
            self.host.request_latency.record(d);
            match via {
                Via::Main => self.host.request_latency_by[0].record(d),
                Via::Preempt => self.host.request_latency_by[1].record(d),
                Via::Local => {}
            }
        }
        Ok(())
    }

    /// Places a host page the state machine assembled (or a zero page it
    /// decided on): with UFFDIO_COPY / UFFDIO_ZEROPAGE into a registered
    /// block, else straight into memory (passive mode).
    ///
    /// A page of the stream that is already present (EEXIST) is an error, as
    /// in QEMU's `postcopy_place_page`: its new content would be lost. For a
    /// zero page decided locally (`via` [`Via::Local`]) it only means a race
    /// with another placement, and is fine.
    fn place(
        &mut self,
        block: usize,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        via: Via,
    ) -> Result<(), StopError> {
        let stream = via != Via::Local;
        if let Some(t) = self.host.request_sent.get_mut(&(block, offset)) {
            self.host.request_phases[1].record(t.elapsed());
            *t = Instant::now();
        }
        let live = self.host.live.as_ref().filter(|l| l.is_registered(block));
        let r = match (live, data) {
            (Some(l), Some(d)) => l.place_page(block, offset, d),
            (Some(l), None) => l.place_zero_page(block, offset, len),
            (None, d) => {
                let mem = self.session.dst.memory_mut();
                let w = match d {
                    Some(d) => mem.write(block, offset, d),
                    None => mem
                        .bytes_mut(block, offset, len as usize)
                        .map(|m| m.fill(0)),
                };
                let at = self.session.dst.applied_up_to();
                return w
                    .map_err(|source| {
                        StopError::Dst(qmig_ram_dst::RamDstError::Memory { offset: at, source })
                    })
                    .and_then(|()| self.placed(block, offset, len, via));
            }
        };
        let why = match r {
            Err(e) => e.to_string(),
            Ok(placed) if stream && placed.already_present > 0 => format!(
                "{:#x} bytes already present (EEXIST; QEMU: postcopy_place_page)",
                placed.already_present
            ),
            Ok(_) => return self.placed(block, offset, len, via),
        };
        // The state machine keeps the pages unreceived and queues SHUT(1).
        let _ = self
            .session
            .dst
            .handle_place_failed(block, offset, len, why.clone());
        Err(StopError::Postcopy(format!(
            "placing {offset:#x} of block {block}: {why}"
        )))
    }

    /// Acts on one event of the state machine.
    pub(crate) fn execute(
        &mut self,
        e: Event,
        ctl: &Ctl,
        note: &mut dyn FnMut(String),
    ) -> Result<(), StopError> {
        match e {
            Event::OpenReturnPath => self.rp_open = self.rp.is_some(),
            Event::NonZeroFill { offset, fill, .. } => note(format!(
                "offset {offset}: ZERO record with fill byte {fill:#04x}"
            )),
            Event::PostcopyState(PostcopyState::Listening) => self.listen(ctl, note)?,
            Event::PostcopyState(PostcopyState::Running) => self.start_touch(ctl),
            _ => {}
        }
        Ok(())
    }

    /// Carries out every placement the state machine queued, in order
    /// (`via`: the channel whose records they come from, or a fault decided
    /// locally; see [`Inner::place`]).
    pub(crate) fn execute_placements(&mut self, via: Via) -> Result<(), StopError> {
        while let Some(p) = self.session.dst.poll_placement() {
            match p {
                Place::HostPage {
                    block,
                    offset,
                    data,
                } => {
                    let len = data.len() as u64;
                    self.place(block, offset, Some(&data), len, via)?;
                    self.session.dst.recycle_page_buffer(data);
                }
                Place::ZeroPage { block, offset, len } => {
                    self.place(block, offset, None, len, via)?
                }
                // Before LISTEN: nothing is registered yet.
                Place::Discard { block, offset, len } => {
                    let at = self.session.dst.applied_up_to();
                    self.session
                        .dst
                        .memory_mut()
                        .discard(block, offset, len)
                        .map_err(|source| {
                            StopError::Dst(qmig_ram_dst::RamDstError::Memory { offset: at, source })
                        })?
                }
            }
        }
        Ok(())
    }

    /// POSTCOPY_LISTEN: give blocks of large pages their backing (2 MiB:
    /// hugetlbfs, else anonymous memory asked for and placed a host page at
    /// a time), register every block with userfaultfd and start a fault
    /// thread per block; without userfaultfd, postcopy is received
    /// passively (pages are written as they come, nothing is asked for).
    fn listen(&mut self, ctl: &Ctl, note: &mut dyn FnMut(String)) -> Result<(), StopError> {
        let passive = |why: String, host: &mut Host, note: &mut dyn FnMut(String)| {
            let why = format!("passive ({why})");
            note(format!(
                "postcopy received {why}; no page is asked for, --touch is not run"
            ));
            host.mode = Some(why);
        };
        if let Err(e) = qmig_uffd_host::probe() {
            passive(
                format!("userfaultfd unavailable: {e}"),
                &mut self.host,
                note,
            );
            return Ok(());
        }
        let sizes: Vec<u64> = self
            .session
            .dst
            .blocks()
            .iter()
            .map(|b| b.page_size())
            .collect();
        let anon = &mut self.session.dst.memory_mut().anon;
        for (i, &ps) in sizes.iter().enumerate() {
            if ps <= 4096 || anon.block(i).is_none_or(|b| b.1 == 0) {
                continue;
            }
            let mut r = Err(std::io::Error::other("not tried"));
            if ps == qmig_uffd_host::HUGE_PAGE_SIZE as u64 {
                r = anon.set_host_page_size(i, ps, Backing::Hugetlbfs);
                if let Err(e) = &r {
                    note(format!(
                        "block {i}: no hugetlbfs memory ({e}); anonymous memory placed \
                         {} KiB at a time instead",
                        ps / 1024
                    ));
                }
            }
            if r.is_err() {
                anon.set_host_page_size(i, ps, Backing::Anonymous)
                    .map_err(|e| StopError::Postcopy(format!("block {i}: {e}")))?;
            }
        }
        let mem = &self.session.dst.memory().anon;
        let blocktime = BlocktimeHandle::from(Blocktime::new(ctl.touch.threads.max(1)));
        let mut regions = Vec::new();
        let mut backing = Vec::new();
        for i in 0..mem.len() {
            let (name, used) = mem.block(i).unwrap_or(("", 0));
            if used == 0 {
                regions.push(None);
                continue;
            }
            let r = mem
                .register(i)
                .map_err(|e| StopError::Postcopy(format!("registering block {i}: {e}")))?;
            backing.push(BlockBacking {
                block: name.to_string(),
                backing: r.mapping().backing().name().to_string(),
                host_page_size: r.page_size() as u64,
                user_mode_only: r.features().user_mode_only,
            });
            let (inner, stop, abort) = (ctl.inner.clone(), ctl.stop.clone(), ctl.abort.clone());
            let serve = FaultFn(move |f: Fault| match inner.upgrade() {
                Some(inner) if !stop.load(Ordering::Acquire) => handle_fault(&inner, f, &abort),
                _ => false,
            });
            let ft = r
                .spawn_fault_thread(i, blocktime.clone(), serve)
                .map_err(|e| StopError::Postcopy(format!("fault thread of block {i}: {e}")))?;
            self.host.fault_threads.push(ft);
            regions.push(Some(r));
        }
        self.host.live = Some(Arc::new(mem.live(regions)));
        self.host.blocktime = Some(blocktime);
        self.host.backing = backing;
        self.host.mode = Some("userfaultfd".into());
        Ok(())
    }

    /// POSTCOPY_RUN: start the `--touch` threads.
    fn start_touch(&mut self, ctl: &Ctl) {
        // Running again after a postcopy recovery: the threads still run.
        if !self.host.touch.is_empty() {
            return;
        }
        let n = ctl.touch.threads;
        // Passive postcopy writes memory as pages come: no reader may run.
        let Some(live) = self.host.live.clone() else {
            return;
        };
        for t in 0..n {
            let live = live.clone();
            let stop = ctl.touch_stop.clone();
            let touched = ctl.touched.clone();
            let pattern = ctl.touch.pattern;
            self.host.touch.push(std::thread::spawn(move || {
                touch(&live, t, n, pattern, &stop, &touched)
            }));
        }
    }
}

/// One `--touch` thread: reads one byte of every 4 KiB page of its share
/// (pages `t, t + n, t + 2n, ...` over all blocks), in address order or a
/// pseudo-random one (Fisher-Yates with xorshift64, seeded by `t`). Returns
/// pages read.
fn touch(
    live: &LiveMemory,
    t: usize,
    n: usize,
    pattern: TouchPattern,
    stop: &AtomicBool,
    touched: &AtomicU64,
) -> u64 {
    let mut pages: Vec<(usize, u64)> = Vec::new();
    let mut k = 0usize;
    for i in 0..live.len() {
        let used = live.block(i).map_or(0, |b| b.1);
        if !live.is_registered(i) {
            continue;
        }
        for p in 0..used.div_ceil(4096) {
            if k % n == t {
                pages.push((i, p * 4096));
            }
            k += 1;
        }
    }
    if pattern == TouchPattern::Random {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
        for i in (1..pages.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pages.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let mut done = 0;
    for (i, off) in pages {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut b = [0u8; 1];
        if live.read(i, off, &mut b).is_err() {
            break;
        }
        done += 1;
        touched.fetch_add(1, Ordering::Relaxed);
    }
    done
}

/// The running postcopy host: how faults are served, and the shared state.
pub(crate) struct Running {
    pub(crate) ctl: Ctl,
}

impl Running {
    /// Prepares the fault handling over `inner` (the fault threads start at
    /// LISTEN); `abort` is set if a fault cannot be served, so the stream
    /// reader (which polls it) stops.
    pub(crate) fn start(
        inner: &Arc<Mutex<Inner>>,
        abort: Arc<AtomicBool>,
        touch: impl Into<Touch>,
    ) -> Self {
        let ctl = Ctl {
            inner: Arc::downgrade(inner),
            abort,
            touch: touch.into(),
            touch_stop: Arc::new(AtomicBool::new(false)),
            touched: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        Running { ctl }
    }

    /// Stops the fault handler, the fault threads and the regions (closing
    /// the userfaultfds wakes every thread still waiting, which then reads
    /// zero), then the touch threads (waiting at most `wait` for them).
    /// Returns the manifest's `postcopy` object.
    ///
    /// After a complete migration (`ok`) the touch threads are first given
    /// `wait` to finish reading every page while faults are still served;
    /// after a failure they are told to stop at once.
    pub(crate) fn stop(self, inner: &Mutex<Inner>, ok: bool, wait: Duration) -> PostcopyInfo {
        let t0 = Instant::now();
        if ok {
            loop {
                let done = lock(inner).host.touch.iter().all(JoinHandle::is_finished);
                if done || t0.elapsed() >= wait {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.ctl.stop.store(true, Ordering::Release);
        self.ctl.touch_stop.store(true, Ordering::Release);
        // Stopped without the lock: a fault thread may be waiting for it.
        let fault_threads: Vec<FaultThread> = lock(inner).host.fault_threads.drain(..).collect();
        let mut faults = 0u64;
        let mut thread_errors = Vec::new();
        for ft in fault_threads {
            match ft.stop() {
                Ok(s) => faults += s.faults,
                Err(e) => thread_errors.push(e.to_string()),
            }
        }
        let mut g = lock(inner);
        // Drop the regions (closing the userfaultfds); touch threads still
        // hold the mappings, never a userfaultfd.
        if let Some(live) = g.host.live.take() {
            live.unregister();
        }
        let touch: Vec<JoinHandle<u64>> = g.host.touch.drain(..).collect();
        let t0 = Instant::now();
        drop(g);
        let mut touch_unfinished = 0;
        let mut touched_pages = 0;
        for h in touch {
            while !h.is_finished() && t0.elapsed() < wait {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                touched_pages += h.join().unwrap_or(0);
            } else {
                touch_unfinished += 1;
            }
        }
        let g = lock(inner);
        let bt = g
            .host
            .blocktime
            .as_ref()
            .map(BlocktimeHandle::snapshot)
            .unwrap_or_default();
        let lat = bt.latency();
        let vcpu_blocktime = bt
            .per_thread()
            .iter()
            .map(|(&tid, d)| VcpuBlocktime {
                thread: tid,
                blocktime_us: d.as_micros() as u64,
                faults: bt.faults_per_thread().get(&tid).copied().unwrap_or(0),
            })
            .collect();
        let st = g.session.dst.stats();
        PostcopyInfo {
            mode: g.host.mode.clone(),
            page_requests: st.page_requests,
            pauses: st.pauses,
            resumes: st.resumes,
            requests_resent: st.requests_resent,
            preempt_records: st.preempt_records,
            recoveries: Vec::new(),
            faults,
            faults_handled: g.host.faults_handled,
            faults_resolved_locally: st.faults_resolved_locally,
            faults_already_requested: st.faults_already_requested,
            outstanding_requests: g.session.dst.outstanding_requests() as u64,
            placed_host_pages: st.placed_host_pages,
            placed_zero_pages: st.placed_zero_pages,
            fault_latency_us: summary(lat),
            fault_latency_dist_us: lat.dist().to_vec(),
            request_latency_us: summary(&g.host.request_latency),
            request_latency_dist_us: g.host.request_latency.dist().to_vec(),
            request_latency_main_us: summary(&g.host.request_latency_by[0]),
            request_latency_preempt_us: summary(&g.host.request_latency_by[1]),
            request_phases_us: g.host.request_phases.iter().map(summary).collect(),
            blocktime_us: bt.all_vcpus_blocked().as_micros() as u64,
            blocktime_total_us: bt.total().as_micros() as u64,
            vcpu_blocktime,
            backing: g.host.backing.clone(),
            touch_threads: self.ctl.touch.threads,
            touch_pattern: self.ctl.touch.pattern.name().to_string(),
            touched_pages,
            touch_threads_unfinished: touch_unfinished,
            fault_thread_errors: thread_errors,
            error: g.host.error.clone(),
        }
    }
}

fn summary(l: &Latency) -> LatencySummary {
    LatencySummary {
        count: l.count(),
        p50: l.quantile_us(0.50),
        p99: l.quantile_us(0.99),
        max: l.max_us(),
    }
}

/// Serves one fault on its fault thread: the state machine decides what to
/// ask for (REQ_PAGES, written at once) or place locally. `false` (and
/// `abort` set, the error kept) when the migration cannot go on.
fn handle_fault(inner: &Mutex<Inner>, f: Fault, abort: &AtomicBool) -> bool {
    let mut g = lock_urgent(inner);
    g.host.faults_handled += 1;
    let mut requested = None;
    let mut r = match g.session.dst.handle_page_fault(f.tag, f.offset) {
        Ok(FaultOutcome::Requested) => {
            let start = f.offset - f.offset % g.session.dst.blocks()[f.tag].page_size();
            g.host.waiting.insert((f.tag, start), f.seen);
            requested = Some((f.tag, start));
            Ok(())
        }
        Ok(FaultOutcome::AlreadyRequested) => Ok(()),
        Ok(FaultOutcome::PlaceLocally) => Ok(()),
        Err(e) => Err(StopError::Dst(e)),
    };
    if r.is_ok() {
        r = g.execute_placements(Via::Local);
    }
    let mut out = std::mem::take(&mut g.host.rp_buf);
    g.flush_transmit(&mut out);
    g.host.rp_buf = out;
    if let Some(at) = requested {
        if let Some(&t) = g.host.waiting.get(&at) {
            g.host.request_phases[0].record(t.elapsed());
            g.host.request_sent.insert(at, Instant::now());
        }
    }
    if let Err(e) = r {
        g.host.error.get_or_insert(e.to_string());
        drop(g);
        // Wake the stream reader: the migration cannot go on.
        abort.store(true, Ordering::Release);
        return false;
    }
    true
}
