//! [`AnonMemory`]: guest RAM in anonymous mappings, filled by precopy through
//! [`GuestMemory`] and registered for postcopy at POSTCOPY_LISTEN.

use std::io;
use std::sync::Arc;

use qmig_ram_dst::GuestMemory;

use crate::sys::{self, Mapping};
use crate::{Region, UffdError};

#[derive(Debug)]
struct Block {
    name: String,
    used: u64,
    /// `None` for a 0-byte block.
    map: Option<Arc<Mapping>>,
}

/// Guest RAM for a postcopy destination: one anonymous private mapping per
/// RAM block (userfaultfd's missing mode covers anonymous memory; a mapping
/// of a regular file cannot be registered).
///
/// Precopy writes through [`GuestMemory`] (`&mut self`); at POSTCOPY_LISTEN
/// [`AnonMemory::register`] hands out a [`Region`] per block that shares the
/// mapping, after which pages are only placed through the region
/// (`UFFDIO_COPY`), and other threads read through it. While any region of a
/// block is alive, the block can no longer be resized and `bytes_mut` on it
/// is refused, so no `&mut` slice aliases memory that other threads touch.
#[derive(Debug, Default)]
pub struct AnonMemory {
    blocks: Vec<Block>,
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

impl AnonMemory {
    /// No blocks yet.
    pub fn new() -> Self {
        AnonMemory::default()
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether there is no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Name and used length of block `index`.
    pub fn block(&self, index: usize) -> Option<(&str, u64)> {
        self.blocks.get(index).map(|b| (b.name.as_str(), b.used))
    }

    /// The mapping of block `index` (`None` for an unknown or 0-byte
    /// block), for threads that read guest memory as vCPUs do: a registered
    /// page that is missing blocks the reader until it is placed. Holding it
    /// keeps the memory mapped but does not keep any userfaultfd open.
    pub fn mapping(&self, index: usize) -> Option<Arc<Mapping>> {
        self.blocks.get(index).and_then(|b| b.map.clone())
    }

    /// Registers block `index` for missing faults ([`Region::register`]).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] for an unknown or 0-byte block; otherwise as
    /// for [`Region::register`].
    pub fn register(&self, index: usize) -> Result<Region, UffdError> {
        let map =
            self.blocks
                .get(index)
                .and_then(|b| b.map.clone())
                .ok_or(UffdError::BadRange {
                    offset: 0,
                    len: 0,
                    why: "no such block, or a 0-byte block",
                })?;
        Region::register(map)
    }

    /// Copies `buf.len()` bytes at `offset` of block `index` out (for
    /// writing images once every region is gone: pages never placed read as
    /// zero then).
    ///
    /// # Errors
    /// An unknown block or a range outside it.
    pub fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self
            .blocks
            .get(index)
            .ok_or_else(|| bad(format!("no block {index}")))?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > b.used)
        {
            return Err(bad(format!(
                "range {offset:#x}+{:#x} outside block {index}",
                buf.len()
            )));
        }
        let Some(m) = &b.map else { return Ok(()) };
        // SAFETY: the range is inside the live mapping (checked above); a
        // byte copy has no alignment needs. Other threads may place pages
        // concurrently (UFFDIO_COPY), which only changes byte values; a
        // registered page that is missing blocks the copy until placed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                m.as_ptr().wrapping_add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn exclusive(&mut self, index: usize) -> io::Result<&mut Block> {
        let b = self
            .blocks
            .get_mut(index)
            .ok_or_else(|| bad(format!("no block {index}")))?;
        if let Some(m) = &mut b.map {
            if Arc::get_mut(m).is_none() {
                return Err(bad(format!(
                    "block \"{}\" is registered for postcopy: only placements may write it",
                    b.name
                )));
            }
        }
        Ok(b)
    }
}

/// Bytes to map for a block of `used` bytes: whole host pages.
fn mapped_len(used: u64) -> io::Result<usize> {
    let ps = sys::host_page_size() as u64;
    let n = used
        .checked_next_multiple_of(ps)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad(format!("block of {used:#x} bytes is too large")))?;
    Ok(n)
}

impl GuestMemory for AnonMemory {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> io::Result<()> {
        let new_map = |len: u64| -> io::Result<Option<Arc<Mapping>>> {
            if len == 0 {
                return Ok(None);
            }
            let m = Mapping::anonymous(mapped_len(len)?).map_err(io::Error::other)?;
            Ok(Some(Arc::new(m)))
        };
        if index == self.blocks.len() {
            self.blocks.push(Block {
                name: name.to_string(),
                used: len,
                map: new_map(len)?,
            });
            return Ok(());
        }
        let b = self.exclusive(index)?;
        let map = new_map(len)?;
        if let (Some(old), Some(new)) = (&b.map, &map) {
            let n = b.used.min(len) as usize;
            let ps = sys::host_page_size();
            // Page by page, skipping zero pages, so pages never written stay
            // not present (they must still fault once registered).
            for at in (0..n).step_by(ps) {
                let k = ps.min(n - at);
                let (src, dst) = (old.as_ptr().wrapping_add(at), new.as_ptr().wrapping_add(at));
                // SAFETY: `src..src + k` is inside the live old mapping, which
                // nothing writes meanwhile (not shared: checked by `exclusive`).
                let page = unsafe { std::slice::from_raw_parts(src, k) };
                if page.iter().any(|&x| x != 0) {
                    // SAFETY: both ranges are `k` bytes inside live, distinct
                    // mappings, so they do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src, dst, k) };
                }
            }
        }
        b.map = map;
        b.used = len;
        Ok(())
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        let b = self.exclusive(index)?;
        if offset.checked_add(len as u64).is_none_or(|e| e > b.used) {
            return Err(bad(format!(
                "range {offset:#x}+{len:#x} outside block {index} of {:#x} bytes",
                b.used
            )));
        }
        let Some(m) = &b.map else { return Ok(&mut []) };
        let p = m.as_ptr().wrapping_add(offset as usize);
        // SAFETY: the range lies inside the mapping (checked above), which
        // lives as long as `self` borrows it; the mapping is not shared with
        // any region or reader (checked by `exclusive`), so this is the only
        // reference into it while the borrow lasts.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// Drops the page (`MADV_DONTNEED`) rather than writing zeros: a page
    /// received as data and then as zero must not be present at LISTEN, or
    /// its postcopy placement would meet EEXIST and be lost.
    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        self.discard(index, offset, len)
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> io::Result<()> {
        let b = self.exclusive(index)?;
        if offset.checked_add(len).is_none_or(|e| e > b.used) {
            return Err(bad("discard range outside block".into()));
        }
        let Some(m) = &b.map else { return Ok(()) };
        let ps = sys::host_page_size() as u64;
        // Whole host pages are dropped; a partial page at either end (blocks
        // whose page size is the target's, smaller than the host's) is zeroed.
        let first = offset.next_multiple_of(ps).min(offset + len);
        let last = ((offset + len) / ps * ps).max(first);
        if last > first {
            // SAFETY: `first..last` is whole host pages inside the mapping;
            // MADV_DONTNEED on private anonymous memory makes them read as
            // zero (and fault again once registered).
            let r = unsafe {
                libc::madvise(
                    m.as_ptr().wrapping_add(first as usize).cast(),
                    (last - first) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for (s, e) in [(offset, first), (last, offset + len)] {
            if e > s {
                self.bytes_mut(index, s, (e - s) as usize)?.fill(0);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopy_writes_then_registration_freezes_the_block() {
        let mut m = AnonMemory::new();
        m.set_block_len(0, "pc.ram", 4 * 4096).unwrap();
        m.set_block_len(1, "empty", 0).unwrap();
        m.write(0, 4096, &[7; 4096]).unwrap();
        m.set_block_len(0, "pc.ram", 8 * 4096).unwrap();
        let mut buf = [0u8; 4096];
        m.read(0, 4096, &mut buf).unwrap();
        assert!(buf == [7; 4096], "a resize keeps the contents");
        m.discard(0, 4096, 4096).unwrap();
        m.read(0, 4096, &mut buf).unwrap();
        assert!(buf == [0; 4096], "discarded");
        assert!(m.bytes_mut(0, 8 * 4096, 1).is_err());
        assert!(m.read(0, u64::MAX, &mut buf).is_err());
        assert!(m.register(1).is_err(), "0-byte block");
        assert!(m.register(5).is_err());
        if crate::probe().is_err() {
            return; // the rest needs a usable userfaultfd
        }
        // Data, then a ZERO record (zero_page): the page must be gone, so a
        // postcopy placement of it lands instead of meeting EEXIST.
        m.write(0, 3 * 4096, &[5; 4096]).unwrap();
        m.zero_page(0, 3 * 4096, 4096).unwrap();
        let r = m.register(0).unwrap();
        let p = r.place_page(3 * 4096, &[6; 4096]).unwrap();
        assert_eq!(p.already_present, 0, "zero_page left the page present");
        assert!(
            m.bytes_mut(0, 0, 4096).is_err(),
            "registered: placements only"
        );
        assert!(m.set_block_len(0, "pc.ram", 4096).is_err());
        r.place_page(0, &[9; 4096]).unwrap();
        drop(r);
        m.read(0, 0, &mut buf).unwrap();
        assert!(buf == [9; 4096], "placed");
        m.read(0, 2 * 4096, &mut buf).unwrap();
        assert!(buf == [0; 4096], "unregistered: missing pages read as zero");
        assert!(m.bytes_mut(0, 0, 4096).is_ok());
    }
}
