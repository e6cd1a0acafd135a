//! What the kernel's userfaultfd offers: [`probe`] and [`Features`].

use std::sync::OnceLock;

use crate::sys::{self, Mapping};
use crate::UffdError;

/// The userfaultfd features relevant to postcopy, as found by [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The raw `UFFD_FEATURE_*` bits the UFFDIO_API handshake offered.
    pub raw: u64,
    /// Missing faults on anonymous private memory can be registered and
    /// resolved with `UFFDIO_COPY` (what [`Region`](crate::Region) uses).
    pub missing_anon: bool,
    /// Missing faults on shmem / memfd memory (`UFFD_FEATURE_MISSING_SHMEM`).
    pub missing_shmem: bool,
    /// Missing faults on hugetlbfs memory (`UFFD_FEATURE_MISSING_HUGETLBFS`).
    pub missing_hugetlbfs: bool,
    /// `UFFDIO_ZEROPAGE` is allowed on anonymous registrations.
    pub zeropage: bool,
    /// Faults report the faulting thread's id (`UFFD_FEATURE_THREAD_ID`),
    /// which per-vCPU blocktime needs.
    pub thread_id: bool,
    /// Only faults of user-space accesses are reported (`UFFD_USER_MODE_ONLY`):
    /// what an unprivileged process gets with `vm.unprivileged_userfaultfd=0`.
    /// Enough for vCPU threads touching guest memory, not for kernel accesses
    /// (a `read(2)` into a missing page fails with EFAULT instead of blocking).
    pub user_mode_only: bool,
}

impl Features {
    pub(crate) fn from_raw(raw: u64, missing_anon: bool, zeropage: bool) -> Self {
        Features {
            raw,
            missing_anon,
            missing_shmem: raw & sys::FEATURE_MISSING_SHMEM != 0,
            missing_hugetlbfs: raw & sys::FEATURE_MISSING_HUGETLBFS != 0,
            zeropage,
            thread_id: raw & sys::FEATURE_THREAD_ID != 0,
            user_mode_only: sys::user_mode_only(),
        }
    }
}

/// The feature bits offered by the kernel (asked once per process: the
/// answer does not change, and each ask costs a userfaultfd).
pub(crate) fn offered_features() -> Result<u64, UffdError> {
    static OFFERED: OnceLock<u64> = OnceLock::new();
    if let Some(&f) = OFFERED.get() {
        return Ok(f);
    }
    // The handshake can be done only once per fd: a first fd asks with no
    // features and learns what is offered; users open another to ask.
    let fd = sys::open_uffd()?;
    let api = sys::api(&fd, 0)?;
    Ok(*OFFERED.get_or_init(|| api.features))
}

/// Probes the kernel's userfaultfd support: opens a userfaultfd, does the
/// API handshake to learn the offered features, then registers a one-page
/// anonymous test mapping for missing faults to see which range ioctls
/// (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`) it allows.
///
/// ```no_run
/// let f = qmig_uffd_host::probe()?;
/// assert!(f.missing_anon);
/// println!("thread ids: {}, zeropage: {}", f.thread_id, f.zeropage);
/// # Ok::<(), qmig_uffd_host::UffdError>(())
/// ```
///
/// # Errors
/// [`UffdError::NotPermitted`] (EPERM: not root and
/// `vm.unprivileged_userfaultfd` is 0), [`UffdError::NotSupported`] (ENOSYS:
/// no userfaultfd in this kernel, or a seccomp filter), [`UffdError::Api`]
/// when the handshake fails, [`UffdError::Syscall`] for anything else.
pub fn probe() -> Result<Features, UffdError> {
    let offered = offered_features()?;
    let fd = sys::open_uffd()?;
    sys::api(&fd, offered & sys::FEATURE_THREAD_ID)?;
    let page = sys::host_page_size();
    let map = Mapping::anonymous(page)?;
    let ioctls = sys::register_missing(&fd, map.addr as u64, page as u64)?;
    // Closing the fd unregisters the test page; `map` unmaps it.
    drop(fd);
    Ok(Features::from_raw(
        offered,
        ioctls & sys::IOCTL_COPY_BIT != 0,
        ioctls & sys::IOCTL_ZEROPAGE_BIT != 0,
    ))
}
