//! QEMU's XBZRLE page cache (source side).

use crate::{encode, XbzrleError};

/// A cached page is not replaced by a page of another address until it is this many
/// generations old.
pub const CACHED_PAGE_LIFETIME: u64 = 2;

/// Returned by [`PageCache::insert`] when the slot holds another, still fresh page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cache slot holds another page that is still fresh; not replaced")]
pub struct InsertRefused;

#[derive(Debug, Clone)]
struct Entry {
    addr: u64,
    age: u64,
    data: Box<[u8]>,
}

/// The source's XBZRLE page cache, with QEMU's semantics (`migration/page_cache.c`).
///
/// * Direct-mapped: `slots = cache_size / page_size` (rounded down, must be a power of
///   two); a page at address `addr` (QEMU's `ram_addr_t`: block offset + offset in the
///   block) lives in slot `(addr / page_size) % slots`.
/// * Every entry carries an *age*: the generation (the source's dirty-sync count) at
///   which it was inserted or last hit by [`lookup`](Self::lookup).
/// * [`insert`](Self::insert) into a slot holding another address is refused while that
///   entry's `age + 2 > generation`; otherwise the slot takes a copy of the page.
/// * Page buffers are allocated on first use of a slot, as in QEMU.
///
/// How QEMU's source uses it, per page of the dirty scan after the first pass (see
/// [`save_page`](Self::save_page), which implements that sequence):
/// miss → insert (when not in the last stage) and send the page in full;
/// hit → encode the snapshot of the page against the cached copy; unchanged → send
/// nothing; overflow → cache the page and send it in full; encoded → cache the snapshot
/// that was encoded and send the delta. A page sent as all-zero refreshes its entry with
/// [`insert_zero`](Self::insert_zero) (QEMU skips that during the first pass).
#[derive(Debug, Clone)]
pub struct PageCache {
    page_size: usize,
    slots: Vec<Option<Entry>>,
    used: usize,
}

/// What [`PageCache::save_page`] decided for one page (QEMU's `save_xbzrle_page`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Not cached: send the page in full. `inserted` says whether the page was stored
    /// (so the next pass may use XBZRLE for it).
    Miss {
        /// Whether the page now is in the cache.
        inserted: bool,
    },
    /// Cached and identical: nothing needs to be sent.
    Unchanged,
    /// Cached, but the delta does not fit: send the page in full (the cache now holds it
    /// unless in the last stage).
    Overflow,
    /// Send `out[..len]` as an XBZRLE record; the cache holds the encoded snapshot unless
    /// in the last stage.
    Encoded(usize),
}

impl PageCache {
    /// Creates an empty cache of `cache_size` bytes for pages of `page_size` bytes.
    ///
    /// # Errors
    /// [`XbzrleError::ZeroPageSize`], [`XbzrleError::CacheSmallerThanPage`], or
    /// [`XbzrleError::SlotsNotPowerOfTwo`] when `cache_size / page_size` (rounded down)
    /// is not a power of two.
    pub fn new(cache_size: u64, page_size: usize) -> Result<Self, XbzrleError> {
        let n = Self::slot_count(cache_size, page_size)?;
        let mut slots = Vec::new();
        slots.resize_with(n, || None);
        Ok(Self {
            page_size,
            slots,
            used: 0,
        })
    }

    fn slot_count(cache_size: u64, page_size: usize) -> Result<usize, XbzrleError> {
        if page_size == 0 {
            return Err(XbzrleError::ZeroPageSize);
        }
        if cache_size < page_size as u64 {
            return Err(XbzrleError::CacheSmallerThanPage {
                cache_size,
                page_size,
            });
        }
        let slots = cache_size / page_size as u64;
        if !slots.is_power_of_two() {
            return Err(XbzrleError::SlotsNotPowerOfTwo { slots });
        }
        usize::try_from(slots).map_err(|_| XbzrleError::SlotsNotPowerOfTwo { slots })
    }

    /// Page size in bytes.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of slots (`cache_size / page_size`).
    #[must_use]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Number of slots holding a page.
    #[must_use]
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether no slot holds a page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Slot index for `addr`.
    #[must_use]
    pub fn slot_of(&self, addr: u64) -> usize {
        ((addr / self.page_size as u64) & (self.slots.len() as u64 - 1)) as usize
    }

    /// Whether `addr` is cached (QEMU's `cache_is_cached`). A hit refreshes the entry's age
    /// to `generation`.
    pub fn lookup(&mut self, addr: u64, generation: u64) -> bool {
        let slot = self.slot_of(addr);
        match &mut self.slots[slot] {
            Some(e) if e.addr == addr => {
                e.age = generation;
                true
            }
            _ => false,
        }
    }

    /// The cached copy of `addr`, if that page is cached. Does not touch the age.
    #[must_use]
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        match &self.slots[self.slot_of(addr)] {
            Some(e) if e.addr == addr => Some(&e.data),
            _ => None,
        }
    }

    /// The cached copy of `addr`, mutably (e.g. to store the snapshot that was just
    /// encoded). Does not touch the age.
    #[must_use]
    pub fn get_mut(&mut self, addr: u64) -> Option<&mut [u8]> {
        let slot = self.slot_of(addr);
        match &mut self.slots[slot] {
            Some(e) if e.addr == addr => Some(&mut e.data),
            _ => None,
        }
    }

    /// The age of the cached entry for `addr`, if cached.
    #[must_use]
    pub fn age(&self, addr: u64) -> Option<u64> {
        match &self.slots[self.slot_of(addr)] {
            Some(e) if e.addr == addr => Some(e.age),
            _ => None,
        }
    }

    /// Stores a copy of `data` as page `addr` (QEMU's `cache_insert`), with age
    /// `generation`, and returns the cached copy.
    ///
    /// # Errors
    /// [`InsertRefused`] when the slot holds a page of another address whose
    /// `age + 2 > generation`; the cache is unchanged then.
    ///
    /// # Panics
    /// If `data.len()` is not the page size.
    pub fn insert(
        &mut self,
        addr: u64,
        data: &[u8],
        generation: u64,
    ) -> Result<&mut [u8], InsertRefused> {
        assert_eq!(data.len(), self.page_size, "page of the wrong size");
        let e = self.claim(addr, generation)?;
        e.copy_from_slice(data);
        Ok(e)
    }

    /// Stores an all-zero page as `addr` (QEMU's `xbzrle_cache_zero_page`, which ignores a
    /// refusal): call it when a page was sent as zero, so a stale copy is replaced.
    ///
    /// # Errors
    /// [`InsertRefused`] as for [`insert`](Self::insert).
    pub fn insert_zero(&mut self, addr: u64, generation: u64) -> Result<(), InsertRefused> {
        self.claim(addr, generation)?.fill(0);
        Ok(())
    }

    /// The slot buffer for `addr` after the refusal check, with address and age set.
    fn claim(&mut self, addr: u64, generation: u64) -> Result<&mut [u8], InsertRefused> {
        let slot = self.slot_of(addr);
        let page_size = self.page_size;
        match &mut self.slots[slot] {
            Some(e) => {
                if e.addr != addr && e.age + CACHED_PAGE_LIFETIME > generation {
                    return Err(InsertRefused);
                }
                e.addr = addr;
                e.age = generation;
                Ok(&mut e.data)
            }
            empty @ None => {
                self.used += 1;
                let e = empty.insert(Entry {
                    addr,
                    age: generation,
                    data: vec![0u8; page_size].into_boxed_slice(),
                });
                Ok(&mut e.data)
            }
        }
    }

    /// Empties the cache (keeps its geometry).
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
        self.used = 0;
    }

    /// Changes the cache size to `new_cache_size` bytes, keeping what fits.
    ///
    /// Every cached page is moved to its slot in the new geometry, in old slot order;
    /// when two pages land in the same slot, the one with the greater age stays (the
    /// earlier one on a tie). Ages are kept. On error the cache is unchanged.
    ///
    /// Note: QEMU's `xbzrle_cache_resize` instead replaces the cache with an empty one;
    /// call [`clear`](Self::clear) after resizing to reproduce that exactly. Either way
    /// only the choice between XBZRLE and full pages changes, never the stream's
    /// validity.
    ///
    /// # Errors
    /// As for [`new`](Self::new).
    pub fn resize(&mut self, new_cache_size: u64) -> Result<(), XbzrleError> {
        let n = Self::slot_count(new_cache_size, self.page_size)?;
        if n == self.slots.len() {
            return Ok(());
        }
        let old = std::mem::take(&mut self.slots);
        self.slots.resize_with(n, || None);
        self.used = 0;
        for e in old.into_iter().flatten() {
            let slot = self.slot_of(e.addr);
            match &mut self.slots[slot] {
                Some(cur) => {
                    if e.age > cur.age {
                        *cur = e;
                    }
                }
                s @ None => {
                    *s = Some(e);
                    self.used += 1;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `save_xbzrle_page` against this cache, for page `addr` whose current
    /// content is `current` (a stable snapshot: the guest must not change it during the
    /// call), at dirty-sync count `generation`. `out` receives the delta; QEMU uses a
    /// page-sized buffer. In the last stage (`last_stage`), the cache is not updated.
    ///
    /// On [`SaveOutcome::Miss`] and [`SaveOutcome::Overflow`] the caller sends `current`
    /// in full; after this call the cache (if updated) holds exactly `current`, so what
    /// was sent and what is cached agree.
    ///
    /// # Panics
    /// If `current.len()` is not the page size.
    pub fn save_page(
        &mut self,
        addr: u64,
        current: &[u8],
        generation: u64,
        last_stage: bool,
        out: &mut [u8],
    ) -> SaveOutcome {
        assert_eq!(current.len(), self.page_size, "page of the wrong size");
        if !self.lookup(addr, generation) {
            let inserted = !last_stage && self.insert(addr, current, generation).is_ok();
            return SaveOutcome::Miss { inserted };
        }
        let cached = self.get_mut(addr).expect("hit just reported");
        match encode(cached, current, out) {
            Ok(0) => SaveOutcome::Unchanged,
            Ok(len) => {
                if !last_stage {
                    cached.copy_from_slice(current);
                }
                SaveOutcome::Encoded(len)
            }
            Err(_) => {
                if !last_stage {
                    cached.copy_from_slice(current);
                }
                SaveOutcome::Overflow
            }
        }
    }
}
