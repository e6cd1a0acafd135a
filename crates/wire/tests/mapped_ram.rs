//! mapped-ram streams (wire-format §14): the layout read in file order from
//! a slice and from a dribbling pipe, byte-exact re-serialization, and
//! hostile block headers refused with typed errors at the entry's offset.

use std::io::Read;

use proptest::prelude::*;
use qmig_wire::header::write_header;
use qmig_wire::mapped_ram::{self, MappedRamHeader};
use qmig_wire::section::write_footer;
use qmig_wire::*;

const PS: u64 = 4096;

/// One block: name and, per page, `Some(fill)` for a page in the file
/// (bit set, every byte `fill`) or `None` for a zero page.
struct Block {
    name: &'static str,
    pages: Vec<Option<u8>>,
}

/// Offsets of each block entry in the built stream.
struct Built {
    bytes: Vec<u8>,
    entries: Vec<u64>,
}

/// A QEMU-shaped mapped-ram stream; `tweak` may change each header before
/// it is written (the bytes after it are laid out from the original).
fn build(blocks: &[Block], tweak: impl Fn(usize, &mut MappedRamHeader)) -> Built {
    let mut s = Vec::new();
    write_header(&mut s);
    Configuration {
        machine: "pc-i440fx-10.0",
        subsections: vec![ConfigSubsection {
            name: "configuration/capabilities",
            version: 1,
            body: ConfigBody::Capabilities(vec!["mapped-ram"]),
        }],
    }
    .write(&mut s)
    .unwrap();
    SectionHeader::start(2, "ram", 0, 4).write(&mut s).unwrap();
    let total: u64 = blocks.iter().map(|b| b.pages.len() as u64 * PS).sum();
    Item::MappedRam(MappedRam::MemSize { total })
        .write(&mut s)
        .unwrap();
    let mut entries = Vec::new();
    for (k, b) in blocks.iter().enumerate() {
        entries.push(s.len() as u64);
        let n = b.pages.len() as u64;
        let after = s.len() as u64 + 1 + b.name.len() as u64 + 8 + 28;
        let blen = mapped_ram::bitmap_len(n);
        let pages_offset = (after + blen).next_multiple_of(mapped_ram::FILE_OFFSET_ALIGNMENT);
        let mut h = MappedRamHeader {
            version: 1,
            page_size: PS,
            bitmap_offset: after,
            pages_offset,
        };
        tweak(k, &mut h);
        Item::MappedRam(MappedRam::Block {
            block: MemBlock {
                name: b.name,
                used_length: n * PS,
                page_size: None,
                addr: None,
            },
            header: h,
        })
        .write(&mut s)
        .unwrap();
        let mut bm = vec![0u8; blen as usize];
        for (i, p) in b.pages.iter().enumerate() {
            if p.is_some() {
                bm[i / 8] |= 1 << (i % 8);
            }
        }
        s.extend_from_slice(&bm);
        s.resize(pages_offset as usize, 0);
        for p in &b.pages {
            s.extend(std::iter::repeat_n(p.unwrap_or(0), PS as usize));
        }
    }
    RamRecord::eos().write(&mut s).unwrap();
    write_footer(&mut s, 2);
    s.push(section::EOF);
    Built { bytes: s, entries }
}

/// Pages with their bit set, as (block, page index, first byte), from the items.
fn set_pages<'a>(items: impl Iterator<Item = Item<'a>>) -> Vec<(String, u64, u8)> {
    let mut out = Vec::new();
    let mut block = String::new();
    let mut bitmap = Vec::new();
    for it in items {
        match it {
            Item::MappedRam(MappedRam::Block { block: b, .. }) => block = b.name.into(),
            Item::MappedRam(MappedRam::Bitmap(b)) => bitmap = b.to_vec(),
            Item::MappedRam(MappedRam::Pages { first, data }) => {
                for (k, p) in data.chunks(PS as usize).enumerate() {
                    let i = first + k as u64;
                    if mapped_ram::page_is_set(&bitmap, i) {
                        out.push((block.clone(), i, p[0]));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn expected(blocks: &[Block]) -> Vec<(String, u64, u8)> {
    blocks
        .iter()
        .flat_map(|b| {
            b.pages
                .iter()
                .enumerate()
                .filter_map(move |(i, p)| p.map(|f| (b.name.to_string(), i as u64, f)))
        })
        .collect()
}

/// Reads at most `sizes[k % len]` bytes per call.
struct Dribble<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    k: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sizes[self.k % self.sizes.len()]
            .max(1)
            .min(buf.len())
            .min(self.data.len());
        self.k += 1;
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

type Listing = Vec<(u64, &'static str)>;
/// Set pages: (block, page index, first byte).
type SetPages = Vec<(String, u64, u8)>;

fn stream_roundtrip(bytes: &[u8], sizes: Vec<usize>) -> (Vec<u8>, SetPages, usize) {
    let (out, pages, cap, _) = stream_read(bytes, sizes);
    (out, pages, cap)
}

fn stream_read(bytes: &[u8], sizes: Vec<usize>) -> (Vec<u8>, SetPages, usize, Listing) {
    let mut listing = Vec::new();
    let mut rd = StreamReader::new(Dribble {
        data: bytes,
        sizes,
        k: 0,
    });
    let mut out = Vec::new();
    let mut pages = Vec::new();
    let mut block = String::new();
    let mut bitmap = Vec::new();
    let mut cap = 0;
    while let Some(ri) = rd.next_item().unwrap() {
        listing.push((ri.offset, ri.item.kind_name()));
        ri.item.write(&mut out).unwrap();
        match &ri.item {
            Item::MappedRam(MappedRam::Block { block: b, .. }) => block = b.name.into(),
            Item::MappedRam(MappedRam::Bitmap(b)) => bitmap = b.to_vec(),
            Item::MappedRam(MappedRam::Pages { first, data }) => {
                for (k, p) in data.chunks(PS as usize).enumerate() {
                    let i = first + k as u64;
                    if mapped_ram::page_is_set(&bitmap, i) {
                        pages.push((block.clone(), i, p[0]));
                    }
                }
            }
            _ => {}
        }
        cap = cap.max(rd.buffer_capacity());
    }
    (out, pages, cap, listing)
}

fn sample() -> Vec<Block> {
    let mut big = vec![None; 2048];
    big[0] = Some(0xaa);
    big[777] = Some(0x11);
    big[2047] = Some(0x55);
    // A zero-length block is read only while the MEM_SIZE total is not
    // reached (as QEMU's loader counts down), so it comes first here.
    vec![
        Block {
            name: "empty",
            pages: vec![],
        },
        Block {
            name: "pc.ram",
            pages: big,
        },
        Block {
            name: "pc.bios",
            pages: vec![Some(1), None, Some(2)],
        },
    ]
}

#[test]
fn slice_and_pipe_read_the_layout() {
    let blocks = sample();
    let b = build(&blocks, |_, _| {});
    let items: Vec<Item<'_>> = SliceReader::new(&b.bytes).map(|r| r.unwrap().1).collect();
    let mut out = Vec::new();
    for it in &items {
        it.write(&mut out).unwrap();
    }
    assert_eq!(out, b.bytes);
    assert_eq!(set_pages(items.iter().cloned()), expected(&blocks));
    // No page record, no MEM_SIZE list: the block entries are their own items.
    assert_eq!(
        items
            .iter()
            .filter(|i| matches!(i, Item::MappedRam(MappedRam::Block { .. })))
            .count(),
        3
    );
    // Through a pipe in odd-sized reads: same bytes, same pages, the same
    // items at the same offsets, bounded buffer.
    let (out, pages, cap, listing) = stream_read(&b.bytes, vec![1, 4093, 7, 65536, 3]);
    assert_eq!(out, b.bytes);
    let slice_listing: Listing = SliceReader::new(&b.bytes)
        .map(|r| {
            let (o, i) = r.unwrap();
            (o, i.kind_name())
        })
        .collect();
    assert_eq!(listing, slice_listing);
    assert_eq!(pages, expected(&blocks));
    assert!(cap <= 4 << 20, "buffer grew to {cap}");
}

#[test]
fn a_block_larger_than_the_buffer_is_streamed() {
    // 32 MiB of pages, read through a pipe: the reader's buffer stays small.
    let mut pages = vec![None; 8192];
    pages[8191] = Some(7);
    let blocks = vec![Block {
        name: "pc.ram",
        pages,
    }];
    let b = build(&blocks, |_, _| {});
    let (out, got, cap) = stream_roundtrip(&b.bytes, vec![1 << 20]);
    assert_eq!(out.len(), b.bytes.len());
    assert!(out == b.bytes);
    assert_eq!(got, expected(&blocks));
    assert!(cap <= 4 << 20, "buffer grew to {cap}");
}

fn mapped_error(b: &Built) -> (u64, String) {
    match SliceReader::new(&b.bytes).find_map(Result::err) {
        Some(WireError::MappedRam { offset, why, .. }) => (offset, why),
        other => panic!("expected a mapped-ram error, got {other:?}"),
    }
}

#[test]
fn hostile_headers_are_typed_errors_at_the_entry() {
    let blocks = sample();
    type Tweak = fn(&mut MappedRamHeader);
    let cases: [(Tweak, &str); 6] = [
        (|h| h.version = 7, "version"),
        (|h| h.page_size = 65536, "page size"),
        (|h| h.bitmap_offset += 8, "right after the header"),
        (|h| h.pages_offset += 4096, "aligned"),
        (|h| h.pages_offset = 1 << 62, "past the end of the input"),
        // Overflows for the 8 MiB block; for the others it is past the end.
        (|h| h.pages_offset = !0xfffff_u64, "overflows"),
    ];
    for (t, want) in cases {
        for k in 0..3 {
            if want == "overflows" && k != 1 {
                continue;
            }
            let b = build(&blocks, |i, h| {
                if i == k {
                    t(h)
                }
            });
            let (off, why) = mapped_error(&b);
            assert_eq!(off, b.entries[k], "{want}: {why}");
            assert!(why.contains(want), "{want}: {why}");
        }
    }
}

#[test]
fn truncated_region_and_page_records_are_refused() {
    let b = build(&sample(), |_, _| {});
    // Cut inside the first block's pages: the entry says its pages run past the input.
    let cut = &b.bytes[..(3 << 20)];
    let e = SliceReader::new(cut).find_map(Result::err).unwrap();
    assert!(matches!(e, WireError::MappedRam { .. }), "{e}");
    // A pipe does not know where the input ends: truncation inside the region.
    let mut rd = StreamReader::new(cut);
    let e = loop {
        match rd.next_item() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("no error"),
            Err(e) => break e,
        }
    };
    assert!(e.is_truncation(), "{e}");
    // A PAGE record where the block list should be.
    let mut s = b.bytes[..b.entries[0] as usize - 8].to_vec();
    RamRecord::page(0, Some("pc.ram"), &[0u8; 4096])
        .write(&mut s)
        .unwrap();
    let e = SliceReader::new(&s).find_map(Result::err).unwrap();
    assert!(
        matches!(e, WireError::Structure { offset, .. } if offset == b.entries[0] - 8),
        "{e}"
    );
    // Block lengths adding up past the MEM_SIZE total.
    let mut s = b.bytes.clone();
    let at = b.entries[0] as usize - 8;
    s[at..at + 8].copy_from_slice(&(0x1000u64 | 4).to_be_bytes());
    let (off, why) = mapped_error(&Built {
        bytes: s,
        entries: vec![],
    });
    // (The zero-length first block fits; pc.ram does not.)
    assert_eq!(off, b.entries[1]);
    assert!(why.contains("total"), "{why}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Any bitmap and page contents: decode then encode gives the bytes,
    /// and the set pages are the ones written.
    #[test]
    fn random_layouts_roundtrip(
        a in proptest::collection::vec(proptest::option::of(any::<u8>()), 0..300),
        b in proptest::collection::vec(proptest::option::of(any::<u8>()), 1..70),
        sizes in proptest::collection::vec(1usize..20000, 1..5),
    ) {
        let blocks = vec![Block { name: "a", pages: a }, Block { name: "b", pages: b }];
        let built = build(&blocks, |_, _| {});
        let items: Vec<Item<'_>> = SliceReader::new(&built.bytes).map(|r| r.unwrap().1).collect();
        let mut out = Vec::new();
        for it in &items {
            it.write(&mut out).unwrap();
        }
        prop_assert!(out == built.bytes);
        prop_assert_eq!(set_pages(items.into_iter()), expected(&blocks));
        let (out, pages, _) = stream_roundtrip(&built.bytes, sizes);
        prop_assert!(out == built.bytes);
        prop_assert_eq!(pages, expected(&blocks));
    }
}
