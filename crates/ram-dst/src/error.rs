//! The crate's one error type.

use crate::dst::PostcopyState;

/// Everything [`RamDst`](crate::RamDst) can refuse.
///
/// Every variant carries `offset`: the absolute stream offset of the item (RAM
/// record or command) that broke the rule, so the bytes can be found with a hex
/// dump. When an error is returned, the item was not applied at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RamDstError {
    /// A record or command names a block the destination does not have.
    #[error("offset {offset}: unknown RAM block \"{name}\"")]
    UnknownBlock {
        /// Stream offset of the item.
        offset: u64,
        /// The block name from the stream.
        name: String,
    },
    /// MEM_SIZE announces a length the local block cannot take.
    #[error(
        "offset {offset}: RAM block \"{name}\" is {remote:#x} bytes in the stream but {local:#x} here \
         (max {max:#x}, {})",
        if *resizable { "resizable" } else { "not resizable" }
    )]
    LengthMismatch {
        /// Stream offset of the MEM_SIZE record.
        offset: u64,
        /// Block name.
        name: String,
        /// Local used length.
        local: u64,
        /// Length announced by the source.
        remote: u64,
        /// Local maximum length.
        max: u64,
        /// Whether the local block may be resized.
        resizable: bool,
    },
    /// With postcopy advised, a block's page size differs between the two sides.
    #[error("offset {offset}: RAM block \"{name}\" has page size {remote:#x} in the stream but {local:#x} here")]
    PageSizeMismatch {
        /// Stream offset of the record or command.
        offset: u64,
        /// Block name (or a description of what was compared).
        name: String,
        /// Local page size.
        local: u64,
        /// Page size from the stream.
        remote: u64,
    },
    /// A size field or a layout value that cannot be right.
    #[error("offset {offset}: bad size: {why}")]
    BadSize {
        /// Stream offset of the item.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A page record before any block was named (CONTINUE with no previous block).
    #[error("offset {offset}: page record continues a block, but no block was named before")]
    NoCurrentBlock {
        /// Stream offset of the record.
        offset: u64,
    },
    /// A page offset that is unaligned or whose page does not lie inside the block.
    #[error("offset {offset}: page at {page_offset:#x} is unaligned or outside RAM block \"{block}\" of {used_length:#x} bytes")]
    PageOutOfBlock {
        /// Stream offset of the record.
        offset: u64,
        /// Block name.
        block: String,
        /// Page offset from the record.
        page_offset: u64,
        /// The block's used length.
        used_length: u64,
    },
    /// An XBZRLE page that does not decode.
    #[error("offset {offset}: XBZRLE page at {page_offset:#x} of \"{block}\": {source}")]
    Xbzrle {
        /// Stream offset of the record.
        offset: u64,
        /// Block name.
        block: String,
        /// Page offset.
        page_offset: u64,
        /// The decoder's complaint.
        source: qmig_xbzrle::XbzrleError,
    },
    /// A COMPRESS_PAGE record that does not inflate to exactly one page.
    #[error("offset {offset}: COMPRESS_PAGE at {page_offset:#x} of \"{block}\": {why}")]
    Compressed {
        /// Stream offset of the record.
        offset: u64,
        /// Block name.
        block: String,
        /// Page offset.
        page_offset: u64,
        /// What went wrong.
        why: String,
    },
    /// A POSTCOPY_RAM_DISCARD range that is unaligned or outside its block.
    #[error("offset {offset}: discard range {start:#x}+{len:#x} of \"{block}\": {why}")]
    Discard {
        /// Stream offset of the command.
        offset: u64,
        /// Block name.
        block: String,
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A command not allowed in the current postcopy state.
    #[error("offset {offset}: {event} is not allowed in postcopy state {state}")]
    IllegalTransition {
        /// Stream offset of the command or record.
        offset: u64,
        /// State at that point.
        state: PostcopyState,
        /// What arrived.
        event: &'static str,
    },
    /// The connection was lost before the migration could pause (QEMU
    /// pauses only after POSTCOPY_RUN: `postcopy_pause_incoming`).
    #[error(
        "offset {offset}: the connection was lost in postcopy state {state}: only a migration \
         past POSTCOPY_RUN can pause and recover, so it failed"
    )]
    ConnectionLost {
        /// Stream offset reached.
        offset: u64,
        /// State at that point.
        state: PostcopyState,
    },
    /// A record kind not allowed once the destination listens for postcopy pages.
    #[error(
        "offset {offset}: {kind} record in postcopy mode (only ZERO, PAGE and EOS are allowed; QEMU: ram_load_postcopy)"
    )]
    NotInPostcopy {
        /// Stream offset of the record.
        offset: u64,
        /// Record kind name.
        kind: &'static str,
    },
    /// In postcopy, the target pages of a host page did not arrive in order.
    #[error("offset {offset}: postcopy target page {page_offset:#x} of \"{block}\" out of order ({why})")]
    PostcopyOrder {
        /// Stream offset of the record.
        offset: u64,
        /// Block name.
        block: String,
        /// Offset of the target page.
        page_offset: u64,
        /// What was expected.
        why: String,
    },
    /// Something this destination does not implement (RDMA hooks, unknown commands...).
    #[error("offset {offset}: unsupported: {what}")]
    Unsupported {
        /// Stream offset of the item.
        offset: u64,
        /// What.
        what: String,
    },
    /// The guest memory backend failed.
    #[error("offset {offset}: guest memory: {source}")]
    Memory {
        /// Stream offset of the item being applied.
        offset: u64,
        /// The backend's error.
        source: std::io::Error,
    },
    /// A received bitmap (return path) of the wrong size or with bits past the end.
    #[error("offset {offset}: received bitmap: {why}")]
    Bitmap {
        /// Offset in the parsed buffer.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A wire-level error while parsing a return-path message.
    #[error(transparent)]
    Wire(#[from] qmig_wire::WireError),
    /// Something QEMU's loader refuses, named by the QEMU function whose
    /// rule it is (e.g. `loadvm_handle_recv_bitmap`).
    #[error("offset {offset}: {why} (QEMU: {function})")]
    QemuRule {
        /// Stream offset of the item.
        offset: u64,
        /// The QEMU function that makes the check.
        function: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A page fault reported by the host ([`RamDst::handle_page_fault`](crate::RamDst::handle_page_fault))
    /// or a placement it reports ([`RamDst::handle_placed`](crate::RamDst::handle_placed))
    /// that the state machine cannot accept.
    #[error(
        "offset {offset}: page fault or placement at {page_offset:#x} of block {block}: {why}"
    )]
    BadFault {
        /// Stream offset applied so far when the fault came.
        offset: u64,
        /// Block index given by the host.
        block: usize,
        /// Offset in the block given by the host.
        page_offset: u64,
        /// The rule broken.
        why: String,
    },
    /// The host reported that a placement failed
    /// ([`RamDst::handle_place_failed`](crate::RamDst::handle_place_failed)).
    #[error(
        "offset {offset}: placing {len:#x} bytes at {page_offset:#x} of \"{block}\" failed: {why}"
    )]
    PlacementFailed {
        /// Stream offset applied so far when the failure was reported.
        offset: u64,
        /// Block name.
        block: String,
        /// Offset in the block, bytes.
        page_offset: u64,
        /// Length, bytes.
        len: u64,
        /// The host's reason (OS error).
        why: String,
    },
    /// Input after an earlier error: the state machine stopped at `offset`.
    #[error("offset {offset}: the destination stopped after an earlier error")]
    Stopped {
        /// Offset up to which the stream was applied.
        offset: u64,
    },
}

impl RamDstError {
    /// The stream offset the error names.
    pub fn offset(&self) -> u64 {
        match self {
            RamDstError::UnknownBlock { offset, .. }
            | RamDstError::LengthMismatch { offset, .. }
            | RamDstError::PageSizeMismatch { offset, .. }
            | RamDstError::BadSize { offset, .. }
            | RamDstError::NoCurrentBlock { offset }
            | RamDstError::PageOutOfBlock { offset, .. }
            | RamDstError::Xbzrle { offset, .. }
            | RamDstError::Compressed { offset, .. }
            | RamDstError::Discard { offset, .. }
            | RamDstError::IllegalTransition { offset, .. }
            | RamDstError::ConnectionLost { offset, .. }
            | RamDstError::NotInPostcopy { offset, .. }
            | RamDstError::PostcopyOrder { offset, .. }
            | RamDstError::Unsupported { offset, .. }
            | RamDstError::Memory { offset, .. }
            | RamDstError::Bitmap { offset, .. }
            | RamDstError::QemuRule { offset, .. }
            | RamDstError::BadFault { offset, .. }
            | RamDstError::PlacementFailed { offset, .. }
            | RamDstError::Stopped { offset } => *offset,
            RamDstError::Wire(e) => e.offset(),
        }
    }
}
