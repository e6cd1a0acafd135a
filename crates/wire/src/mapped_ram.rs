//! The mapped-ram file layout (wire-format §14; QEMU 9.0+ `migrate file:`
//! with the `mapped-ram` capability).
//!
//! In such a stream each entry of the RAM START section's MEM_SIZE block
//! list is followed by a 28-byte block header (be32 version 1, be64 page
//! size, be64 bitmap offset, be64 pages offset). The bytes from the bitmap
//! offset (the file position right after the header) up to
//! `pages_offset + used_length` are not part of the record stream: they hold
//! the block's dirty bitmap (`BITS_TO_LONGS(pages) × 8` bytes, host byte
//! order, bit set = page written), zero padding up to the 1 MiB aligned
//! pages offset, and page `i` at `pages_offset + i × page_size` (zero pages
//! keep their bit clear and are not written: the file is sparse). The record
//! stream resumes after that region with the next block entry, or the EOS.
//!
//! The decoder gives these as [`MappedRam`] items: the MEM_SIZE header word,
//! each block entry with its header, then the region in parts (the bitmap
//! whole, padding and runs of whole pages in bounded chunks), so a pipe or
//! a compressed file is read in file order with bounded memory and the items
//! serialize back to the same bytes.

use crate::error::PResult;
use crate::names::{counted_name, put_counted};
use crate::ram::MemBlock;
use nom::number::streaming::{be_u32, be_u64};

/// Length of the per-block header (`MappedRamHeader`, packed).
pub const HEADER_LEN: usize = 28;
/// The only header version QEMU writes and reads.
pub const VERSION: u32 = 1;
/// Alignment of each block's pages offset in the file (1 MiB).
pub const FILE_OFFSET_ALIGNMENT: u64 = 1 << 20;
/// [`MappedRam::Pages`] items end at multiples of this many bytes of the
/// page area (or at its end); a multiple of every target page size.
pub const PAGES_CHUNK: usize = 1 << 20;
/// [`MappedRam::Padding`] items end at multiples of this stream offset (or
/// at the pages offset).
pub const PADDING_CHUNK: usize = 1 << 20;

/// The 28-byte header QEMU writes after each MEM_SIZE block entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRamHeader {
    /// Header version (1).
    pub version: u32,
    /// The target page size (bytes) the bitmap and page offsets use.
    pub page_size: u64,
    /// File offset of the block's bitmap (right after this header).
    pub bitmap_offset: u64,
    /// File offset of the block's first page (1 MiB aligned).
    pub pages_offset: u64,
}

impl MappedRamHeader {
    /// Appends the 28 header bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.bitmap_offset.to_be_bytes());
        out.extend_from_slice(&self.pages_offset.to_be_bytes());
    }
}

/// Parses the 28-byte block header (no checks: see [`check_block`]).
pub(crate) fn parse_header(i: &[u8]) -> PResult<'_, MappedRamHeader> {
    let (i, version) = be_u32(i)?;
    let (i, page_size) = be_u64(i)?;
    let (i, bitmap_offset) = be_u64(i)?;
    let (i, pages_offset) = be_u64(i)?;
    Ok((
        i,
        MappedRamHeader {
            version,
            page_size,
            bitmap_offset,
            pages_offset,
        },
    ))
}

/// Bitmap bytes of a block of `pages` pages: `BITS_TO_LONGS(pages) × 8`
/// (QEMU's `unsigned long` words on a 64-bit host).
pub fn bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// Whether page `i` has its bit set in a bitmap read from the file
/// (little-endian 64-bit words, the x86-64/aarch64 host order). A page
/// beyond the bitmap is clear.
pub fn page_is_set(bitmap: &[u8], i: u64) -> bool {
    usize::try_from(i / 8)
        .ok()
        .and_then(|b| bitmap.get(b))
        .is_some_and(|byte| byte >> (i % 8) & 1 == 1)
}

/// Sets bit `i` of a bitmap in the file's layout (little-endian 64-bit
/// words, as [`page_is_set`] reads it). A bit beyond the bitmap is ignored.
pub fn set_page(bitmap: &mut [u8], i: u64) {
    if let Some(byte) = usize::try_from(i / 8).ok().and_then(|b| bitmap.get_mut(b)) {
        *byte |= 1 << (i % 8);
    }
}

impl MappedRamHeader {
    /// The header QEMU writes for a block of `used_length` bytes whose
    /// header ends at file offset `after_header` (`mapped_ram_setup_ramblock`):
    /// version 1, the bitmap right after the header, the pages at the next
    /// 1 MiB boundary after the bitmap. The block's region then ends at
    /// `pages_offset + used_length`, where the stream resumes.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (at offset `after_header`) when the
    /// page size is not a power of two in 1 KiB..=64 KiB, the length is not
    /// a multiple of it, or the offsets overflow: exactly what
    /// [`check_block`] would refuse on reading.
    pub fn plan(
        after_header: u64,
        used_length: u64,
        page_size: u64,
    ) -> Result<MappedRamHeader, crate::WireError> {
        let bad = |why: String| crate::WireError::Unwritable {
            offset: after_header,
            what: "mapped-ram block header",
            why,
        };
        if crate::target_page::page_bits_of(page_size).is_none() {
            return Err(bad(format!(
                "page size {page_size} is not a power of two in 1 KiB..=64 KiB"
            )));
        }
        if !used_length.is_multiple_of(page_size) {
            return Err(bad(format!(
                "used length {used_length:#x} is not a multiple of the page size {page_size}"
            )));
        }
        let pages_offset = after_header
            .checked_add(bitmap_len(used_length / page_size))
            .and_then(|e| e.checked_next_multiple_of(FILE_OFFSET_ALIGNMENT))
            .filter(|p| p.checked_add(used_length).is_some())
            .ok_or_else(|| bad("the block's file region overflows a 64-bit offset".into()))?;
        Ok(MappedRamHeader {
            version: VERSION,
            page_size,
            bitmap_offset: after_header,
            pages_offset,
        })
    }
}

/// Set bits among the first `pages` bits of `bitmap`.
pub fn count_set(bitmap: &[u8], pages: u64) -> u64 {
    let whole = usize::try_from(pages / 8)
        .unwrap_or(usize::MAX)
        .min(bitmap.len());
    let mut n: u64 = bitmap[..whole]
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum();
    for i in (whole as u64 * 8)..pages {
        n += u64::from(page_is_set(bitmap, i));
    }
    n
}

/// A mapped-ram item of the RAM START section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappedRam<'a> {
    /// The MEM_SIZE record's header word: `total` is the sum of the block
    /// lengths; the block entries follow as [`MappedRam::Block`] items.
    MemSize {
        /// Total used length of all blocks (bytes).
        total: u64,
    },
    /// One block entry of the MEM_SIZE list with its header; its file
    /// region follows.
    Block {
        /// The entry (name, used length, guest address with `x-ignore-shared`).
        block: MemBlock<'a>,
        /// The 28-byte header.
        header: MappedRamHeader,
    },
    /// The block's whole bitmap (bit `i` set: page `i` is in the file).
    Bitmap(&'a [u8]),
    /// Bytes between the bitmap and the pages offset (or any other region
    /// byte that is not a whole page), carried for byte-exact output.
    Padding(&'a [u8]),
    /// Whole pages of the block's page area, from page index `first` on
    /// (only those whose bit is set hold the page's content).
    Pages {
        /// Index of the first page in the block.
        first: u64,
        /// The pages' bytes (a multiple of the page size).
        data: &'a [u8],
    },
}

impl MappedRam<'_> {
    /// Serializes the item.
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] for a MEM_SIZE total with bits below
    /// 1 KiB set (they would read as flags), a block name readers refuse, or
    /// a page-size field on a block (mapped-ram excludes postcopy).
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let start = out.len();
        match self {
            MappedRam::MemSize { total } => {
                if total & 0x3ff != 0 {
                    return Err(crate::names::unwritable(
                        start,
                        "mapped-ram MEM_SIZE",
                        format!("total {total:#x} is not a multiple of 1 KiB"),
                    ));
                }
                out.extend_from_slice(&(total | crate::ram::flags::MEM_SIZE).to_be_bytes());
            }
            MappedRam::Block { block, header } => {
                if block.page_size.is_some() {
                    return Err(crate::names::unwritable(
                        start,
                        "mapped-ram block entry",
                        "a page-size field (postcopy) in a mapped-ram stream".into(),
                    ));
                }
                put_counted(out, block.name, "RAM block name", start)?;
                out.extend_from_slice(&block.used_length.to_be_bytes());
                if let Some(a) = block.addr {
                    out.extend_from_slice(&a.to_be_bytes());
                }
                header.write(out);
            }
            MappedRam::Bitmap(d) | MappedRam::Padding(d) | MappedRam::Pages { data: d, .. } => {
                out.extend_from_slice(d)
            }
        }
        Ok(())
    }

    /// Upper-case name for listings.
    pub fn kind_name(&self) -> &'static str {
        match self {
            MappedRam::MemSize { .. } => "MEM_SIZE",
            MappedRam::Block { .. } => "MAPPED_RAM_BLOCK",
            MappedRam::Bitmap(_) => "MAPPED_RAM_BITMAP",
            MappedRam::Padding(_) => "MAPPED_RAM_PADDING",
            MappedRam::Pages { .. } => "MAPPED_RAM_PAGES",
        }
    }
}

/// Parses one block entry (counted name, be64 used length, be64 guest
/// address when `ignore_shared`) and its header.
pub(crate) fn parse_block_entry(
    i: &[u8],
    ignore_shared: bool,
) -> PResult<'_, (MemBlock<'_>, MappedRamHeader)> {
    let (i, name) = counted_name(i, "RAM block name")?;
    let (i, used_length) = be_u64(i)?;
    let (i, addr) = if ignore_shared {
        let (i, a) = be_u64(i)?;
        (i, Some(a))
    } else {
        (i, None)
    };
    let (i, header) = parse_header(i)?;
    Ok((
        i,
        (
            MemBlock {
                name,
                used_length,
                page_size: None,
                addr,
            },
            header,
        ),
    ))
}

/// Decodes one block entry with its header at the start of `buf` (absolute
/// offset `base`), returning them and the bytes taken.
///
/// # Errors
/// [`crate::WireError`] with the absolute offset: a bad block name, or
/// `Truncated` when `buf` ends inside the entry.
pub fn decode_block_entry(
    buf: &[u8],
    base: u64,
    ignore_shared: bool,
) -> Result<((MemBlock<'_>, MappedRamHeader), usize), crate::WireError> {
    crate::error::finish(
        buf,
        base,
        "mapped-ram block entry",
        parse_block_entry(buf, ignore_shared),
    )
}

/// The file region of one block, as absolute stream offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start of the bitmap (= the position right after the header).
    pub bitmap_offset: u64,
    /// End of the bitmap.
    pub bitmap_end: u64,
    /// First page.
    pub pages_offset: u64,
    /// End of the region: `pages_offset + used_length`.
    pub end: u64,
    /// Page size (bytes).
    pub page_size: u64,
    /// Pages in the block.
    pub pages: u64,
}

/// Checks a block header read at a stream position where the header ends at
/// `after_header`, against the target page size `page_size`, the MEM_SIZE
/// total and the lengths so far (`sum`, before this block), the largest
/// bitmap accepted and, when known, where the input ends (`input_end`).
/// Mirrors QEMU's `parse_ramblock_mapped_ram` (version, page size, pages
/// offset alignment) and adds what its seeks take for granted: the bitmap
/// where the header ends, pages after the bitmap, no overflow, the region
/// inside the input.
///
/// # Errors
/// The rule broken, as text (the caller adds offset and block).
#[allow(clippy::too_many_arguments)]
pub fn check_block(
    block: &MemBlock<'_>,
    h: &MappedRamHeader,
    after_header: u64,
    page_size: u64,
    total: u64,
    sum: u64,
    max_bitmap: u64,
    input_end: Option<u64>,
) -> Result<Region, String> {
    if h.version != VERSION {
        return Err(format!(
            "header version {} (only {VERSION} exists)",
            h.version
        ));
    }
    if h.page_size != page_size {
        return Err(format!(
            "header page size {} differs from the target page size {page_size}",
            h.page_size
        ));
    }
    if !block.used_length.is_multiple_of(page_size) {
        return Err(format!(
            "used length {:#x} is not a multiple of the page size",
            block.used_length
        ));
    }
    match sum.checked_add(block.used_length) {
        Some(s) if s <= total => {}
        _ => {
            return Err(format!(
                "block lengths add up to more than the MEM_SIZE total {total:#x}"
            ))
        }
    }
    if h.bitmap_offset != after_header {
        return Err(format!(
            "bitmap offset {} is not the position right after the header ({after_header})",
            h.bitmap_offset
        ));
    }
    let pages = block.used_length / page_size;
    let blen = bitmap_len(pages);
    if blen > max_bitmap {
        return Err(format!(
            "bitmap of {blen} bytes is over the limit of {max_bitmap}"
        ));
    }
    let bitmap_end = h.bitmap_offset.saturating_add(blen);
    if !h.pages_offset.is_multiple_of(FILE_OFFSET_ALIGNMENT) {
        return Err(format!(
            "pages offset {:#x} is not 1 MiB aligned",
            h.pages_offset
        ));
    }
    if h.pages_offset < bitmap_end {
        return Err(format!(
            "pages offset {} is inside the bitmap (which ends at {bitmap_end})",
            h.pages_offset
        ));
    }
    let Some(end) = h.pages_offset.checked_add(block.used_length) else {
        return Err(format!(
            "pages offset {:#x} + used length {:#x} overflows",
            h.pages_offset, block.used_length
        ));
    };
    if let Some(e) = input_end {
        if end > e {
            return Err(format!(
                "the page area ends at {end}, past the end of the input ({e})"
            ));
        }
    }
    Ok(Region {
        bitmap_offset: h.bitmap_offset,
        bitmap_end,
        pages_offset: h.pages_offset,
        end,
        page_size,
        pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name_strategy() -> impl Strategy<Value = String> {
        "[ -~]{1,40}"
    }

    proptest! {
        #[test]
        fn header_roundtrip(version: u32, page_size: u64, b: u64, p: u64) {
            let h = MappedRamHeader { version, page_size, bitmap_offset: b, pages_offset: p };
            let mut out = Vec::new();
            h.write(&mut out);
            prop_assert_eq!(out.len(), HEADER_LEN);
            let (rest, got) = parse_header(&out).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(got, h);
        }

        #[test]
        fn block_entry_roundtrip(
            name in name_strategy(),
            used_length: u64,
            addr in proptest::option::of(any::<u64>()),
            version: u32, page_size: u64, b: u64, p: u64,
        ) {
            let block = MemBlock { name: &name, used_length, page_size: None, addr };
            let header = MappedRamHeader { version, page_size, bitmap_offset: b, pages_offset: p };
            let mut out = Vec::new();
            MappedRam::Block { block, header }.write(&mut out).unwrap();
            let (rest, (gb, gh)) = parse_block_entry(&out, addr.is_some()).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(gb, block);
            prop_assert_eq!(gh, header);
            // Every strict prefix asks for more bytes, never errs otherwise.
            for n in 0..out.len() {
                prop_assert!(matches!(parse_block_entry(&out[..n], addr.is_some()), Err(nom::Err::Incomplete(_))));
            }
        }

        #[test]
        fn bytes_decode_then_encode(bytes in proptest::collection::vec(any::<u8>(), 0..80), shared: bool) {
            if let Ok((rest, (block, header))) = parse_block_entry(&bytes, shared) {
                let mut out = Vec::new();
                MappedRam::Block { block, header }.write(&mut out).unwrap();
                prop_assert_eq!(&out[..], &bytes[..bytes.len() - rest.len()]);
            }
        }

        #[test]
        fn checked_regions_stay_ordered(
            pages in 0u64..1 << 20, after in 0u64..1 << 40, po in 0u64..1 << 30, sum in 0u64..1 << 40, slack in 0u64..1 << 40,
        ) {
            let block = MemBlock { name: "b", used_length: pages * 4096, page_size: None, addr: None };
            let h = MappedRamHeader { version: 1, page_size: 4096, bitmap_offset: after, pages_offset: po << 20 };
            if let Ok(r) = check_block(&block, &h, after, 4096, sum + pages * 4096 + slack, sum, 1 << 26, None) {
                prop_assert!(r.bitmap_offset <= r.bitmap_end);
                prop_assert!(r.bitmap_end <= r.pages_offset);
                prop_assert_eq!(r.end - r.pages_offset, pages * 4096);
                prop_assert_eq!(r.bitmap_end - r.bitmap_offset, pages.div_ceil(64) * 8);
            }
        }
    }

    proptest! {
        #[test]
        fn planned_headers_pass_the_reader_checks(
            pages in 0u64..1 << 22, bits in 10u32..=16, after in 0u64..1 << 40, sum in 0u64..1 << 40,
        ) {
            let ps = 1u64 << bits;
            let block = MemBlock { name: "b", used_length: pages * ps, page_size: None, addr: None };
            let h = MappedRamHeader::plan(after, block.used_length, ps).unwrap();
            let r = check_block(&block, &h, after, ps, sum + block.used_length, sum, 1 << 26, None).unwrap();
            prop_assert_eq!(r.pages, pages);
            // The smallest aligned offset past the bitmap.
            prop_assert!(h.pages_offset - r.bitmap_end < FILE_OFFSET_ALIGNMENT);
        }

        #[test]
        fn set_bits_read_back(bits in proptest::collection::btree_set(0u64..4096, 0..64)) {
            let mut bm = vec![0u8; bitmap_len(4096) as usize];
            for &b in &bits {
                set_page(&mut bm, b);
            }
            for i in 0..4096 {
                prop_assert_eq!(page_is_set(&bm, i), bits.contains(&i));
            }
            prop_assert_eq!(count_set(&bm, 4096), bits.len() as u64);
        }
    }

    #[test]
    fn plan_matches_the_qemu_file() {
        // tests/data/field/mapped-ram-file: pc.ram (64 MiB) header ends at
        // 142, pages at 1 MiB; /rom@etc/acpi/tables (128 KiB) at 68157497.
        let h = MappedRamHeader::plan(142, 64 << 20, 4096).unwrap();
        assert_eq!((h.bitmap_offset, h.pages_offset), (142, 1 << 20));
        let h = MappedRamHeader::plan(68_157_497, 128 << 10, 4096).unwrap();
        assert_eq!(h.pages_offset, 69_206_016);
        for (after, len, ps, want) in [
            (0, 4096, 3000, "power of two"),
            (0, 4097, 4096, "multiple"),
            (u64::MAX - 10, 4096, 4096, "overflows"),
        ] {
            let e = MappedRamHeader::plan(after, len, ps)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn hostile_headers_are_refused() {
        let block = MemBlock {
            name: "pc.ram",
            used_length: 1 << 26,
            page_size: None,
            addr: None,
        };
        let good = MappedRamHeader {
            version: 1,
            page_size: 4096,
            bitmap_offset: 142,
            pages_offset: 1 << 20,
        };
        let check = |h: MappedRamHeader, end: Option<u64>| {
            check_block(&block, &h, 142, 4096, 1 << 27, 0, 1 << 26, end)
        };
        assert!(check(good, None).is_ok());
        for (h, end, want) in [
            (MappedRamHeader { version: 2, ..good }, None, "version"),
            (
                MappedRamHeader {
                    page_size: 1024,
                    ..good
                },
                None,
                "page size",
            ),
            (
                MappedRamHeader {
                    bitmap_offset: 0,
                    ..good
                },
                None,
                "right after the header",
            ),
            (
                MappedRamHeader {
                    pages_offset: (1 << 20) + 4096,
                    ..good
                },
                None,
                "aligned",
            ),
            (
                MappedRamHeader {
                    pages_offset: 0,
                    ..good
                },
                None,
                "inside the bitmap",
            ),
            (
                MappedRamHeader {
                    pages_offset: !0xfffff_u64,
                    ..good
                },
                None,
                "overflows",
            ),
            (good, Some(1 << 20), "past the end"),
        ] {
            let e = check(h, end).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        // Lengths adding up past the total.
        let e = check_block(&block, &good, 142, 4096, 1 << 26, 1, 1 << 26, None).unwrap_err();
        assert!(e.contains("total"), "{e}");
        // A bitmap over the cap.
        let e = check_block(&block, &good, 142, 4096, 1 << 27, 0, 16, None).unwrap_err();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn bitmap_bits_are_little_endian_words() {
        let mut bm = vec![0u8; 16];
        bm[0] = 0b0000_0101;
        bm[8] = 0x80;
        assert!(page_is_set(&bm, 0) && !page_is_set(&bm, 1) && page_is_set(&bm, 2));
        assert!(page_is_set(&bm, 71));
        assert!(!page_is_set(&bm, 1000));
        assert_eq!(count_set(&bm, 128), 3);
        assert_eq!(count_set(&bm, 71), 2);
        assert_eq!(bitmap_len(16384), 2048);
        assert_eq!(bitmap_len(1), 8);
        assert_eq!(bitmap_len(0), 0);
    }
}
