//! # qmig-wire
//!
//! Parsers and serializers for QEMU's live-migration stream, byte for byte:
//! the container (QEVM header, configuration, sections, footers, EOF, vmdesc
//! trailer), commands (including PACKAGED nested streams), return-path
//! messages with the received-bitmap trailer, and the RAM section records.
//!
//! Device (non-RAM) sections are kept as opaque byte spans; [`vmstate`]
//! decodes them field by field from the vmdesc. Serializing the items of a
//! stream in order gives back its exact bytes.
//!
//! ```
//! use qmig_wire::{Item, SliceReader};
//! # let mut stream = Vec::new();
//! # qmig_wire::header::write_header(&mut stream);
//! # qmig_wire::header::Configuration { machine: "pc", subsections: vec![] }.write(&mut stream);
//! # stream.push(0); // EOF
//! let mut out = Vec::new();
//! for item in SliceReader::new(&stream) {
//!     let (_offset, item) = item?;
//!     item.write(&mut out);
//! }
//! assert_eq!(out, stream);
//! # Ok::<(), qmig_wire::WireError>(())
//! ```
#![warn(missing_docs)]

pub mod bitmap;
pub mod command;
pub mod connections;
pub mod decoder;
pub mod devices;
mod error;
pub mod header;
pub mod iterative;
pub mod mapped_ram;
pub mod multifd;
mod names;
pub mod ram;
pub mod reader;
pub mod recovery;
pub mod return_path;
pub mod section;
pub mod target_page;
pub mod vmdesc;
pub mod vmstate;

pub use bitmap::PageBitmap;
pub use command::{Advise, Command, Discard, DiscardRange};
pub use decoder::{Decoder, Item, Limits, Phase, SectionInfo, Step, StreamStart};
pub use error::WireError;
pub use header::{ConfigBody, ConfigSubsection, Configuration};
pub use mapped_ram::{MappedRam, MappedRamHeader};
pub use ram::{MemBlock, RamBody, RamContext, RamKind, RamRecord};
pub use reader::{decode_rp_message, ReadItem, ReturnPathReader, SliceReader, StreamReader};
pub use return_path::RpMessage;
pub use section::{SectionHeader, SectionIdent, SectionKind};
pub use vmstate::{DeviceDesc, DeviceState, VmDesc};

/// Parses a whole return-path capture into messages.
///
/// # Errors
/// The first malformed or truncated message, with its offset.
pub fn parse_return_path(buf: &[u8]) -> Result<Vec<(u64, RpMessage<'_>)>, WireError> {
    ReturnPathReader::new(buf).collect()
}
