//! The crate's error type.

/// Everything that can go wrong in `qmig-ram-src`.
#[derive(Debug, thiserror::Error)]
pub enum RamSrcError {
    /// The block layout given to [`crate::RamSrc::new`] is unusable.
    #[error("bad RAM layout: {why}")]
    Layout {
        /// What rule the layout breaks.
        why: String,
    },
    /// The configuration is unusable (page size, cache size, compress level...).
    #[error("bad configuration: {why}")]
    Config {
        /// What rule the configuration breaks.
        why: String,
    },
    /// A dirty page was reported for a block index that does not exist.
    #[error("block index {index} out of range ({blocks} blocks)")]
    NoSuchBlock {
        /// The index given.
        index: usize,
        /// How many blocks there are.
        blocks: usize,
    },
    /// A dirty range was reported outside its block.
    #[error(
        "dirty range {offset:#x}+{len:#x} outside block \"{block}\" of {used_length:#x} bytes"
    )]
    OutOfBlock {
        /// Block name.
        block: String,
        /// Byte offset given.
        offset: u64,
        /// Byte length given.
        len: u64,
        /// The block's length.
        used_length: u64,
    },
    /// The guest memory handed to the machine does not match the layout.
    #[error("guest memory for block \"{block}\" holds {have:#x} bytes, layout says {want:#x}")]
    MemoryMismatch {
        /// Block name.
        block: String,
        /// Bytes the memory provides.
        have: u64,
        /// Bytes the layout announces.
        want: u64,
    },
    /// A method was called in a state where it is not allowed.
    #[error("{call} called in state {}", state.name())]
    State {
        /// The method.
        call: &'static str,
        /// The machine's state.
        state: crate::State,
    },
    /// A [`crate::Source`] method was called in a phase where it is not allowed.
    #[error("{call} called in phase {phase:?}")]
    Phase {
        /// The method.
        call: &'static str,
        /// The source's phase.
        phase: crate::SourcePhase,
    },
    /// zlib failed to compress a page (it never should).
    #[error("zlib compression of page {offset:#x} of \"{block}\" failed: {why}")]
    Compress {
        /// Block name.
        block: String,
        /// Page offset in the block.
        offset: u64,
        /// zlib's complaint.
        why: String,
    },
    /// The template stream cannot serve as a container.
    #[error("template stream: {why}")]
    Template {
        /// What is wrong with it.
        why: String,
    },
    /// A page request from the return path breaks one of QEMU's rules
    /// (`migrate_handle_rp_req_pages`, `ram_save_queue_pages`): the
    /// migration fails.
    #[error("return path: {msg} for {len:#x} bytes at {start:#x} of {}: {rule}",
            block.as_deref().map_or("no block".to_string(), |b| format!("block \"{b}\"")))]
    PageRequest {
        /// REQ_PAGES or REQ_PAGES_ID.
        msg: &'static str,
        /// The block it names or continues (`None`: no block yet).
        block: Option<String>,
        /// Requested start, in bytes from the block's start.
        start: u64,
        /// Requested length in bytes.
        len: u64,
        /// The rule broken.
        rule: RequestRule,
    },
    /// A return-path message the source cannot take (postcopy recovery's
    /// RECV_BITMAP and RESUME_ACK, unknown types).
    #[error("return path: unexpected {name} message (type {msg_type})")]
    UnexpectedMessage {
        /// Message name.
        name: &'static str,
        /// Message type number.
        msg_type: u16,
    },
    /// The template stream does not parse, or (through
    /// [`crate::RamSrc::handle_return_path_bytes`]) a return-path message
    /// breaks its framing, e.g. a RECV_BITMAP reply with a wrong end marker.
    #[error("template stream: {0}")]
    Wire(#[from] qmig_wire::WireError),
    /// The connection was lost before POSTCOPY_RUN was on its way (QEMU's
    /// `postcopy_pause` applies only once the destination may run the
    /// guest): the migration fails; the machine is now
    /// [`crate::State::Failed`].
    #[error("connection lost in state {} before POSTCOPY_RUN was sent: the migration fails (only a postcopy migration whose destination runs can pause)", state.name())]
    NotPausable {
        /// The state the machine was in.
        state: crate::State,
    },
    /// A postcopy recovery message breaks one of the recovery rules
    /// (wire-format §11; QEMU's `ram_dirty_bitmap_reload`,
    /// `migrate_handle_rp_resume_ack`): the migration fails.
    #[error("postcopy recovery: {rule}")]
    Recovery {
        /// The rule broken.
        rule: RecoveryRule,
    },
}

/// Why a recovery message was refused (see [`RamSrcError::Recovery`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryRule {
    /// A RECV_BITMAP reply names a block the source does not have.
    #[error("RECV_BITMAP reply for unknown block \"{block}\"")]
    UnknownBlock {
        /// The name in the reply.
        block: String,
    },
    /// A RECV_BITMAP reply's size is not `round_up(ceil(pages / 8), 8)`.
    #[error("RECV_BITMAP reply for \"{block}\" holds {size} bytes, {pages} pages need {expected}")]
    BitmapSize {
        /// Block name.
        block: String,
        /// Bitmap bytes received.
        size: u64,
        /// Target pages of the block.
        pages: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A RECV_BITMAP reply sets a bit past the block's last page.
    #[error("RECV_BITMAP reply for \"{block}\": {why}")]
    BitmapBits {
        /// Block name.
        block: String,
        /// What the wire layer said.
        why: String,
    },
    /// A second RECV_BITMAP reply for one block in one recovery.
    #[error("a second RECV_BITMAP reply for \"{block}\" in one recovery")]
    DuplicateBitmap {
        /// Block name.
        block: String,
    },
    /// A recovery message in a state where it cannot come (RECV_BITMAP
    /// outside recovery or after POSTCOPY_RESUME, RESUME_ACK before
    /// POSTCOPY_RESUME).
    #[error("{msg} in state {} (POSTCOPY_RESUME sent: {resume_sent})", state.name())]
    WrongState {
        /// The message or call.
        msg: &'static str,
        /// The machine's state.
        state: crate::State,
        /// Whether POSTCOPY_RESUME was written.
        resume_sent: bool,
    },
    /// RESUME_ACK carries a value other than 1.
    #[error("RESUME_ACK value {value}, expected 1")]
    ResumeAckValue {
        /// The value received.
        value: u32,
    },
    /// POSTCOPY_RESUME was asked for while some blocks' bitmaps are missing.
    #[error("POSTCOPY_RESUME before every RECV_BITMAP reply is in ({missing} missing)")]
    BitmapsPending {
        /// Blocks without a reply yet.
        missing: usize,
    },
}

/// Why a page request was refused (see [`RamSrcError::PageRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestRule {
    /// REQ_PAGES_ID names a block the source does not have.
    #[error("unknown block")]
    UnknownBlock,
    /// REQ_PAGES came before any REQ_PAGES_ID named a block.
    #[error("REQ_PAGES before any REQ_PAGES_ID named a block")]
    NoPreviousBlock,
    /// Start or length is not a multiple of the page size.
    #[error("start or length not aligned to {align:#x} bytes")]
    Unaligned {
        /// The alignment required.
        align: u64,
    },
    /// The range goes past the block's used length.
    #[error("range past the block's used length {used_length:#x}")]
    OutOfBlock {
        /// The block's used length.
        used_length: u64,
    },
}
