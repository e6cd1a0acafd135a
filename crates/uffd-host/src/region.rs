//! [`Region`]: a guest-memory mapping registered for missing faults, and the
//! placement calls that resolve them.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use qmig_wire::PageBitmap;
use userfaultfd::{IoctlFlags, Uffd};

use crate::blocktime::Blocktime;
use crate::probe::offered_features;
use crate::sys::{self, Mapping};
use crate::{Features, UffdError};

/// What the region and its fault thread track, under one mutex: the host
/// pages placed and the host pages reported (asked for), one bit per host
/// page ([`PageBitmap`], the one bitmap type of every qmig crate; it is not
/// itself thread-safe, so it lives only behind this lock).
#[derive(Debug)]
pub(crate) struct Tracking {
    pub received: PageBitmap,
    pub requested: PageBitmap,
    pub blocktime: Option<BlocktimeHandle>,
}

/// A [`Blocktime`] shared by the fault threads and placements of every
/// region of a guest (and readable by anyone), keyed by virtual address.
#[derive(Debug, Clone, Default)]
pub struct BlocktimeHandle(Arc<Mutex<Blocktime>>);

impl From<Blocktime> for BlocktimeHandle {
    fn from(b: Blocktime) -> Self {
        BlocktimeHandle(Arc::new(Mutex::new(b)))
    }
}

impl BlocktimeHandle {
    /// A copy of the accounting as it is now.
    pub fn snapshot(&self) -> Blocktime {
        self.lock().clone()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Blocktime> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The origin of every blocktime timestamp (one per process, so waits in
/// different regions compare).
pub(crate) fn now() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// State shared by a [`Region`] and its fault thread. Owns the userfaultfd
/// and the mapping; the userfaultfd is declared first so it is closed
/// (unregistering the range and releasing any waiter) before the memory is
/// unmapped.
#[derive(Debug)]
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub map: Arc<Mapping>,
    pub page_size: usize,
    pub features: Features,
    pub zeropage: bool,
    pub tracking: Mutex<Tracking>,
    pub fault_thread: AtomicBool,
}

fn uffd_error(op: &'static str, e: userfaultfd::Error) -> UffdError {
    let source = match e {
        userfaultfd::Error::SystemError(n)
        | userfaultfd::Error::CopyFailed(n)
        | userfaultfd::Error::ZeropageFailed(n) => io::Error::from_raw_os_error(n as i32),
        other => io::Error::other(other.to_string()),
    };
    UffdError::Syscall { op, source }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Tracking> {
        // A panic while holding the lock leaves only bitmaps behind: usable.
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wake(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        let start = self.map.as_ptr().wrapping_add(offset).cast();
        self.uffd
            .wake(start, len)
            .map_err(|e| uffd_error("UFFDIO_WAKE", e))
    }
}

/// The outcome of a placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placed {
    /// Bytes the call filled.
    pub filled: usize,
    /// Bytes that were already present (EEXIST): left alone, waiters woken.
    pub already_present: usize,
}

/// Most EAGAIN retries of one placement before giving up.
const MAX_RETRIES: u32 = 1000;

/// Guest RAM for postcopy: a [`Mapping`] (anonymous, memfd or hugetlbfs)
/// with its own userfaultfd, registered for missing faults.
///
/// Touching a page that was never placed blocks the touching thread until
/// [`Region::place_page`] or [`Region::place_zero_page`] fills it; the fault
/// is reported by the fault thread ([`Region::spawn_fault_thread`]).
/// Placement methods take `&self` and may be called from any thread.
///
/// The region's *host page* (the unit of faults, requests and placements)
/// is the mapping's kernel page (2 MiB for hugetlbfs) or, with
/// [`Region::register_host_pages`], a larger power of two: an anonymous
/// stand-in for a block of 2 MiB pages is then asked for and placed 2 MiB
/// at a time, as QEMU does for such blocks.
#[derive(Debug, Clone)]
pub struct Region {
    pub(crate) shared: Arc<Shared>,
}

impl Region {
    /// Maps `len` bytes of anonymous memory and registers them for missing
    /// faults.
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when `len` is zero or not a multiple of the host
    /// page size; otherwise as for [`Region::register`].
    pub fn new(len: usize) -> Result<Self, UffdError> {
        let page_size = sys::host_page_size();
        if len == 0 || !len.is_multiple_of(page_size) {
            return Err(UffdError::BadRange {
                offset: 0,
                len,
                why: "a region must be a non-zero multiple of the host page size",
            });
        }
        Region::register(Arc::new(Mapping::anonymous(len)?))
    }

    /// Registers an existing mapping (guest RAM that precopy filled, at
    /// POSTCOPY_LISTEN, after the discards) for missing faults with a new
    /// userfaultfd; its host page is the mapping's kernel page. Pages
    /// already present stay as they are; touching any other page faults from
    /// now on. The region keeps the mapping alive; dropping the last handle
    /// (and stopping the fault thread) closes the userfaultfd, which
    /// unregisters the range and wakes every waiter.
    ///
    /// Requests `UFFD_FEATURE_THREAD_ID` when the kernel offers it. The
    /// userfaultfd handles kernel-mode faults too unless the process may
    /// only have a user-mode-only one ([`Features::user_mode_only`]).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the length is not whole host pages;
    /// [`UffdError::NotPermitted`] / [`UffdError::NotSupported`] when
    /// userfaultfd cannot be used; [`UffdError::MissingFeature`] when the
    /// registration does not allow `UFFDIO_COPY`; [`UffdError::Syscall`] for
    /// other failures (UFFDIO_REGISTER refuses memory of other kinds, e.g.
    /// a mapping of a regular file).
    pub fn register(map: Arc<Mapping>) -> Result<Self, UffdError> {
        let ps = map.page_size();
        Region::register_host_pages(map, ps)
    }

    /// As [`Region::register`], with host pages of `host_page_size` bytes
    /// (a power of two, at least the mapping's kernel page).
    ///
    /// # Errors
    /// As for [`Region::register`]; [`UffdError::BadRange`] for a bad
    /// `host_page_size`.
    pub fn register_host_pages(
        map: Arc<Mapping>,
        host_page_size: usize,
    ) -> Result<Self, UffdError> {
        let page_size = host_page_size;
        let len = map.len;
        if !page_size.is_power_of_two()
            || page_size < map.page_size()
            || len == 0
            || !len.is_multiple_of(page_size)
            || !map.addr.is_multiple_of(map.page_size())
        {
            return Err(UffdError::BadRange {
                offset: 0,
                len,
                why: "a region must be a non-zero multiple of its host page size, \
                      a power of two no smaller than the kernel page",
            });
        }
        let offered = offered_features()?;
        let want = offered.enabled & userfaultfd::FeatureFlags::THREAD_ID;
        let opened = sys::open_uffd(want)?;
        let ioctls = opened
            .uffd
            .register(map.as_ptr().cast(), len)
            .map_err(|e| uffd_error("UFFDIO_REGISTER", e))?;
        for (bit, what) in [
            (IoctlFlags::COPY, "UFFDIO_COPY on the registered range"),
            (IoctlFlags::WAKE, "UFFDIO_WAKE on the registered range"),
        ] {
            if !ioctls.contains(bit) {
                return Err(UffdError::MissingFeature { what });
            }
        }
        let zeropage = ioctls.contains(IoctlFlags::ZEROPAGE);
        let pages = (len / page_size) as u64;
        let mut features =
            Features::from_flags(offered.enabled, true, zeropage, opened.user_mode_only);
        features.thread_id = opened
            .features
            .contains(userfaultfd::FeatureFlags::THREAD_ID);
        Ok(Region {
            shared: Arc::new(Shared {
                uffd: opened.uffd,
                map,
                page_size,
                features,
                zeropage,
                tracking: Mutex::new(Tracking {
                    received: PageBitmap::new(pages),
                    requested: PageBitmap::new(pages),
                    blocktime: None,
                }),
                fault_thread: AtomicBool::new(false),
            }),
        })
    }

    /// The features this region's userfaultfd has.
    pub fn features(&self) -> Features {
        self.shared.features
    }

    /// The mapping.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.shared.map
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.shared.map.len
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The host page size placements are aligned to.
    pub fn page_size(&self) -> usize {
        self.shared.page_size
    }

    /// Whether `thread_id` is reported with faults (UFFD_FEATURE_THREAD_ID).
    pub fn has_thread_id(&self) -> bool {
        self.shared.features.thread_id
    }

    /// Start of the mapping. Reading or writing through it blocks on pages
    /// not yet placed, like a vCPU would.
    pub fn as_ptr(&self) -> *mut u8 {
        self.shared.map.addr as *mut u8
    }

    /// Whether the host page at `offset` was placed by this region.
    pub fn is_placed(&self, offset: usize) -> bool {
        offset < self.len()
            && self
                .shared
                .lock()
                .received
                .get((offset / self.page_size()) as u64)
    }

    /// A snapshot of the blocktime accounting of the fault thread (empty
    /// before one was started).
    pub fn blocktime(&self) -> Blocktime {
        self.shared
            .lock()
            .blocktime
            .as_ref()
            .map(BlocktimeHandle::snapshot)
            .unwrap_or_default()
    }

    /// Copies `buf.len()` bytes at `offset` out of the region, touching the
    /// memory as a guest would: the call blocks (faults) until every page it
    /// reads has been placed.
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the range is outside the region.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), UffdError> {
        self.check(offset, buf.len(), false)?;
        let src = self.as_ptr().wrapping_add(offset);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `offset + i` is inside the live mapping (checked
            // above); a volatile read of a u8 has no alignment needs and a
            // page that is not present blocks in the kernel until placed.
            *b = unsafe { std::ptr::read_volatile(src.wrapping_add(i)) };
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize, aligned: bool) -> Result<(), UffdError> {
        let bad = |why| Err(UffdError::BadRange { offset, len, why });
        if offset.checked_add(len).is_none_or(|e| e > self.len()) {
            return bad("outside the region");
        }
        let ps = self.page_size();
        if aligned && (len == 0 || !offset.is_multiple_of(ps) || !len.is_multiple_of(ps)) {
            return bad("placements must be whole host pages");
        }
        Ok(())
    }

    /// Places `data` (whole host pages) at `offset` with `UFFDIO_COPY`,
    /// waking threads waiting on it. Pages already present (EEXIST) are not
    /// an error: they are left as they are and their waiters are woken with
    /// `UFFDIO_WAKE`, since a failed copy wakes no one.
    ///
    /// # Errors
    /// [`UffdError::BadRange`] for a range that is not whole host pages inside
    /// the region; [`UffdError::Syscall`] when the kernel refuses the copy.
    pub fn place_page(&self, offset: usize, data: &[u8]) -> Result<Placed, UffdError> {
        self.check(offset, data.len(), true)?;
        self.fill(offset, data.len(), Some(data), true)
    }

    /// Places `len` bytes of zero pages at `offset` with `UFFDIO_ZEROPAGE`
    /// (or a copy of zeros when the kernel lacks it), with the same EEXIST
    /// handling as [`Region::place_page`].
    ///
    /// # Errors
    /// As for [`Region::place_page`].
    pub fn place_zero_page(&self, offset: usize, len: usize) -> Result<Placed, UffdError> {
        self.check(offset, len, true)?;
        if self.shared.zeropage {
            self.fill(offset, len, None, true)
        } else {
            self.fill(offset, len, Some(&vec![0; len]), true)
        }
    }

    /// Wakes threads waiting on `[offset, offset + len)` (`UFFDIO_WAKE`).
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Syscall`] when the ioctl fails.
    pub fn wake(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len, true)?;
        self.shared.wake(offset, len)
    }

    /// Drops the pages of `[offset, offset + len)` (as for
    /// POSTCOPY_RAM_DISCARD; [`Mapping::discard`]) and forgets that they
    /// were placed or asked for: touching them faults again.
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Syscall`] when madvise fails.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len, true)?;
        self.shared.map.discard(offset, len)?;
        let ps = self.page_size();
        let mut t = self.shared.lock();
        let (first, n) = ((offset / ps) as u64, (len / ps) as u64);
        t.received.clear_range(first, n);
        t.requested.clear_range(first, n);
        Ok(())
    }

    /// One placement ioctl over `[dst, dst + len)`: the bytes done, or the
    /// errno with the bytes done before it (EAGAIN: a partial copy).
    fn fill_ioctl(
        &self,
        dst: usize,
        len: usize,
        src: Option<&[u8]>,
        wake: bool,
    ) -> Result<usize, (usize, io::Error)> {
        let addr = self.shared.map.as_ptr().wrapping_add(dst).cast();
        match src {
            Some(s) => {
                // SAFETY: `s` is `len` readable bytes borrowed for the call
                // (callers pass `len <= s.len()`), and `addr..addr + len` lies
                // inside the registered range (checked by callers); the
                // kernel copies atomically into pages not yet present.
                let r = unsafe { self.shared.uffd.copy(s.as_ptr().cast(), addr, len, wake) };
                match r {
                    Ok(n) => Ok(n),
                    Err(userfaultfd::Error::PartiallyCopied(n)) => {
                        Err((n, io::Error::from_raw_os_error(libc::EAGAIN)))
                    }
                    Err(userfaultfd::Error::CopyFailed(e)) => Err((0, io::Error::from(e))),
                    Err(e) => Err((0, io::Error::other(e.to_string()))),
                }
            }
            None => {
                // SAFETY: the range lies inside the registered range
                // (checked by callers).
                let r = unsafe { self.shared.uffd.zeropage(addr, len, wake) };
                match r {
                    Ok(n) => Ok(n),
                    // The crate drops the partial count of an EAGAIN: report
                    // none done; the retry then skips what was zeroed as
                    // EEXIST pages.
                    Err(userfaultfd::Error::ZeropageFailed(e)) => Err((0, io::Error::from(e))),
                    Err(e) => Err((0, io::Error::other(e.to_string()))),
                }
            }
        }
    }

    /// Fills `[offset, offset + len)` from `data` (or with zeros), page by
    /// page past any EEXIST, then records the pages as placed and closes the
    /// blocktime of their waiters. `wake = false` is for tests that need a
    /// populated page with a thread still asleep on it.
    pub(crate) fn fill(
        &self,
        offset: usize,
        len: usize,
        data: Option<&[u8]>,
        wake: bool,
    ) -> Result<Placed, UffdError> {
        let ps = self.page_size();
        let op = if data.is_some() {
            "UFFDIO_COPY"
        } else {
            "UFFDIO_ZEROPAGE"
        };
        let mut out = Placed::default();
        let mut done = 0;
        let mut retries = 0;
        while done < len {
            let src = data.map(|d| &d[done..len]);
            match self.fill_ioctl(offset + done, len - done, src, wake) {
                Ok(n) => {
                    let n = n.min(len - done);
                    out.filled += n;
                    done += n;
                    if n == 0 {
                        retries += 1;
                    }
                }
                Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // The first kernel page of what remains is already there
                    // (the kernel reports pages copied before it as a short
                    // count, and EEXIST only when none were). Skip it and wake
                    // anyone waiting on it: a failed copy wakes no one.
                    let kps = self.shared.map.page_size().min(len - done);
                    self.shared.wake(offset + done, kps)?;
                    out.already_present += kps;
                    done += kps;
                }
                Err((n, e)) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // The address space changed under the copy; `n` says how
                    // much got through. Retry the rest.
                    let n = n.min(len - done);
                    out.filled += n;
                    done += n;
                    retries += 1;
                }
                Err((_, source)) => return Err(UffdError::Syscall { op, source }),
            }
            if retries > MAX_RETRIES {
                return Err(UffdError::Syscall {
                    op,
                    source: io::Error::from_raw_os_error(libc::EAGAIN),
                });
            }
        }
        let t_now = now();
        let mut t = self.shared.lock();
        t.received
            .set_range((offset / ps) as u64, (len / ps) as u64);
        if let Some(b) = &t.blocktime {
            let start = (self.shared.map.addr + offset) as u64;
            b.lock().placed(start, len as u64, t_now);
        }
        Ok(out)
    }

    pub(crate) fn claim_fault_thread(&self) -> Result<(), UffdError> {
        if self.shared.fault_thread.swap(true, Ordering::AcqRel) {
            return Err(UffdError::FaultThreadRunning);
        }
        Ok(())
    }
}
