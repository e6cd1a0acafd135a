//! RAM section records: `be64 offset|flags`, an optional counted block name,
//! then a body that depends on the flags.

use crate::error::{fail, PResult};
use crate::names::{counted_name, put_counted};
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u16, be_u32, be_u64, be_u8};

/// RAM record flag bits (below the target page size).
pub mod flags {
    /// Obsolete "full" flag; never sent by QEMU >= 1.x.
    pub const FULL: u64 = 0x01;
    /// A page whose bytes all equal the fill byte (0).
    pub const ZERO: u64 = 0x02;
    /// The block list (only in the RAM START section).
    pub const MEM_SIZE: u64 = 0x04;
    /// A raw page.
    pub const PAGE: u64 = 0x08;
    /// End of the section payload.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous page record: no name follows.
    pub const CONTINUE: u64 = 0x20;
    /// An XBZRLE-encoded page.
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook.
    pub const HOOK: u64 = 0x80;
    /// A zlib-compressed page (QEMU <= 9.0).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd channels flush marker.
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// Length of a mapped-ram block header ([`crate::mapped_ram::HEADER_LEN`]).
pub const MAPPED_RAM_HEADER_LEN: usize = crate::mapped_ram::HEADER_LEN;

/// Parsing context for RAM records: what the stream announced so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamContext {
    /// log2 of the target page size (12 on x86).
    pub page_bits: u32,
    /// POSTCOPY_ADVISE was seen; `Some(summary)` when it carried one.
    pub postcopy_advised: Option<Option<u64>>,
    /// The source's host page size (blocks with another page size carry it when postcopy is advised).
    pub host_page_size: u64,
    /// `x-ignore-shared` capability: each MEM_SIZE block carries its guest address.
    pub ignore_shared: bool,
    /// `mapped-ram` capability.
    pub mapped_ram: bool,
}

impl Default for RamContext {
    fn default() -> Self {
        RamContext {
            page_bits: 12,
            postcopy_advised: None,
            host_page_size: 4096,
            ignore_shared: false,
            mapped_ram: false,
        }
    }
}

impl RamContext {
    /// Target page size in bytes.
    pub fn page_size(&self) -> usize {
        1usize << self.page_bits
    }
}

/// zlib's `compressBound` for `n` input bytes.
pub fn compress_bound(n: u32) -> u32 {
    n + (n >> 12) + (n >> 14) + (n >> 25) + 13
}

/// One entry of the MEM_SIZE block list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemBlock<'a> {
    /// Block idstr, e.g. `pc.ram`.
    pub name: &'a str,
    /// Used length in bytes.
    pub used_length: u64,
    /// Page size, present when postcopy is advised and it differs from the host page size.
    pub page_size: Option<u64>,
    /// Guest address, present with `x-ignore-shared`.
    pub addr: Option<u64>,
}

/// Body of a RAM record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamBody<'a> {
    /// MEM_SIZE: the block list; the record's `offset` is the total.
    MemSize(Vec<MemBlock<'a>>),
    /// ZERO with its fill byte (QEMU >= 8.2 only accepts 0).
    Zero {
        /// Fill byte.
        fill: u8,
    },
    /// PAGE: one raw target page.
    Page(&'a [u8]),
    /// XBZRLE: encoded bytes (header byte 1 and be16 length implied).
    Xbzrle(&'a [u8]),
    /// COMPRESS_PAGE: a zlib stream (be32 length implied).
    Compressed(&'a [u8]),
    /// EOS: end of this section's RAM payload.
    Eos,
    /// HOOK: an RDMA control point, no payload on this channel.
    Hook,
    /// MULTIFD_FLUSH: multifd sync point, no payload.
    MultifdFlush,
}

/// The kind of a RAM record, for counting and listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RamKind {
    /// MEM_SIZE.
    MemSize,
    /// ZERO.
    Zero,
    /// PAGE.
    Page,
    /// XBZRLE.
    Xbzrle,
    /// COMPRESS_PAGE.
    Compressed,
    /// EOS.
    Eos,
    /// HOOK.
    Hook,
    /// MULTIFD_FLUSH.
    MultifdFlush,
}

impl RamKind {
    /// Upper-case wire name.
    pub fn name(self) -> &'static str {
        match self {
            RamKind::MemSize => "MEM_SIZE",
            RamKind::Zero => "ZERO",
            RamKind::Page => "PAGE",
            RamKind::Xbzrle => "XBZRLE",
            RamKind::Compressed => "COMPRESS_PAGE",
            RamKind::Eos => "EOS",
            RamKind::Hook => "HOOK",
            RamKind::MultifdFlush => "MULTIFD_FLUSH",
        }
    }
}

/// A RAM record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRecord<'a> {
    /// Page-aligned offset in the block (for MEM_SIZE: the total of all block lengths).
    pub offset: u64,
    /// Flag bits as sent (including CONTINUE).
    pub flags: u64,
    /// The block name when sent, `None` when the record continues the previous block
    /// (or carries no block at all: MEM_SIZE, EOS, HOOK, MULTIFD_FLUSH).
    pub block: Option<&'a str>,
    /// The body.
    pub body: RamBody<'a>,
}

impl<'a> RamRecord<'a> {
    /// The record's kind.
    pub fn kind(&self) -> RamKind {
        match self.body {
            RamBody::MemSize(_) => RamKind::MemSize,
            RamBody::Zero { .. } => RamKind::Zero,
            RamBody::Page(_) => RamKind::Page,
            RamBody::Xbzrle(_) => RamKind::Xbzrle,
            RamBody::Compressed(_) => RamKind::Compressed,
            RamBody::Eos => RamKind::Eos,
            RamBody::Hook => RamKind::Hook,
            RamBody::MultifdFlush => RamKind::MultifdFlush,
        }
    }

    /// Whether this record addresses a page (and so a block).
    pub fn is_page(&self) -> bool {
        self.flags & (flags::ZERO | flags::PAGE | flags::XBZRLE | flags::COMPRESS_PAGE) != 0
    }

    /// Length of the variable payload (page bytes, encoded bytes...).
    pub fn payload_len(&self) -> usize {
        match &self.body {
            RamBody::Page(d) | RamBody::Xbzrle(d) | RamBody::Compressed(d) => d.len(),
            RamBody::Zero { .. } => 1,
            _ => 0,
        }
    }

    /// A ZERO record.
    pub fn zero(offset: u64, block: Option<&'a str>) -> Self {
        Self::page_like(offset, flags::ZERO, block, RamBody::Zero { fill: 0 })
    }

    /// A PAGE record.
    pub fn page(offset: u64, block: Option<&'a str>, data: &'a [u8]) -> Self {
        Self::page_like(offset, flags::PAGE, block, RamBody::Page(data))
    }

    /// An XBZRLE record.
    pub fn xbzrle(offset: u64, block: Option<&'a str>, data: &'a [u8]) -> Self {
        Self::page_like(offset, flags::XBZRLE, block, RamBody::Xbzrle(data))
    }

    /// A COMPRESS_PAGE record.
    pub fn compressed(offset: u64, block: Option<&'a str>, data: &'a [u8]) -> Self {
        Self::page_like(
            offset,
            flags::COMPRESS_PAGE,
            block,
            RamBody::Compressed(data),
        )
    }

    /// An EOS record.
    pub fn eos() -> Self {
        RamRecord {
            offset: 0,
            flags: flags::EOS,
            block: None,
            body: RamBody::Eos,
        }
    }

    /// A MEM_SIZE record; the total is computed from the blocks.
    pub fn mem_size(blocks: Vec<MemBlock<'a>>) -> Self {
        let total = blocks.iter().map(|b| b.used_length).sum();
        RamRecord {
            offset: total,
            flags: flags::MEM_SIZE,
            block: None,
            body: RamBody::MemSize(blocks),
        }
    }

    fn page_like(offset: u64, f: u64, block: Option<&'a str>, body: RamBody<'a>) -> Self {
        RamRecord {
            offset,
            flags: if block.is_some() {
                f
            } else {
                f | flags::CONTINUE
            },
            block,
            body,
        }
    }

    /// Serializes the record after checking it is one a reader reads back
    /// the same: `flags` hold exactly the kind bit of the body (plus CONTINUE
    /// on page records without a block name, and only there), the offset
    /// does not overlap the flag bits (aligning it to the target page is the
    /// caller's part: the record does not know the page size), names are
    /// valid counted names, lengths fit their fields (XBZRLE be16, COMPRESS_PAGE
    /// be32), a PAGE is a power of two of 1 to 64 KiB, and MEM_SIZE lengths
    /// add up to its total. On error nothing is written.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] naming the rule.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let start = out.len();
        let bad = |why: String| crate::names::unwritable(start, "RAM record", why);
        let (kind, page) = match &self.body {
            RamBody::MemSize(_) => (flags::MEM_SIZE, false),
            RamBody::Zero { .. } => (flags::ZERO, true),
            RamBody::Page(_) => (flags::PAGE, true),
            RamBody::Xbzrle(_) => (flags::XBZRLE, true),
            RamBody::Compressed(_) => (flags::COMPRESS_PAGE, true),
            RamBody::Eos => (flags::EOS, false),
            RamBody::Hook => (flags::HOOK, false),
            RamBody::MultifdFlush => (flags::MULTIFD_FLUSH, false),
        };
        let want = if page && self.block.is_none() {
            kind | flags::CONTINUE
        } else {
            kind
        };
        if self.flags != want {
            return Err(bad(format!(
                "flags {:#x} disagree with the body and block name (expected {want:#x})",
                self.flags
            )));
        }
        if !page && self.block.is_some() {
            return Err(bad("only page records carry a block name".into()));
        }
        const FLAG_BITS: u64 = 0x3ff;
        if self.offset & FLAG_BITS != 0 {
            return Err(bad(format!(
                "offset {:#x} overlaps the flag bits",
                self.offset
            )));
        }
        match &self.body {
            RamBody::Page(d)
                if !(d.len().is_power_of_two() && (1024..=65536).contains(&d.len())) =>
            {
                return Err(bad(format!(
                    "PAGE of {} bytes (a target page is a power of two of 1 to 64 KiB)",
                    d.len()
                )))
            }
            RamBody::Xbzrle(d) if d.len() > u16::MAX as usize => {
                return Err(bad(format!(
                    "XBZRLE body of {} bytes does not fit its be16 length",
                    d.len()
                )))
            }
            RamBody::Compressed(d) if d.len() > u32::MAX as usize => {
                return Err(bad(format!(
                    "COMPRESS_PAGE body of {} bytes does not fit its be32 length",
                    d.len()
                )))
            }
            RamBody::MemSize(blocks) => {
                let sum = blocks
                    .iter()
                    .try_fold(0u64, |a, b| a.checked_add(b.used_length));
                if sum != Some(self.offset) {
                    return Err(bad(format!(
                        "MEM_SIZE total {:#x} is not the sum of its block lengths",
                        self.offset
                    )));
                }
            }
            _ => {}
        }
        let r = self.write_checked(out, start);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn write_checked(&self, out: &mut Vec<u8>, start: usize) -> Result<(), crate::WireError> {
        out.extend_from_slice(&(self.offset | self.flags).to_be_bytes());
        if let Some(b) = self.block {
            put_counted(out, b, "RAM block name", start)?;
        }
        match &self.body {
            RamBody::MemSize(blocks) => {
                for b in blocks {
                    put_counted(out, b.name, "MEM_SIZE block name", start)?;
                    out.extend_from_slice(&b.used_length.to_be_bytes());
                    if let Some(ps) = b.page_size {
                        out.extend_from_slice(&ps.to_be_bytes());
                    }
                    if let Some(a) = b.addr {
                        out.extend_from_slice(&a.to_be_bytes());
                    }
                }
            }
            RamBody::Zero { fill } => out.push(*fill),
            RamBody::Page(d) => out.extend_from_slice(d),
            RamBody::Xbzrle(d) => {
                out.push(1);
                out.extend_from_slice(&(d.len() as u16).to_be_bytes());
                out.extend_from_slice(d);
            }
            RamBody::Compressed(d) => {
                out.extend_from_slice(&(d.len() as u32).to_be_bytes());
                out.extend_from_slice(d);
            }
            RamBody::Eos | RamBody::Hook | RamBody::MultifdFlush => {}
        }
        Ok(())
    }
}

/// Parses one RAM record.
///
/// `have_block` says whether a block was named earlier on this channel (for
/// CONTINUE); the caller tracks the name itself.
pub(crate) fn parse_ram_record<'a>(
    i: &'a [u8],
    ctx: &RamContext,
    have_block: bool,
) -> PResult<'a, RamRecord<'a>> {
    let at = i;
    let (i, word) = be_u64(i)?;
    let page_mask = (1u64 << ctx.page_bits) - 1;
    let f = word & page_mask;
    let offset = word & !page_mask;
    let kind = f & !flags::CONTINUE;
    let page_flags = flags::ZERO | flags::PAGE | flags::XBZRLE | flags::COMPRESS_PAGE;
    // Exactly one kind bit, as QEMU's loader's switch requires.
    let body_kind = match kind {
        flags::ZERO | flags::PAGE | flags::XBZRLE | flags::COMPRESS_PAGE => kind,
        flags::MEM_SIZE | flags::EOS | flags::HOOK | flags::MULTIFD_FLUSH
            if f & flags::CONTINUE == 0 =>
        {
            kind
        }
        _ => fail!(at, BadRamFlags { flags: f }),
    };
    let (i, block) = if body_kind & page_flags != 0 {
        if f & flags::CONTINUE != 0 {
            if !have_block {
                fail!(at, ContinueWithoutBlock {});
            }
            (i, None)
        } else {
            let (i, name) = counted_name(i, "RAM block name")?;
            (i, Some(name))
        }
    } else {
        (i, None)
    };
    let ps = ctx.page_size();
    let (i, body) = match body_kind {
        flags::ZERO => {
            let (i, fill) = be_u8(i)?;
            (i, RamBody::Zero { fill })
        }
        flags::PAGE => {
            let (i, d) = take(ps)(i)?;
            (i, RamBody::Page(d))
        }
        flags::XBZRLE => {
            let hat = i;
            let (i, h) = be_u8(i)?;
            if h != 1 {
                fail!(hat, XbzrleHeader { found: h });
            }
            let lat = i;
            let (i, len) = be_u16(i)?;
            if len as usize > ps {
                fail!(
                    lat,
                    XbzrleLength {
                        len: len as u32,
                        page_size: ps as u32
                    }
                );
            }
            let (i, d) = take(len as usize)(i)?;
            (i, RamBody::Xbzrle(d))
        }
        flags::COMPRESS_PAGE => {
            let lat = i;
            let (i, len) = be_u32(i)?;
            let bound = compress_bound(ps as u32);
            if len > bound {
                fail!(
                    lat,
                    CompressLength {
                        len: len,
                        page_size: ps as u32,
                        bound: bound
                    }
                );
            }
            let (i, d) = take(len as usize)(i)?;
            (i, RamBody::Compressed(d))
        }
        flags::MEM_SIZE => {
            let (i, blocks) = parse_mem_size(i, offset, ctx)?;
            (i, RamBody::MemSize(blocks))
        }
        flags::EOS => (i, RamBody::Eos),
        flags::HOOK => (i, RamBody::Hook),
        _ => (i, RamBody::MultifdFlush),
    };
    Ok((
        i,
        RamRecord {
            offset,
            flags: f,
            block,
            body,
        },
    ))
}

/// Parses the MEM_SIZE block list that follows the header word.
///
/// Which optional fields each entry carries is derived from the stream: the
/// guest address when the configuration lists `x-ignore-shared`, the page
/// size when postcopy was advised and the block's page size differs from
/// the host's. The latter is not announced per block, so where the bytes
/// allow both readings (a value that could be a page size, see
/// [`page_size_candidate`]) both are tried, and the one whose block lengths
/// add up to the MEM_SIZE total, with valid names all the way, is taken.
fn parse_mem_size<'a>(i: &'a [u8], total: u64, ctx: &RamContext) -> PResult<'a, Vec<MemBlock<'a>>> {
    if ctx.mapped_ram {
        fail!(
            i,
            Unsupported {
                what: "a mapped-ram MEM_SIZE list as one record (its block regions lie between the entries: read it with the Decoder, which gives MappedRam items)"
            }
        );
    }
    let mut blocks = Vec::new();
    let mut budget = MEM_SIZE_ATTEMPTS;
    // First look for a reading followed by what QEMU sends after the list
    // (EOS, or a MULTIFD_FLUSH / HOOK before it); failing that, any reading
    // whose lengths add up.
    match mem_size_entries(i, total, 0, ctx, &mut blocks, &mut budget, true) {
        Ok((r, ())) => return Ok((r, blocks)),
        Err(nom::Err::Incomplete(n)) => return Err(nom::Err::Incomplete(n)),
        Err(_) => blocks.clear(),
    }
    let (r, ()) = mem_size_entries(i, total, 0, ctx, &mut blocks, &mut budget, false)?;
    Ok((r, blocks))
}

/// Whether `i` starts with a record QEMU sends right after the block list.
fn setup_trailer(i: &[u8]) -> PResult<'_, bool> {
    let (_, v) = be_u64(i)?;
    Ok((
        i,
        matches!(v, flags::EOS | flags::MULTIFD_FLUSH | flags::HOOK),
    ))
}

/// How many alternative readings of an ambiguous block list are tried
/// before giving up (each ambiguous entry doubles them).
const MEM_SIZE_ATTEMPTS: u32 = 1024;

/// Parses the entries after `sum` bytes of blocks, pushing them on `out`;
/// backtracks over the page-size ambiguity.
fn mem_size_entries<'a>(
    i: &'a [u8],
    total: u64,
    sum: u64,
    ctx: &RamContext,
    out: &mut Vec<MemBlock<'a>>,
    budget: &mut u32,
    strict: bool,
) -> PResult<'a, ()> {
    if sum == total {
        if strict && !setup_trailer(i)?.1 {
            fail!(
                i,
                MemSize {
                    total: total,
                    sum: sum,
                    why: "block list not followed by EOS"
                }
            );
        }
        return Ok((i, ()));
    }
    let at = i;
    let (r, name) = counted_name(i, "RAM block name")?;
    let (r, used_length) = be_u64(r)?;
    let sum = match sum.checked_add(used_length) {
        Some(s) => s,
        None => fail!(
            at,
            MemSize {
                total: total,
                sum: u64::MAX,
                why: "block lengths overflow u64"
            }
        ),
    };
    if sum > total {
        fail!(
            at,
            MemSize {
                total: total,
                sum: sum,
                why: "block lengths add up to more than the total"
            }
        );
    }
    let candidates: [Option<Option<u64>>; 2] = match ctx.postcopy_advised {
        None => [Some(None), None],
        Some(summary) => match page_size_candidate(r, summary, ctx.host_page_size)?.1 {
            Some(ps) => [Some(Some(ps)), Some(None)],
            None => [Some(None), None],
        },
    };
    let mut first_err = None;
    let mut incomplete = None;
    for page_size in candidates.into_iter().flatten() {
        if *budget == 0 {
            fail!(
                at,
                MemSize {
                    total: total,
                    sum: sum,
                    why: "block list too ambiguous to read (page-size fields)"
                }
            );
        }
        *budget -= 1;
        let r = if page_size.is_some() { &r[8..] } else { r };
        let (r, addr) = if ctx.ignore_shared {
            let (r, a) = be_u64(r)?;
            (r, Some(a))
        } else {
            (r, None)
        };
        out.push(MemBlock {
            name,
            used_length,
            page_size,
            addr,
        });
        match mem_size_entries(r, total, sum, ctx, out, budget, strict) {
            Ok(x) => return Ok(x),
            // A reading that needs more input than there is loses to one that
            // is complete and consistent; if none is, more input is needed.
            Err(nom::Err::Incomplete(n)) => {
                out.pop();
                incomplete.get_or_insert(n);
            }
            Err(e) => {
                out.pop();
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(n) = incomplete {
        return Err(nom::Err::Incomplete(n));
    }
    Err(first_err.unwrap_or(nom::Err::Incomplete(nom::Needed::Unknown)))
}

/// Whether the eight bytes at `i` could be a block's page-size field, when
/// postcopy is advised: only blocks whose page size differs from the host
/// page size carry one. If the ADVISE summary says every block uses the host
/// page size, none does; otherwise a candidate is a power of two above the
/// host page size that the summary includes. A block name would start with a
/// non-zero length byte (a value of at least 2^56), and the records that may
/// follow the list have values below the page size, so outside
/// `x-ignore-shared` (where a guest address follows) the answer is exact.
fn page_size_candidate(i: &[u8], summary: Option<u64>, host: u64) -> PResult<'_, Option<u64>> {
    if summary == Some(host) {
        return Ok((i, None));
    }
    let (_, v) = be_u64(i)?;
    let in_summary = summary.is_none_or(|s| s & v == v);
    if v.is_power_of_two() && v > host && in_summary && v >> 56 == 0 {
        Ok((i, Some(v)))
    } else {
        Ok((i, None))
    }
}

/// Decodes one RAM record at the start of `buf` (absolute offset `base`),
/// returning it and its length.
///
/// # Errors
/// [`crate::WireError`] with the absolute offset of the rule broken, or
/// `Truncated` if `buf` ends inside the record.
pub fn decode_record<'a>(
    buf: &'a [u8],
    base: u64,
    ctx: &RamContext,
    have_block: bool,
) -> Result<(RamRecord<'a>, usize), crate::WireError> {
    crate::error::finish(
        buf,
        base,
        "RAM record",
        parse_ram_record(buf, ctx, have_block),
    )
}
