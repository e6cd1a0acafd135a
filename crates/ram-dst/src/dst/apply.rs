//! Precopy apply: ZERO, PAGE, XBZRLE and COMPRESS_PAGE records (with the
//! inflate of COMPRESS_PAGE bodies) and mapped-ram items, written straight
//! into the [`GuestMemory`](crate::GuestMemory), as QEMU's `ram_load_precopy` and
//! `read_ramblock_mapped_ram` do; plus the checks that follow the source's
//! QEMU version (fill bytes, compression).

use qmig_wire::{RamBody, RamRecord};

use super::{Event, Leniency, PostcopyState, RamDst};
use crate::memory::GuestMemory;
use crate::RamDstError;

impl<M: GuestMemory> RamDst<M> {
    /// Whether the stream's machine type proves a source of at least `v`.
    pub(super) fn source_at_least(&self, v: (u32, u32)) -> bool {
        self.machine_version.is_some_and(|m| m >= v)
    }

    /// A ZERO record's fill byte: 0, or (from a source that may predate
    /// QEMU 8.2) a fill that is applied and reported as a leniency.
    pub(super) fn check_fill(
        &mut self,
        at: u64,
        fill: u8,
        function: &'static str,
    ) -> Result<(), RamDstError> {
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

    /// Applies one RAM record at stream offset `at` (without the bookkeeping
    /// of [`RamDst::handle_item`]: prefer that).
    pub(super) fn handle_record(
        &mut self,
        at: u64,
        rec: &RamRecord<'_>,
    ) -> Result<(), RamDstError> {
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
                    self.out.events.push_back(Event::NonZeroFill {
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
    pub(super) fn handle_mapped(
        &mut self,
        at: u64,
        m: &qmig_wire::MappedRam<'_>,
    ) -> Result<(), RamDstError> {
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
                let r = if self.mapped_per_page || self.postcopy >= PostcopyState::Listening {
                    self.mapped_pages_per_page(at, index, &bm, *first, data)
                } else {
                    self.mapped_pages_runs(at, index, &bm, *first, data)
                };
                self.mapped = Some((index, bm));
                r
            }
        }
    }

    /// Applies mapped-ram pages one at a time as PAGE and ZERO records.
    fn mapped_pages_per_page(
        &mut self,
        at: u64,
        index: usize,
        bm: &[u8],
        first: u64,
        data: &[u8],
    ) -> Result<(), RamDstError> {
        let tps = self.page_size();
        for (k, page) in data.chunks(tps as usize).enumerate() {
            let i = first.saturating_add(k as u64);
            let off = i.saturating_mul(tps);
            let rec = if qmig_wire::mapped_ram::page_is_set(bm, i) {
                RamRecord::page(off, None, page)
            } else {
                RamRecord::zero(off, None)
            };
            self.current = Some(index);
            self.handle_record(at + k as u64 * tps, &rec)?;
        }
        Ok(())
    }

    /// Applies mapped-ram pages by runs: each run of set bits is written
    /// with one [`GuestMemory::write_run`] (file to file when the input file
    /// is known), pages with a clear bit are left alone unless they hold
    /// data (then zeroed, as a ZERO record would). Same memory, counters
    /// and errors (at the first page out of the block) as
    /// [`RamDst::mapped_pages_per_page`].
    fn mapped_pages_runs(
        &mut self,
        at: u64,
        index: usize,
        bm: &[u8],
        first: u64,
        data: &[u8],
    ) -> Result<(), RamDstError> {
        use qmig_wire::mapped_ram::page_is_set;
        let tps = self.page_size();
        let n = data.len() as u64 / tps;
        // Pages inside the block; the first page past it fails as the
        // per-page path fails there, after the pages before it.
        let used = self.blocks[index].used_length;
        let inside = (0..n)
            .take_while(|k| {
                first
                    .checked_add(*k)
                    .and_then(|i| i.checked_mul(tps))
                    .and_then(|o| o.checked_add(tps))
                    .is_some_and(|e| e <= used)
            })
            .count() as u64;
        let whole = if (data.len() as u64).is_multiple_of(tps) {
            n
        } else {
            n + 1
        };
        self.current = Some(index);
        let mut k = 0u64;
        while k < inside {
            let set = page_is_set(bm, first + k);
            let mut e = k + 1;
            while e < inside && page_is_set(bm, first + e) == set {
                e += 1;
            }
            if set {
                let off = (first + k) * tps;
                let bytes = &data[(k * tps) as usize..(e * tps) as usize];
                let src = self
                    .mapped_source
                    .as_ref()
                    .map(|(f, base)| (f, base.saturating_add(at + k * tps)));
                self.memory
                    .write_run(index, off, bytes, src)
                    .map_err(|source| RamDstError::Memory {
                        offset: at + k * tps,
                        source,
                    })?;
                let blk = &mut self.blocks[index];
                for p in first + k..first + e {
                    blk.nonzero.set(p);
                    blk.received.set(p);
                }
                self.stats.page += e - k;
            } else {
                for p in first + k..first + e {
                    if self.blocks[index].nonzero.get(p) {
                        self.memory
                            .zero_page(index, p * tps, tps)
                            .map_err(|source| RamDstError::Memory {
                                offset: at + (p - first) * tps,
                                source,
                            })?;
                    }
                    let blk = &mut self.blocks[index];
                    blk.nonzero.clear(p);
                    blk.received.set(p);
                    self.stats.zero += 1;
                }
            }
            k = e;
        }
        if inside < whole {
            // The rest (out of the block, or a short last page) fails
            // exactly as the per-page path does.
            let from = (inside * tps) as usize;
            return self.mapped_pages_per_page(
                at + inside * tps,
                index,
                bm,
                first.saturating_add(inside),
                &data[from..],
            );
        }
        Ok(())
    }

    pub(super) fn check_page_len(&self, at: u64, len: usize) -> Result<(), RamDstError> {
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

    /// Inflates one COMPRESS_PAGE body into `scratch`; it must give exactly one page.
    pub(super) fn inflate_page(&mut self, z: &[u8]) -> Result<(), String> {
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
}
