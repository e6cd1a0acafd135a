//! The crate's error type and the encoder's overflow outcome.

/// Everything that can go wrong in this crate: a malformed encoded page given to
/// [`decode`](crate::decode) / [`validate`](crate::validate), or an invalid
/// [`PageCache`](crate::PageCache) geometry.
///
/// Every decode variant names `position`, the byte offset in the encoded input where the
/// offending length field starts, and the rule of the XBZRLE format it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XbzrleError {
    /// The encoded input is longer than a page. QEMU's destination refuses such a
    /// record before decoding (a valid encoding never exceeds the page size).
    #[error("encoded page is {len} bytes, longer than the {page_len}-byte page")]
    InputTooLong {
        /// Length of the encoded input.
        len: usize,
        /// Page size.
        page_len: usize,
    },
    /// A run length does not fit the 2-byte ULEB128 form: its second byte has the
    /// continuation bit (0x80) set.
    #[error("run length at input position {position} is longer than 2 ULEB128 bytes")]
    LengthTooLong {
        /// Input offset of the length's first byte.
        position: usize,
    },
    /// The input ends inside a run length, or where a data run's length must follow a
    /// skip run.
    #[error("input ends inside or before the run length at input position {position}")]
    TruncatedLength {
        /// Input offset where the length starts (may equal the input length).
        position: usize,
    },
    /// A skip (unchanged-bytes) run of length 0 that is not the first run.
    #[error("zero-length skip run at input position {position} (only the first may be 0)")]
    ZeroSkipRun {
        /// Input offset of the length.
        position: usize,
    },
    /// A data (changed-bytes) run of length 0.
    #[error("zero-length data run at input position {position}")]
    ZeroDataRun {
        /// Input offset of the length.
        position: usize,
    },
    /// A skip or data run extends past the end of the page.
    #[error(
        "run at input position {position} covers page bytes {page_offset}..{end}, past the \
         {page_len}-byte page"
    )]
    RunPastPageEnd {
        /// Input offset of the run's length.
        position: usize,
        /// Page offset where the run starts.
        page_offset: usize,
        /// Page offset where the run would end.
        end: usize,
        /// Page size.
        page_len: usize,
    },
    /// A data run announces more literal bytes than the input has left.
    #[error(
        "data run at input position {position} announces {len} bytes but only {available} remain"
    )]
    RunPastInputEnd {
        /// Input offset of the run's length.
        position: usize,
        /// Announced literal length.
        len: usize,
        /// Input bytes left after the length.
        available: usize,
    },
    /// Page size 0 given to [`PageCache`](crate::PageCache).
    #[error("page size must not be 0")]
    ZeroPageSize,
    /// Cache size smaller than one page.
    #[error("cache size {cache_size} is smaller than the {page_size}-byte page")]
    CacheSmallerThanPage {
        /// Requested cache size in bytes.
        cache_size: u64,
        /// Page size.
        page_size: usize,
    },
    /// `cache size / page size` (rounded down) is not a power of two.
    #[error("cache of {slots} pages: the number of pages must be a power of two")]
    SlotsNotPowerOfTwo {
        /// `cache size / page size`, rounded down.
        slots: u64,
    },
}

/// The encoder's "does not fit" outcome: the XBZRLE encoding would not fit the output
/// limit under QEMU's overflow rule, so the page must be sent in full (a normal `PAGE`
/// record) instead.
///
/// It is also returned for pages larger than 16 KiB whose delta needs a run longer than
/// 0x3FFF bytes, which the format cannot express (QEMU aborts on an assertion there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("XBZRLE encoding does not fit the output limit; send the full page")]
pub struct Overflow;
