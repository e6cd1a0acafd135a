//! The destination state machine: [`RamDst`].
//!
//! Where things are (one concern per file):
//!
//! | file | what |
//! |------|------|
//! | `dst.rs` (this) | the type, its configuration, item dispatch, counters |
//! | [`dst/layout.rs`](layout) | block table: local/adopted blocks, MEM_SIZE and address checks, limits |
//! | [`dst/apply.rs`](apply) | precopy apply: ZERO/PAGE/XBZRLE/COMPRESS_PAGE (inflate), mapped-ram |
//! | [`dst/host_page.rs`](host_page) | postcopy host-page assembly and placement |
//! | [`dst/postcopy.rs`](postcopy) | postcopy state, commands, faults, placement reports |
//! | [`dst/recovery.rs`](recovery) | pause, recovery connection (RECV_BITMAP, RESUME), preempt channel |
//! | [`dst/output.rs`](output) | outputs: return-path bytes, placements, events, SHUT |

use std::collections::{HashMap, HashSet};

use qmig_wire::{Item, ReadItem};

use crate::memory::GuestMemory;
use crate::RamDstError;

mod apply;
mod host_page;
mod layout;
mod output;
mod postcopy;
mod recovery;

pub(crate) use host_page::HostPage;
pub use layout::{
    BlockState, Layout, LocalBlock, MAX_ADOPTED_BLOCKS, MAX_ADOPTED_PAGES, MAX_PAGE_SIZE,
    TARGET_PAGE_BITS,
};
use output::Output;
pub use output::{Event, Place};
pub use postcopy::{FaultOutcome, PostcopyState};

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

/// What happens to a host page assembled in postcopy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Write it into the [`GuestMemory`] (replay; no OS help needed).
    Apply,
    /// Hand it out as an [`Place::HostPage`] / [`Place::ZeroPage`] (and discards as [`Place::Discard`])
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

/// What a host page handed out as a [`Place`] is, until it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    /// A [`Place::HostPage`] of the stream.
    Data,
    /// A [`Place::ZeroPage`] of the stream.
    Zero,
    /// A [`Place::ZeroPage`] for a fault on a page received before.
    Local,
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
    /// Host pages with data of the postcopy stream placed: written with
    /// [`Placement::Apply`]; with [`Placement::Emit`], a [`Place::HostPage`]
    /// counts once the host reports it done ([`RamDst::handle_placed`]),
    /// not when it is handed out.
    pub placed_host_pages: u64,
    /// Zero host pages of the postcopy stream placed (as for
    /// `placed_host_pages`); zero pages placed for a fault on a page received
    /// before are counted in `faults_resolved_locally` instead.
    pub placed_zero_pages: u64,
    /// Page requests (REQ_PAGES / REQ_PAGES_ID) queued on the return path by
    /// [`RamDst::handle_page_fault`].
    pub page_requests: u64,
    /// Faults resolved without asking the source: the host page was received
    /// (as zero, never written) but is not present in memory.
    pub faults_resolved_locally: u64,
    /// Faults on a host page already asked for and not yet placed.
    pub faults_already_requested: u64,
    /// Times the migration paused ([`RamDst::handle_connection_lost`]).
    pub pauses: u64,
    /// Times it resumed (POSTCOPY_RESUME answered with RESUME_ACK).
    pub resumes: u64,
    /// Page requests sent again after a resume (counted in `page_requests` too).
    pub requests_resent: u64,
    /// RECV_BITMAP replies queued.
    pub recv_bitmaps_sent: u64,
    /// Page records applied from the postcopy-preempt channel.
    pub preempt_records: u64,
}

/// The sans-IO RAM destination (quinn-proto shape): inputs are `handle_*`
/// calls, outputs are drained with `poll_*` calls. Nothing here does I/O,
/// spawns threads or reads a clock.
///
/// # Call order
///
/// ```text
///  loop {
///      handle_read_item(item) | handle_item(offset, len, item)   // stream input, in order
///      | handle_page_fault(block, offset)                        // a thread faulted (after LISTEN)
///      | handle_placed(block, offset, len)                       // a Place succeeded
///      | handle_place_failed(block, offset, len, why)            // a Place failed
///      | handle_preempt_item(offset, item)                       // preempt channel input
///      | handle_connection_lost()                                // main channel cut
///      | handle_recovery_connection()                            // then the new one's items
///      then drain, in this order:
///          poll_event()            -> Event   (register at Listening, start at Running, ...)
///          poll_placement()        -> Place   (carry out, then report with handle_placed)
///          poll_transmit(&mut buf) -> bytes   (write to the return path as they are)
///  }
///  handle_end_of_input()   // the stream is complete: SHUT(0) queued
///  | handle_failure()      // the host failed (I/O, decode, signal): SHUT(1) queued
///  poll_transmit(&mut buf) // the SHUT
/// ```
///
/// Every `handle_*` call that returns an error stops the machine and queues
/// SHUT(1) (if a return path is open); later input gets
/// [`RamDstError::Stopped`]. Every item is applied whole or not at all:
/// [`RamDst::applied_up_to`] says how far.
///
/// # States
///
/// ```text
///                      precopy records (ZERO, PAGE, XBZRLE, COMPRESS_PAGE, MEM_SIZE)
///                    ┌──────┐
///                    ▼      │
///  ──new()──►   [None] ─────┘──────────────────────────────────EOF──► SHUT(0)
///                  │ POSTCOPY_ADVISE (page sizes checked)
///                  ▼
///              [Advised] ── precopy records, EOF ──► SHUT(0) (postcopy never started)
///                  │ POSTCOPY_RAM_DISCARD (Place::Discard; received bits cleared)
///                  ▼
///            [Discarding] ◄─┐ more DISCARDs
///                  │────────┘
///                  │ POSTCOPY_LISTEN (also straight from Advised; usually inside PACKAGED)
///                  ▼
///            [Listening]  register memory; faults → REQ_PAGES(_ID); ZERO/PAGE only,
///                  │      gathered into host pages → Place::HostPage / Place::ZeroPage
///                  │ POSTCOPY_RUN
///                  ▼
///             [Running]   guest runs; same as Listening    ◄──────────────────────┐
///                  │ EOF          │ handle_connection_lost                    │
///                  ▼              ▼                                           │ POSTCOPY_RESUME:
///               [End]          [Paused]  host pages being assembled dropped;  │ RESUME_ACK(1), then
///                  │              │      received bits, requests kept;       │ pending requests
///                  │              │      faults recorded, not sent            │ (first REQ_PAGES_ID)
///                  │              │ handle_recovery_connection                │
///                  │              ▼                                           │
///                  │          [Recovering]  RECV_BITMAP → reply (size, LE    ─┘
///                  │              │         bitmap, end marker) per block
///                  │              └─ handle_connection_lost ──► [Paused] (again)
///                  └── handle_end_of_input ──► SHUT(0)
///
///  None..Listening ── handle_connection_lost ──► stopped, SHUT(1) (QEMU fails, it never
///                                               pauses before POSTCOPY_RUN)
///  any state ── bad item, bad fault, failed placement, handle_failure ──► stopped, SHUT(1)
/// ```
/// Refused transitions (LISTEN twice, RUN before LISTEN, DISCARD after
/// LISTEN, ADVISE twice, …) are [`RamDstError::IllegalTransition`] naming
/// the stream offset, the state and the command.
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
    /// Buffers of placed host pages given back ([`RamDst::recycle_page_buffer`]),
    /// to assemble the next host pages in without allocating.
    spare_pages: Vec<Vec<u8>>,
    /// The postcopy-preempt channel's own host page and last block.
    preempt: recovery::ChannelCtx,
    /// Return-path bytes, placements and events waiting to be polled.
    out: Output,
    /// Host pages (block, host-page offset) handed out as a [`Place`] and
    /// not yet reported placed.
    in_flight: HashMap<(usize, u64), InFlight>,
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
    /// mapped-ram: the input file and the file offset of stream offset 0,
    /// for copying page runs file to file.
    mapped_source: Option<(std::fs::File, u64)>,
    /// mapped-ram: apply each page as a PAGE or ZERO record (the reference path).
    mapped_per_page: bool,
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
        let adopt = matches!(config.layout, Layout::Adopt);
        let (blocks, by_name) = match config.layout {
            Layout::Fixed(local) => {
                layout::local_blocks(local, 1u64 << config.target_page_bits, &mut memory)?
            }
            Layout::Adopt => (Vec::new(), HashMap::new()),
        };
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
            spare_pages: Vec::new(),
            preempt: recovery::ChannelCtx::default(),
            out: Output::default(),
            in_flight: HashMap::new(),
            requested: HashSet::new(),
            last_requested_block: None,
            stats: Stats::default(),
            applied_to: 0,
            stopped: false,
            scratch: Vec::new(),
            inflate: flate2::Decompress::new(true),
            mapped: None,
            mapped_source: None,
            mapped_per_page: false,
        })
    }

    /// Says that the stream is read from `file`, stream offset 0 being at
    /// file offset `base`: the pages of a mapped-ram file region (wire-format
    /// §14) are then copied from the file to the memory file to file where
    /// the memory can ([`GuestMemory::write_run`]), rather than from the
    /// items' bytes. The items must be that file's bytes (a mapping of it).
    pub fn set_mapped_ram_source(&mut self, file: std::fs::File, base: u64) {
        self.mapped_source = Some((file, base));
    }

    /// With `on`, mapped-ram pages are applied one at a time as PAGE (bit
    /// set) and ZERO (bit clear) records, the reference for the run path
    /// that is used otherwise (same memory, counters and errors, slower).
    pub fn set_mapped_ram_per_page(&mut self, on: bool) {
        self.mapped_per_page = on;
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
                    self.fail();
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
    /// is then not applied, the machine stops and SHUT(1) is queued for
    /// [`RamDst::poll_transmit`] (if a return path is open).
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
        if self.postcopy == PostcopyState::Paused {
            // Items come from a connection: the host must report the
            // recovery connection first.
            let e = RamDstError::IllegalTransition {
                offset,
                state: self.postcopy,
                event: "a stream item with no recovery connection",
            };
            self.fail();
            return Err(e);
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
                self.fail();
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
}
