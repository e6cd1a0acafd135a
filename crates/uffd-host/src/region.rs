//! [`Region`]: an anonymous mapping registered for missing faults, and the
//! placement calls that resolve them.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::blocktime::Blocktime;
use crate::probe::offered_features;
use crate::sys::{self, Mapping};
use crate::{Features, UffdError};

/// A bitmap with one bit per host page.
#[derive(Debug, Clone)]
pub(crate) struct HostPageBitmap(Vec<u64>);

impl HostPageBitmap {
    fn new(pages: usize) -> Self {
        HostPageBitmap(vec![0; pages.div_ceil(64)])
    }
    pub(crate) fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    pub(crate) fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// What the fault thread and the placement path share, under one lock.
#[derive(Debug)]
pub(crate) struct Tracking {
    /// Host pages placed (by this region's placement calls).
    pub received: HostPageBitmap,
    /// Host pages already reported as faults (asked for).
    pub requested: HostPageBitmap,
    pub blocktime: Blocktime,
}

/// State shared by a [`Region`] and its fault thread. Owns the fd and the
/// mapping; the fd is declared first so it is closed (unregistering the
/// range and releasing any waiter) before the memory is unmapped.
#[derive(Debug)]
pub(crate) struct Shared {
    pub fd: OwnedFd,
    pub map: Arc<Mapping>,
    pub page_size: usize,
    pub features: Features,
    pub zeropage: bool,
    pub epoch: Instant,
    pub tracking: Mutex<Tracking>,
    pub fault_thread: AtomicBool,
}

impl Shared {
    pub(crate) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Tracking> {
        // A panic while holding the lock leaves only bitmaps behind: usable.
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wake(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        let mut r = sys::UffdioRange {
            start: (self.map.addr + offset) as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { sys::ioctl(&self.fd, sys::UFFDIO_WAKE, &mut r) }.map_err(|source| {
            UffdError::Syscall {
                op: "UFFDIO_WAKE",
                source,
            }
        })
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

/// Guest RAM stand-in for postcopy: an anonymous private mapping of `len`
/// bytes with its own userfaultfd, registered for missing faults.
///
/// Touching a page that was never placed blocks the touching thread until
/// [`Region::place_page`] or [`Region::place_zero_page`] fills it; the fault
/// is reported by the fault thread ([`Region::spawn_fault_thread`]).
/// Placement methods take `&self` and may be called from any thread.
///
/// Only base (host) pages: hugetlbfs and shmem-backed regions are not
/// created here, though [`probe`](crate::probe) reports whether the kernel
/// would allow them.
#[derive(Debug, Clone)]
pub struct Region {
    pub(crate) shared: Arc<Shared>,
}

impl Region {
    /// Maps `len` bytes and registers them for missing faults. Requests
    /// `UFFD_FEATURE_THREAD_ID` when the kernel offers it.
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when `len` is zero or not a multiple of the host
    /// page size; [`UffdError::NotPermitted`] / [`UffdError::NotSupported`]
    /// when userfaultfd cannot be used; [`UffdError::MissingFeature`] when the
    /// registration does not allow `UFFDIO_COPY`; [`UffdError::Syscall`] for
    /// other failures.
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

    /// Registers an existing anonymous mapping (e.g. guest RAM that precopy
    /// filled, at POSTCOPY_LISTEN) for missing faults with a new
    /// userfaultfd. Pages already present stay as they are; touching any
    /// other page faults from now on. The region keeps the mapping alive;
    /// dropping the last handle (and stopping the fault thread) closes the
    /// userfaultfd, which unregisters the range and wakes every waiter.
    ///
    /// # Errors
    /// As for [`Region::new`].
    pub fn register(map: Arc<Mapping>) -> Result<Self, UffdError> {
        let page_size = sys::host_page_size();
        let len = map.len;
        if len == 0 || !len.is_multiple_of(page_size) {
            return Err(UffdError::BadRange {
                offset: 0,
                len,
                why: "a region must be a non-zero multiple of the host page size",
            });
        }
        let offered = offered_features()?;
        let want = offered & sys::FEATURE_THREAD_ID;
        let fd = sys::open_uffd()?;
        sys::api(&fd, want)?;
        let ioctls = sys::register_missing(&fd, map.addr as u64, len as u64)?;
        for (bit, what) in [
            (sys::IOCTL_COPY_BIT, "UFFDIO_COPY on the registered range"),
            (sys::IOCTL_WAKE_BIT, "UFFDIO_WAKE on the registered range"),
        ] {
            if ioctls & bit == 0 {
                return Err(UffdError::MissingFeature { what });
            }
        }
        let zeropage = ioctls & sys::IOCTL_ZEROPAGE_BIT != 0;
        let pages = len / page_size;
        Ok(Region {
            shared: Arc::new(Shared {
                fd,
                map,
                page_size,
                features: Features::from_raw(offered, true, zeropage),
                zeropage,
                epoch: Instant::now(),
                tracking: Mutex::new(Tracking {
                    received: HostPageBitmap::new(pages),
                    requested: HostPageBitmap::new(pages),
                    blocktime: Blocktime::default(),
                }),
                fault_thread: AtomicBool::new(false),
            }),
        })
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
        offset < self.len() && self.shared.lock().received.get(offset / self.page_size())
    }

    /// A snapshot of the blocktime accounting.
    pub fn blocktime(&self) -> Blocktime {
        self.shared.lock().blocktime.clone()
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

    /// Drops the pages of `[offset, offset + len)` (`MADV_DONTNEED`, as for
    /// POSTCOPY_RAM_DISCARD) and forgets that they were placed or asked
    /// for: touching them faults again.
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Syscall`] when madvise fails.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len, true)?;
        let p = self.as_ptr().wrapping_add(offset).cast::<libc::c_void>();
        // SAFETY: the range is whole pages inside the mapping this region
        // owns; dropping them only makes later reads fault.
        let r = unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(UffdError::Syscall {
                op: "madvise(MADV_DONTNEED)",
                source: io::Error::last_os_error(),
            });
        }
        let ps = self.page_size();
        let mut t = self.shared.lock();
        for page in offset / ps..(offset + len) / ps {
            t.received.clear(page);
            t.requested.clear(page);
        }
        Ok(())
    }

    /// One placement ioctl over `[dst, dst + len)`: `Ok(n)` bytes done, or
    /// the errno.
    fn fill_ioctl(
        &self,
        dst: usize,
        len: usize,
        src: Option<&[u8]>,
        wake: bool,
    ) -> (i64, io::Result<()>) {
        let addr = (self.shared.map.addr + dst) as u64;
        match src {
            Some(s) => {
                let mut c = sys::UffdioCopy {
                    dst: addr,
                    src: s.as_ptr() as u64,
                    len: len as u64,
                    mode: if wake { 0 } else { 1 },
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; `src`
                // points to `len` readable bytes borrowed for the call and
                // `dst` lies inside the registered range (checked by callers).
                let r = unsafe { sys::ioctl(&self.shared.fd, sys::UFFDIO_COPY, &mut c) };
                (c.copy, r)
            }
            None => {
                let mut z = sys::UffdioZeropage {
                    range: sys::UffdioRange {
                        start: addr,
                        len: len as u64,
                    },
                    mode: if wake { 0 } else { 1 },
                    zeropage: 0,
                };
                // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`;
                // the range lies inside the registered range.
                let r = unsafe { sys::ioctl(&self.shared.fd, sys::UFFDIO_ZEROPAGE, &mut z) };
                (z.zeropage, r)
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
            let src = data.map(|d| &d[done..]);
            let (n, r) = self.fill_ioctl(offset + done, len - done, src, wake);
            match r {
                Ok(()) => {
                    let n = usize::try_from(n).unwrap_or(0).min(len - done);
                    out.filled += n;
                    done += n;
                    if n == 0 {
                        retries += 1;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // The first page of what remains is already there (the
                    // kernel reports pages copied before it as a short count,
                    // and EEXIST only when none were). Skip that page and wake
                    // anyone waiting on it: a failed copy wakes no one.
                    self.shared.wake(offset + done, ps)?;
                    out.already_present += ps;
                    done += ps;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // The address space changed under the copy; `n` says how
                    // much got through. Retry the rest.
                    let n = usize::try_from(n).unwrap_or(0).min(len - done);
                    out.filled += n;
                    done += n;
                    retries += 1;
                }
                Err(source) => return Err(UffdError::Syscall { op, source }),
            }
            if retries > MAX_RETRIES {
                return Err(UffdError::Syscall {
                    op,
                    source: io::Error::from_raw_os_error(libc::EAGAIN),
                });
            }
        }
        let now = self.shared.now();
        let mut t = self.shared.lock();
        for page in offset / ps..(offset + len) / ps {
            t.received.set(page);
        }
        t.blocktime.placed(offset as u64, len as u64, now);
        Ok(out)
    }

    pub(crate) fn claim_fault_thread(&self) -> Result<(), UffdError> {
        if self.shared.fault_thread.swap(true, Ordering::AcqRel) {
            return Err(UffdError::FaultThreadRunning);
        }
        Ok(())
    }
}
