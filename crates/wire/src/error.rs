//! The crate's one error type, and the internal nom error that carries it.
//!
//! Every variant names the absolute byte offset (from the start of the stream
//! being parsed) where the broken rule was detected, so a user can go straight
//! to the offending bytes with a hex dump.

use nom::error::{ErrorKind, ParseError};

/// An error found while parsing or reading a migration stream.
///
/// `offset` is always an absolute position in the stream (for nested
/// `PACKAGED` contents too), pointing at the field that broke the rule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended in the middle of an item.
    #[error("offset {offset}: stream truncated inside {what} (input ends at {end})")]
    Truncated {
        /// Where the unfinished item starts.
        offset: u64,
        /// Where the input ends.
        end: u64,
        /// What was being read.
        what: &'static str,
    },
    /// The stream does not start with `QEVM`.
    #[error("offset {offset}: bad magic {found:#010x}, expected 0x5145564d (\"QEVM\")")]
    BadMagic {
        /// Offset of the magic.
        offset: u64,
        /// The value read instead.
        found: u32,
    },
    /// The stream version is not 3.
    #[error("offset {offset}: unsupported stream version {found}, only version 3 is valid")]
    BadVersion {
        /// Offset of the version field.
        offset: u64,
        /// The version read.
        found: u32,
    },
    /// A section type byte that is not a known section type.
    #[error("offset {offset}: unknown section type {byte:#04x}")]
    UnknownSectionType {
        /// Offset of the type byte.
        offset: u64,
        /// The byte read.
        byte: u8,
    },
    /// A section footer whose id differs from the section it closes.
    #[error("offset {offset}: section footer names id {found}, but section {expected} is open")]
    FooterMismatch {
        /// Offset of the footer.
        offset: u64,
        /// The open section's id.
        expected: u32,
        /// The id in the footer.
        found: u32,
    },
    /// A section footer byte was expected but something else was found.
    #[error("offset {offset}: expected a section footer (0x7e) for section {section_id}, found {byte:#04x}")]
    MissingFooter {
        /// Offset where the footer should be.
        offset: u64,
        /// The section that should be closed.
        section_id: u32,
        /// The byte read instead.
        byte: u8,
    },
    /// PART or END for a section id that no START introduced.
    #[error("offset {offset}: section {section_id} continued but never started")]
    SectionNotStarted {
        /// Offset of the section header.
        offset: u64,
        /// The unknown id.
        section_id: u32,
    },
    /// A counted string (section idstr, block name, subsection name) that is empty or not printable ASCII.
    #[error("offset {offset}: invalid {what}: {why}")]
    BadName {
        /// Offset of the length byte.
        offset: u64,
        /// What kind of name.
        what: &'static str,
        /// Why it is rejected.
        why: &'static str,
    },
    /// A RAM record with CONTINUE before any block was named.
    #[error("offset {offset}: RAM record uses CONTINUE but no block was named before")]
    ContinueWithoutBlock {
        /// Offset of the record header.
        offset: u64,
    },
    /// A RAM record header with a flag combination no QEMU sends.
    #[error("offset {offset}: invalid RAM record flags {flags:#x}")]
    BadRamFlags {
        /// Offset of the record header.
        offset: u64,
        /// The flag bits (below the target page size).
        flags: u64,
    },
    /// XBZRLE record whose header byte is not 1.
    #[error("offset {offset}: XBZRLE header byte is {found:#04x}, must be 0x01")]
    XbzrleHeader {
        /// Offset of the header byte.
        offset: u64,
        /// Byte read.
        found: u8,
    },
    /// XBZRLE encoded length larger than a page.
    #[error("offset {offset}: XBZRLE length {len} exceeds the page size {page_size}")]
    XbzrleLength {
        /// Offset of the length field.
        offset: u64,
        /// Length read.
        len: u32,
        /// Target page size.
        page_size: u32,
    },
    /// COMPRESS_PAGE length larger than zlib's compressBound of a page.
    #[error(
        "offset {offset}: COMPRESS_PAGE length {len} exceeds compressBound({page_size}) = {bound}"
    )]
    CompressLength {
        /// Offset of the length field.
        offset: u64,
        /// Length read.
        len: u32,
        /// Target page size.
        page_size: u32,
        /// compressBound(page_size).
        bound: u32,
    },
    /// A length beyond a configured cap (PACKAGED, device section, bitmap...).
    #[error("offset {offset}: {what} of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// Offset of the length field (or of the item).
        offset: u64,
        /// What is too large.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The cap in force.
        cap: u64,
    },
    /// MEM_SIZE block lengths that overflow or do not add up to the total.
    #[error("offset {offset}: MEM_SIZE block list: {why} (total {total:#x}, sum so far {sum:#x})")]
    MemSize {
        /// Offset of the offending block entry.
        offset: u64,
        /// Announced total.
        total: u64,
        /// Sum of lengths up to and including the offending block.
        sum: u64,
        /// What went wrong.
        why: &'static str,
    },
    /// A command whose payload does not have the length its type requires.
    #[error("offset {offset}: command {cmd} ({name}) has length {len}, {why}")]
    CommandLength {
        /// Offset of the command.
        offset: u64,
        /// Command number.
        cmd: u16,
        /// Command name.
        name: &'static str,
        /// Length field.
        len: u16,
        /// Rule broken.
        why: &'static str,
    },
    /// A POSTCOPY_RAM_DISCARD command that is malformed.
    #[error("offset {offset}: RAM_DISCARD: {why}")]
    Discard {
        /// Offset of the offending field.
        offset: u64,
        /// Rule broken.
        why: &'static str,
    },
    /// A return-path message whose length does not match its type.
    #[error("offset {offset}: return-path message {msg_type} ({name}) has length {len}, expected {expected}")]
    ReturnPathLength {
        /// Offset of the message.
        offset: u64,
        /// Message type.
        msg_type: u16,
        /// Its name.
        name: &'static str,
        /// Length field.
        len: u16,
        /// Expected length.
        expected: &'static str,
    },
    /// A received bitmap whose end marker is wrong.
    #[error(
        "offset {offset}: received bitmap end marker {found:#018x}, expected 0x0123456789abcdef"
    )]
    BitmapEndMarker {
        /// Offset of the marker.
        offset: u64,
        /// The value read.
        found: u64,
    },
    /// A received bitmap whose size is not a multiple of 8 bytes.
    #[error("offset {offset}: received bitmap size {size} is not a multiple of 8")]
    BitmapSize {
        /// Offset of the size field.
        offset: u64,
        /// Size read.
        size: u64,
    },
    /// A page bitmap in wire form (RECV_BITMAP, mapped-ram) of the wrong
    /// length for its block, or with bits set past the block's last page.
    #[error("offset {offset}: page bitmap: {why}")]
    Bitmap {
        /// Offset of the bitmap bytes.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A postcopy recovery message names a RAM block that the layout does
    /// not have (QEMU's `loadvm_handle_recv_bitmap` and
    /// `ram_dirty_bitmap_reload` look the name up and fail).
    #[error(
        "offset {offset}: {what} names RAM block \"{name}\", which the migration does not have"
    )]
    UnknownBlock {
        /// Offset of the message.
        offset: u64,
        /// Which message (e.g. `RECV_BITMAP command`).
        what: &'static str,
        /// The name it gave.
        name: String,
    },
    /// A RECV_BITMAP reply whose size is not the one the block's length
    /// gives (wire-format §11: `round_up(ceil(pages / 8), 8)`; QEMU's
    /// `ram_dirty_bitmap_reload` compares it with its own).
    #[error("offset {offset}: RECV_BITMAP reply for \"{block}\" has size {size}, its {pages} pages need {expected} bytes")]
    RecvBitmapSize {
        /// Offset of the be64 size field.
        offset: u64,
        /// The block.
        block: String,
        /// Size read.
        size: u64,
        /// Target pages of the block.
        pages: u64,
        /// Size the block needs.
        expected: u64,
    },
    /// A RESUME_ACK whose value is not 1 (QEMU's `migrate_handle_rp_resume_ack`
    /// fails the migration on any other value).
    #[error("offset {offset}: RESUME_ACK value {value}, QEMU accepts only 1")]
    ResumeAck {
        /// Offset of the message.
        offset: u64,
        /// Value read.
        value: u32,
    },
    /// A postcopy recovery connection breaks the order QEMU follows
    /// (wire-format §11: RECV_BITMAP commands, POSTCOPY_RESUME, then RAM).
    #[error("offset {offset}: postcopy recovery: {why}")]
    Recovery {
        /// Offset of the offending item.
        offset: u64,
        /// Rule broken.
        why: &'static str,
    },
    /// A configuration section that is malformed.
    #[error("offset {offset}: configuration: {why}")]
    Configuration {
        /// Offset of the offending field.
        offset: u64,
        /// Rule broken.
        why: &'static str,
    },
    /// The end of a device (non-RAM) section could not be found.
    #[error("offset {offset}: cannot delimit device section {section_id} ({idstr}): {why}")]
    DeviceSection {
        /// Offset of the section's payload.
        offset: u64,
        /// Section id.
        section_id: u32,
        /// Section idstr.
        idstr: String,
        /// What went wrong.
        why: &'static str,
    },
    /// The vmdesc JSON is not valid JSON, or not a description QEMU writes
    /// (`migration/savevm.c` / `vmstate.c` `vmsd_desc_field_*`), or beyond a cap.
    /// `offset` is relative to the start of the JSON (0 for rules about the
    /// parsed tree, whose place is named in `why`).
    #[error("offset {offset}: vmdesc: {why}")]
    Vmdesc {
        /// Offset in the JSON.
        offset: u64,
        /// Rule broken, with the path of the offending entry.
        why: String,
    },
    /// A device section payload disagrees with its vmdesc description: a
    /// subsection marker, name or version, a NULL-pointer marker, a
    /// capability length or a struct size.
    #[error("offset {offset}: device {device}: {path}: {why}")]
    VmStateMismatch {
        /// Absolute stream offset of the offending byte.
        offset: u64,
        /// Section idstr and instance, e.g. `cpu 0`.
        device: String,
        /// Path of the field or subsection inside the device.
        path: String,
        /// Rule broken.
        why: String,
    },
    /// A device section payload whose length is not the one its vmdesc
    /// description adds up to.
    #[error("offset {offset}: device {device}: payload is {found} bytes, its vmdesc description says {expected}")]
    VmStateLength {
        /// Absolute stream offset where the payload ends early or where the
        /// undescribed bytes start.
        offset: u64,
        /// Section idstr and instance.
        device: String,
        /// Length the description adds up to.
        expected: u64,
        /// Length of the payload given.
        found: u64,
    },
    /// A structural rule of the stream was broken (item out of place).
    #[error("offset {offset}: {why}")]
    Structure {
        /// Offset of the item.
        offset: u64,
        /// Rule broken.
        why: &'static str,
    },
    /// A feature this version of qmig does not handle.
    #[error("offset {offset}: unsupported: {what}")]
    Unsupported {
        /// Offset of the item.
        offset: u64,
        /// What is not supported.
        what: &'static str,
    },
    /// The target page size is invalid, unknown, or sources disagree on it.
    #[error("offset {offset}: target page size: {why}")]
    PageSize {
        /// Offset of the item that needed or announced it.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The bytes can be read in more than one consistent way; qmig refuses to
    /// choose.
    #[error("offset {offset}: ambiguous stream: {why}")]
    Ambiguous {
        /// Offset where the readings part.
        offset: u64,
        /// The readings.
        why: String,
    },
    /// A serializer was given something it cannot write faithfully (a
    /// length that does not fit its field, a name a reader would refuse,
    /// flags that disagree with the body...). Nothing was written.
    #[error("output offset {offset}: cannot write {what}: {why}")]
    Unwritable {
        /// Offset in the output buffer where the item would have started.
        offset: u64,
        /// What was being written.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A mapped-ram block header or file region breaks a rule of the layout
    /// (wire-format §14; QEMU's `parse_ramblock_mapped_ram`).
    #[error("offset {offset}: mapped-ram block \"{block}\": {why}")]
    MappedRam {
        /// Offset of the block entry or region part.
        offset: u64,
        /// The RAM block's idstr.
        block: String,
        /// Rule broken.
        why: String,
    },
    /// A multifd channel header or packet breaks a rule (wire-format
    /// multifd section; QEMU's `multifd_recv_initial_packet` and
    /// `multifd_recv_unfill_packet`).
    #[error("offset {offset}: multifd: {why}")]
    Multifd {
        /// Offset of the offending field.
        offset: u64,
        /// Rule broken.
        why: String,
    },
    /// Reading the underlying input failed.
    #[error("offset {offset}: I/O error: {source}")]
    Io {
        /// Stream offset reached.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

macro_rules! each_offset {
    ($self:expr, $o:ident => $body:expr) => {
        match $self {
            WireError::Truncated { offset: $o, .. }
            | WireError::BadMagic { offset: $o, .. }
            | WireError::BadVersion { offset: $o, .. }
            | WireError::UnknownSectionType { offset: $o, .. }
            | WireError::FooterMismatch { offset: $o, .. }
            | WireError::MissingFooter { offset: $o, .. }
            | WireError::SectionNotStarted { offset: $o, .. }
            | WireError::BadName { offset: $o, .. }
            | WireError::ContinueWithoutBlock { offset: $o }
            | WireError::BadRamFlags { offset: $o, .. }
            | WireError::XbzrleHeader { offset: $o, .. }
            | WireError::XbzrleLength { offset: $o, .. }
            | WireError::CompressLength { offset: $o, .. }
            | WireError::TooLarge { offset: $o, .. }
            | WireError::MemSize { offset: $o, .. }
            | WireError::CommandLength { offset: $o, .. }
            | WireError::Discard { offset: $o, .. }
            | WireError::ReturnPathLength { offset: $o, .. }
            | WireError::BitmapEndMarker { offset: $o, .. }
            | WireError::BitmapSize { offset: $o, .. }
            | WireError::Bitmap { offset: $o, .. }
            | WireError::UnknownBlock { offset: $o, .. }
            | WireError::RecvBitmapSize { offset: $o, .. }
            | WireError::ResumeAck { offset: $o, .. }
            | WireError::Recovery { offset: $o, .. }
            | WireError::Configuration { offset: $o, .. }
            | WireError::DeviceSection { offset: $o, .. }
            | WireError::Vmdesc { offset: $o, .. }
            | WireError::VmStateMismatch { offset: $o, .. }
            | WireError::VmStateLength { offset: $o, .. }
            | WireError::Structure { offset: $o, .. }
            | WireError::Unsupported { offset: $o, .. }
            | WireError::PageSize { offset: $o, .. }
            | WireError::Ambiguous { offset: $o, .. }
            | WireError::Unwritable { offset: $o, .. }
            | WireError::MappedRam { offset: $o, .. }
            | WireError::Multifd { offset: $o, .. }
            | WireError::Io { offset: $o, .. } => $body,
        }
    };
}

impl WireError {
    /// The absolute stream offset this error points at.
    pub fn offset(&self) -> u64 {
        each_offset!(self, o => *o)
    }

    /// Whether this error only says the input ended early (more bytes could fix it).
    pub fn is_truncation(&self) -> bool {
        matches!(self, WireError::Truncated { .. })
    }

    /// Shifts the offset by `base` (used when an error found in a sub-slice is
    /// reported against the whole stream).
    pub(crate) fn shifted(mut self, base: u64) -> Self {
        each_offset!(&mut self, o => *o += base);
        self
    }
}

/// Internal nom error: the domain error plus how much input remained where it
/// was raised, so the public API can turn it into an absolute offset.
#[derive(Debug)]
pub(crate) struct PErr {
    /// Remaining input length at the failure point.
    pub remaining: usize,
    /// The error, with `offset` still to be filled in (0).
    pub err: WireError,
}

impl PErr {
    /// A domain error raised at `at` (the remaining input at the offending field).
    pub(crate) fn at(at: &[u8], err: WireError) -> nom::Err<PErr> {
        nom::Err::Failure(PErr {
            remaining: at.len(),
            err,
        })
    }
}

impl<'a> ParseError<&'a [u8]> for PErr {
    fn from_error_kind(input: &'a [u8], kind: ErrorKind) -> Self {
        PErr {
            remaining: input.len(),
            err: WireError::Structure {
                offset: 0,
                why: match kind {
                    ErrorKind::Tag => "unexpected tag",
                    ErrorKind::Verify => "verification failed",
                    _ => "malformed input",
                },
            },
        }
    }

    fn append(_: &'a [u8], _: ErrorKind, other: Self) -> Self {
        other
    }
}

/// Result type of the internal nom parsers.
pub(crate) type PResult<'a, T> = nom::IResult<&'a [u8], T, PErr>;

/// Raises a domain error at `at` inside a parser.
macro_rules! fail {
    ($at:expr, $variant:ident { $($field:ident : $val:expr),* $(,)? }) => {
        return Err($crate::error::PErr::at(
            $at,
            $crate::error::WireError::$variant { offset: 0, $($field: $val),* },
        ))
    };
}
pub(crate) use fail;

/// Maps an internal parser result on `buf` (which starts at absolute offset
/// `base`) to the public form: the value and the bytes it took, or an error
/// with an absolute offset (truncation included).
pub(crate) fn finish<T>(
    buf: &[u8],
    base: u64,
    what: &'static str,
    r: PResult<'_, T>,
) -> Result<(T, usize), WireError> {
    match r {
        Ok((rest, v)) => Ok((v, buf.len() - rest.len())),
        Err(nom::Err::Incomplete(_)) => Err(WireError::Truncated {
            offset: base,
            end: base + buf.len() as u64,
            what,
        }),
        Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => {
            let rel = (buf.len() - e.remaining.min(buf.len())) as u64;
            Err(e.err.shifted(base + rel))
        }
    }
}
