//! The kernel interface: `struct uffdio_*` layouts, ioctl numbers, and the
//! few calls that create and configure a userfaultfd. Everything here is a
//! thin, checked wrapper around one system call.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::UffdError;

/// `UFFD_API`: the only API version the kernel knows.
pub(crate) const UFFD_API: u64 = 0xAA;

/// `UFFD_EVENT_PAGEFAULT`.
pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub(crate) const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub(crate) const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub(crate) const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_THREAD_ID`.
pub(crate) const FEATURE_THREAD_ID: u64 = 1 << 8;

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub(crate) const REGISTER_MODE_MISSING: u64 = 1 << 0;

/// Bit numbers of the ioctls in `uffdio_api.ioctls` / `uffdio_register.ioctls`.
pub(crate) const IOCTL_REGISTER_BIT: u64 = 1 << 0x00;
pub(crate) const IOCTL_UNREGISTER_BIT: u64 = 1 << 0x01;
pub(crate) const IOCTL_WAKE_BIT: u64 = 1 << 0x02;
pub(crate) const IOCTL_COPY_BIT: u64 = 1 << 0x03;
pub(crate) const IOCTL_ZEROPAGE_BIT: u64 = 1 << 0x04;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negated errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes zeroed, or a negated errno.
    pub zeropage: i64,
}

/// `struct uffd_msg`, with its union read as the page-fault member
/// (`flags`, `address`, `feat.ptid`); other events are recognised by
/// `event` and ignored.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub pf_flags: u64,
    pub pf_address: u64,
    pub pf_ptid: u32,
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

pub(crate) const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
pub(crate) const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
pub(crate) const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
pub(crate) const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, 40);
pub(crate) const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, 32);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// Issues ioctl `req` on `fd` with argument `arg`; returns the errno on failure.
///
/// # Safety
/// `req` must be an ioctl whose argument is a `T` that the kernel may read
/// and write (one of the `UFFDIO_*` numbers above with its matching struct).
pub(crate) unsafe fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> io::Result<()> {
    let p: *mut T = arg;
    // SAFETY: the caller guarantees `req` takes a `T`; `p` points to a live,
    // exclusively borrowed `T` for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, p) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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

/// `UFFD_USER_MODE_ONLY` (linux/userfaultfd.h, since 5.11): the fd only
/// handles faults raised by user-space accesses, which the
/// `vm.unprivileged_userfaultfd=0` default allows without privileges.
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Whether [`open_uffd`] had to fall back to user-mode-only faults.
static USER_MODE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the userfaultfds opened so far handle user-mode faults only
/// (see [`open_uffd`]).
pub(crate) fn user_mode_only() -> bool {
    USER_MODE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

fn syscall_uffd(flags: libc::c_int) -> Result<OwnedFd, io::Error> {
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Opens a new userfaultfd (close-on-exec, non-blocking). Tries the
/// `userfaultfd(2)` system call first; when it is refused with EPERM,
/// `/dev/userfaultfd` (whose file permissions may grant what the sysctl does
/// not); and when that fails too, the system call with
/// `UFFD_USER_MODE_ONLY`, which an unprivileged process may always use:
/// faults raised inside the kernel (a `read(2)` into registered memory, say)
/// are then not reported, only those of user-space accesses.
pub(crate) fn open_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if !user_mode_only() {
        let err = match syscall_uffd(flags) {
            Ok(fd) => return Ok(fd),
            Err(e) => e,
        };
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(open_error(err));
        }
        if let Some(fd) = open_dev_uffd(flags) {
            return Ok(fd);
        }
        match syscall_uffd(flags | UFFD_USER_MODE_ONLY) {
            Ok(fd) => {
                USER_MODE_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(fd)
            }
            // Report the first refusal: that is the one the sysctl governs.
            Err(_) => Err(open_error(err)),
        }
    } else {
        syscall_uffd(flags | UFFD_USER_MODE_ONLY).map_err(open_error)
    }
}

/// A userfaultfd from `/dev/userfaultfd`, if its permissions allow.
fn open_dev_uffd(flags: libc::c_int) -> Option<OwnedFd> {
    let path: &CStr = c"/dev/userfaultfd";
    // SAFETY: `path` is a NUL-terminated string; open returns a new fd or -1.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return None;
    }
    // SAFETY: `dev` is a fresh fd that nothing else owns.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if r < 0 {
        return None;
    }
    // SAFETY: `r` is a fresh fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(r) })
}

/// The UFFDIO_API handshake (once per fd): asks for `features`; returns the
/// kernel's answer (with `features = 0` the answer lists every feature the
/// kernel offers).
pub(crate) fn api(fd: &OwnedFd, features: u64) -> Result<UffdioApi, UffdError> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
    unsafe { ioctl(fd, UFFDIO_API, &mut a) }
        .map_err(|source| UffdError::Api { features, source })?;
    let need = IOCTL_REGISTER_BIT | IOCTL_UNREGISTER_BIT;
    if a.ioctls & need != need {
        return Err(UffdError::MissingFeature {
            what: "UFFDIO_REGISTER/UFFDIO_UNREGISTER",
        });
    }
    Ok(a)
}

/// Registers `[start, start + len)` for missing faults; returns the range
/// ioctls the kernel allows on it.
pub(crate) fn register_missing(fd: &OwnedFd, start: u64, len: u64) -> Result<u64, UffdError> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
    unsafe { ioctl(fd, UFFDIO_REGISTER, &mut r) }.map_err(|source| UffdError::Syscall {
        op: "UFFDIO_REGISTER",
        source,
    })?;
    Ok(r.ioctls)
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

/// An anonymous private mapping (`MAP_PRIVATE | MAP_ANONYMOUS |
/// MAP_NORESERVE`), unmapped on drop. Pages never written are not present:
/// once registered with a [`Region`](crate::Region) touching them faults.
#[derive(Debug)]
pub struct Mapping {
    pub(crate) addr: usize,
    pub(crate) len: usize,
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

    /// Copies `buf.len()` bytes at `offset` out with volatile reads, as a
    /// vCPU would touch them: a page that is registered and missing blocks
    /// the call until it is placed (or the userfaultfd is closed; it then
    /// reads as zero).
    ///
    /// # Errors
    /// [`UffdError::BadRange`] when the range is outside the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), UffdError> {
        if offset.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            return Err(UffdError::BadRange {
                offset,
                len: buf.len(),
                why: "outside the mapping",
            });
        }
        let src = self.as_ptr().wrapping_add(offset);
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `offset + i` is inside the live mapping (checked
            // above); a volatile u8 read has no alignment needs.
            *b = unsafe { std::ptr::read_volatile(src.wrapping_add(i)) };
        }
        Ok(())
    }

    /// Maps `len` bytes (non-zero) of anonymous, private, read/write memory.
    ///
    /// # Errors
    /// [`UffdError::Syscall`] when mmap fails (e.g. `len` is 0).
    pub fn anonymous(len: usize) -> Result<Self, UffdError> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UffdError::Syscall {
                op: "mmap",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Mapping {
            addr: p as usize,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping this value owns; no
        // reference into it outlives the owner (the `Region`'s shared state).
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
