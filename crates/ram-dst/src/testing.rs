//! Support for tests that play the host of a [`RamDst`] in postcopy
//! ([`Placement::Emit`](crate::Placement::Emit)): the placement loop
//! `poll_placement` → carry the placement out → `handle_placed` (or
//! `handle_place_failed`), written once for the pair harnesses of
//! `ram-dst`, `ram-src` and `uffd-host`.

use std::io;

use crate::{GuestMemory, Place, RamDst, RamDstError};

/// What [`drain_placements`] carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placements {
    /// [`Place::HostPage`]s placed and reported.
    pub host_pages: u64,
    /// [`Place::ZeroPage`]s placed and reported.
    pub zero_pages: u64,
    /// [`Place::Discard`]s carried out.
    pub discards: u64,
}

/// Drains [`RamDst::poll_placement`]: each placement is carried out by
/// `place` (given the destination's memory and the placement), then
/// reported with [`RamDst::handle_placed`] (host and zero pages; a discard
/// is not reported), and a host page's buffer given back
/// ([`RamDst::recycle_page_buffer`]). Returns what was done.
///
/// # Errors
/// When `place` fails, the placement is reported with
/// [`RamDst::handle_place_failed`] (the machine stops, SHUT(1) is queued)
/// and that error is returned; a failed discard is
/// [`RamDstError::Memory`]; an error of `handle_placed` is returned as is.
/// Placements after the failing one stay queued.
pub fn drain_placements<M: GuestMemory>(
    dst: &mut RamDst<M>,
    mut place: impl FnMut(&mut M, &Place) -> io::Result<()>,
) -> Result<Placements, RamDstError> {
    let mut done = Placements::default();
    while let Some(p) = dst.poll_placement() {
        let r = place(dst.memory_mut(), &p);
        let (block, offset, len) = match &p {
            Place::HostPage {
                block,
                offset,
                data,
            } => (*block, *offset, data.len() as u64),
            Place::ZeroPage { block, offset, len } => (*block, *offset, *len),
            Place::Discard { .. } => {
                r.map_err(|source| RamDstError::Memory {
                    offset: dst.applied_up_to(),
                    source,
                })?;
                done.discards += 1;
                continue;
            }
        };
        if let Err(e) = r {
            return Err(dst.handle_place_failed(block, offset, len, e.to_string()));
        }
        dst.handle_placed(block, offset, len)?;
        match p {
            Place::HostPage { data, .. } => {
                dst.recycle_page_buffer(data);
                done.host_pages += 1
            }
            _ => done.zero_pages += 1,
        }
    }
    Ok(done)
}

/// Carries a placement out on plain memory (e.g. [`VecMemory`](crate::VecMemory)):
/// writes a host page's bytes, writes zeros for a zero page, discards a
/// range. The `place` argument of [`drain_placements`] for hosts without
/// userfaultfd.
///
/// # Errors
/// The memory's I/O error.
pub fn write_placement<M: GuestMemory>(mem: &mut M, p: &Place) -> io::Result<()> {
    match p {
        Place::HostPage {
            block,
            offset,
            data,
        } => mem.write(*block, *offset, data),
        Place::ZeroPage { block, offset, len } => {
            mem.write(*block, *offset, &vec![0u8; *len as usize])
        }
        Place::Discard { block, offset, len } => mem.discard(*block, *offset, *len),
    }
}
