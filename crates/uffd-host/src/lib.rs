//! # qmig-uffd-host
//!
//! The destination's OS edge for postcopy migration on Linux: guest RAM
//! stand-ins registered with userfaultfd, the placement calls that execute
//! `qmig-ram-dst`'s [`PlaceHostPage`/`PlaceZeroPage`] actions, and the fault
//! thread that turns missing faults into page requests and keeps blocktime.
//!
//! * [`probe`] — what the kernel offers ([`Features`]), or why userfaultfd
//!   cannot be used ([`UffdError::NotPermitted`], [`UffdError::NotSupported`]).
//! * [`Mapping`] — guest memory: anonymous, memfd or hugetlbfs
//!   ([`Backing`]), read and written through `&self` with volatile copies.
//! * [`Region`] — an existing [`Mapping`] registered for missing faults
//!   with its own userfaultfd (at POSTCOPY_LISTEN, after precopy filled it): [`Region::place_page`] (`UFFDIO_COPY`),
//!   [`Region::place_zero_page`] (`UFFDIO_ZEROPAGE`), [`Region::wake`]
//!   (`UFFDIO_WAKE`), [`Region::discard`] (`MADV_DONTNEED`). Placing a page
//!   that is already present (EEXIST) is not an error; its waiters are woken.
//! * [`FaultThread`] — from [`Region::spawn_fault_thread`]: polls the
//!   userfaultfd and a stop eventfd, sends one [`Fault`] per host page that
//!   is neither placed nor already asked for, and feeds [`Blocktime`].
//! * [`Blocktime`] — pure accounting over explicit timestamps: per thread,
//!   total, and the time all vCPUs were blocked at once.
//!
//! ```no_run
//! use std::sync::mpsc;
//! use qmig_uffd_host::{Blocktime, Region};
//!
//! let region = Region::new(16 * 4096)?;
//! let (tx, rx) = mpsc::channel();
//! let faults = region.spawn_fault_thread(0, Blocktime::new(1), tx)?;
//! // ... a vCPU touches region.as_ptr() + 0x3000 and blocks ...
//! let f = rx.recv().unwrap(); // ask the source for f.offset (REQ_PAGES)
//! region.place_page(f.offset as usize, &[0xAB; 4096])?; // the vCPU resumes
//! let stats = faults.stop()?;
//! # Ok::<(), qmig_uffd_host::UffdError>(())
//! ```
//!
//! ## The `userfaultfd` crate, and where raw `libc` remains
//! Opening, the API handshake, registration, `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE` and reading fault events go through the
//! `userfaultfd` crate. Raw `libc` is left where the crate cannot express
//! the call: the user-mode-only fallback for unprivileged processes (the
//! crate never tries the system call when `/dev/userfaultfd` exists but is
//! not accessible; see `sys.rs`), `poll(2)` on the userfaultfd and a stop
//! eventfd, and the mappings themselves (mmap, memfd_create, madvise).
//! Building the crate needs libclang (bindgen): `apt-get install libclang-dev`.
//!
//! [`PlaceHostPage`/`PlaceZeroPage`]: https://docs.rs/qmig-ram-dst
#![warn(missing_docs)]

mod blocktime;
mod fault;
mod guest;
mod probe;
mod region;
mod sys;

pub use blocktime::{latency_bucket, Blocktime, Latency, LATENCY_BUCKETS};
pub use fault::{Fault, FaultFn, FaultSink, FaultStats, FaultThread};
pub use guest::{AnonMemory, LiveMemory};
pub use probe::{probe, Features};
pub use region::{BlocktimeHandle, Placed, Region};
pub use sys::{Backing, Mapping, HUGE_PAGE_SIZE};

/// Errors of the userfaultfd edge.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd(2) was refused (EPERM).
    #[error(
        "userfaultfd is not permitted ({source}): run as root (CAP_SYS_PTRACE), \
         set vm.unprivileged_userfaultfd=1, or grant read/write access to /dev/userfaultfd"
    )]
    NotPermitted {
        /// The OS error.
        source: std::io::Error,
    },
    /// This kernel has no userfaultfd (ENOSYS).
    #[error(
        "userfaultfd is not available ({source}): the kernel lacks CONFIG_USERFAULTFD \
         or a seccomp filter blocks the system call"
    )]
    NotSupported {
        /// The OS error.
        source: std::io::Error,
    },
    /// The UFFDIO_API handshake failed (e.g. a requested feature is unknown).
    #[error("UFFDIO_API handshake asking for features {features:#x} failed: {source}")]
    Api {
        /// Feature bits asked for.
        features: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel does not offer something postcopy needs.
    #[error("userfaultfd lacks {what}")]
    MissingFeature {
        /// What is missing.
        what: &'static str,
    },
    /// A range given to a region method breaks a rule.
    #[error("range {offset:#x}+{len:#x}: {why}")]
    BadRange {
        /// Offset in the region.
        offset: usize,
        /// Length in bytes.
        len: usize,
        /// The rule broken.
        why: &'static str,
    },
    /// The region already has a fault thread.
    #[error("the region already has a running fault thread")]
    FaultThreadRunning,
    /// The fault thread panicked.
    #[error("the fault thread panicked")]
    FaultThreadPanicked,
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Syscall {
        /// The call.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
