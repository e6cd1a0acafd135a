//! XBZRLE ("XOR-based zero run-length encoding") as used by QEMU's RAM migration stream,
//! byte-for-byte compatible with QEMU, plus QEMU's source-side page cache.
//!
//! An encoded page is a sequence of run pairs `zrun nzrun {zrun nzrun}`:
//!
//! * `zrun`: number of bytes unchanged since the previous version of the page (a skip);
//! * `nzrun`: number of changed bytes, followed by those bytes of the *new* page.
//!
//! Lengths are ULEB128 of at most two bytes ([`uleb128`]). Only the first skip may be
//! empty, a data run never is, a trailing skip is not sent, and runs are maximal, so the
//! encoding of a page pair is unique. An unchanged page encodes to nothing.
//!
//! * [`encode`]: fast encoder (SIMD compares where available), identical in output and
//!   overflow behaviour to QEMU's generic encoder and to the naive
//!   [`reference::encode`] oracle.
//! * [`decode`]: applies an encoded page onto the destination's page in one checked pass
//!   (undo log on error).
//! * [`PageCache`]: QEMU's direct-mapped, age-protected cache of previously sent pages.
//!
//! ```
//! use qmig_xbzrle::{decode, encode};
//!
//! let old = vec![0u8; 4096];
//! let mut new = old.clone();
//! new[200..204].copy_from_slice(b"qmig");
//! let mut out = vec![0u8; 4096]; // QEMU's limit: one page
//! let len = encode(&old, &new, &mut out).expect("small delta fits");
//! assert_eq!(&out[..len], b"\xc8\x01\x04qmig"); // skip 200 (2-byte ULEB), 4 literal bytes
//!
//! let mut page = old.clone();
//! decode(&out[..len], &mut page)?;
//! assert_eq!(page, new);
//! # Ok::<(), qmig_xbzrle::XbzrleError>(())
//! ```
#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
mod avx512;
mod cache;
mod decode;
mod encode;
mod error;
pub mod reference;
pub mod uleb128;

pub use cache::{InsertRefused, PageCache, SaveOutcome, CACHED_PAGE_LIFETIME};
pub use decode::{decode, decode_two_pass, validate};
pub use encode::{encode, encode_portable, variants};
pub use error::{Overflow, XbzrleError};
