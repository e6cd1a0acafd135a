//! The source state machine: [`RamSrc`].

use qmig_wire::{MemBlock, PageBitmap, RamRecord};
use qmig_xbzrle::{PageCache, SaveOutcome};

use crate::compress::PageCompressor;
use crate::error::RequestRule;
use crate::zero::is_zero;
use crate::RamSrcError;

/// [`RamSrc::poll_iterate`] reads at most this many times its byte budget
/// of guest memory per call (so zero pages, which cost a few bytes of
/// output each, cannot make one call read a whole block).
pub const SCAN_FACTOR: usize = 4;
/// Target page size of x86 (and of every QEMU target qmig has met).
pub const DEFAULT_PAGE_SIZE: usize = 4096;

/// QEMU's default `xbzrle-cache-size` (64 MiB).
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;

/// One RAM block of the source, in QEMU's RAM block list order (which is the
/// MEM_SIZE order and the order pages are scanned in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrcBlock {
    /// Block idstr, e.g. `pc.ram` (at most 255 bytes).
    pub name: String,
    /// Used length in bytes (a non-zero multiple of the target page size).
    pub used_length: u64,
    /// Start of the block in QEMU's `ram_addr_t` space. Only XBZRLE uses it:
    /// the page cache is keyed (and direct-mapped) by `ram_addr + offset`.
    pub ram_addr: u64,
    /// The page-size field of this block's MEM_SIZE entry, when one is sent
    /// (postcopy advised and the block's page size differs from the host's).
    pub mem_size_page_size: Option<u64>,
    /// The guest-address field of this block's MEM_SIZE entry (`x-ignore-shared`).
    pub mem_size_addr: Option<u64>,
    /// The block's host page size: the dirty target pages of one host page
    /// are sent together, as QEMU's `ram_save_host_page` does. Normally the
    /// target page size.
    pub host_page_size: u64,
}

impl SrcBlock {
    /// A block with 4 KiB host pages, no optional MEM_SIZE fields and
    /// `ram_addr` 0 (see [`SrcBlock::sequential`]).
    #[must_use]
    pub fn new(name: &str, used_length: u64) -> Self {
        SrcBlock {
            name: name.to_string(),
            used_length,
            ram_addr: 0,
            mem_size_page_size: None,
            mem_size_addr: None,
            host_page_size: DEFAULT_PAGE_SIZE as u64,
        }
    }

    /// Blocks from `(name, used_length)` pairs, laid out back to back in
    /// `ram_addr` space in list order. (QEMU places blocks by creation order
    /// and maximum length, which a stream does not tell; only XBZRLE cache
    /// collisions depend on it.)
    #[must_use]
    pub fn sequential<'a>(blocks: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<SrcBlock> {
        let mut at = 0u64;
        blocks
            .into_iter()
            .map(|(name, len)| {
                let mut b = SrcBlock::new(name, len);
                b.ram_addr = at;
                at = at.saturating_add(len);
                b
            })
            .collect()
    }
}

/// What the source sends besides ZERO and PAGE records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Target page size in bytes (a power of two, 512..=1 GiB).
    pub page_size: usize,
    /// XBZRLE with a page cache of this many bytes (`cache / page` must be a
    /// power of two), or `None`.
    pub xbzrle_cache_size: Option<u64>,
    /// COMPRESS_PAGE records (QEMU ≤ 9.0 `compress` capability) at this zlib
    /// level, or `None`.
    pub compress_level: Option<u32>,
    /// `zero-page-detection=legacy` (ZERO records); `false` is QEMU ≥ 9.0's
    /// `none`, sending zero pages as PAGE.
    pub zero_page_detection: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            page_size: DEFAULT_PAGE_SIZE,
            xbzrle_cache_size: None,
            compress_level: None,
            zero_page_detection: true,
        }
    }
}

/// The machine's state. Calls allowed in each:
///
/// ```text
///  Setup ──poll_setup──► Iterating ──────────poll_complete──────────► Done
///                         │  ▲  handle_dirty, handle_sync,              ▲
///                         └──┘  poll_iterate, handle_return_path        │
///                         │                                             │
///                         └─postcopy_switchover─► Postcopy ─poll_complete┘
///                            (sync, host-page      │  ▲ poll_iterate (requested
///                             canonicalisation,    └──┘ pages first), poll_preempt,
///                             RAM_DISCARD commands)      handle_return_path,
///                                                        handle_run_sent
/// ```
///
/// Postcopy recovery (wire-format §11, QEMU's `postcopy_pause` and
/// `postcopy_do_resume`): [`RamSrc::handle_connection_lost`] is the only
/// way into [`State::Paused`], and it is taken only once the caller has
/// reported POSTCOPY_RUN on its way ([`RamSrc::handle_run_sent`]): until
/// then the destination does not run the guest and the migration fails
/// instead ([`State::Failed`], [`RamSrcError::NotPausable`]).
///
/// ```text
///   Postcopy / Done ──handle_connection_lost──► Paused      (run sent)
///   Postcopy / Iterating / Setup ──handle_connection_lost──► Failed
///                                                            (run not sent)
///   Paused ──poll_recovery_start (RECV_BITMAP × blocks)──► Recovering
///   Recovering: handle_return_path(RECV_BITMAP reply) × blocks
///               (dirty bitmap := ¬received ∖ discarded, per block)
///            ──poll_resume (POSTCOPY_RESUME, all replies in)──►
///            ──handle_return_path(RESUME_ACK(1))──► Postcopy
///   Recovering ──handle_connection_lost──► Paused (recover again)
///   Failed: every call fails.
/// ```
///
/// [`RamSrc::handle_return_path`] is accepted in every state but `Setup`
/// and `Failed`; in `Done` page requests are still checked but nothing is
/// queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing sent yet: call [`RamSrc::poll_setup`].
    Setup,
    /// The block list was sent: iterate, report dirty pages, sync.
    Iterating,
    /// Switched to postcopy: the guest runs on the destination, which
    /// requests the pages it faults on; no more dirty pages are reported.
    Postcopy,
    /// The connection broke after POSTCOPY_RUN: nothing is sent until the
    /// caller reconnects and calls [`RamSrc::poll_recovery_start`].
    Paused,
    /// A recovery connection is open: waiting for the RECV_BITMAP replies,
    /// then for RESUME_ACK.
    Recovering,
    /// The final pass was sent; nothing more to do.
    Done,
    /// The connection broke before POSTCOPY_RUN: the migration failed.
    Failed,
}

impl State {
    /// A lower-case name for messages (`setup`, `iterating`, `done`).
    pub fn name(self) -> &'static str {
        match self {
            State::Setup => "setup",
            State::Iterating => "iterating",
            State::Postcopy => "postcopy",
            State::Paused => "paused",
            State::Recovering => "recovering",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// The connection a page record goes on. Each channel has its own "last
/// block" for CONTINUE, forgotten when the channel is (re)opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The main migration connection (sections, commands, the background
    /// scan).
    Main,
    /// The postcopy-preempt connection: raw page records of requested
    /// pages only (wire-format §12).
    Preempt,
}

/// How a call to [`RamSrc::poll_iterate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Progress {
    /// The byte budget was used up; dirty pages may remain.
    Budget,
    /// A whole round over RAM found nothing dirty: the pass is over. Sync
    /// (or complete) next.
    Clean,
}

/// Counters, named after QEMU's `query-migrate` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// PAGE records (`ram.normal`).
    pub normal: u64,
    /// ZERO records (`ram.duplicate`).
    pub duplicate: u64,
    /// XBZRLE records (`xbzrle-cache.pages`).
    pub xbzrle_pages: u64,
    /// Bytes of XBZRLE records after the 8-byte header word (`xbzrle-cache.bytes`).
    pub xbzrle_bytes: u64,
    /// XBZRLE cache misses (`xbzrle-cache.cache-miss`).
    pub xbzrle_cache_miss: u64,
    /// XBZRLE encodings that overflowed a page and went out as PAGE
    /// (`xbzrle-cache.overflow`).
    pub xbzrle_overflow: u64,
    /// Dirty pages found unchanged against the XBZRLE cache and not sent.
    pub xbzrle_unchanged: u64,
    /// COMPRESS_PAGE records (`compression.pages` minus zero pages).
    pub compressed_pages: u64,
    /// Bytes of zlib data in COMPRESS_PAGE records (`compression.compressed-size`).
    pub compressed_bytes: u64,
    /// Every byte of RAM section payload written (`ram.transferred` minus
    /// section headers and footers).
    pub transferred: u64,
    /// Dirty-bitmap syncs so far: the generation (`ram.dirty-sync-count`).
    pub dirty_sync_count: u64,
    /// Calls that sent at least one page (QEMU's `iterations`).
    pub iterations: u64,
    /// Page requests (REQ_PAGES / REQ_PAGES_ID) accepted
    /// (`ram.postcopy-requests`).
    pub postcopy_requests: u64,
    /// Target pages sent because the destination requested them (pages a
    /// request named that were already sent are not counted).
    pub requested_pages: u64,
    /// Bytes of requested pages' records (not counted against any budget).
    pub requested_bytes: u64,
    /// Bytes of RAM records sent in postcopy (`ram.postcopy-bytes`).
    pub postcopy_bytes: u64,
    /// POSTCOPY_RAM_DISCARD commands written at switchover.
    pub discard_commands: u64,
    /// Postcopy recoveries started (RECV_BITMAP rounds).
    pub recoveries: u64,
    /// Recoveries completed (RESUME_ACK received).
    pub resumes: u64,
    /// Target pages sent on the preempt channel.
    pub preempt_pages: u64,
    /// Bytes written on the preempt channel.
    pub preempt_bytes: u64,
    /// Ranges in those commands.
    pub discard_ranges: u64,
}

/// At most this many ranges go in one POSTCOPY_RAM_DISCARD command (QEMU's
/// `MAX_DISCARDS_PER_COMMAND` in `postcopy-ram.c`).
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;

/// A page request accepted from the return path and not yet served: target
/// pages `first..first + count` of block `block` (index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Block index.
    pub block: usize,
    /// First target page.
    pub first: usize,
    /// Number of target pages.
    pub count: usize,
}

/// Makes every host page (`host_pages` target pages) with any dirty target
/// page wholly dirty (QEMU's `postcopy_chunk_hostpages_pass`): the
/// destination can only place whole host pages.
pub fn canonicalize_host_pages(bm: &mut PageBitmap, host_pages: u64) {
    if host_pages <= 1 {
        return;
    }
    let len = bm.len();
    let mut at = 0;
    while let Some(p) = bm.next_set(at, len) {
        let hp = p / host_pages * host_pages;
        bm.set_range(hp, host_pages.min(len - hp));
        at = hp + host_pages;
    }
}

/// The runs of set bits of `bm`, as byte ranges for POSTCOPY_RAM_DISCARD
/// (`page_size` bytes per bit).
#[must_use]
pub fn dirty_runs(bm: &PageBitmap, page_size: u64) -> Vec<qmig_wire::DiscardRange> {
    let len = bm.len();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(s) = bm.next_set(at, len) {
        let mut e = s + 1;
        while e < len && bm.get(e) {
            e += 1;
        }
        out.push(qmig_wire::DiscardRange {
            start: s * page_size,
            len: (e - s) * page_size,
        });
        at = e;
    }
    out
}

/// Read access to the source's guest memory, one byte slice per block (in
/// the order of the blocks given to [`RamSrc::new`]).
pub trait GuestRam {
    /// The bytes of block `index`; at least its `used_length` long.
    fn block(&self, index: usize) -> &[u8];
    /// Number of blocks.
    fn blocks(&self) -> usize;
}

impl<T: AsRef<[u8]>> GuestRam for [T] {
    fn block(&self, index: usize) -> &[u8] {
        self[index].as_ref()
    }
    fn blocks(&self) -> usize {
        self.len()
    }
}

impl<T: AsRef<[u8]>> GuestRam for Vec<T> {
    fn block(&self, index: usize) -> &[u8] {
        self[index].as_ref()
    }
    fn blocks(&self) -> usize {
        self.len()
    }
}

/// The source side of QEMU's RAM migration, sans IO: it writes the payload
/// of the `ram` section (records up to and including EOS) into a caller's
/// buffer; the caller frames sections and moves bytes.
///
/// Order of calls: [`poll_setup`](Self::poll_setup) (START payload: MEM_SIZE,
/// EOS; every page becomes dirty and the generation is 1), then any number of
/// [`poll_iterate`](Self::poll_iterate) (one PART payload each, at most about
/// `budget` bytes), with [`handle_dirty`](Self::handle_dirty) to report pages
/// the guest wrote and [`handle_sync`](Self::handle_sync) to make them visible
/// (QEMU's dirty-bitmap sync, which bumps the generation), and finally
/// [`poll_complete`](Self::poll_complete) (END payload: a sync, then every
/// dirty page regardless of budget, XBZRLE without cache updates, EOS).
///
/// Postcopy (see the diagram on [`State`]): after the precopy passes,
/// [`postcopy_switchover`](Self::postcopy_switchover) writes the
/// POSTCOPY_RAM_DISCARD commands; then [`handle_return_path`](Self::handle_return_path)
/// queues the destination's page requests, each [`poll_iterate`](Self::poll_iterate)
/// sends the queued host pages first (outside its budget) and then continues
/// the background scan, ZERO and PAGE records only, whole host pages; and
/// [`poll_complete`](Self::poll_complete) (no sync) sends whatever is left.
/// The framing around these payloads (PACKAGED, pings, sections) is
/// [`crate::Source`]'s.
///
/// Page decisions follow QEMU: the scan resumes where it stopped and wraps
/// around the block list (`find_dirty_block`); the block name is written
/// only when the block differs from the previous page record's; a zero page
/// is ZERO (and refreshes its XBZRLE cache entry once XBZRLE has started);
/// XBZRLE starts when the scan first wraps past the last block; with
/// compression (and before XBZRLE starts) a page continuing the previous
/// record's block is a COMPRESS_PAGE, the first page of a block a PAGE.
///
/// ```
/// use qmig_ram_src::{Config, Progress, RamSrc, SrcBlock};
///
/// let blocks = SrcBlock::sequential([("pc.ram", 8192)]);
/// let mut mem = vec![vec![0u8; 8192]];
/// mem[0][4096] = 1;
/// let mut src = RamSrc::new(blocks, Config::default())?;
/// let mut out = Vec::new();
/// src.poll_setup(&mut out)?;
/// out.clear();
/// assert_eq!(src.poll_iterate(&mem, usize::MAX, &mut out)?, Progress::Clean);
/// assert_eq!((src.counters().duplicate, src.counters().normal), (1, 1));
/// // The guest writes page 0; a sync makes it dirty; completion sends it.
/// mem[0][0] = 9;
/// src.handle_dirty(0, 0, 1)?;
/// out.clear();
/// src.poll_complete(&mem, &mut out)?;
/// assert_eq!(src.counters().normal, 2);
/// # Ok::<(), qmig_ram_src::RamSrcError>(())
/// ```
#[derive(Debug)]
pub struct RamSrc {
    blocks: Vec<SrcBlock>,
    pages: Vec<usize>,
    host_pages: Vec<usize>,
    page_size: usize,
    page_bits: u32,
    zero_detection: bool,
    state: State,
    /// Pages to send (QEMU's migration bitmap).
    dirty: Vec<PageBitmap>,
    /// Pages the guest wrote since the last sync (the dirty log).
    log: Vec<PageBitmap>,
    dirty_count: u64,
    /// Where the last search stopped (`last_seen_block`, `last_page`).
    cursor: Option<(usize, usize)>,
    /// The block of the last page record on the main channel
    /// (`last_sent_block`).
    last_sent: Option<usize>,
    /// The block of the last page record on the preempt channel.
    last_sent_preempt: Option<usize>,
    /// Pages never to send (QEMU's RamDiscardManager ranges, e.g. unplugged
    /// virtio-mem memory), per block when any.
    discarded: Vec<Option<PageBitmap>>,
    /// POSTCOPY_RUN is on its way: a lost connection may pause.
    run_sent: bool,
    /// In recovery: blocks whose RECV_BITMAP reply has not come yet.
    bitmaps_pending: Vec<bool>,
    /// In recovery: POSTCOPY_RESUME was written.
    resume_sent: bool,
    xbzrle: Option<PageCache>,
    xbzrle_started: bool,
    encoded: Vec<u8>,
    compressor: Option<PageCompressor>,
    last_stage: bool,
    counters: Counters,
    /// Page requests waiting, served before the background scan
    /// (QEMU's `src_page_requests`).
    urgent: std::collections::VecDeque<PageRequest>,
    /// The block of the last page request (REQ_PAGES continues it).
    last_req_block: Option<usize>,
    /// SHUT's status, once the destination sent it.
    shut: Option<u32>,
    /// The last PONG's value.
    last_pong: Option<u32>,
    /// Multifd: pages go to the channels' packets (see [`RamSrc::set_multifd`]).
    multifd: Option<crate::multifd::MultifdSender>,
}

impl RamSrc {
    /// A source for `blocks` (in QEMU's block list order).
    ///
    /// # Errors
    /// [`RamSrcError::Layout`] for an empty or too long name, an empty block, a duplicate
    /// name, a length that is not a page multiple, a bad host page size;
    /// [`RamSrcError::Config`] for a bad page size, XBZRLE cache size or
    /// compress level.
    pub fn new(blocks: Vec<SrcBlock>, config: Config) -> Result<Self, RamSrcError> {
        let ps = config.page_size;
        if !ps.is_power_of_two() || !(512..=1 << 30).contains(&ps) {
            return Err(RamSrcError::Config {
                why: format!("target page size {ps} is not a power of two in 512..=1GiB"),
            });
        }
        let mut seen = std::collections::HashSet::new();
        let mut pages = Vec::with_capacity(blocks.len());
        let mut host_pages = Vec::with_capacity(blocks.len());
        for b in &blocks {
            let bad = |why: String| RamSrcError::Layout {
                why: format!("block \"{}\": {why}", b.name),
            };
            if b.name.is_empty() || b.name.len() > 255 {
                return Err(bad("name must be 1..=255 bytes".into()));
            }
            if !seen.insert(b.name.as_str()) {
                return Err(bad("listed twice".into()));
            }
            if b.used_length == 0 {
                // MEM_SIZE lists blocks until their lengths add up to the
                // total: an empty block could not be told apart.
                return Err(bad("empty block (MEM_SIZE cannot carry it)".into()));
            }
            if b.used_length % ps as u64 != 0 {
                return Err(bad(format!(
                    "length {:#x} is not a multiple of the page size",
                    b.used_length
                )));
            }
            if !b.host_page_size.is_power_of_two() || b.host_page_size < ps as u64 {
                return Err(bad(format!("host page size {:#x}", b.host_page_size)));
            }
            let n = usize::try_from(b.used_length / ps as u64)
                .map_err(|_| bad("too many pages".into()))?;
            pages.push(n);
            host_pages.push((b.host_page_size / ps as u64) as usize);
        }
        let xbzrle = match config.xbzrle_cache_size {
            Some(size) => Some(PageCache::new(size, ps).map_err(|e| RamSrcError::Config {
                why: format!("XBZRLE cache: {e}"),
            })?),
            None => None,
        };
        let compressor = match config.compress_level {
            Some(l) => Some(PageCompressor::new(l).map_err(|why| RamSrcError::Config { why })?),
            None => None,
        };
        let nblocks = pages.len();
        Ok(RamSrc {
            dirty: pages.iter().map(|&n| PageBitmap::new(n as u64)).collect(),
            log: pages.iter().map(|&n| PageBitmap::new(n as u64)).collect(),
            blocks,
            pages,
            host_pages,
            page_size: ps,
            page_bits: ps.trailing_zeros(),
            zero_detection: config.zero_page_detection,
            state: State::Setup,
            dirty_count: 0,
            cursor: None,
            last_sent: None,
            last_sent_preempt: None,
            discarded: vec![None; nblocks],
            run_sent: false,
            bitmaps_pending: Vec::new(),
            resume_sent: false,
            xbzrle,
            xbzrle_started: false,
            encoded: vec![0; ps],
            compressor,
            last_stage: false,
            counters: Counters::default(),
            urgent: std::collections::VecDeque::new(),
            last_req_block: None,
            shut: None,
            last_pong: None,
            multifd: None,
        })
    }

    /// Sends pages through multifd channels from now on (QEMU's `multifd`
    /// capability): page data goes to `m`'s packets instead of PAGE records,
    /// zero pages too unless `zero-page-detection` is `legacy`, and every
    /// sync point of `m` is paired on the main stream (a MULTIFD_FLUSH
    /// record, or the section's EOS with `multifd-flush-after-each-section`).
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Setup`];
    /// [`RamSrcError::Config`] with XBZRLE or COMPRESS_PAGE configured
    /// (QEMU's multifd path uses neither).
    pub fn set_multifd(&mut self, m: crate::multifd::MultifdSender) -> Result<(), RamSrcError> {
        self.expect("set_multifd", State::Setup)?;
        if self.xbzrle.is_some() || self.compressor.is_some() {
            return Err(RamSrcError::Config {
                why: "multifd sends pages in packets: XBZRLE and COMPRESS_PAGE do not apply".into(),
            });
        }
        self.multifd = Some(m);
        Ok(())
    }

    /// The multifd sender, when multifd is on.
    #[must_use]
    pub fn multifd(&self) -> Option<&crate::multifd::MultifdSender> {
        self.multifd.as_ref()
    }

    /// The multifd sender, to take the channels' output.
    pub fn multifd_mut(&mut self) -> Option<&mut crate::multifd::MultifdSender> {
        self.multifd.as_mut()
    }

    /// A multifd sync point: SYNC packets on every channel, paired with a
    /// MULTIFD_FLUSH record on `out` unless `flush_record` is false (the
    /// section's EOS pairs instead).
    fn multifd_sync(&mut self, out: &mut Vec<u8>, flush_record: bool) -> Result<(), RamSrcError> {
        if let Some(m) = self.multifd.as_mut() {
            m.sync()?;
            if flush_record {
                let at = out.len();
                RamRecord {
                    offset: 0,
                    flags: qmig_wire::ram::flags::MULTIFD_FLUSH,
                    block: None,
                    body: qmig_wire::RamBody::MultifdFlush,
                }
                .write(out)?;
                self.counters.transferred += (out.len() - at) as u64;
            }
        }
        Ok(())
    }

    /// Whether syncs pair with EOS (`multifd-flush-after-each-section`).
    fn multifd_per_section(&self) -> bool {
        self.multifd
            .as_ref()
            .is_some_and(|m| m.config().flush_after_each_section)
    }

    fn multifd_bytes(&self) -> usize {
        self.multifd
            .as_ref()
            .map_or(0, |m| m.stats().bytes as usize)
    }

    /// The blocks, in scan order.
    #[must_use]
    pub fn blocks(&self) -> &[SrcBlock] {
        &self.blocks
    }

    /// The state.
    #[must_use]
    pub fn state(&self) -> State {
        self.state
    }

    /// Counters so far.
    #[must_use]
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The generation (dirty-sync count) XBZRLE ages are measured in.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.counters.dirty_sync_count
    }

    /// Pages still to send (dirty in the migration bitmap).
    #[must_use]
    pub fn remaining_pages(&self) -> u64 {
        self.dirty_count
    }

    /// Whether XBZRLE is in use now (it starts after the first full round).
    #[must_use]
    pub fn xbzrle_started(&self) -> bool {
        self.xbzrle_started
    }

    /// The XBZRLE page cache, when XBZRLE is configured.
    #[must_use]
    pub fn xbzrle_cache(&self) -> Option<&PageCache> {
        self.xbzrle.as_ref()
    }

    /// SHUT's status, once the destination sent it (0 = success).
    #[must_use]
    pub fn shut(&self) -> Option<u32> {
        self.shut
    }

    /// The value of the last PONG received.
    #[must_use]
    pub fn last_pong(&self) -> Option<u32> {
        self.last_pong
    }

    /// Page requests accepted and not yet served, oldest first.
    pub fn pending_requests(&self) -> impl Iterator<Item = &PageRequest> + '_ {
        self.urgent.iter()
    }

    /// The 16-byte POSTCOPY_ADVISE payload for these blocks: the OR of the
    /// blocks' page sizes and the target page size (QEMU's
    /// `qemu_savevm_send_postcopy_advise`).
    #[must_use]
    pub fn postcopy_advise(&self) -> qmig_wire::Advise {
        qmig_wire::Advise {
            page_size_summary: self.blocks.iter().fold(0, |a, b| a | b.host_page_size),
            target_page_size: self.page_size as u64,
        }
    }

    /// Takes one return-path message (QEMU's `source_return_path_thread`).
    ///
    /// REQ_PAGES_ID and REQ_PAGES are checked as QEMU's
    /// `migrate_handle_rp_req_pages` and `ram_save_queue_pages` check them,
    /// then queued: the next [`poll_iterate`](Self::poll_iterate) (or
    /// [`poll_complete`](Self::poll_complete)) sends the requested host
    /// pages that are still unsent before anything else, whatever its
    /// budget. SHUT and PONG are recorded ([`shut`](Self::shut),
    /// [`last_pong`](Self::last_pong)); SWITCHOVER_ACK is accepted.
    ///
    /// # Errors
    /// [`RamSrcError::PageRequest`] for a request naming an unknown block,
    /// a REQ_PAGES before any REQ_PAGES_ID, a start or length not aligned to
    /// the target page size, or a range past the block's used length;
    /// [`RamSrcError::UnexpectedMessage`] for RECV_BITMAP, RESUME_ACK
    /// (postcopy recovery, not supported) and unknown types;
    /// [`RamSrcError::State`] in [`State::Setup`]. The migration must then
    /// fail: QEMU marks the return path broken and the migration failed.
    pub fn handle_return_path(
        &mut self,
        msg: &qmig_wire::RpMessage<'_>,
    ) -> Result<(), RamSrcError> {
        use qmig_wire::RpMessage;
        if matches!(self.state, State::Setup | State::Failed) {
            return Err(RamSrcError::State {
                call: "handle_return_path",
                state: self.state,
            });
        }
        let (name, start, len, block) = match msg {
            RpMessage::Shut(v) => {
                self.shut = Some(*v);
                return Ok(());
            }
            RpMessage::Pong(v) => {
                self.last_pong = Some(*v);
                return Ok(());
            }
            RpMessage::SwitchoverAck => return Ok(()),
            RpMessage::RecvBitmap { block, bitmap } => {
                return self.handle_recv_bitmap(block, bitmap);
            }
            RpMessage::ResumeAck(v) => return self.handle_resume_ack(*v),
            RpMessage::ReqPagesId { start, len, block } => {
                let Some(i) = self.blocks.iter().position(|b| b.name == *block) else {
                    return Err(RamSrcError::PageRequest {
                        msg: "REQ_PAGES_ID",
                        block: Some((*block).to_string()),
                        start: *start,
                        len: u64::from(*len),
                        rule: RequestRule::UnknownBlock,
                    });
                };
                self.last_req_block = Some(i);
                ("REQ_PAGES_ID", *start, u64::from(*len), i)
            }
            RpMessage::ReqPages { start, len } => match self.last_req_block {
                Some(i) => ("REQ_PAGES", *start, u64::from(*len), i),
                None => {
                    return Err(RamSrcError::PageRequest {
                        msg: "REQ_PAGES",
                        block: None,
                        start: *start,
                        len: u64::from(*len),
                        rule: RequestRule::NoPreviousBlock,
                    })
                }
            },
            other => {
                return Err(RamSrcError::UnexpectedMessage {
                    name: other.name(),
                    msg_type: other.msg_type(),
                })
            }
        };
        let b = &self.blocks[block];
        let fail = |rule| RamSrcError::PageRequest {
            msg: name,
            block: Some(b.name.clone()),
            start,
            len,
            rule,
        };
        let align = self.page_size as u64;
        if start % align != 0 || len % align != 0 {
            return Err(fail(RequestRule::Unaligned { align }));
        }
        match start.checked_add(len) {
            Some(end) if end <= b.used_length => {}
            _ => {
                return Err(fail(RequestRule::OutOfBlock {
                    used_length: b.used_length,
                }))
            }
        }
        self.counters.postcopy_requests += 1;
        if len > 0 && self.state != State::Done {
            self.urgent.push_back(PageRequest {
                block,
                first: (start >> self.page_bits) as usize,
                count: (len >> self.page_bits) as usize,
            });
        }
        Ok(())
    }

    /// Switches to postcopy (QEMU's `ram_postcopy_send_discard_bitmap`): a
    /// last dirty-bitmap sync, every host page with a dirty target page made
    /// wholly dirty (`postcopy_chunk_hostpages_pass`), then for each block
    /// with dirty pages POSTCOPY_RAM_DISCARD commands listing its dirty runs
    /// in bytes, at most [`MAX_DISCARDS_PER_COMMAND`] ranges each. The next
    /// page record names its block again. XBZRLE and compression stop.
    ///
    /// The caller frames the rest of the switchover around these commands
    /// (see [`crate::Source`]).
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Iterating`];
    /// [`RamSrcError::Wire`] if a command cannot be written (a block name a
    /// reader would refuse; not expected after [`RamSrc::new`]'s checks).
    pub fn postcopy_switchover(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect("postcopy_switchover", State::Iterating)?;
        if self.multifd.is_some() {
            // QEMU 10.0's migrate_caps_check refuses multifd with postcopy-ram.
            return Err(RamSrcError::Config {
                why: "postcopy with multifd (QEMU 10.0 refuses the multifd and postcopy-ram capabilities together)".into(),
            });
        }
        self.handle_sync()?;
        for blk in 0..self.blocks.len() {
            canonicalize_host_pages(&mut self.dirty[blk], self.host_pages[blk] as u64);
            let ranges = dirty_runs(&self.dirty[blk], self.page_size as u64);
            for chunk in ranges.chunks(MAX_DISCARDS_PER_COMMAND) {
                qmig_wire::Command::RamDiscard(qmig_wire::Discard {
                    block: &self.blocks[blk].name,
                    ranges: chunk.to_vec(),
                })
                .write(out)?;
                self.counters.discard_commands += 1;
                self.counters.discard_ranges += chunk.len() as u64;
            }
        }
        self.dirty_count = self.dirty.iter().map(PageBitmap::count_ones).sum();
        self.last_sent = None;
        self.state = State::Postcopy;
        Ok(())
    }

    /// Marks bytes `[offset, offset + len)` of block `block` as discarded:
    /// pages that are never sent (QEMU's `RamDiscardManager` ranges, e.g.
    /// unplugged virtio-mem memory, which `ramblock_dirty_bitmap_clear_discarded_pages`
    /// clears at setup and again when a recovery reloads the bitmap).
    /// Partial pages at either end count as discarded only when whole.
    ///
    /// # Errors
    /// [`RamSrcError::State`] after [`poll_setup`](Self::poll_setup);
    /// [`RamSrcError::NoSuchBlock`], [`RamSrcError::OutOfBlock`].
    pub fn set_discarded(
        &mut self,
        block: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), RamSrcError> {
        self.expect("set_discarded", State::Setup)?;
        let b = self.blocks.get(block).ok_or(RamSrcError::NoSuchBlock {
            index: block,
            blocks: self.blocks.len(),
        })?;
        match offset.checked_add(len) {
            Some(end) if end <= b.used_length => {
                let ps = self.page_size as u64;
                let first = offset.div_ceil(ps);
                let last = end / ps;
                if last > first {
                    let n = self.pages[block] as u64;
                    self.discarded[block]
                        .get_or_insert_with(|| PageBitmap::new(n))
                        .set_range(first, last - first);
                }
                Ok(())
            }
            _ => Err(RamSrcError::OutOfBlock {
                block: b.name.clone(),
                offset,
                len,
                used_length: b.used_length,
            }),
        }
    }

    /// Reports that POSTCOPY_RUN (the package holding it) has been handed
    /// to the connection: from now on the destination may run the guest, so
    /// a lost connection pauses instead of failing (QEMU's source enters
    /// `postcopy-active` once `postcopy_start` has sent the package).
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Postcopy`].
    pub fn handle_run_sent(&mut self) -> Result<(), RamSrcError> {
        self.expect("handle_run_sent", State::Postcopy)?;
        self.run_sent = true;
        Ok(())
    }

    /// Whether POSTCOPY_RUN was reported sent ([`handle_run_sent`](Self::handle_run_sent)).
    #[must_use]
    pub fn run_sent(&self) -> bool {
        self.run_sent
    }

    /// The connection (main channel, its return path or the preempt
    /// channel) broke. After POSTCOPY_RUN ([`State::Postcopy`] with
    /// [`handle_run_sent`](Self::handle_run_sent), [`State::Done`] before
    /// SHUT, or [`State::Recovering`]) the machine pauses
    /// ([`State::Paused`], QEMU's `postcopy_pause`): queued page requests are
    /// dropped (the destination re-sends every pending one after
    /// RESUME_ACK) and nothing is sent until the caller reconnects. In
    /// [`State::Paused`] this does nothing.
    ///
    /// # Errors
    /// [`RamSrcError::NotPausable`] in any other state, which becomes
    /// [`State::Failed`]: before POSTCOPY_RUN the migration fails cleanly.
    pub fn handle_connection_lost(&mut self) -> Result<(), RamSrcError> {
        match self.state {
            State::Paused => Ok(()),
            State::Postcopy | State::Done | State::Recovering if self.run_sent => {
                self.state = State::Paused;
                self.urgent.clear();
                self.last_req_block = None;
                self.bitmaps_pending.clear();
                self.resume_sent = false;
                Ok(())
            }
            state => {
                self.state = State::Failed;
                self.urgent.clear();
                Err(RamSrcError::NotPausable { state })
            }
        }
    }

    /// Starts a recovery on a new main connection (QEMU's
    /// `ram_dirty_bitmap_sync_all`): writes one RECV_BITMAP command per
    /// block, back to back, and waits for the replies
    /// ([`handle_return_path`](Self::handle_return_path)). The first page
    /// record on every channel will name its block again.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Paused`]; [`RamSrcError::Wire`]
    /// for a block name a reader would refuse (not after [`RamSrc::new`]).
    pub fn poll_recovery_start(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect("poll_recovery_start", State::Paused)?;
        for b in &self.blocks {
            qmig_wire::Command::RecvBitmap { block: &b.name }.write(out)?;
        }
        self.bitmaps_pending = vec![true; self.blocks.len()];
        self.resume_sent = false;
        self.last_sent = None;
        self.last_sent_preempt = None;
        self.last_req_block = None;
        self.counters.recoveries += 1;
        self.state = State::Recovering;
        Ok(())
    }

    /// Blocks whose RECV_BITMAP reply is still awaited in this recovery.
    #[must_use]
    pub fn bitmaps_pending(&self) -> usize {
        self.bitmaps_pending.iter().filter(|&&p| p).count()
    }

    /// Whether POSTCOPY_RESUME may be written now: recovering, every reply
    /// in, not written yet.
    #[must_use]
    pub fn ready_to_resume(&self) -> bool {
        self.state == State::Recovering && !self.resume_sent && self.bitmaps_pending() == 0
    }

    /// Writes POSTCOPY_RESUME once every RECV_BITMAP reply is in (QEMU's
    /// `postcopy_resume_handshake`); RESUME_ACK is then awaited.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Recovering`];
    /// [`RamSrcError::Recovery`] when a reply is missing or POSTCOPY_RESUME
    /// was already written.
    pub fn poll_resume(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect("poll_resume", State::Recovering)?;
        if self.resume_sent {
            return Err(self.wrong_state("POSTCOPY_RESUME"));
        }
        let missing = self.bitmaps_pending();
        if missing > 0 {
            return Err(RamSrcError::Recovery {
                rule: crate::RecoveryRule::BitmapsPending { missing },
            });
        }
        qmig_wire::Command::PostcopyResume.write(out)?;
        self.resume_sent = true;
        Ok(())
    }

    fn wrong_state(&self, msg: &'static str) -> RamSrcError {
        RamSrcError::Recovery {
            rule: crate::RecoveryRule::WrongState {
                msg,
                state: self.state,
                resume_sent: self.resume_sent,
            },
        }
    }

    fn handle_recv_bitmap(&mut self, block: &str, bitmap: &[u8]) -> Result<(), RamSrcError> {
        use crate::RecoveryRule as R;
        if self.state != State::Recovering || self.resume_sent {
            return Err(self.wrong_state("RECV_BITMAP reply"));
        }
        let fail = |rule| RamSrcError::Recovery { rule };
        let Some(i) = self.blocks.iter().position(|b| b.name == block) else {
            return Err(fail(R::UnknownBlock {
                block: block.to_string(),
            }));
        };
        let n = self.pages[i] as u64;
        let expected = qmig_wire::return_path::recv_bitmap_size(n);
        if bitmap.len() as u64 != expected {
            return Err(fail(R::BitmapSize {
                block: block.to_string(),
                size: bitmap.len() as u64,
                pages: n,
                expected,
            }));
        }
        if !self.bitmaps_pending[i] {
            return Err(fail(R::DuplicateBitmap {
                block: block.to_string(),
            }));
        }
        let received = PageBitmap::from_le_bytes(bitmap, n).map_err(|e| {
            fail(R::BitmapBits {
                block: block.to_string(),
                why: e.to_string(),
            })
        })?;
        // The complement of what the destination placed, minus the
        // discarded ranges.
        let mut d = PageBitmap::new(n);
        d.set_range(0, n);
        for p in received.iter_ones() {
            d.clear(p);
        }
        if let Some(x) = &self.discarded[i] {
            for p in x.iter_ones() {
                d.clear(p);
            }
        }
        self.dirty_count = self.dirty_count - self.dirty[i].count_ones() + d.count_ones();
        self.dirty[i] = d;
        self.bitmaps_pending[i] = false;
        Ok(())
    }

    fn handle_resume_ack(&mut self, value: u32) -> Result<(), RamSrcError> {
        if self.state != State::Recovering || !self.resume_sent {
            return Err(self.wrong_state("RESUME_ACK"));
        }
        if value != qmig_wire::recovery::RESUME_ACK_VALUE {
            return Err(RamSrcError::Recovery {
                rule: crate::RecoveryRule::ResumeAckValue { value },
            });
        }
        self.resume_sent = false;
        self.last_req_block = None;
        self.counters.resumes += 1;
        self.state = State::Postcopy;
        Ok(())
    }

    /// Parses one return-path message at the start of `buf` (which starts
    /// at return-path offset `base`) and takes it as
    /// [`handle_return_path`](Self::handle_return_path) does. Returns the
    /// bytes used, or `None` when `buf` holds no whole message yet.
    ///
    /// # Errors
    /// [`RamSrcError::Wire`] for a framing error (a wrong length, a
    /// RECV_BITMAP reply whose size is not a multiple of 8 or whose end
    /// marker is not `0x0123456789ABCDEF`), with its offset; then as
    /// [`handle_return_path`](Self::handle_return_path).
    pub fn handle_return_path_bytes(
        &mut self,
        buf: &[u8],
        base: u64,
    ) -> Result<Option<usize>, RamSrcError> {
        match qmig_wire::decode_rp_message(buf, base)? {
            Some((m, used)) => {
                self.handle_return_path(&m)?;
                Ok(Some(used))
            }
            None => Ok(None),
        }
    }

    /// The preempt channel was (re)opened: its first page record will name
    /// its block.
    pub fn handle_preempt_connected(&mut self) {
        self.last_sent_preempt = None;
    }

    /// Postcopy-preempt (wire-format §12, QEMU's `ram_save_host_page_urgent`):
    /// writes the queued requested host pages that are still unsent as raw
    /// page records for the preempt channel (no section, no EOS), with the
    /// preempt channel's own CONTINUE context. The background scan's cursor
    /// does not move. A host page is always sent whole by one call, so a
    /// page the background scan has sent (or put in the main channel's
    /// buffer) is clean and finishes on the main channel. Returns the
    /// target pages written.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Postcopy`];
    /// [`RamSrcError::MemoryMismatch`] when `mem` does not cover the blocks.
    pub fn poll_preempt<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<u64, RamSrcError> {
        self.expect("poll_preempt", State::Postcopy)?;
        self.check_memory(mem)?;
        let (start, pages) = (out.len(), self.counters.requested_pages);
        std::mem::swap(&mut self.last_sent, &mut self.last_sent_preempt);
        let r = self.serve_requests(mem, out, false);
        std::mem::swap(&mut self.last_sent, &mut self.last_sent_preempt);
        r?;
        let n = self.counters.requested_pages - pages;
        let bytes = (out.len() - start) as u64;
        self.counters.preempt_pages += n;
        self.counters.preempt_bytes += bytes;
        self.counters.transferred += bytes;
        self.counters.postcopy_bytes += bytes;
        Ok(n)
    }

    /// Sends the queued page requests: for each, the host pages of its range
    /// that are still dirty, in order; the background scan then goes on
    /// after the last one (QEMU's `get_queued_page`).
    fn serve_requests<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
        move_cursor: bool,
    ) -> Result<(), RamSrcError> {
        while let Some(r) = self.urgent.pop_front() {
            let at = out.len();
            let hp = self.host_pages[r.block];
            let end = (r.first + r.count).min(self.pages[r.block]);
            let mut page = r.first / hp * hp;
            while page < end {
                let next = page + hp;
                let dirty = self.dirty[r.block]
                    .next_set(page as u64, next.min(self.pages[r.block]) as u64)
                    .is_some();
                if dirty {
                    let mut p = page;
                    let sent = self.save_host_page(r.block, &mut p, mem, out)?;
                    self.counters.requested_pages += sent as u64;
                    if move_cursor {
                        self.cursor = Some((r.block, p));
                    }
                }
                page = next;
            }
            self.counters.requested_bytes += (out.len() - at) as u64;
        }
        Ok(())
    }

    fn expect(&self, call: &'static str, want: State) -> Result<(), RamSrcError> {
        if self.state == want {
            Ok(())
        } else {
            Err(RamSrcError::State {
                call,
                state: self.state,
            })
        }
    }

    /// Writes the START payload: MEM_SIZE with the block list, then EOS.
    /// Every page becomes dirty and the first sync happens (generation 1),
    /// as in QEMU's `ram_save_setup`.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Setup`].
    pub fn poll_setup(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect("poll_setup", State::Setup)?;
        let start = out.len();
        let list = self
            .blocks
            .iter()
            .map(|b| MemBlock {
                name: &b.name,
                used_length: b.used_length,
                page_size: b.mem_size_page_size,
                addr: b.mem_size_addr,
            })
            .collect();
        RamRecord::mem_size(list).write(out)?;
        // ram_save_setup: multifd_ram_flush_and_sync.
        let per_section = self.multifd_per_section();
        self.multifd_sync(out, !per_section)?;
        RamRecord::eos().write(out)?;
        self.dirty_count = self
            .dirty
            .iter_mut()
            .map(|d| {
                d.set_range(0, d.len());
                d.len()
            })
            .sum();
        for l in &mut self.log {
            l.clear_range(0, l.len());
        }
        for (d, x) in self.dirty.iter_mut().zip(&self.discarded) {
            if let Some(x) = x {
                for i in x.iter_ones() {
                    d.clear(i);
                }
            }
        }
        self.dirty_count = self.dirty.iter().map(PageBitmap::count_ones).sum();
        self.counters.dirty_sync_count = 1;
        self.counters.transferred += (out.len() - start) as u64;
        self.state = State::Iterating;
        Ok(())
    }

    /// Reports that the guest wrote bytes `[offset, offset + len)` of block
    /// `block`: the pages become dirty at the next sync.
    ///
    /// # Errors
    /// [`RamSrcError::NoSuchBlock`], [`RamSrcError::OutOfBlock`], or
    /// [`RamSrcError::State`] after completion.
    pub fn handle_dirty(&mut self, block: usize, offset: u64, len: u64) -> Result<(), RamSrcError> {
        if !matches!(self.state, State::Setup | State::Iterating) {
            return Err(RamSrcError::State {
                call: "handle_dirty",
                state: self.state,
            });
        }
        let b = self.blocks.get(block).ok_or(RamSrcError::NoSuchBlock {
            index: block,
            blocks: self.blocks.len(),
        })?;
        match offset.checked_add(len) {
            Some(end) if end <= b.used_length => {
                if len == 0 {
                    return Ok(());
                }
                let first = (offset >> self.page_bits) as usize;
                let last = ((end - 1) >> self.page_bits) as usize;
                self.log[block].set_range(first as u64, (last - first + 1) as u64);
                Ok(())
            }
            _ => Err(RamSrcError::OutOfBlock {
                block: b.name.clone(),
                offset,
                len,
                used_length: b.used_length,
            }),
        }
    }

    /// Reports that the guest wrote target page `page` of block `block`.
    ///
    /// # Errors
    /// As for [`handle_dirty`](Self::handle_dirty).
    pub fn handle_dirty_page(&mut self, block: usize, page: u64) -> Result<(), RamSrcError> {
        let ps = self.page_size as u64;
        self.handle_dirty(block, page.saturating_mul(ps), ps)
    }

    /// The dirty-bitmap sync: pages reported since the last sync become dirty
    /// and the generation goes up by one. Returns how many pages became dirty.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Iterating`].
    pub fn handle_sync(&mut self) -> Result<u64, RamSrcError> {
        self.expect("handle_sync", State::Iterating)?;
        let mut n = 0;
        for ((d, l), x) in self
            .dirty
            .iter_mut()
            .zip(self.log.iter_mut())
            .zip(&self.discarded)
        {
            if let Some(x) = x {
                for i in x.iter_ones() {
                    l.clear(i);
                }
            }
            n += d.merge_from(l);
        }
        self.dirty_count += n;
        self.counters.dirty_sync_count += 1;
        Ok(n)
    }

    /// Writes one PART payload: dirty pages while fewer than `budget` bytes
    /// were written by this call (QEMU checks its rate limit before each
    /// page), then EOS.
    ///
    /// # Errors
    /// [`RamSrcError::State`] unless in [`State::Iterating`];
    /// [`RamSrcError::MemoryMismatch`] when `mem` does not cover the blocks;
    /// [`RamSrcError::Compress`].
    pub fn poll_iterate<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> Result<Progress, RamSrcError> {
        if self.state != State::Postcopy {
            self.expect("poll_iterate", State::Iterating)?;
        }
        self.check_memory(mem)?;
        let start = out.len();
        self.serve_requests(mem, out, true)?;
        // Requested pages are never held back by the budget.
        let budget = budget.saturating_add(out.len() - start);
        let mut progress = Progress::Budget;
        let mf_start = self.multifd_bytes();
        // Pages read from `mem` by this call, in bytes: zero pages cost a few
        // bytes of output each, so without this bound one call could read a
        // whole block of them (a host that maps its images would then hold
        // all of it resident). QEMU bounds the same loop by time
        // (`ram_save_iterate`'s MAX_WAIT check); a sans-IO machine bounds
        // it by the memory it reads: at most SCAN_FACTOR × budget.
        let scan_limit = budget.saturating_mul(SCAN_FACTOR).max(1);
        let tps = 1usize << self.page_bits;
        let mut scanned = 0usize;
        while out.len() - start + (self.multifd_bytes() - mf_start) < budget && scanned < scan_limit
        {
            let pages = self.find_and_save(mem, out)?;
            if pages == 0 {
                progress = Progress::Clean;
                break;
            }
            scanned = scanned.saturating_add(pages.saturating_mul(tps));
            self.counters.iterations += 1;
        }
        if self.multifd_per_section() {
            self.multifd_sync(out, false)?;
        }
        RamRecord::eos().write(out)?;
        self.counters.transferred += (out.len() - start) as u64;
        if self.state == State::Postcopy {
            self.counters.postcopy_bytes += (out.len() - start) as u64;
        }
        Ok(progress)
    }

    /// Writes the END payload: a sync, then every dirty page (no budget; the
    /// XBZRLE cache is not updated any more), then EOS.
    ///
    /// # Errors
    /// As for [`poll_iterate`](Self::poll_iterate).
    pub fn poll_complete<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<(), RamSrcError> {
        let postcopy = self.state == State::Postcopy;
        if !postcopy {
            self.expect("poll_complete", State::Iterating)?;
        }
        self.check_memory(mem)?;
        self.last_stage = true;
        let start = out.len();
        if postcopy {
            // The guest runs on the destination: no sync (QEMU's
            // `ram_save_complete` syncs only outside postcopy).
            self.serve_requests(mem, out, true)?;
        } else {
            self.handle_sync()?;
        }
        while self.find_and_save(mem, out)? != 0 {
            self.counters.iterations += 1;
        }
        // ram_save_complete: multifd_ram_flush_and_sync.
        let per_section = self.multifd_per_section();
        self.multifd_sync(out, !per_section)?;
        RamRecord::eos().write(out)?;
        self.counters.transferred += (out.len() - start) as u64;
        if postcopy {
            self.counters.postcopy_bytes += (out.len() - start) as u64;
        }
        self.urgent.clear();
        self.state = State::Done;
        Ok(())
    }

    fn check_memory<M: GuestRam + ?Sized>(&self, mem: &M) -> Result<(), RamSrcError> {
        for (i, b) in self.blocks.iter().enumerate() {
            let have = if i < mem.blocks() {
                mem.block(i).len() as u64
            } else {
                0
            };
            if have < b.used_length {
                return Err(RamSrcError::MemoryMismatch {
                    block: b.name.clone(),
                    have,
                    want: b.used_length,
                });
            }
        }
        Ok(())
    }

    /// QEMU's `ram_find_and_save_block`: from where the last search stopped,
    /// find the next dirty page (wrapping around the block list) and send
    /// its host page. Returns the number of pages sent; 0 when a complete
    /// round found nothing dirty.
    fn find_and_save<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<usize, RamSrcError> {
        let n = self.blocks.len();
        if self.pages.iter().all(|&p| p == 0) {
            return Ok(0);
        }
        let (start_blk, start_page) = self.cursor.unwrap_or((0, 0));
        let (mut blk, mut page) = (start_blk, start_page);
        let mut complete_round = false;
        loop {
            page = self.dirty[blk]
                .next_set(page as u64, self.pages[blk] as u64)
                .map_or(self.pages[blk], |p| p as usize);
            if complete_round && blk == start_blk && page >= start_page {
                self.cursor = Some((blk, page));
                return Ok(0);
            }
            if page >= self.pages[blk] {
                page = 0;
                blk += 1;
                if blk == n {
                    blk = 0;
                    complete_round = true;
                    // find_dirty_block: a sync per round over RAM.
                    if self.multifd.is_some() && !self.multifd_per_section() {
                        self.multifd_sync(out, true)?;
                    }
                    if self.xbzrle.is_some() {
                        self.xbzrle_started = true;
                    }
                }
                continue;
            }
            let sent = self.save_host_page(blk, &mut page, mem, out)?;
            if sent > 0 {
                self.cursor = Some((blk, page));
                return Ok(sent);
            }
        }
    }

    /// QEMU's `ram_save_host_page`: sends the dirty target pages of the host
    /// page holding `*page`, from `*page` on; leaves `*page` at the end of
    /// the host page (or the block).
    fn save_host_page<M: GuestRam + ?Sized>(
        &mut self,
        blk: usize,
        page: &mut usize,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<usize, RamSrcError> {
        let hp = self.host_pages[blk];
        let end = ((*page / hp + 1) * hp).min(self.pages[blk]);
        let mut sent = 0;
        let mut p = *page;
        while p < end {
            if self.dirty[blk].test_and_clear(p as u64) {
                self.dirty_count -= 1;
                sent += self.save_target_page(blk, p, mem, out)?;
            }
            p = self.dirty[blk]
                .next_set(p as u64 + 1, end as u64)
                .map_or(end, |x| x as usize);
        }
        *page = end;
        Ok(sent)
    }

    /// The block name a page record of `blk` carries: none when it continues
    /// the block of the previous record (QEMU's CONTINUE), else the name.
    fn block_ref(&mut self, blk: usize) -> Option<&str> {
        if self.last_sent == Some(blk) {
            None
        } else {
            self.last_sent = Some(blk);
            Some(&self.blocks[blk].name)
        }
    }

    /// QEMU's `ram_save_target_page` for one dirty page. Returns 1 when a
    /// record was written, 0 when XBZRLE found the page unchanged.
    fn save_target_page<M: GuestRam + ?Sized>(
        &mut self,
        blk: usize,
        page: usize,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<usize, RamSrcError> {
        let ps = self.page_size;
        let offset = (page as u64) << self.page_bits;
        let data = &mem.block(blk)[page * ps..(page + 1) * ps];
        if let Some(m) = self.multifd.as_mut() {
            // ram_save_target_page_multifd: only `legacy` detects zero
            // pages on the migration thread (ZERO records on main).
            let legacy =
                m.config().zero_page_detection == crate::multifd::ZeroPageDetection::Legacy;
            if legacy && is_zero(data) {
                self.write_zero(out, blk, offset)?;
                return Ok(1);
            }
            m.queue_page(blk, &self.blocks[blk].name, offset, data)?;
            return Ok(1);
        }
        let zero = self.zero_detection && is_zero(data);

        // Compression (QEMU <= 9.0, only until XBZRLE starts): pages that
        // continue the last record's block went to the compression threads,
        // which send zero pages as ZERO; the first page of a block is sent
        // by the migration thread below, as ZERO or PAGE.
        let postcopy = self.state == State::Postcopy;
        if self.last_sent == Some(blk) && !self.xbzrle_started && !postcopy {
            if let Some(c) = self.compressor.as_mut() {
                if zero {
                    self.write_zero(out, blk, offset)?;
                    return Ok(1);
                }
                let z = c.compress(data).map_err(|why| RamSrcError::Compress {
                    block: self.blocks[blk].name.clone(),
                    offset,
                    why,
                })?;
                // Same block as the last record, so always CONTINUE.
                RamRecord::compressed(offset, None, z).write(out)?;
                self.counters.compressed_pages += 1;
                self.counters.compressed_bytes += z.len() as u64;
                return Ok(1);
            }
        }

        if zero {
            self.write_zero(out, blk, offset)?;
            // A page sent as zero replaces its (stale) cached copy.
            if self.xbzrle_started && !postcopy {
                let addr = self.blocks[blk].ram_addr + offset;
                let generation = self.counters.dirty_sync_count;
                if let Some(cache) = self.xbzrle.as_mut() {
                    let _ = cache.insert_zero(addr, generation);
                }
            }
            return Ok(1);
        }

        if self.xbzrle_started && !postcopy {
            let addr = self.blocks[blk].ram_addr + offset;
            let generation = self.counters.dirty_sync_count;
            if let Some(cache) = self.xbzrle.as_mut() {
                match cache.save_page(addr, data, generation, self.last_stage, &mut self.encoded) {
                    SaveOutcome::Miss { .. } => self.counters.xbzrle_cache_miss += 1,
                    SaveOutcome::Overflow => self.counters.xbzrle_overflow += 1,
                    SaveOutcome::Unchanged => {
                        self.counters.xbzrle_unchanged += 1;
                        return Ok(0);
                    }
                    SaveOutcome::Encoded(len) => {
                        let at = out.len();
                        let block = if self.last_sent == Some(blk) {
                            None
                        } else {
                            self.last_sent = Some(blk);
                            Some(self.blocks[blk].name.as_str())
                        };
                        RamRecord::xbzrle(offset, block, &self.encoded[..len]).write(out)?;
                        self.counters.xbzrle_pages += 1;
                        self.counters.xbzrle_bytes += (out.len() - at - 8) as u64;
                        return Ok(1);
                    }
                }
            }
        }

        RamRecord::page(offset, self.block_ref(blk), data).write(out)?;
        self.counters.normal += 1;
        Ok(1)
    }

    fn write_zero(
        &mut self,
        out: &mut Vec<u8>,
        blk: usize,
        offset: u64,
    ) -> Result<(), RamSrcError> {
        RamRecord::zero(offset, self.block_ref(blk)).write(out)?;
        self.counters.duplicate += 1;
        Ok(())
    }
}
