//! The kernel interface: opening a userfaultfd (through the `userfaultfd`
//! crate, with one raw fallback), the guest-memory mappings userfaultfd's
//! missing mode can register (anonymous, memfd/shmem, hugetlbfs), and the
//! stop eventfd of the fault thread.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

use crate::UffdError;

/// `UFFD_USER_MODE_ONLY` (linux/userfaultfd.h, since 5.11): the fd only
/// handles faults raised by user-space accesses, which the
/// `vm.unprivileged_userfaultfd=0` default allows without privileges.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// `UFFD_API`: the only API version the kernel knows.
const UFFD_API: u64 = 0xAA;

/// `struct uffdio_api`, for the one handshake the crate cannot do for us
/// (see [`open_user_mode_only`]).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
/// `UFFDIO_API` = `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F;

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The crate's error as an `io::Error` (its errno when it has one).
fn crate_io_error(e: userfaultfd::Error) -> io::Error {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn open_error(e: io::Error) -> UffdError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => UffdError::NotPermitted { source: e },
        Some(libc::ENOSYS) => UffdError::NotSupported { source: e },
        _ => UffdError::Syscall {
            op: "userfaultfd",
            source: e,
        },
    }
}

/// A userfaultfd and how it was obtained.
#[derive(Debug)]
pub(crate) struct Opened {
    pub uffd: Uffd,
    /// The features the handshake enabled.
    pub features: FeatureFlags,
    /// Only user-mode faults are reported (the unprivileged fallback).
    pub user_mode_only: bool,
}

/// Opens a new userfaultfd (close-on-exec, non-blocking) and does the
/// UFFDIO_API handshake asking for `features`.
///
/// Full (kernel-mode too) fault handling is tried first, through the
/// `userfaultfd` crate with `user_mode_only(false)`: a privileged process
/// (CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1`, or access to
/// `/dev/userfaultfd`) must serve faults the kernel itself raises (a
/// `read(2)` into guest memory, vhost), as QEMU's destination does. Only if
/// that is refused for lack of permission does it fall back to
/// `UFFD_USER_MODE_ONLY`, which an unprivileged process may always use.
pub(crate) fn open_uffd(features: FeatureFlags) -> Result<Opened, UffdError> {
    let full = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(features)
        .create();
    let err = match full {
        Ok(uffd) => {
            return Ok(Opened {
                uffd,
                features,
                user_mode_only: false,
            })
        }
        Err(e) => crate_io_error(e),
    };
    if !is_permission(&err) {
        return Err(match err.raw_os_error() {
            Some(libc::EINVAL) => UffdError::Api {
                features: features.bits(),
                source: err,
            },
            _ => open_error(err),
        });
    }
    match open_user_mode_only(features) {
        Ok(uffd) => Ok(Opened {
            uffd,
            features,
            user_mode_only: true,
        }),
        // Report the first refusal: that is the one the fixes address.
        Err(_) => Err(open_error(err)),
    }
}

/// The unprivileged fallback: `userfaultfd(UFFD_USER_MODE_ONLY)` and the
/// UFFDIO_API handshake, with raw `libc`.
///
/// Why not the crate: `UffdBuilder::create` opens `/dev/userfaultfd`
/// whenever that node exists and gives up if it cannot be opened, without
/// trying the system call; on a stock system the node exists with mode 0600,
/// so an unprivileged process would never reach the user-mode-only system
/// call the kernel does allow it. The crate's handshake is private, so it is
/// done here too; the fd is then handed to the crate ([`Uffd::from_raw_fd`])
/// for everything else.
fn open_user_mode_only(features: FeatureFlags) -> Result<Uffd, io::Error> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(r).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut a = UffdioApi {
        api: UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    let p: *mut UffdioApi = &mut a;
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `p` points to
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, p) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open userfaultfd whose ownership moves to the
    // `Uffd` (which closes it on drop).
    Ok(unsafe { <Uffd as FromRawFd>::from_raw_fd(raw) })
}

/// The host (base) page size.
pub(crate) fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r > 0 {
        r as usize
    } else {
        4096
    }
}

/// The memory behind a [`Mapping`]: the three kinds userfaultfd's missing
/// mode can register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    Anonymous,
    /// A memfd (shmem), mapped shared.
    Memfd,
    /// A hugetlbfs memfd (`MFD_HUGETLB`) of 2 MiB pages, mapped shared.
    Hugetlbfs,
}

impl Backing {
    /// The name used in manifests and errors.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Memfd => "memfd",
            Backing::Hugetlbfs => "hugetlbfs",
        }
    }
}

/// The huge page size [`Backing::Hugetlbfs`] uses.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Guest memory mapped read/write, unmapped on drop: anonymous private
/// memory, a memfd or a hugetlbfs memfd. Pages never written are not
/// present: once registered with a [`Region`](crate::Region) touching them
/// faults.
///
/// Access is through `&self` only, with volatile copies ([`Mapping::read`],
/// [`Mapping::write`]), in the manner of vm-memory's `VolatileSlice`: other
/// threads (UFFDIO_COPY, vCPU stand-ins) may change the bytes at any time,
/// so no Rust reference into the memory is ever made while it is shared.
#[derive(Debug)]
pub struct Mapping {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    backing: Backing,
    /// The memfd, for shared backings (kept for the mapping's lifetime).
    _fd: Option<OwnedFd>,
}

impl Mapping {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// What the memory is.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The kernel page size of the memory: 2 MiB for hugetlbfs, else the
    /// host page size. Placements and discards are multiples of it.
    pub fn page_size(&self) -> usize {
        match self.backing {
            Backing::Hugetlbfs => HUGE_PAGE_SIZE,
            _ => host_page_size(),
        }
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(UffdError::BadRange {
                offset,
                len,
                why: "outside the mapping",
            });
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out with volatile reads, as a
    /// vCPU would touch them: a page that is registered and missing blocks
    /// the call until it is placed (or the userfaultfd is closed; it then
    /// reads as zero).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the range is outside the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), UffdError> {
        self.check(offset, buf.len())?;
        let src = self.as_ptr().wrapping_add(offset);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `offset + i` is inside the live mapping (checked
            // above); a volatile u8 read has no alignment needs.
            *b = unsafe { std::ptr::read_volatile(src.wrapping_add(i)) };
        }
        Ok(())
    }

    /// Copies `data` in at `offset` with volatile writes (precopy's path,
    /// before registration; a registered missing page blocks the writer
    /// until placed, as a vCPU write would).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the range is outside the mapping.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), UffdError> {
        self.check(offset, data.len())?;
        let dst = self.as_ptr().wrapping_add(offset);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `offset + i` is inside the live mapping (checked
            // above); a volatile u8 write has no alignment needs, and no
            // Rust reference into the mapping exists to be invalidated.
            unsafe { std::ptr::write_volatile(dst.wrapping_add(i), *b) };
        }
        Ok(())
    }

    /// Whether any byte of `[offset, offset + len)` is non-zero (volatile
    /// reads; for pages not present this reads zeros without allocating).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the range is outside the mapping.
    pub fn any_nonzero(&self, offset: usize, len: usize) -> Result<bool, UffdError> {
        self.check(offset, len)?;
        let src = self.as_ptr().wrapping_add(offset);
        Ok((0..len).any(|i| {
            // SAFETY: inside the live mapping (checked above).
            unsafe { std::ptr::read_volatile(src.wrapping_add(i)) != 0 }
        }))
    }

    /// Drops the pages of `[offset, offset + len)` (whole kernel pages):
    /// `MADV_DONTNEED` for anonymous memory, `MADV_REMOVE` (punching a hole
    /// in the memfd) for shared memory, where DONTNEED would only unmap the
    /// page and leave it in the page cache, present to a later fault.
    ///
    /// # Errors
    /// [`UffdError::BadRange`]; [`UffdError::Syscall`] when madvise fails.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len)?;
        let ps = self.page_size();
        if !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(UffdError::BadRange {
                offset,
                len,
                why: "discards must be whole kernel pages",
            });
        }
        if len == 0 {
            return Ok(());
        }
        let (advice, op) = match self.backing {
            Backing::Anonymous => (libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)"),
            _ => (libc::MADV_REMOVE, "madvise(MADV_REMOVE)"),
        };
        let p = self.as_ptr().wrapping_add(offset).cast::<libc::c_void>();
        // SAFETY: the range is whole pages inside the mapping this value
        // owns; dropping them only makes later reads see zeros (or fault).
        let r = unsafe { libc::madvise(p, len, advice) };
        if r != 0 {
            return Err(UffdError::Syscall {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Maps `len` bytes (non-zero) of anonymous, private, read/write memory.
    ///
    /// # Errors
    /// [`UffdError::Syscall`] when mmap fails (e.g. `len` is 0).
    pub fn anonymous(len: usize) -> Result<Self, UffdError> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let addr = mmap(len, flags, None)?;
        Ok(Mapping {
            addr,
            len,
            backing: Backing::Anonymous,
            _fd: None,
        })
    }

    /// Maps `len` bytes of a new memfd, shared (as QEMU's
    /// `memory-backend-memfd`): shmem with [`Backing::Memfd`], 2 MiB
    /// hugetlbfs pages with [`Backing::Hugetlbfs`] (`len` must then be a
    /// multiple of 2 MiB, and the huge pages are reserved at mmap time:
    /// `vm.nr_hugepages` must have enough free).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] for a bad `len`; [`UffdError::Syscall`] when
    /// memfd_create, ftruncate or mmap fails (ENOMEM from mmap: not enough
    /// free huge pages; reserve them with `echo N > /proc/sys/vm/nr_hugepages`).
    pub fn memfd(len: usize, backing: Backing) -> Result<Self, UffdError> {
        let (mfd_flags, ps) = match backing {
            Backing::Anonymous => return Mapping::anonymous(len),
            Backing::Memfd => (libc::MFD_CLOEXEC, host_page_size()),
            // MFD_HUGE_2MB is 21 << MFD_HUGE_SHIFT (26).
            Backing::Hugetlbfs => (
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << 26),
                HUGE_PAGE_SIZE,
            ),
        };
        if len == 0 || !len.is_multiple_of(ps) {
            return Err(UffdError::BadRange {
                offset: 0,
                len,
                why: "a memfd mapping must be a non-zero multiple of its page size",
            });
        }
        let name: &CStr = c"qmig-guest-ram";
        // SAFETY: `name` is NUL-terminated; memfd_create returns a new fd or -1.
        let r = unsafe { libc::memfd_create(name.as_ptr(), mfd_flags) };
        if r < 0 {
            return Err(UffdError::Syscall {
                op: "memfd_create",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `r` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(r) };
        let size = libc::off_t::try_from(len).map_err(|_| UffdError::BadRange {
            offset: 0,
            len,
            why: "too large",
        })?;
        // SAFETY: ftruncate on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(UffdError::Syscall {
                op: "ftruncate(memfd)",
                source: io::Error::last_os_error(),
            });
        }
        let addr = mmap(len, libc::MAP_SHARED, Some(&fd)).map_err(|e| match (backing, e) {
            (Backing::Hugetlbfs, UffdError::Syscall { source, .. }) => UffdError::Syscall {
                op: "mmap(hugetlbfs memfd): reserve 2 MiB pages with \
                     `echo N > /proc/sys/vm/nr_hugepages`",
                source,
            },
            (_, e) => e,
        })?;
        Ok(Mapping {
            addr,
            len,
            backing,
            _fd: Some(fd),
        })
    }
}

fn mmap(len: usize, flags: libc::c_int, fd: Option<&OwnedFd>) -> Result<usize, UffdError> {
    // SAFETY: a fresh mapping at an address the kernel picks aliases nothing
    // in this process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.map_or(-1, |f| f.as_raw_fd()),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(UffdError::Syscall {
            op: "mmap",
            source: io::Error::last_os_error(),
        });
    }
    Ok(p as usize)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping this value owns; no
        // reference into it outlives the owner.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// An eventfd used to tell the fault thread to stop.
pub(crate) fn eventfd() -> Result<OwnedFd, UffdError> {
    // SAFETY: eventfd(2) takes an initial count and flags; returns a new fd or -1.
    let r = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if r < 0 {
        return Err(UffdError::Syscall {
            op: "eventfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `r` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}
