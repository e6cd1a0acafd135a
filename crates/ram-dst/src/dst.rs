//! The destination state machine: [`RamDst`].

use std::collections::{HashMap, HashSet, VecDeque};

use qmig_wire::{Command, Item, MemBlock, RamBody, RamRecord, ReadItem};

use crate::bitmap::write_recv_bitmap_reply;
use crate::memory::GuestMemory;
use crate::RamDstError;
use qmig_wire::bitmap::PageBitmap;

/// Largest block page size accepted from a stream (1 GiB huge pages).
/// With [`Placement::Apply`] no buffer of this size is ever allocated: target
/// pages are applied as they arrive.
pub const MAX_PAGE_SIZE: u64 = 1 << 30;

/// Target page sizes QEMU targets use, as log2: 1 KiB (some Arm and
/// MIPS configurations) to 64 KiB. `configuration/target-page-bits` outside
/// this range is refused.
pub const TARGET_PAGE_BITS: std::ops::RangeInclusive<u32> = 10..=16;

/// Most target pages [`Layout::Adopt`] takes on, over all blocks: 2^27, i.e.
/// 512 GiB of 4 KiB pages. Each target page costs two bits of bitmap (received,
/// may-be-non-zero), so this keeps the bitmaps at most 32 MiB whatever the
/// stream announces and touches (a few kilobytes of ZERO records spread over a
/// huge block would otherwise bring every bitmap page into memory).
pub const MAX_ADOPTED_PAGES: u64 = 1 << 27;

/// Most blocks [`Layout::Adopt`] creates (each becomes an image file and two
/// bitmaps); QEMU machines have a few dozen.
pub const MAX_ADOPTED_BLOCKS: usize = 4096;

/// The QEMU version a machine type name says the source is at least:
/// `pc-i440fx-10.0`, `pc-q35-8.2`, `virt-9.1`, `pseries-8.2`,
/// `s390x-ccw-virtio-7.2` → `(major, minor)`. Machine types carry the
/// version of the QEMU release that introduced them, and a source only has
/// machine types up to its own version. `None` for unversioned names
/// (`microvm`, `isapc`, distribution-specific ones such as `pc-q35-rhel9.4.0`).
pub fn machine_qemu_version(machine: &str) -> Option<(u32, u32)> {
    let (_, ver) = machine.rsplit_once('-')?;
    let (maj, min) = ver.split_once('.')?;
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    Some((num(maj)?, num(min)?))
}

/// A leniency of offline reading: something QEMU 10's loader refuses but
/// qmig accepts, because the stream may come from an older QEMU that allowed
/// it (the machine type does not prove otherwise). Reported in the
/// manifest and by `inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leniency {
    /// ZERO records with a non-zero fill byte were applied as fills
    /// (QEMU ≥ 8.2 refuses them in `ram_load_precopy` / `ram_load_postcopy`).
    NonZeroFill,
}

/// A RAM block the destination has before the stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBlock {
    /// Block idstr, e.g. `pc.ram`.
    pub name: String,
    /// Current length in bytes.
    pub used_length: u64,
    /// Largest length a resize may give it.
    pub max_length: u64,
    /// The block's (host) page size: 4 KiB, or a huge page size.
    pub page_size: u64,
    /// Whether MEM_SIZE may resize it (up to `max_length`).
    pub resizable: bool,
}

impl LocalBlock {
    /// A fixed-size block with 4 KiB pages.
    pub fn fixed(name: &str, used_length: u64) -> Self {
        LocalBlock {
            name: name.to_string(),
            used_length,
            max_length: used_length,
            page_size: 4096,
            resizable: false,
        }
    }
}

/// Where the destination's RAM layout comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The destination has these blocks; MEM_SIZE is checked against them.
    Fixed(Vec<LocalBlock>),
    /// Replay: create whatever blocks MEM_SIZE lists (resizable, page size as
    /// announced or the host page size).
    Adopt,
}

/// What happens to a host page assembled in postcopy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Write it into the [`GuestMemory`] (replay; no OS help needed).
    Apply,
    /// Hand it out as an [`Action::PlaceHostPage`] / [`Action::PlaceZeroPage`]
    /// for the host to place atomically (e.g. with `UFFDIO_COPY`); the memory
    /// is not touched.
    Emit,
}

/// Configuration of a [`RamDst`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Local blocks, or adopt the source's.
    pub layout: Layout,
    /// Postcopy placement policy.
    pub placement: Placement,
    /// log2 of the target page size expected (12); a stream announcing
    /// another one is refused unless adopting before any block exists.
    pub target_page_bits: u32,
    /// The destination's host page size: the page size of blocks that
    /// MEM_SIZE gives no page size for.
    pub host_page_size: u64,
    /// In [`Layout::Adopt`] mode, the most bytes all blocks together may take.
    pub max_adopted_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layout: Layout::Adopt,
            placement: Placement::Apply,
            target_page_bits: 12,
            host_page_size: 4096,
            max_adopted_bytes: 1 << 40,
        }
    }
}

/// The incoming postcopy state (QEMU's `PostcopyState` on the destination).
///
/// ```text
///  None ─ADVISE─► Advised ─DISCARD─► Discarding ─┐
///                    │               (DISCARD)*   │
///                    └────────LISTEN──────────────┴─► Listening ─RUN─► Running ─EOF─► End
/// ```
/// A stream that never leaves `None`/`Advised`/`Discarding` is plain precopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PostcopyState {
    /// No postcopy advised.
    None,
    /// POSTCOPY_ADVISE received.
    Advised,
    /// At least one POSTCOPY_RAM_DISCARD received.
    Discarding,
    /// POSTCOPY_LISTEN received: RAM records are postcopy records.
    Listening,
    /// POSTCOPY_RUN received: the guest may run.
    Running,
    /// The postcopy stream ended.
    End,
}

impl PostcopyState {
    /// A lower-case name for output (`none`, `advised`, `discarding`,
    /// `listening`, `running`, `end`).
    pub fn name(self) -> &'static str {
        match self {
            PostcopyState::None => "none",
            PostcopyState::Advised => "advised",
            PostcopyState::Discarding => "discarding",
            PostcopyState::Listening => "listening",
            PostcopyState::Running => "running",
            PostcopyState::End => "end",
        }
    }
}

impl std::fmt::Display for PostcopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Something the host of the state machine must do, from [`RamDst::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The source asked for a return path (OPEN_RETURN_PATH).
    OpenReturnPath,
    /// Send a PONG with this value on the return path (only after
    /// OPEN_RETURN_PATH: a PING without one is refused, as QEMU's
    /// `loadvm_process_command` does).
    Pong(u32),
    /// A ZERO record had a non-zero fill byte; it was applied as a fill
    /// (QEMU before 8.2 does the same; later versions refuse it).
    NonZeroFill {
        /// Stream offset of the record.
        offset: u64,
        /// Block index.
        block: usize,
        /// Page offset in the block.
        page_offset: u64,
        /// The fill byte.
        fill: u8,
    },
    /// Place `data` (one whole host page) at `offset` of `block` atomically
    /// ([`Placement::Emit`] only). Its received bits are set when the host
    /// reports the placement with [`RamDst::handle_placed`].
    PlaceHostPage {
        /// Block index.
        block: usize,
        /// Host-page-aligned offset in the block.
        offset: u64,
        /// The host page.
        data: Vec<u8>,
    },
    /// Place a zero host page of `len` bytes at `offset` of `block`
    /// ([`Placement::Emit`] only, or after [`RamDst::handle_page_fault`] on
    /// a received page); report it with [`RamDst::handle_placed`].
    PlaceZeroPage {
        /// Block index.
        block: usize,
        /// Host-page-aligned offset in the block.
        offset: u64,
        /// Host page size.
        len: u64,
    },
    /// The postcopy state changed (register userfaultfd on `Listening`, start
    /// the guest on `Running`, tear down on `End`).
    PostcopyState(PostcopyState),
    /// The source asked for a block's received bitmap (RECV_BITMAP command):
    /// answer with [`RamDst::recv_bitmap_reply`]. Postcopy recovery only,
    /// which this destination does not enter: not emitted today (RECV_BITMAP
    /// is refused, as QEMU refuses it outside postcopy-recover).
    SendRecvBitmap {
        /// Block index.
        block: usize,
    },
    /// The source asked to resume postcopy (POSTCOPY_RESUME): send RESUME_ACK.
    /// Postcopy recovery only: not emitted today (outside recovery QEMU
    /// ignores POSTCOPY_RESUME, and so does this destination).
    ResumeAck,
    /// MEM_SIZE resized a block.
    BlockResized {
        /// Block index.
        block: usize,
        /// New used length.
        len: u64,
    },
}

/// Counters of what was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// ZERO records.
    pub zero: u64,
    /// ZERO records with a non-zero fill byte.
    pub nonzero_fill: u64,
    /// PAGE records.
    pub page: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
    /// MEM_SIZE records.
    pub mem_size: u64,
    /// Target pages dropped by POSTCOPY_RAM_DISCARD.
    pub discarded_pages: u64,
    /// Host pages placed in postcopy mode (with data).
    pub placed_host_pages: u64,
    /// Zero host pages placed in postcopy mode.
    pub placed_zero_pages: u64,
    /// Page requests (REQ_PAGES / REQ_PAGES_ID) queued on the return path by
    /// [`RamDst::handle_page_fault`].
    pub page_requests: u64,
    /// Faults resolved without asking the source: the host page was received
    /// (as zero, never written) but is not present in memory.
    pub faults_resolved_locally: u64,
    /// Faults on a host page already asked for and not yet placed.
    pub faults_already_requested: u64,
}

/// What [`RamDst::handle_page_fault`] decided for a faulting host page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A REQ_PAGES / REQ_PAGES_ID for the whole host page was queued for
    /// [`RamDst::poll_transmit`].
    Requested,
    /// The host page was asked for before and has not been placed yet:
    /// nothing new is sent.
    AlreadyRequested,
    /// The host page was received (a zero page that precopy never had to
    /// write) but is not present: an [`Action::PlaceZeroPage`] was queued.
    PlaceLocally,
}

/// The destination's view of one RAM block.
#[derive(Debug, Clone)]
pub struct BlockState {
    name: String,
    used_length: u64,
    max_length: u64,
    page_size: u64,
    resizable: bool,
    received: PageBitmap,
    /// Pages that may hold non-zero bytes (so a ZERO record must really write).
    nonzero: PageBitmap,
}

impl BlockState {
    /// Block idstr.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current used length.
    pub fn used_length(&self) -> u64 {
        self.used_length
    }

    /// Maximum length.
    pub fn max_length(&self) -> u64 {
        self.max_length
    }

    /// The block's (host) page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Whether MEM_SIZE may resize it.
    pub fn resizable(&self) -> bool {
        self.resizable
    }

    /// The received bitmap: one bit per target page.
    pub fn received(&self) -> &PageBitmap {
        &self.received
    }

    /// Multifd hook: whether target page `page` may hold non-zero bytes.
    pub(crate) fn maybe_nonzero(&self, page: u64) -> bool {
        self.nonzero.get(page)
    }

    /// Multifd hook: target page `page` was received, with data or as zero.
    pub(crate) fn mark_received(&mut self, page: u64, nonzero: bool) {
        if nonzero {
            self.nonzero.set(page);
        } else {
            self.nonzero.clear(page);
        }
        self.received.set(page);
    }
}

/// A host page being assembled in postcopy mode.
#[derive(Debug)]
pub(crate) struct HostPage {
    block: usize,
    start: u64,
    next: u64,
    all_zero: bool,
    pub(crate) data: Vec<u8>,
}

/// The sans-IO RAM destination: feed it the items of a migration stream,
/// collect the actions it asks for.
///
/// Call [`RamDst::handle_item`] (or [`RamDst::handle_read_item`]) for every
/// item of the stream in order, then drain [`RamDst::poll_action`] before
/// feeding the next item. RAM records are applied to the [`GuestMemory`];
/// commands move the postcopy state machine ([`PostcopyState`]). Nothing
/// here does I/O, spawns threads or reads a clock.
///
/// Every item is applied whole or not at all. After an error the machine
/// stops: [`RamDst::applied_up_to`] says where, and later input is refused.
///
/// ```
/// use qmig_ram_dst::{Config, RamDst, VecMemory};
/// use qmig_wire::{MemBlock, RamRecord, Item};
///
/// let mut dst = RamDst::new(Config::default(), VecMemory::new())?;
/// let blocks = vec![MemBlock { name: "pc.ram", used_length: 8192, page_size: None, addr: None }];
/// dst.handle_item(0, 20, &Item::Ram(RamRecord::mem_size(blocks)))?;
/// let page = [7u8; 4096];
/// dst.handle_item(20, 4104, &Item::Ram(RamRecord::page(4096, Some("pc.ram"), &page)))?;
/// assert_eq!(dst.memory().block("pc.ram").unwrap()[4096..], page[..]);
/// assert!(dst.blocks()[0].received().get(1));
/// # Ok::<(), qmig_ram_dst::RamDstError>(())
/// ```
#[derive(Debug)]
pub struct RamDst<M> {
    memory: M,
    adopt: bool,
    placement: Placement,
    host_page_size: u64,
    max_adopted_bytes: u64,
    page_bits: u32,
    blocks: Vec<BlockState>,
    by_name: HashMap<String, usize>,
    current: Option<usize>,
    postcopy: PostcopyState,
    /// OPEN_RETURN_PATH was received.
    return_path: bool,
    /// The QEMU version the machine type proves (configuration section).
    machine_version: Option<(u32, u32)>,
    leniencies: Vec<Leniency>,
    pub(crate) host_page: Option<HostPage>,
    actions: VecDeque<Action>,
    /// Return-path bytes waiting for [`RamDst::poll_transmit`].
    transmit: Vec<u8>,
    /// Host pages asked for (block, host-page offset) and not yet placed.
    requested: HashSet<(usize, u64)>,
    /// The block named by the last REQ_PAGES_ID (later requests for the same
    /// block use REQ_PAGES, as QEMU's `migrate_send_rp_req_pages` does).
    last_requested_block: Option<usize>,
    stats: Stats,
    applied_to: u64,
    stopped: bool,
    scratch: Vec<u8>,
    inflate: flate2::Decompress,
    /// mapped-ram: the block whose file region is being read, and its
    /// bitmap once read.
    mapped: Option<(usize, Vec<u8>)>,
}

impl<M: GuestMemory> RamDst<M> {
    /// A destination with `config`'s layout over `memory`. In [`Layout::Fixed`]
    /// mode the memory is given every local block now.
    ///
    /// # Errors
    /// [`RamDstError::BadSize`] for a local block whose sizes are not page
    /// multiples (or page size not a power of two), [`RamDstError::Memory`]
    /// when the memory cannot create a block.
    pub fn new(config: Config, mut memory: M) -> Result<Self, RamDstError> {
        if !TARGET_PAGE_BITS.contains(&config.target_page_bits) {
            return Err(RamDstError::BadSize {
                offset: 0,
                why: format!(
                    "target page bits {} outside {TARGET_PAGE_BITS:?}",
                    config.target_page_bits
                ),
            });
        }
        let tps = 1u64 << config.target_page_bits;
        let mut blocks = Vec::new();
        let mut by_name = HashMap::new();
        let adopt = matches!(config.layout, Layout::Adopt);
        if let Layout::Fixed(local) = config.layout {
            for (i, b) in local.into_iter().enumerate() {
                let bad = |why: String| RamDstError::BadSize {
                    offset: 0,
                    why: format!("local block \"{}\": {why}", b.name),
                };
                if !b.page_size.is_power_of_two()
                    || b.page_size < tps
                    || b.page_size > MAX_PAGE_SIZE
                {
                    return Err(bad(format!("page size {:#x}", b.page_size)));
                }
                if !b.used_length.is_multiple_of(b.page_size) || b.max_length < b.used_length {
                    return Err(bad(format!(
                        "length {:#x} (max {:#x})",
                        b.used_length, b.max_length
                    )));
                }
                if by_name.insert(b.name.clone(), i).is_some() {
                    return Err(bad("listed twice".into()));
                }
                memory
                    .set_block_len(i, &b.name, b.used_length)
                    .map_err(|source| RamDstError::Memory { offset: 0, source })?;
                let pages = b.used_length / tps;
                blocks.push(BlockState {
                    name: b.name,
                    used_length: b.used_length,
                    max_length: b.max_length,
                    page_size: b.page_size,
                    resizable: b.resizable,
                    received: PageBitmap::new(pages),
                    nonzero: PageBitmap::new(pages),
                });
            }
        }
        Ok(RamDst {
            memory,
            adopt,
            placement: config.placement,
            host_page_size: config.host_page_size,
            max_adopted_bytes: config.max_adopted_bytes,
            page_bits: config.target_page_bits,
            blocks,
            by_name,
            current: None,
            postcopy: PostcopyState::None,
            return_path: false,
            machine_version: None,
            leniencies: Vec::new(),
            host_page: None,
            actions: VecDeque::new(),
            transmit: Vec::new(),
            requested: HashSet::new(),
            last_requested_block: None,
            stats: Stats::default(),
            applied_to: 0,
            stopped: false,
            scratch: Vec::new(),
            inflate: flate2::Decompress::new(true),
            mapped: None,
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The guest memory, mutably (e.g. for a host that places pages itself).
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.memory
    }

    /// The memory, mutably, beside the blocks (e.g. to copy out only the
    /// pages whose received bit is set).
    pub fn split_mut(&mut self) -> (&mut M, &[BlockState]) {
        (&mut self.memory, &self.blocks)
    }

    /// Multifd hook (`crate::multifd`): the memory and the block table.
    pub(crate) fn multifd_parts(&mut self) -> (&mut M, &mut [BlockState]) {
        (&mut self.memory, &mut self.blocks)
    }

    /// Gives the memory back.
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// The blocks, by index.
    pub fn blocks(&self) -> &[BlockState] {
        &self.blocks
    }

    /// Index of the block called `name`.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Target page size in bytes.
    pub fn page_size(&self) -> u64 {
        1 << self.page_bits
    }

    /// The postcopy state.
    pub fn postcopy_state(&self) -> PostcopyState {
        self.postcopy
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stream offset just past the last item applied.
    pub fn applied_up_to(&self) -> u64 {
        self.applied_to
    }

    /// Whether an error stopped the machine.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The next action for the host, if any. Drain after every `handle_*`.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Appends the return-path bytes the state machine wants sent (PONG
    /// after OPEN_RETURN_PATH, REQ_PAGES / REQ_PAGES_ID from
    /// [`RamDst::handle_page_fault`]) to `out`, in order; returns whether
    /// there were any. Drain it after every `handle_*` call and write the
    /// bytes to the return path as they are. (SHUT is the host's: it knows
    /// when its side is finished.)
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.transmit.is_empty() {
            return false;
        }
        out.append(&mut self.transmit);
        true
    }

    /// Host page bounds of `page_offset` in block `block`, checked: the
    /// block exists and the offset is inside its used length.
    fn fault_page(&self, block: usize, page_offset: u64) -> Result<(u64, u64), RamDstError> {
        let bad = |why: String| RamDstError::BadFault {
            offset: self.applied_to,
            block,
            page_offset,
            why,
        };
        let Some(blk) = self.blocks.get(block) else {
            return Err(bad(format!("no such block ({} blocks)", self.blocks.len())));
        };
        if page_offset >= blk.used_length {
            return Err(bad(format!(
                "outside \"{}\" (used length {:#x})",
                blk.name, blk.used_length
            )));
        }
        let hps = blk.page_size;
        Ok((page_offset - page_offset % hps, hps))
    }

    /// A thread faulted on `page_offset` of block `block` (a page that is
    /// not present in the host's memory, e.g. a userfaultfd missing fault
    /// after POSTCOPY_LISTEN). Decides, for the whole host page:
    ///
    /// * not received and not asked for: a REQ_PAGES_ID (first request, or
    ///   another block than the last request) or REQ_PAGES is queued for
    ///   [`RamDst::poll_transmit`] ([`FaultOutcome::Requested`]), as QEMU's
    ///   `postcopy_request_page` / `migrate_send_rp_req_pages` do;
    /// * asked for already: nothing ([`FaultOutcome::AlreadyRequested`]);
    /// * received (every target page): it was received as a zero page that
    ///   never had to be written, so an [`Action::PlaceZeroPage`] is queued
    ///   ([`FaultOutcome::PlaceLocally`]) and nothing is asked of the source,
    ///   which would not send an already-sent page again.
    ///
    /// Call order: only between items (never while a `handle_*` call runs),
    /// then drain [`RamDst::poll_action`] and [`RamDst::poll_transmit`].
    ///
    /// # Errors
    /// [`RamDstError::BadFault`] for an unknown block, an offset outside it,
    /// a fault before POSTCOPY_LISTEN, a request without a return path, or a
    /// request after the postcopy stream ended; [`RamDstError::Stopped`]
    /// after an earlier error.
    pub fn handle_page_fault(
        &mut self,
        block: usize,
        page_offset: u64,
    ) -> Result<FaultOutcome, RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        let (start, hps) = self.fault_page(block, page_offset)?;
        let bad = |why: String| RamDstError::BadFault {
            offset: self.applied_to,
            block,
            page_offset,
            why,
        };
        use PostcopyState as S;
        if !matches!(self.postcopy, S::Listening | S::Running | S::End) {
            return Err(bad(format!(
                "a fault before POSTCOPY_LISTEN (state {:?})",
                self.postcopy
            )));
        }
        let tps = self.page_size();
        let blk = &self.blocks[block];
        let (p, n) = (start / tps, hps / tps);
        if (p..p + n).all(|i| blk.received.get(i)) {
            self.stats.faults_resolved_locally += 1;
            self.actions.push_back(Action::PlaceZeroPage {
                block,
                offset: start,
                len: hps,
            });
            return Ok(FaultOutcome::PlaceLocally);
        }
        if self.requested.contains(&(block, start)) {
            self.stats.faults_already_requested += 1;
            return Ok(FaultOutcome::AlreadyRequested);
        }
        if self.postcopy == S::End {
            return Err(bad(
                "the postcopy stream ended without this page: nobody left to ask".into(),
            ));
        }
        if !self.return_path {
            return Err(bad(
                "postcopy needs a return path to ask for pages (no OPEN_RETURN_PATH)".into(),
            ));
        }
        let len = u32::try_from(hps).map_err(|_| bad(format!("host page {hps:#x} too large")))?;
        let msg = if self.last_requested_block == Some(block) {
            qmig_wire::RpMessage::ReqPages { start, len }
        } else {
            qmig_wire::RpMessage::ReqPagesId {
                start,
                len,
                block: &blk.name,
            }
        };
        msg.write(&mut self.transmit)?;
        self.last_requested_block = Some(block);
        self.requested.insert((block, start));
        self.stats.page_requests += 1;
        Ok(FaultOutcome::Requested)
    }

    /// The host placed `len` bytes at `offset` of block `block` (an
    /// [`Action::PlaceHostPage`] or [`Action::PlaceZeroPage`] succeeded,
    /// EEXIST included): their received bits are set now, and the host page
    /// is no longer outstanding. Call it before feeding the next item.
    ///
    /// # Errors
    /// [`RamDstError::BadFault`] for an unknown block or a range that is not
    /// whole host pages inside the block.
    pub fn handle_placed(
        &mut self,
        block: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), RamDstError> {
        let (start, hps) = self.fault_page(block, offset)?;
        let blk = &self.blocks[block];
        if start != offset
            || len == 0
            || !len.is_multiple_of(hps)
            || offset.checked_add(len).is_none_or(|e| e > blk.used_length)
        {
            return Err(RamDstError::BadFault {
                offset: self.applied_to,
                block,
                page_offset: offset,
                why: format!("placement of {len:#x} bytes is not whole host pages of the block"),
            });
        }
        let tps = self.page_size();
        self.blocks[block]
            .received
            .set_range(offset / tps, len / tps);
        let mut at = offset;
        while at < offset + len {
            self.requested.remove(&(block, at));
            at += hps;
        }
        Ok(())
    }

    /// Host pages asked for and not yet placed.
    pub fn outstanding_requests(&self) -> usize {
        self.requested.len()
    }

    /// Writes the return-path RECV_BITMAP message for block `index` (framed
    /// message, be64 size, little-endian bitmap, end marker) to `out`.
    /// Returns false for an unknown index.
    ///
    /// # Errors
    /// As for [`write_recv_bitmap_reply`](crate::write_recv_bitmap_reply).
    pub fn recv_bitmap_reply(&self, index: usize, out: &mut Vec<u8>) -> Result<bool, RamDstError> {
        match self.blocks.get(index) {
            Some(b) => {
                write_recv_bitmap_reply(&b.name, &b.received, out)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Writes to `out` the return-path message a destination sends for
    /// `action`, if any: PONG once OPEN_RETURN_PATH was received; RECV_BITMAP
    /// and RESUME_ACK (postcopy recovery only, never emitted today). Other
    /// actions need no reply. Replies are bounded: a PONG is 8 bytes for a
    /// 9-byte PING, and no reply grows with a size the input announces.
    ///
    /// The PONG is also queued, in order with page requests, for
    /// [`RamDst::poll_transmit`]; a host that drains `poll_transmit` (as
    /// `qmig recv` does) calls `reply` only for the other actions.
    ///
    /// # Errors
    /// As for [`write_recv_bitmap_reply`](crate::write_recv_bitmap_reply).
    pub fn reply(&self, action: &Action, out: &mut Vec<u8>) -> Result<(), RamDstError> {
        if !self.return_path {
            return Ok(());
        }
        match action {
            Action::Pong(v) => qmig_wire::RpMessage::Pong(*v).write(out)?,
            Action::SendRecvBitmap { block } => {
                self.recv_bitmap_reply(*block, out)?;
            }
            Action::ResumeAck => qmig_wire::RpMessage::ResumeAck(1).write(out)?,
            _ => {}
        }
        Ok(())
    }

    /// Handles an item from [`qmig_wire::StreamReader`].
    ///
    /// # Errors
    /// As for [`RamDst::handle_item`].
    /// The target page size is the decoder's (which may have it from the
    /// vmdesc, the machine type or the records themselves rather than the
    /// configuration section).
    pub fn handle_read_item(&mut self, ri: &ReadItem<'_>) -> Result<(), RamDstError> {
        if let Item::Ram(_) | Item::MappedRam(_) = ri.item {
            let bits = ri.decoder.ram_context().page_bits;
            if bits != self.page_bits && !self.stopped {
                if let Err(e) = self.handle_configuration(ri.offset, Some(bits)) {
                    self.stopped = true;
                    self.applied_to = ri.offset;
                    return Err(e);
                }
            }
        }
        self.handle_item(ri.offset, ri.len, &ri.item)
    }

    /// Handles one stream item of `len` bytes at stream offset `offset`.
    /// Items other than the configuration, RAM records, commands and EOF are
    /// accepted and ignored.
    ///
    /// # Errors
    /// A [`RamDstError`] naming `offset` when the item breaks a rule; the item
    /// is then not applied and the machine stops.
    pub fn handle_item(
        &mut self,
        offset: u64,
        len: usize,
        item: &Item<'_>,
    ) -> Result<(), RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        let r = match item {
            Item::Configuration(c) => {
                self.machine_version = machine_qemu_version(c.machine);
                self.handle_configuration(offset, c.target_page_bits())
            }
            Item::Section(h) => self.handle_section(offset, h),
            Item::Ram(rec) => self.handle_record(offset, rec),
            Item::Command(c) => self.handle_command(offset, c),
            Item::Eof => self.handle_eof(offset),
            Item::MappedRam(m) => self.handle_mapped(offset, m),
            _ => Ok(()),
        };
        match r {
            Ok(()) => {
                self.applied_to = offset + len as u64;
                Ok(())
            }
            Err(e) => {
                self.stopped = true;
                self.applied_to = offset;
                Err(e)
            }
        }
    }

    /// The checks QEMU makes on the RAM section's header: `ram` exists only
    /// as instance 0 (`qemu_loadvm_section_start_full` finds no other
    /// instance) and is loaded only at version 4 (`ram_load`).
    fn handle_section(
        &mut self,
        at: u64,
        h: &qmig_wire::SectionHeader<'_>,
    ) -> Result<(), RamDstError> {
        let Some(id) = h.ident.filter(|i| i.idstr == "ram") else {
            return Ok(());
        };
        if id.instance != 0 {
            return Err(RamDstError::QemuRule {
                offset: at,
                function: "qemu_loadvm_section_start_full",
                why: format!("unknown section instance \"ram\" {}", id.instance),
            });
        }
        if id.version != 4 {
            return Err(RamDstError::QemuRule {
                offset: at,
                function: "ram_load",
                why: format!("RAM section version {} (only 4 is loaded)", id.version),
            });
        }
        Ok(())
    }

    /// Whether the stream's machine type proves a source of at least `v`.
    fn source_at_least(&self, v: (u32, u32)) -> bool {
        self.machine_version.is_some_and(|m| m >= v)
    }

    /// A ZERO record's fill byte: 0, or (from a source that may predate
    /// QEMU 8.2) a fill that is applied and reported as a leniency.
    fn check_fill(&mut self, at: u64, fill: u8, function: &'static str) -> Result<(), RamDstError> {
        if fill != 0 && self.source_at_least((8, 2)) {
            return Err(RamDstError::QemuRule {
                offset: at,
                function,
                why: format!(
                    "ZERO record with fill byte {fill:#04x} (\"Found a zero page with value {fill}\"); \
                     the machine type says QEMU >= 8.2, which sends only 0"
                ),
            });
        }
        if fill != 0 && !self.leniencies.contains(&Leniency::NonZeroFill) {
            self.leniencies.push(Leniency::NonZeroFill);
        }
        Ok(())
    }

    /// What was accepted that QEMU 10's loader would refuse (see [`Leniency`]).
    pub fn leniencies(&self) -> &[Leniency] {
        &self.leniencies
    }

    /// The QEMU version the machine type proves, if it carries one
    /// ([`machine_qemu_version`]).
    pub fn machine_version(&self) -> Option<(u32, u32)> {
        self.machine_version
    }

    fn handle_configuration(&mut self, at: u64, bits: Option<u32>) -> Result<(), RamDstError> {
        let Some(bits) = bits else { return Ok(()) };
        if bits == self.page_bits {
            return Ok(());
        }
        if self.adopt && self.blocks.is_empty() && qmig_wire::target_page::valid_page_bits(bits) {
            self.page_bits = bits;
            return Ok(());
        }
        Err(RamDstError::PageSizeMismatch {
            offset: at,
            name: "target page size".into(),
            local: 1 << self.page_bits,
            remote: 1u64.checked_shl(bits).unwrap_or(0),
        })
    }

    /// Applies one RAM record at stream offset `at` (without the bookkeeping
    /// of [`RamDst::handle_item`]: prefer that).
    fn handle_record(&mut self, at: u64, rec: &RamRecord<'_>) -> Result<(), RamDstError> {
        if self.postcopy >= PostcopyState::Listening {
            return self.apply_postcopy(at, rec);
        }
        let tps = self.page_size();
        match &rec.body {
            RamBody::Zero { fill } => {
                let (b, off) = self.resolve(at, rec)?;
                self.check_fill(at, *fill, "ram_load_precopy")?;
                let p = off / tps;
                let blk = &mut self.blocks[b];
                if *fill != 0 {
                    let mem = self
                        .memory
                        .bytes_mut(b, off, tps as usize)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?;
                    mem.fill(*fill);
                } else if blk.nonzero.get(p) {
                    // Through zero_page: memory that tracks presence (a
                    // postcopy destination's) must not keep the page present,
                    // or a later placement of it would find it there.
                    self.memory
                        .zero_page(b, off, tps)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?;
                }
                if *fill != 0 {
                    blk.nonzero.set(p);
                    self.stats.nonzero_fill += 1;
                    self.actions.push_back(Action::NonZeroFill {
                        offset: at,
                        block: b,
                        page_offset: off,
                        fill: *fill,
                    });
                } else {
                    blk.nonzero.clear(p);
                }
                blk.received.set(p);
                self.stats.zero += 1;
                self.current = Some(b);
            }
            RamBody::Page(data) => {
                self.check_page_len(at, data.len())?;
                let (b, off) = self.resolve(at, rec)?;
                self.memory
                    .write(b, off, data)
                    .map_err(|source| RamDstError::Memory { offset: at, source })?;
                let blk = &mut self.blocks[b];
                blk.nonzero.set(off / tps);
                blk.received.set(off / tps);
                self.stats.page += 1;
                self.current = Some(b);
            }
            RamBody::Xbzrle(enc) => {
                let (b, off) = self.resolve(at, rec)?;
                let mem = self
                    .memory
                    .bytes_mut(b, off, tps as usize)
                    .map_err(|source| RamDstError::Memory { offset: at, source })?;
                // decode() validates the whole encoding before it writes a byte.
                qmig_xbzrle::decode(enc, mem).map_err(|source| RamDstError::Xbzrle {
                    offset: at,
                    block: self.blocks[b].name.clone(),
                    page_offset: off,
                    source,
                })?;
                let blk = &mut self.blocks[b];
                blk.nonzero.set(off / tps);
                blk.received.set(off / tps);
                self.stats.xbzrle += 1;
                self.current = Some(b);
            }
            RamBody::Compressed(z) => {
                let (b, off) = self.resolve(at, rec)?;
                if self.source_at_least((9, 1)) {
                    return Err(RamDstError::QemuRule {
                        offset: at,
                        function: "ram_load_precopy",
                        why: "COMPRESS_PAGE record, but the machine type says QEMU >= 9.1, \
                              which has no compression"
                            .into(),
                    });
                }
                if let Err(why) = self.inflate_page(z) {
                    return Err(RamDstError::Compressed {
                        offset: at,
                        block: self.blocks[b].name.clone(),
                        page_offset: off,
                        why,
                    });
                }
                self.memory
                    .write(b, off, &self.scratch[..tps as usize])
                    .map_err(|source| RamDstError::Memory { offset: at, source })?;
                let blk = &mut self.blocks[b];
                blk.nonzero.set(off / tps);
                blk.received.set(off / tps);
                self.stats.compressed += 1;
                self.current = Some(b);
            }
            RamBody::MemSize(list) => self.handle_mem_size(at, rec.offset, list)?,
            RamBody::Eos | RamBody::MultifdFlush | RamBody::Hook => {}
        }
        Ok(())
    }

    /// Applies a mapped-ram item (wire-format §14): each block entry is
    /// adopted or checked as a one-block MEM_SIZE list; the bitmap is kept;
    /// a page whose bit is set is applied as a PAGE record, one whose bit is
    /// clear as a ZERO record (QEMU clears the bit of a page it found zero
    /// and leaves it out of the file), as `read_ramblock_mapped_ram` loads
    /// them into fresh memory.
    fn handle_mapped(&mut self, at: u64, m: &qmig_wire::MappedRam<'_>) -> Result<(), RamDstError> {
        use qmig_wire::MappedRam;
        match m {
            MappedRam::MemSize { .. } | MappedRam::Padding(_) => Ok(()),
            MappedRam::Block { block, .. } => {
                self.mapped = None;
                self.handle_mem_size(at, block.used_length, std::slice::from_ref(block))?;
                let index =
                    *self
                        .by_name
                        .get(block.name)
                        .ok_or_else(|| RamDstError::UnknownBlock {
                            offset: at,
                            name: block.name.to_string(),
                        })?;
                self.mapped = Some((index, Vec::new()));
                Ok(())
            }
            MappedRam::Bitmap(b) => {
                let (_, bm) = self
                    .mapped
                    .as_mut()
                    .ok_or(RamDstError::NoCurrentBlock { offset: at })?;
                bm.clear();
                bm.extend_from_slice(b);
                Ok(())
            }
            MappedRam::Pages { first, data } => {
                let Some((index, bm)) = self.mapped.take() else {
                    return Err(RamDstError::NoCurrentBlock { offset: at });
                };
                let tps = self.page_size();
                let r = (|| {
                    for (k, page) in data.chunks(tps as usize).enumerate() {
                        let i = first.saturating_add(k as u64);
                        let off = i.saturating_mul(tps);
                        let rec = if qmig_wire::mapped_ram::page_is_set(&bm, i) {
                            RamRecord::page(off, None, page)
                        } else {
                            RamRecord::zero(off, None)
                        };
                        self.current = Some(index);
                        self.handle_record(at + k as u64 * tps, &rec)?;
                    }
                    Ok(())
                })();
                self.mapped = Some((index, bm));
                r
            }
        }
    }

    fn check_page_len(&self, at: u64, len: usize) -> Result<(), RamDstError> {
        if len as u64 != self.page_size() {
            return Err(RamDstError::BadSize {
                offset: at,
                why: format!(
                    "PAGE record of {len} bytes, target page size is {}",
                    self.page_size()
                ),
            });
        }
        Ok(())
    }

    /// The block and page offset a page record addresses, checked.
    #[inline]
    fn resolve(&self, at: u64, rec: &RamRecord<'_>) -> Result<(usize, u64), RamDstError> {
        let b = match rec.block {
            Some(name) => match self.current {
                Some(c) if self.blocks[c].name == name => c,
                _ => *self
                    .by_name
                    .get(name)
                    .ok_or_else(|| RamDstError::UnknownBlock {
                        offset: at,
                        name: name.to_string(),
                    })?,
            },
            None => self
                .current
                .ok_or(RamDstError::NoCurrentBlock { offset: at })?,
        };
        let blk = &self.blocks[b];
        let tps = self.page_size();
        if !rec.offset.is_multiple_of(tps)
            || rec
                .offset
                .checked_add(tps)
                .is_none_or(|e| e > blk.used_length)
        {
            return Err(RamDstError::PageOutOfBlock {
                offset: at,
                block: blk.name.clone(),
                page_offset: rec.offset,
                used_length: blk.used_length,
            });
        }
        Ok((b, rec.offset))
    }

    /// Inflates one COMPRESS_PAGE body into `scratch`; it must give exactly one page.
    fn inflate_page(&mut self, z: &[u8]) -> Result<(), String> {
        let tps = self.page_size() as usize;
        self.scratch.resize(tps + 1, 0);
        self.inflate.reset(true);
        let st = self
            .inflate
            .decompress(z, &mut self.scratch, flate2::FlushDecompress::Finish)
            .map_err(|e| format!("zlib error: {e}"))?;
        if st != flate2::Status::StreamEnd {
            return Err("zlib stream incomplete or inflating to more than a page".into());
        }
        if self.inflate.total_out() != tps as u64 {
            return Err(format!(
                "inflates to {} bytes, not one page of {tps}",
                self.inflate.total_out()
            ));
        }
        Ok(())
    }

    fn handle_mem_size(
        &mut self,
        at: u64,
        total: u64,
        list: &[MemBlock<'_>],
    ) -> Result<(), RamDstError> {
        let tps = self.page_size();
        let bad = |why: String| RamDstError::BadSize { offset: at, why };
        let sum = list
            .iter()
            .try_fold(0u64, |a, b| a.checked_add(b.used_length));
        if sum != Some(total) {
            return Err(bad(format!(
                "MEM_SIZE total {total:#x} differs from the sum of its block lengths"
            )));
        }
        enum Plan<'a> {
            New {
                name: &'a str,
                len: u64,
                page_size: u64,
            },
            Resize {
                index: usize,
                len: u64,
            },
        }
        let mut plans = Vec::new();
        let mut seen = HashSet::new();
        // Bytes all blocks take after this record (adopt mode's cap).
        let listed: HashSet<&str> = list.iter().map(|m| m.name).collect();
        let mut after: u64 = self
            .blocks
            .iter()
            .filter(|b| !listed.contains(b.name.as_str()))
            .map(|b| b.used_length)
            .fold(0, u64::saturating_add);
        let advised = self.postcopy != PostcopyState::None;
        for mb in list {
            if !seen.insert(mb.name) {
                return Err(bad(format!(
                    "block \"{}\" listed twice in MEM_SIZE",
                    mb.name
                )));
            }
            if !mb.used_length.is_multiple_of(tps) {
                return Err(bad(format!(
                    "block \"{}\" length {:#x} is not a multiple of the target page size",
                    mb.name, mb.used_length
                )));
            }
            after = after.saturating_add(mb.used_length);
            match self.by_name.get(mb.name) {
                Some(&i) => {
                    let blk = &self.blocks[i];
                    if advised {
                        // Absent: the block's page is the larger of the host
                        // and target page (ram.c ram_load_precopy).
                        let remote = mb.page_size.unwrap_or(self.host_page_size.max(tps));
                        if remote != blk.page_size {
                            return Err(RamDstError::PageSizeMismatch {
                                offset: at,
                                name: blk.name.clone(),
                                local: blk.page_size,
                                remote,
                            });
                        }
                    }
                    if blk.used_length != mb.used_length {
                        if !blk.resizable
                            || mb.used_length > blk.max_length
                            || !mb.used_length.is_multiple_of(blk.page_size)
                        {
                            return Err(RamDstError::LengthMismatch {
                                offset: at,
                                name: blk.name.clone(),
                                local: blk.used_length,
                                remote: mb.used_length,
                                max: blk.max_length,
                                resizable: blk.resizable,
                            });
                        }
                        plans.push(Plan::Resize {
                            index: i,
                            len: mb.used_length,
                        });
                    }
                }
                None if self.adopt => {
                    if self.blocks.len() + plans.len() >= MAX_ADOPTED_BLOCKS {
                        return Err(bad(format!(
                            "more than {MAX_ADOPTED_BLOCKS} RAM blocks (at \"{}\")",
                            mb.name
                        )));
                    }
                    let ps = mb.page_size.unwrap_or(self.host_page_size.max(tps));
                    if !ps.is_power_of_two()
                        || ps < tps
                        || ps > MAX_PAGE_SIZE
                        || !mb.used_length.is_multiple_of(ps)
                    {
                        return Err(bad(format!(
                            "block \"{}\" page size {ps:#x} (length {:#x})",
                            mb.name, mb.used_length
                        )));
                    }
                    plans.push(Plan::New {
                        name: mb.name,
                        len: mb.used_length,
                        page_size: ps,
                    });
                }
                None => {
                    return Err(RamDstError::UnknownBlock {
                        offset: at,
                        name: mb.name.to_string(),
                    })
                }
            }
        }
        if self.adopt && after / tps > MAX_ADOPTED_PAGES {
            return Err(bad(format!(
                "blocks would take {} target pages, more than the limit of {MAX_ADOPTED_PAGES} \
                 (bitmap memory)",
                after / tps
            )));
        }
        if self.adopt && after > self.max_adopted_bytes {
            return Err(bad(format!(
                "blocks would take {after:#x} bytes, more than the limit {:#x}",
                self.max_adopted_bytes
            )));
        }
        for p in plans {
            match p {
                Plan::New {
                    name,
                    len,
                    page_size,
                } => {
                    let index = self.blocks.len();
                    self.memory
                        .set_block_len(index, name, len)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?;
                    self.blocks.push(BlockState {
                        name: name.to_string(),
                        used_length: len,
                        max_length: self.max_adopted_bytes,
                        page_size,
                        resizable: true,
                        received: PageBitmap::new(len / tps),
                        nonzero: PageBitmap::new(len / tps),
                    });
                    self.by_name.insert(name.to_string(), index);
                }
                Plan::Resize { index, len } => {
                    let blk = &mut self.blocks[index];
                    self.memory
                        .set_block_len(index, &blk.name, len)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?;
                    blk.used_length = len;
                    blk.received.resize(len / tps);
                    blk.nonzero.resize(len / tps);
                    self.actions
                        .push_back(Action::BlockResized { block: index, len });
                }
            }
        }
        self.stats.mem_size += 1;
        Ok(())
    }

    fn set_postcopy(&mut self, s: PostcopyState) {
        if self.postcopy != s {
            self.postcopy = s;
            self.actions.push_back(Action::PostcopyState(s));
        }
    }

    fn handle_command(&mut self, at: u64, cmd: &Command<'_>) -> Result<(), RamDstError> {
        use PostcopyState as S;
        let state = self.postcopy;
        let illegal = |event: &'static str| RamDstError::IllegalTransition {
            offset: at,
            state,
            event,
        };
        match cmd {
            Command::OpenReturnPath => {
                self.return_path = true;
                self.actions.push_back(Action::OpenReturnPath)
            }
            Command::Ping(v) => {
                if !self.return_path {
                    return Err(RamDstError::QemuRule {
                        offset: at,
                        function: "loadvm_process_command",
                        why: format!("PING {v:#x} with no return path open"),
                    });
                }
                qmig_wire::RpMessage::Pong(*v).write(&mut self.transmit)?;
                self.actions.push_back(Action::Pong(*v))
            }
            Command::PostcopyAdvise(advise) => {
                if state != S::None {
                    return Err(illegal("POSTCOPY_ADVISE"));
                }
                if let Some(a) = advise {
                    if a.target_page_size != self.page_size() {
                        return Err(RamDstError::PageSizeMismatch {
                            offset: at,
                            name: "target page size (POSTCOPY_ADVISE)".into(),
                            local: self.page_size(),
                            remote: a.target_page_size,
                        });
                    }
                    if !self.adopt {
                        let local = self.blocks.iter().fold(0, |s, b| s | b.page_size);
                        if a.page_size_summary != local {
                            return Err(RamDstError::PageSizeMismatch {
                                offset: at,
                                name: "page size summary (POSTCOPY_ADVISE)".into(),
                                local,
                                remote: a.page_size_summary,
                            });
                        }
                    }
                }
                self.set_postcopy(S::Advised);
            }
            Command::RamDiscard(d) => {
                if !matches!(state, S::Advised | S::Discarding) {
                    return Err(illegal("POSTCOPY_RAM_DISCARD"));
                }
                self.discard(at, d)?;
                self.set_postcopy(S::Discarding);
            }
            Command::PostcopyListen => {
                if !matches!(state, S::Advised | S::Discarding) {
                    return Err(illegal("POSTCOPY_LISTEN"));
                }
                self.set_postcopy(S::Listening);
            }
            Command::PostcopyRun => {
                if state != S::Listening {
                    return Err(illegal("POSTCOPY_RUN"));
                }
                self.set_postcopy(S::Running);
            }
            // Both belong to postcopy recovery, a state this destination
            // never enters (a new main channel after a failure).
            Command::PostcopyResume => {
                // QEMU's loadvm_postcopy_handle_resume reports a resume
                // outside postcopy-recover and ignores it: no RESUME_ACK.
                if !matches!(state, S::Listening | S::Running) {
                    return Err(illegal("POSTCOPY_RESUME"));
                }
            }
            Command::RecvBitmap { block } => {
                // QEMU's loadvm_handle_recv_bitmap fails the load outside
                // postcopy-recover; answering would let a few bytes of input
                // ask for gigabytes of bitmap on the return path.
                return Err(RamDstError::QemuRule {
                    offset: at,
                    function: "loadvm_handle_recv_bitmap",
                    why: format!(
                        "RECV_BITMAP for \"{block}\" outside postcopy recovery (state {state:?})"
                    ),
                });
            }
            Command::Packaged { .. } | Command::SwitchoverStart => {}
            Command::EnableColo => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: "COLO".into(),
                })
            }
            Command::Unknown { cmd, .. } => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: format!("command {cmd}"),
                });
            }
            // Command is non-exhaustive in spirit: anything new is refused.
            #[allow(unreachable_patterns)]
            _ => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: format!("command {}", cmd.name()),
                })
            }
        }
        Ok(())
    }

    /// POSTCOPY_RAM_DISCARD: every range is checked (aligned to the block's
    /// page size, inside its used length) before any is applied.
    ///
    /// Range count: QEMU's source sends at most 12 ranges per command, but its
    /// loader (`loadvm_postcopy_ram_handle_discard`) takes as many as the be16
    /// command length holds (about 4000), and so does qmig. What keeps a
    /// command cheap is the cost per range: the bitmaps are cleared a word at
    /// a time over their non-zero words only, and memory is discarded only
    /// where a page may hold data, so a range's cost does not grow with its length.
    fn discard(&mut self, at: u64, d: &qmig_wire::Discard<'_>) -> Result<(), RamDstError> {
        let Some(&b) = self.by_name.get(d.block) else {
            return Err(RamDstError::UnknownBlock {
                offset: at,
                name: d.block.to_string(),
            });
        };
        let tps = self.page_size();
        let blk = &self.blocks[b];
        for r in &d.ranges {
            let err = |why| RamDstError::Discard {
                offset: at,
                block: blk.name.clone(),
                start: r.start,
                len: r.len,
                why,
            };
            if !r.start.is_multiple_of(blk.page_size) || !r.len.is_multiple_of(blk.page_size) {
                return Err(err("not aligned to the block's page size"));
            }
            if r.start
                .checked_add(r.len)
                .is_none_or(|e| e > blk.used_length)
            {
                return Err(err("outside the block"));
            }
        }
        for r in &d.ranges {
            let (p, n) = (r.start / tps, r.len / tps);
            let blk = &mut self.blocks[b];
            // Word-at-a-time over the non-zero words only: a range's cost does
            // not grow with its length (see PageBitmap).
            if blk.nonzero.clear_range(p, n) {
                self.memory
                    .discard(b, r.start, r.len)
                    .map_err(|source| RamDstError::Memory { offset: at, source })?;
            }
            blk.received.clear_range(p, n);
            self.stats.discarded_pages = self.stats.discarded_pages.saturating_add(n);
        }
        Ok(())
    }

    fn handle_eof(&mut self, at: u64) -> Result<(), RamDstError> {
        if let Some(hp) = &self.host_page {
            return Err(RamDstError::PostcopyOrder {
                offset: at,
                block: self.blocks[hp.block].name.clone(),
                page_offset: hp.next,
                why: "the stream ended inside a host page".into(),
            });
        }
        if matches!(
            self.postcopy,
            PostcopyState::Listening | PostcopyState::Running
        ) {
            self.set_postcopy(PostcopyState::End);
        }
        Ok(())
    }

    /// A RAM record once the destination listens: target pages are gathered
    /// into host pages, placed whole.
    fn apply_postcopy(&mut self, at: u64, rec: &RamRecord<'_>) -> Result<(), RamDstError> {
        let (fill, data) = match &rec.body {
            RamBody::Zero { fill } => (*fill, None),
            RamBody::Page(d) => {
                self.check_page_len(at, d.len())?;
                (0, Some(*d))
            }
            RamBody::Eos => return Ok(()),
            // ram_load_postcopy takes ZERO, PAGE and EOS only: MULTIFD_FLUSH,
            // XBZRLE, COMPRESS_PAGE, MEM_SIZE and HOOK fail the load.
            _ => {
                return Err(RamDstError::NotInPostcopy {
                    offset: at,
                    kind: rec.kind().name(),
                })
            }
        };
        if self.postcopy == PostcopyState::End {
            return Err(RamDstError::IllegalTransition {
                offset: at,
                state: self.postcopy,
                event: "RAM page record",
            });
        }
        let (b, off) = self.resolve(at, rec)?;
        self.check_fill(at, fill, "ram_load_postcopy")?;
        let tps = self.page_size();
        let hps = self.blocks[b].page_size;
        let within = off % hps;
        if within == 0 && self.blocks[b].received.any_in_range(off / tps, hps / tps) {
            // QEMU places each host page once (UFFDIO_COPY); a page already
            // present (received and not discarded) fails with EEXIST, which
            // postcopy_place_page treats as fatal.
            return Err(RamDstError::QemuRule {
                offset: at,
                function: "postcopy_place_page",
                why: format!(
                    "host page {off:#x} of \"{}\" is already present (received before and not discarded)",
                    self.blocks[b].name
                ),
            });
        }
        let order = |why: &str| RamDstError::PostcopyOrder {
            offset: at,
            block: self.blocks[b].name.clone(),
            page_offset: off,
            why: why.to_string(),
        };
        match &self.host_page {
            None if within != 0 => {
                return Err(order("a host page must start with its first target page"))
            }
            Some(_) if within == 0 => return Err(order("the previous host page is incomplete")),
            Some(hp) if hp.block != b || hp.next != off => {
                return Err(order(&format!(
                    "expected {:#x} of \"{}\"",
                    hp.next, self.blocks[hp.block].name
                )))
            }
            _ => {}
        }
        if self.placement == Placement::Apply {
            // Replay: no atomicity to keep, so each target page goes straight
            // to memory and no host-page buffer (up to 1 GiB) is needed.
            // Received bits are still set only when the host page is complete.
            let p = off / tps;
            match data {
                Some(d) => {
                    self.memory
                        .write(b, off, d)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?;
                    self.blocks[b].nonzero.set(p);
                }
                None if fill != 0 || self.blocks[b].nonzero.get(p) => {
                    self.memory
                        .bytes_mut(b, off, tps as usize)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?
                        .fill(fill);
                    if fill == 0 {
                        self.blocks[b].nonzero.clear(p);
                    } else {
                        self.blocks[b].nonzero.set(p);
                    }
                }
                None => {}
            }
        }
        let emit = self.placement == Placement::Emit;
        let hp = self.host_page.get_or_insert_with(|| HostPage {
            block: b,
            start: off,
            next: off,
            all_zero: true,
            data: Vec::new(),
        });
        match data {
            Some(d) => {
                if emit {
                    hp.data.extend_from_slice(d);
                }
                hp.all_zero = false;
            }
            None => {
                if emit {
                    hp.data.resize(hp.data.len() + tps as usize, fill);
                }
                if fill != 0 {
                    hp.all_zero = false;
                    self.stats.nonzero_fill += 1;
                    self.actions.push_back(Action::NonZeroFill {
                        offset: at,
                        block: b,
                        page_offset: off,
                        fill,
                    });
                }
                self.stats.zero += 1;
            }
        }
        if data.is_some() {
            self.stats.page += 1;
        }
        hp.next = off + tps;
        self.current = Some(b);
        if within + tps == hps {
            let Some(hp) = self.host_page.take() else {
                return Ok(());
            };
            self.place(at, hp)?;
        }
        Ok(())
    }

    fn place(&mut self, _at: u64, hp: HostPage) -> Result<(), RamDstError> {
        let tps = self.page_size();
        let len = hp.next - hp.start;
        let (p, n) = (hp.start / tps, len / tps);
        let b = hp.block;
        match self.placement {
            // The target pages were applied as they came (apply_postcopy).
            Placement::Apply => {}
            Placement::Emit => {
                let blk = &mut self.blocks[b];
                if hp.all_zero {
                    blk.nonzero.clear_range(p, n);
                    self.actions.push_back(Action::PlaceZeroPage {
                        block: b,
                        offset: hp.start,
                        len,
                    });
                } else {
                    blk.nonzero.set_range(p, n);
                    self.actions.push_back(Action::PlaceHostPage {
                        block: b,
                        offset: hp.start,
                        data: hp.data,
                    });
                }
            }
        }
        if self.placement == Placement::Apply {
            // Emit: set when the host reports success (handle_placed).
            self.blocks[b].received.set_range(p, n);
        }
        if hp.all_zero {
            self.stats.placed_zero_pages += 1;
        } else {
            self.stats.placed_host_pages += 1;
        }
        Ok(())
    }
}
