//! The block table: the destination's RAM blocks ([`BlockState`]), where
//! they come from ([`Layout`], [`LocalBlock`]), the checks MEM_SIZE and
//! every page record's address go through, and the limits on what a stream
//! may make the destination allocate.

use std::collections::{HashMap, HashSet};

use qmig_wire::bitmap::PageBitmap;
use qmig_wire::{MemBlock, RamRecord};

use super::{Event, PostcopyState, RamDst};
use crate::memory::GuestMemory;
use crate::RamDstError;

/// Largest block page size accepted from a stream (1 GiB huge pages).
/// With [`Placement::Apply`](crate::Placement::Apply) no buffer of this size is ever allocated: target
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

/// The destination's view of one RAM block.
#[derive(Debug, Clone)]
pub struct BlockState {
    pub(super) name: String,
    pub(super) used_length: u64,
    pub(super) max_length: u64,
    pub(super) page_size: u64,
    pub(super) resizable: bool,
    /// Target pages received (and, with [`Placement::Emit`](crate::Placement::Emit), placed).
    pub(super) received: PageBitmap,
    /// Pages that may hold non-zero bytes (so a ZERO record must really write).
    pub(super) nonzero: PageBitmap,
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

/// Checks the local blocks of a [`Layout::Fixed`] configuration (page size a
/// power of two from the target page size to [`MAX_PAGE_SIZE`], lengths
/// whole pages, names unique) and gives each to `memory`, in order.
///
/// # Errors
/// [`RamDstError::BadSize`] naming the block and the rule broken;
/// [`RamDstError::Memory`] when the memory cannot create a block.
pub(super) fn local_blocks<M: GuestMemory>(
    local: Vec<LocalBlock>,
    tps: u64,
    memory: &mut M,
) -> Result<(Vec<BlockState>, HashMap<String, usize>), RamDstError> {
    let mut blocks = Vec::new();
    let mut by_name = HashMap::new();
    for (i, b) in local.into_iter().enumerate() {
        let bad = |why: String| RamDstError::BadSize {
            offset: 0,
            why: format!("local block \"{}\": {why}", b.name),
        };
        if !b.page_size.is_power_of_two() || b.page_size < tps || b.page_size > MAX_PAGE_SIZE {
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
    Ok((blocks, by_name))
}

impl<M: GuestMemory> RamDst<M> {
    /// The block and page offset a page record addresses, checked.
    #[inline]
    pub(super) fn resolve(
        &self,
        at: u64,
        rec: &RamRecord<'_>,
    ) -> Result<(usize, u64), RamDstError> {
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

    pub(super) fn handle_mem_size(
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
                    self.out
                        .events
                        .push_back(Event::BlockResized { block: index, len });
                }
            }
        }
        self.stats.mem_size += 1;
        Ok(())
    }
}
