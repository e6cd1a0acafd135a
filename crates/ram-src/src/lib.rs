//! # qmig-ram-src
//!
//! The source side of QEMU's RAM migration, as a sans-IO state machine:
//! [`RamSrc`] turns guest memory and a dirty log into exactly the RAM records
//! QEMU would send (MEM_SIZE, ZERO, PAGE, XBZRLE, COMPRESS_PAGE, EOS), with
//! QEMU's page order, block-name (CONTINUE) decisions, XBZRLE cache decisions
//! and counters. It writes section payloads into a caller's buffer and never
//! touches a socket or a clock.
//!
//! For postcopy, [`RamSrc::handle_return_path`] takes the destination's page
//! requests (checked as QEMU checks them) into a queue served before the
//! background scan, and [`RamSrc::postcopy_switchover`] writes the discards.
//! After POSTCOPY_RUN, a lost connection pauses the machine and a recovery
//! ([`RamSrc::poll_recovery_start`], the RECV_BITMAP replies,
//! [`RamSrc::poll_resume`], RESUME_ACK) resumes it; [`RamSrc::poll_preempt`]
//! writes requested pages for the postcopy-preempt channel (see [`State`]).
//!
//! [`Template`] supplies everything around the RAM records from a real
//! stream, precopy or postcopy (header, configuration, the `ram` section's
//! identity, SWITCHOVER_START, device sections, EOF, vmdesc), and [`Source`]
//! writes whole streams with it (see its docs for the postcopy order). By
//! hand, a precopy stream is:
//!
//! ```
//! use qmig_ram_src::{Config, Progress, RamSrc, SrcBlock, Template};
//! use qmig_wire::SectionKind;
//! # let template_bytes = qmig_ram_src::template::tests_support::tiny_template();
//! let t = Template::parse(&template_bytes)?;
//! let blocks = SrcBlock::sequential([("pc.ram", 4096 * 4)]);
//! let mem = vec![vec![1u8; 4096 * 4]];
//! let mut src = RamSrc::new(blocks, Config::default())?;
//! let mut out = Vec::new();
//! t.write_prefix(&mut out);
//! t.begin_section(SectionKind::Start, &mut out);
//! src.poll_setup(&mut out)?;
//! t.end_section(&mut out);
//! loop {
//!     t.begin_section(SectionKind::Part, &mut out);
//!     let p = src.poll_iterate(&mem, 1 << 20, &mut out)?;
//!     t.end_section(&mut out);
//!     if p == Progress::Clean { break; }
//! }
//! t.write_switchover(&mut out);
//! t.begin_section(SectionKind::End, &mut out);
//! src.poll_complete(&mem, &mut out)?;
//! t.end_section(&mut out);
//! t.write_tail(&mut out);
//! assert!(qmig_wire::SliceReader::new(&out).all(|i| i.is_ok()));
//! # Ok::<(), qmig_ram_src::RamSrcError>(())
//! ```
#![warn(missing_docs)]

mod compress;
pub mod convert;
mod error;
pub mod mapped;
pub mod multifd;
mod source;
mod src;
pub mod template;
mod zero;

pub use compress::PageCompressor;
pub use error::{RamSrcError, RecoveryRule, RequestRule};
pub use source::{ping, Source, SourcePhase};
pub use src::{
    canonicalize_host_pages, dirty_runs, Channel, Config, Counters, GuestRam, PageRequest,
    Progress, RamSrc, SrcBlock, State, DEFAULT_PAGE_SIZE, DEFAULT_XBZRLE_CACHE_SIZE,
    MAX_DISCARDS_PER_COMMAND, SCAN_FACTOR,
};
pub use template::Template;
pub use zero::is_zero;
