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
    /// The template stream does not parse.
    #[error("template stream: {0}")]
    Wire(#[from] qmig_wire::WireError),
}
