//! What the kernel's userfaultfd offers: [`probe`] and [`Features`].

use std::sync::OnceLock;

use userfaultfd::{FeatureFlags, IoctlFlags};

use crate::sys::{self, Mapping};
use crate::UffdError;

/// The userfaultfd features relevant to postcopy, as found by [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The raw `UFFD_FEATURE_*` bits the UFFDIO_API handshake accepted.
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
    pub(crate) fn from_flags(
        enabled: FeatureFlags,
        missing_anon: bool,
        zeropage: bool,
        user_mode_only: bool,
    ) -> Self {
        Features {
            raw: enabled.bits(),
            missing_anon,
            missing_shmem: enabled.contains(FeatureFlags::MISSING_SHMEM),
            missing_hugetlbfs: enabled.contains(FeatureFlags::MISSING_HUGETLBFS),
            zeropage,
            thread_id: enabled.contains(FeatureFlags::THREAD_ID),
            user_mode_only,
        }
    }
}

/// What the UFFDIO_API handshake accepted, learnt once per process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offered {
    /// The features a handshake accepted.
    pub enabled: FeatureFlags,
}

/// The features the kernel accepts (asked once per process: the answer
/// does not change, and each ask costs a userfaultfd).
///
/// The `userfaultfd` crate does not return the kernel's answer to the
/// handshake, only whether the features asked for were accepted; so this
/// asks for the postcopy set (thread ids, shmem and hugetlbfs missing
/// faults) and, if refused (EINVAL: an older kernel), for none.
pub(crate) fn offered_features() -> Result<Offered, UffdError> {
    static OFFERED: OnceLock<Offered> = OnceLock::new();
    if let Some(&f) = OFFERED.get() {
        return Ok(f);
    }
    let all =
        FeatureFlags::THREAD_ID | FeatureFlags::MISSING_SHMEM | FeatureFlags::MISSING_HUGETLBFS;
    let enabled = match sys::open_uffd(all) {
        Ok(_) => all,
        Err(UffdError::Api { .. }) => {
            sys::open_uffd(FeatureFlags::empty())?;
            FeatureFlags::empty()
        }
        Err(e) => return Err(e),
    };
    Ok(*OFFERED.get_or_init(|| Offered { enabled }))
}

/// Probes the kernel's userfaultfd support: opens a userfaultfd with the
/// features postcopy uses, then registers a one-page anonymous test mapping
/// for missing faults to see which range ioctls (`UFFDIO_COPY`,
/// `UFFDIO_ZEROPAGE`) it allows.
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
/// `vm.unprivileged_userfaultfd` is 0, and even a user-mode-only fd was
/// refused), [`UffdError::NotSupported`] (ENOSYS: no userfaultfd in this
/// kernel, or a seccomp filter), [`UffdError::Api`] when the handshake
/// fails, [`UffdError::Syscall`] for anything else.
pub fn probe() -> Result<Features, UffdError> {
    let offered = offered_features()?;
    let opened = sys::open_uffd(offered.enabled & FeatureFlags::THREAD_ID)?;
    let page = sys::host_page_size();
    let map = Mapping::anonymous(page)?;
    let ioctls = opened
        .uffd
        .register(map.as_ptr().cast(), page)
        .map_err(|e| UffdError::Syscall {
            op: "UFFDIO_REGISTER",
            source: std::io::Error::other(e.to_string()),
        })?;
    // Closing the fd unregisters the test page; `map` unmaps it.
    drop(opened.uffd);
    Ok(Features::from_flags(
        offered.enabled,
        ioctls.contains(IoctlFlags::COPY),
        ioctls.contains(IoctlFlags::ZEROPAGE),
        opened.user_mode_only,
    ))
}
