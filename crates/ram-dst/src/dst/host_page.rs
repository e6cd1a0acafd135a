//! Host-page assembly once the destination listens: the target pages of a
//! postcopy record stream are gathered into whole host pages, which are
//! placed at once (QEMU's `ram_load_postcopy` / `postcopy_place_page`),
//! either written directly ([`Placement::Apply`]) or handed to the host
//! ([`Placement::Emit`], [`Place::HostPage`] / [`Place::ZeroPage`]).

use qmig_wire::{RamBody, RamRecord};

use super::{Event, InFlight, Place, Placement, PostcopyState, RamDst};
use crate::memory::GuestMemory;
use crate::RamDstError;

/// A host page being assembled in postcopy mode.
#[derive(Debug)]
pub(crate) struct HostPage {
    pub(super) block: usize,
    pub(super) start: u64,
    pub(super) next: u64,
    pub(super) all_zero: bool,
    pub(crate) data: Vec<u8>,
}

impl<M: GuestMemory> RamDst<M> {
    /// A RAM record once the destination listens: target pages are gathered
    /// into host pages, placed whole.
    pub(super) fn apply_postcopy(
        &mut self,
        at: u64,
        rec: &RamRecord<'_>,
    ) -> Result<(), RamDstError> {
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
        if matches!(
            self.postcopy,
            PostcopyState::End | PostcopyState::Paused | PostcopyState::Recovering
        ) {
            // Paused: no connection; Recovering: the source sends pages only
            // after POSTCOPY_RESUME (its first record names its block).
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
        if within == 0
            && (self.blocks[b].received.any_in_range(off / tps, hps / tps)
                || self.in_flight.contains_key(&(b, off)))
        {
            // QEMU places each host page once (UFFDIO_COPY); a page already
            // present (received and not discarded) fails with EEXIST, which
            // postcopy_place_page treats as fatal.
            return Err(RamDstError::QemuRule {
                offset: at,
                function: "postcopy_place_page",
                why: format!(
                    "host page {off:#x} of \"{}\" is already present or being placed \
                     (received before and not discarded)",
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
        if self.host_page.is_none() {
            let data = if emit { self.page_buffer() } else { Vec::new() };
            self.host_page = Some(HostPage {
                block: b,
                start: off,
                next: off,
                all_zero: true,
                data,
            });
        }
        let Some(hp) = self.host_page.as_mut() else {
            return Ok(());
        };
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
                    self.out.events.push_back(Event::NonZeroFill {
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

    pub(super) fn place(&mut self, _at: u64, hp: HostPage) -> Result<(), RamDstError> {
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
                    self.out.placements.push_back(Place::ZeroPage {
                        block: b,
                        offset: hp.start,
                        len,
                    });
                    self.recycle_page_buffer(hp.data);
                } else {
                    blk.nonzero.set_range(p, n);
                    self.out.placements.push_back(Place::HostPage {
                        block: b,
                        offset: hp.start,
                        data: hp.data,
                    });
                }
                let kind = if hp.all_zero {
                    InFlight::Zero
                } else {
                    InFlight::Data
                };
                self.in_flight.insert((b, hp.start), kind);
            }
        }
        if self.placement == Placement::Apply {
            // Emit: set and counted when the host reports success
            // (handle_placed).
            self.blocks[b].received.set_range(p, n);
            self.requested.remove(&(b, hp.start));
            if hp.all_zero {
                self.stats.placed_zero_pages += 1;
            } else {
                self.stats.placed_host_pages += 1;
            }
        }
        Ok(())
    }
}
