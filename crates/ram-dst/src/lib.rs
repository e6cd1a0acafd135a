//! # qmig-ram-dst
//!
//! The destination side of QEMU's RAM migration, as a sans-IO state machine:
//! [`RamDst`] takes the items of a migration stream (from `qmig-wire`) and
//! applies the RAM records (ZERO, PAGE, XBZRLE, COMPRESS_PAGE) to a
//! [`GuestMemory`], checking the announced block layout (MEM_SIZE) against the
//! local one, keeping a received bitmap per block, and following the postcopy
//! commands (ADVISE → DISCARD → LISTEN → RUN → END). What it needs from the
//! outside world comes out split by kind, as in quinn-proto:
//! return-path bytes (PONG, REQ_PAGES / REQ_PAGES_ID, SHUT) from
//! [`RamDst::poll_transmit`], memory placements ([`Place`]: host page, zero
//! page, discard) from [`RamDst::poll_placement`], and notifications
//! ([`Event`]: return path opened, postcopy state, non-zero fill, resize)
//! from [`RamDst::poll_event`]. The host feeds back page faults
//! ([`RamDst::handle_page_fault`]), placement results
//! ([`RamDst::handle_placed`], [`RamDst::handle_place_failed`]) and the end
//! of its input ([`RamDst::handle_end_of_input`], [`RamDst::handle_failure`]).
//! See [`RamDst`] for the call order and the state diagram.
//!
//! Memories: [`VecMemory`] (tests, benchmarks), [`MmapMemory`] (sparse
//! image files mapped shared; the only `unsafe` code in the crate) and
//! [`FileMemory`] (sparse image files written with combined `pwrite`s; the
//! fastest for replaying a stream from a file).
//!
//! Multifd: [`multifd::ChannelDecoder`] inflates a channel's packets (one
//! zlib or zstd stream per channel) and [`RamDst::apply_multifd`] applies
//! them; [`multifd::SyncPairing`] is the SYNC / MULTIFD_FLUSH pairing rule.
//!
//! Every check that keeps a hostile stream from writing outside a block is
//! done before memory is touched; every error names the stream offset.
//!
//! ```
//! use qmig_ram_dst::{Config, Event, RamDst, VecMemory};
//! use qmig_wire::{Command, Item, RpMessage};
//!
//! let mut dst = RamDst::new(Config::default(), VecMemory::new())?;
//! dst.handle_item(95, 5, &Item::Command(Command::OpenReturnPath))?;
//! assert_eq!(dst.poll_event(), Some(Event::OpenReturnPath));
//! dst.handle_item(100, 9, &Item::Command(Command::Ping(7)))?;
//! assert_eq!(dst.applied_up_to(), 109);
//! dst.handle_end_of_input()?;
//! let (mut rp, mut want) = (Vec::new(), Vec::new());
//! assert!(dst.poll_transmit(&mut rp));
//! RpMessage::Pong(7).write(&mut want)?;
//! RpMessage::Shut(0).write(&mut want)?;
//! assert_eq!(rp, want);
//! # Ok::<(), qmig_ram_dst::RamDstError>(())
//! ```
#![warn(missing_docs)]

mod bitmap;
mod dst;
mod error;
mod file;
mod memory;
mod mmap;
pub mod multifd;
pub mod multifd_offline;
pub mod testing;

pub use bitmap::{parse_recv_bitmap_reply, write_recv_bitmap_reply};
pub use dst::{
    machine_qemu_version, BlockState, Config, Event, FaultOutcome, Layout, Leniency, LocalBlock,
    Place, Placement, PostcopyState, RamDst, Stats, MAX_ADOPTED_BLOCKS, MAX_ADOPTED_PAGES,
    MAX_PAGE_SIZE, TARGET_PAGE_BITS,
};
pub use error::RamDstError;
pub use file::FileMemory;
pub use memory::{GuestMemory, VecMemory};
pub use mmap::{ImageFile, MappedInput, MmapMemory};
pub use qmig_wire::bitmap::PageBitmap;

#[cfg(test)]
mod tests;
