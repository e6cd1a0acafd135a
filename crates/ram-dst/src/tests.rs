//! Unit tests: one per transition and per check.

use std::io::Write;

use qmig_wire::{Advise, Command, Discard, DiscardRange, Item, MemBlock, RamRecord};

use crate::*;

const PS: u64 = 4096;

fn mb(name: &str, len: u64) -> MemBlock<'_> {
    MemBlock {
        name,
        used_length: len,
        page_size: None,
        addr: None,
    }
}

fn adopt() -> RamDst<VecMemory> {
    RamDst::new(Config::default(), VecMemory::new()).unwrap()
}

fn fixed(blocks: Vec<LocalBlock>) -> RamDst<VecMemory> {
    RamDst::new(
        Config {
            layout: Layout::Fixed(blocks),
            ..Config::default()
        },
        VecMemory::new(),
    )
    .unwrap()
}

fn emit(blocks: Vec<LocalBlock>) -> RamDst<VecMemory> {
    RamDst::new(
        Config {
            layout: Layout::Fixed(blocks),
            placement: Placement::Emit,
            ..Config::default()
        },
        VecMemory::new(),
    )
    .unwrap()
}

/// Feeds `item` at `at` (length 10).
fn feed(d: &mut RamDst<VecMemory>, at: u64, item: Item<'_>) -> Result<(), RamDstError> {
    d.handle_item(at, 10, &item)
}

fn ram(r: RamRecord<'_>) -> Item<'_> {
    Item::Ram(r)
}

fn cmd(c: Command<'_>) -> Item<'_> {
    Item::Command(c)
}

/// An output of the machine other than return-path bytes.
#[derive(Debug, PartialEq)]
enum Out {
    E(Event),
    P(Place),
}

/// The events, then the placements, queued so far.
fn actions<M: GuestMemory>(d: &mut RamDst<M>) -> Vec<Out> {
    let mut v: Vec<Out> = std::iter::from_fn(|| d.poll_event()).map(Out::E).collect();
    v.extend(std::iter::from_fn(|| d.poll_placement()).map(Out::P));
    v
}

fn with_ram(len: u64) -> RamDst<VecMemory> {
    let mut d = adopt();
    feed(&mut d, 0, ram(RamRecord::mem_size(vec![mb("pc.ram", len)]))).unwrap();
    d
}

fn mem(d: &RamDst<VecMemory>) -> &[u8] {
    d.memory().block("pc.ram").unwrap()
}

// ---- MEM_SIZE and the layout --------------------------------------------------------

#[test]
fn adopt_creates_blocks() {
    let mut d = adopt();
    feed(
        &mut d,
        0,
        ram(RamRecord::mem_size(vec![
            mb("pc.ram", 8 * PS),
            mb("vga.vram", 2 * PS),
        ])),
    )
    .unwrap();
    assert_eq!(d.blocks().len(), 2);
    assert_eq!(d.blocks()[1].name(), "vga.vram");
    assert_eq!(d.memory().block("vga.vram").unwrap().len(), 2 * PS as usize);
    assert_eq!(d.block_index("pc.ram"), Some(0));
    assert_eq!(d.stats().mem_size, 1);
}

#[test]
fn adopt_refuses_more_than_the_cap() {
    let mut d = RamDst::new(
        Config {
            max_adopted_bytes: 4 * PS,
            ..Config::default()
        },
        VecMemory::new(),
    )
    .unwrap();
    let e = feed(
        &mut d,
        33,
        ram(RamRecord::mem_size(vec![mb("a", 4 * PS), mb("b", PS)])),
    )
    .unwrap_err();
    assert!(matches!(e, RamDstError::BadSize { offset: 33, .. }), "{e}");
    assert!(d.blocks().is_empty(), "nothing created");
}

#[test]
fn fixed_unknown_block_is_named() {
    let mut d = fixed(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    let e = feed(
        &mut d,
        17,
        ram(RamRecord::mem_size(vec![
            mb("pc.ram", 4 * PS),
            mb("mystery", PS),
        ])),
    )
    .unwrap_err();
    assert!(matches!(&e, RamDstError::UnknownBlock { offset: 17, name } if name == "mystery"));
    assert!(e.to_string().contains("mystery") && e.to_string().contains("offset 17"));
}

#[test]
fn fixed_length_mismatch() {
    let mut d = fixed(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    let e = feed(
        &mut d,
        5,
        ram(RamRecord::mem_size(vec![mb("pc.ram", 8 * PS)])),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        RamDstError::LengthMismatch {
            offset: 5,
            local: 16384,
            remote: 32768,
            resizable: false,
            ..
        }
    ));
}

#[test]
fn resizable_block_resizes_up_to_max() {
    let b = LocalBlock {
        resizable: true,
        max_length: 8 * PS,
        ..LocalBlock::fixed("acpi", 2 * PS)
    };
    let mut d = fixed(vec![b.clone()]);
    feed(
        &mut d,
        0,
        ram(RamRecord::mem_size(vec![mb("acpi", 6 * PS)])),
    )
    .unwrap();
    assert_eq!(d.blocks()[0].used_length(), 6 * PS);
    assert_eq!(d.blocks()[0].received().len(), 6);
    assert_eq!(d.memory().block("acpi").unwrap().len(), 6 * PS as usize);
    assert_eq!(
        actions(&mut d),
        vec![Out::E(Event::BlockResized {
            block: 0,
            len: 6 * PS
        })]
    );
    let mut d = fixed(vec![b]);
    let e = feed(
        &mut d,
        0,
        ram(RamRecord::mem_size(vec![mb("acpi", 9 * PS)])),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        RamDstError::LengthMismatch {
            max: 32768,
            resizable: true,
            ..
        }
    ));
}

#[test]
fn page_size_checked_only_when_advised() {
    let huge = LocalBlock {
        page_size: 2 << 20,
        ..LocalBlock::fixed("mem", 4 << 20)
    };
    // Not advised: no page size field, no check.
    let mut d = fixed(vec![huge.clone()]);
    feed(
        &mut d,
        0,
        ram(RamRecord::mem_size(vec![mb("mem", 4 << 20)])),
    )
    .unwrap();
    // Advised, the stream says 4 KiB (no field): mismatch.
    let mut d = fixed(vec![huge.clone()]);
    feed(&mut d, 0, cmd(Command::PostcopyAdvise(None))).unwrap();
    let e = feed(
        &mut d,
        9,
        ram(RamRecord::mem_size(vec![mb("mem", 4 << 20)])),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::PageSizeMismatch {
                offset: 9,
                local: 0x200000,
                remote: 4096,
                ..
            }
        ),
        "{e}"
    );
    // Advised, matching field.
    let mut d = fixed(vec![huge]);
    feed(&mut d, 0, cmd(Command::PostcopyAdvise(None))).unwrap();
    let m = MemBlock {
        page_size: Some(2 << 20),
        ..mb("mem", 4 << 20)
    };
    feed(&mut d, 9, ram(RamRecord::mem_size(vec![m]))).unwrap();
}

#[test]
fn mem_size_bad_sizes() {
    let mut d = adopt();
    let e = feed(
        &mut d,
        1,
        ram(RamRecord::mem_size(vec![mb("pc.ram", PS + 1)])),
    )
    .unwrap_err();
    assert!(matches!(e, RamDstError::BadSize { .. }));
    let mut d = adopt();
    let mut r = RamRecord::mem_size(vec![mb("pc.ram", PS)]);
    r.offset = 2 * PS;
    assert!(matches!(
        feed(&mut d, 1, ram(r)),
        Err(RamDstError::BadSize { .. })
    ));
    let mut d = adopt();
    let e = feed(
        &mut d,
        1,
        ram(RamRecord::mem_size(vec![mb("a", PS), mb("a", PS)])),
    )
    .unwrap_err();
    assert!(matches!(e, RamDstError::BadSize { .. }));
    let mut d = adopt();
    let mut r = RamRecord::mem_size(vec![mb("a", PS)]);
    r.body = qmig_wire::RamBody::MemSize(vec![mb("a", !0xfffu64), mb("b", PS)]);
    assert!(matches!(
        feed(&mut d, 1, ram(r)),
        Err(RamDstError::BadSize { .. })
    ));
    let mut d = adopt();
    let m = MemBlock {
        page_size: Some(3 * PS),
        ..mb("a", 6 * PS)
    };
    assert!(matches!(
        feed(&mut d, 1, ram(RamRecord::mem_size(vec![m]))),
        Err(RamDstError::BadSize { .. })
    ));
}

#[test]
fn bad_local_layout_is_refused() {
    let b = LocalBlock {
        page_size: 3000,
        ..LocalBlock::fixed("x", PS)
    };
    assert!(RamDst::new(
        Config {
            layout: Layout::Fixed(vec![b]),
            ..Config::default()
        },
        VecMemory::new()
    )
    .is_err());
    let b = LocalBlock::fixed("x", PS + 8);
    assert!(RamDst::new(
        Config {
            layout: Layout::Fixed(vec![b]),
            ..Config::default()
        },
        VecMemory::new()
    )
    .is_err());
}

// ---- page records ------------------------------------------------------------------

#[test]
fn page_then_continue() {
    let mut d = with_ram(4 * PS);
    let a = [1u8; 4096];
    let b = [2u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 20, ram(RamRecord::page(2 * PS, None, &b))).unwrap();
    assert_eq!(&mem(&d)[..4096], &a[..]);
    assert_eq!(&mem(&d)[8192..12288], &b[..]);
    assert_eq!(mem(&d)[4096], 0);
    assert_eq!(
        d.blocks()[0].received().iter_ones().collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(d.stats().page, 2);
    assert_eq!(d.applied_up_to(), 30);
}

#[test]
fn zero_page_clears_written_page_and_nonzero_fill_is_reported() {
    let mut d = with_ram(2 * PS);
    let a = [9u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 20, ram(RamRecord::zero(PS, None))).unwrap();
    assert!(mem(&d).iter().all(|&b| b == 0));
    let mut r = RamRecord::zero(0, None);
    r.body = qmig_wire::RamBody::Zero { fill: 0x5a };
    feed(&mut d, 30, ram(r)).unwrap();
    assert!(mem(&d)[..4096].iter().all(|&b| b == 0x5a));
    assert_eq!(
        actions(&mut d),
        vec![Out::E(Event::NonZeroFill {
            offset: 30,
            block: 0,
            page_offset: 0,
            fill: 0x5a
        })]
    );
    assert_eq!(d.stats().nonzero_fill, 1);
    assert_eq!(d.stats().zero, 2);
}

#[test]
fn page_offset_at_used_length_is_refused() {
    let mut d = with_ram(4 * PS);
    let a = [1u8; 4096];
    let e = feed(&mut d, 77, ram(RamRecord::page(4 * PS, Some("pc.ram"), &a))).unwrap_err();
    assert!(matches!(
        e,
        RamDstError::PageOutOfBlock {
            offset: 77,
            page_offset: 16384,
            used_length: 16384,
            ..
        }
    ));
    assert_eq!(d.applied_up_to(), 77);
    assert!(d.is_stopped());
    // Later input is refused.
    assert!(matches!(
        feed(&mut d, 87, ram(RamRecord::page(0, None, &a))),
        Err(RamDstError::Stopped { offset: 77 })
    ));
    assert!(mem(&d).iter().all(|&b| b == 0));
}

#[test]
fn page_offset_overflowing_u64_is_refused() {
    let mut d = with_ram(4 * PS);
    let a = [1u8; 4096];
    let e = feed(
        &mut d,
        1,
        ram(RamRecord::page(!0xfffu64, Some("pc.ram"), &a)),
    )
    .unwrap_err();
    assert!(matches!(e, RamDstError::PageOutOfBlock { .. }));
}

#[test]
fn unaligned_page_offset_is_refused() {
    let mut d = with_ram(4 * PS);
    let e = feed(&mut d, 1, ram(RamRecord::zero(100, Some("pc.ram")))).unwrap_err();
    assert!(matches!(
        e,
        RamDstError::PageOutOfBlock {
            page_offset: 100,
            ..
        }
    ));
}

#[test]
fn continue_before_any_block_is_refused() {
    let mut d = with_ram(4 * PS);
    let e = feed(&mut d, 42, ram(RamRecord::zero(0, None))).unwrap_err();
    assert!(matches!(e, RamDstError::NoCurrentBlock { offset: 42 }));
}

#[test]
fn unknown_block_in_page_record() {
    let mut d = with_ram(4 * PS);
    let e = feed(&mut d, 42, ram(RamRecord::zero(0, Some("nope")))).unwrap_err();
    assert!(matches!(&e, RamDstError::UnknownBlock { offset: 42, name } if name == "nope"));
}

#[test]
fn short_page_is_refused() {
    let mut d = with_ram(4 * PS);
    let a = [1u8; 100];
    assert!(matches!(
        feed(&mut d, 1, ram(RamRecord::page(0, Some("pc.ram"), &a))),
        Err(RamDstError::BadSize { .. })
    ));
}

#[test]
fn xbzrle_applies_onto_the_current_page() {
    let mut d = with_ram(2 * PS);
    let old = [3u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(PS, Some("pc.ram"), &old))).unwrap();
    let mut new = old;
    new[100..104].copy_from_slice(b"qmig");
    let mut enc = vec![0u8; 4096];
    let n = qmig_xbzrle::encode(&old, &new, &mut enc).unwrap();
    feed(&mut d, 20, ram(RamRecord::xbzrle(PS, None, &enc[..n]))).unwrap();
    assert_eq!(&mem(&d)[4096..], &new[..]);
    assert_eq!(d.stats().xbzrle, 1);
}

#[test]
fn bad_xbzrle_leaves_the_page_alone() {
    let mut d = with_ram(2 * PS);
    let old = [3u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &old))).unwrap();
    // A data run that runs past the page end.
    let enc = [0x80, 0x20, 0x10, 1, 2];
    let e = feed(&mut d, 20, ram(RamRecord::xbzrle(0, None, &enc))).unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::Xbzrle {
                offset: 20,
                page_offset: 0,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(&mem(&d)[..4096], &old[..]);
    assert!(!d.blocks()[0].received().get(1));
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(1));
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

#[test]
fn compressed_page_inflates_to_one_page() {
    let mut d = with_ram(2 * PS);
    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let z = deflate(&page);
    feed(
        &mut d,
        10,
        ram(RamRecord::compressed(PS, Some("pc.ram"), &z)),
    )
    .unwrap();
    assert_eq!(&mem(&d)[4096..], &page[..]);
    assert_eq!(d.stats().compressed, 1);
}

#[test]
fn compressed_page_errors() {
    for (what, z) in [
        ("short", deflate(&[1u8; 4000])),
        ("long", deflate(&[1u8; 4097])),
        ("garbage", vec![0x78, 0x01, 0xff, 0xff, 0xff]),
        ("truncated", deflate(&[7u8; 4096])[..5].to_vec()),
    ] {
        let mut d = with_ram(2 * PS);
        let e = feed(
            &mut d,
            50,
            ram(RamRecord::compressed(0, Some("pc.ram"), &z)),
        )
        .unwrap_err();
        assert!(
            matches!(e, RamDstError::Compressed { offset: 50, .. }),
            "{what}: {e}"
        );
        assert!(mem(&d).iter().all(|&b| b == 0), "{what}");
    }
}

#[test]
fn target_page_size_from_configuration() {
    use qmig_wire::{ConfigBody, ConfigSubsection, Configuration};
    let c = Configuration {
        machine: "pc",
        subsections: vec![ConfigSubsection {
            name: "configuration/target-page-bits",
            version: 1,
            body: ConfigBody::TargetPageBits(13),
        }],
    };
    let mut d = adopt();
    feed(&mut d, 0, Item::Configuration(c.clone())).unwrap();
    assert_eq!(d.page_size(), 8192);
    let mut d = fixed(vec![LocalBlock::fixed("pc.ram", PS)]);
    assert!(matches!(
        feed(&mut d, 8, Item::Configuration(c)),
        Err(RamDstError::PageSizeMismatch { offset: 8, .. })
    ));
}

// ---- commands ----------------------------------------------------------------------

#[test]
fn ping_and_open_return_path() {
    let mut d = adopt();
    feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
    feed(&mut d, 5, cmd(Command::Ping(0x42))).unwrap();
    assert_eq!(actions(&mut d), vec![Out::E(Event::OpenReturnPath)]);
    assert_eq!(transmitted(&mut d), vec![qmig_wire::RpMessage::Pong(0x42)]);
}

#[test]
fn unknown_command_is_refused() {
    let mut d = adopt();
    let e = feed(
        &mut d,
        3,
        cmd(Command::Unknown {
            cmd: 99,
            payload: &[],
        }),
    )
    .unwrap_err();
    assert!(matches!(e, RamDstError::Unsupported { offset: 3, .. }));
}

fn discard<'a>(block: &'a str, ranges: &[(u64, u64)]) -> Item<'a> {
    cmd(Command::RamDiscard(Discard {
        block,
        ranges: ranges
            .iter()
            .map(|&(start, len)| DiscardRange { start, len })
            .collect(),
    }))
}

#[test]
fn discard_drops_pages_and_received_bits() {
    let mut d = with_ram(8 * PS);
    let a = [1u8; 4096];
    for p in 0..8 {
        feed(
            &mut d,
            10 + p,
            ram(RamRecord::page(p * PS, Some("pc.ram"), &a)),
        )
        .unwrap();
    }
    feed(&mut d, 100, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(
        &mut d,
        110,
        discard("pc.ram", &[(PS, 2 * PS), (6 * PS, PS)]),
    )
    .unwrap();
    assert_eq!(d.postcopy_state(), PostcopyState::Discarding);
    assert_eq!(
        d.blocks()[0].received().iter_ones().collect::<Vec<_>>(),
        vec![0, 3, 4, 5, 7]
    );
    assert!(mem(&d)[4096..12288].iter().all(|&b| b == 0));
    assert!(mem(&d)[12288..16384].iter().all(|&b| b == 1));
    assert_eq!(d.stats().discarded_pages, 3);
    // Several discards in a row are fine.
    feed(&mut d, 120, discard("pc.ram", &[(0, PS)])).unwrap();
}

#[test]
fn discard_is_checked_before_anything_is_dropped() {
    let cases: [(&str, &[(u64, u64)]); 5] = [
        ("unaligned start", &[(0, PS), (100, PS)]),
        ("unaligned length", &[(0, PS), (0, 100)]),
        ("past the end", &[(0, PS), (7 * PS, 2 * PS)]),
        ("overflow", &[(0, PS), (PS, !0xfffu64)]),
        ("start past the end", &[(0, PS), (9 * PS, 0)]),
    ];
    for (what, ranges) in cases {
        let mut d = with_ram(8 * PS);
        let a = [1u8; 4096];
        feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
        feed(&mut d, 20, cmd(Command::PostcopyAdvise(None))).unwrap();
        let e = feed(&mut d, 30, discard("pc.ram", ranges)).unwrap_err();
        assert!(
            matches!(e, RamDstError::Discard { offset: 30, .. }),
            "{what}: {e}"
        );
        assert!(
            d.blocks()[0].received().get(0),
            "{what}: first range must not be applied"
        );
        assert_eq!(mem(&d)[0], 1, "{what}");
    }
    let mut d = with_ram(8 * PS);
    feed(&mut d, 20, cmd(Command::PostcopyAdvise(None))).unwrap();
    assert!(matches!(
        feed(&mut d, 30, discard("nope", &[])),
        Err(RamDstError::UnknownBlock { .. })
    ));
}

#[test]
fn discard_alignment_follows_the_block_page_size() {
    let huge = LocalBlock {
        page_size: 8192,
        ..LocalBlock::fixed("m", 8 * PS)
    };
    let mut d = fixed(vec![huge]);
    feed(&mut d, 0, cmd(Command::PostcopyAdvise(None))).unwrap();
    assert!(matches!(
        feed(&mut d, 30, discard("m", &[(PS, PS)])),
        Err(RamDstError::Discard { .. })
    ));
}

/// Memory for blocks too big to allocate: accesses go to one scratch page,
/// discards are counted.
#[derive(Default)]
struct CountingMemory {
    scratch: Vec<u8>,
    discards: u64,
}

impl GuestMemory for CountingMemory {
    fn set_block_len(&mut self, _: usize, _: &str, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn bytes_mut(&mut self, _: usize, _: u64, len: usize) -> std::io::Result<&mut [u8]> {
        self.scratch.resize(len, 0);
        Ok(&mut self.scratch)
    }
    fn discard(&mut self, _: usize, _: u64, _: u64) -> std::io::Result<()> {
        self.discards += 1;
        Ok(())
    }
}

/// Issue 14, case 2: one POSTCOPY_RAM_DISCARD with 4000 ranges each over a
/// whole 512 GiB block (the largest adopted; 4000 is what a be16 command
/// length allows; QEMU's loader takes any count that fits, the source sends
/// at most 12). Each range costs the non-zero words it touches, not its
/// length: this returns at once instead of after minutes.
#[test]
fn discard_bomb_costs_the_words_it_touches() {
    const BIG: u64 = MAX_ADOPTED_PAGES * PS;
    let mut d = RamDst::new(Config::default(), CountingMemory::default()).unwrap();
    d.handle_item(0, 10, &ram(RamRecord::mem_size(vec![mb("pc.ram", BIG)])))
        .unwrap();
    let a = [1u8; 4096];
    for (i, off) in [0, BIG / 2, BIG - PS].into_iter().enumerate() {
        d.handle_item(
            10 + i as u64,
            1,
            &ram(RamRecord::page(off, Some("pc.ram"), &a)),
        )
        .unwrap();
    }
    d.handle_item(20, 1, &cmd(Command::PostcopyAdvise(None)))
        .unwrap();
    let ranges = vec![(0, BIG); 4000];
    d.handle_item(30, 64_000, &discard("pc.ram", &ranges))
        .unwrap();
    assert_eq!(d.memory().discards, 1, "only the first range had data");
    assert_eq!(d.blocks()[0].received().count_ones(), 0);
    assert_eq!(d.stats().discarded_pages, 4000 * (BIG / PS));
    // And a range past the end is still refused before anything is touched.
    let e = d
        .handle_item(70_000, 20, &discard("pc.ram", &[(0, PS), (BIG, PS)]))
        .unwrap_err();
    assert!(
        matches!(e, RamDstError::Discard { offset: 70_000, .. }),
        "{e}"
    );
}

/// Issue 14, case 3: a 1 GiB host page in postcopy, replayed (Apply): the
/// target pages go straight to memory, no host-page buffer is allocated, and
/// the received bits appear only once the whole host page is in.
#[test]
fn gigabyte_host_page_is_applied_without_a_buffer() {
    const GIB: u64 = 1 << 30;
    let blk = LocalBlock {
        page_size: GIB,
        ..LocalBlock::fixed("huge", 2 * GIB)
    };
    let cfg = Config {
        layout: Layout::Fixed(vec![blk]),
        ..Config::default()
    };
    let mut d = RamDst::new(cfg, CountingMemory::default()).unwrap();
    for (i, c) in [Command::PostcopyAdvise(None), Command::PostcopyListen]
        .into_iter()
        .enumerate()
    {
        d.handle_item(i as u64, 1, &cmd(c)).unwrap();
    }
    let a = [3u8; 4096];
    let pages = GIB / PS;
    for p in 0..pages {
        let rec = if p == 5 {
            RamRecord::page(GIB + p * PS, Some("huge"), &a)
        } else {
            RamRecord::zero(GIB + p * PS, (p == 0).then_some("huge"))
        };
        d.handle_item(10 + p, 1, &ram(rec)).unwrap();
        if p == pages / 2 {
            let hp = d.host_page.as_ref().unwrap();
            assert_eq!(hp.data.capacity(), 0, "no assembly buffer in Apply mode");
            assert_eq!(d.blocks()[0].received().count_ones(), 0);
        }
    }
    assert!(d.host_page.is_none());
    assert_eq!(d.blocks()[0].received().count_ones(), pages);
    assert_eq!(d.stats().placed_host_pages, 1);
}

#[test]
fn target_page_size_outside_qemus_range_is_refused() {
    for bits in [9, 17, 30] {
        let cfg = Config {
            target_page_bits: bits,
            ..Config::default()
        };
        assert!(
            matches!(
                RamDst::new(cfg, VecMemory::new()),
                Err(RamDstError::BadSize { .. })
            ),
            "{bits}"
        );
    }
    for bits in [10, 16] {
        let cfg = Config {
            target_page_bits: bits,
            ..Config::default()
        };
        assert!(RamDst::new(cfg, VecMemory::new()).is_ok(), "{bits}");
    }
}

#[test]
fn adopted_block_count_is_capped() {
    let mut d = adopt();
    let names: Vec<String> = (0..MAX_ADOPTED_BLOCKS + 1)
        .map(|i| format!("b{i}"))
        .collect();
    let mut at = 0;
    for chunk in names.chunks(1000) {
        let list: Vec<MemBlock<'_>> = chunk.iter().map(|n| mb(n, 0)).collect();
        let r = feed(&mut d, at, ram(RamRecord::mem_size(list)));
        at += 10;
        if chunk.len() < 1000 {
            let e = r.unwrap_err();
            assert!(matches!(e, RamDstError::BadSize { .. }), "{e}");
        } else {
            r.unwrap();
        }
    }
    assert_eq!(d.blocks().len(), 4000);
}

// ---- postcopy state machine ----------------------------------------------------------

fn illegal(r: Result<(), RamDstError>, state: PostcopyState) {
    match r {
        Err(RamDstError::IllegalTransition { state: s, .. }) => assert_eq!(s, state),
        other => panic!("expected an illegal transition from {state:?}, got {other:?}"),
    }
}

#[test]
fn postcopy_full_sequence() {
    let mut d = with_ram(4 * PS);
    assert_eq!(d.postcopy_state(), PostcopyState::None);
    feed(
        &mut d,
        1,
        cmd(Command::PostcopyAdvise(Some(Advise {
            page_size_summary: PS,
            target_page_size: PS,
        }))),
    )
    .unwrap();
    feed(&mut d, 2, discard("pc.ram", &[(0, PS)])).unwrap();
    feed(&mut d, 3, cmd(Command::PostcopyListen)).unwrap();
    feed(&mut d, 4, cmd(Command::PostcopyRun)).unwrap();
    feed(&mut d, 5, Item::Eof).unwrap();
    assert_eq!(d.postcopy_state(), PostcopyState::End);
    use PostcopyState as P;
    let states: Vec<_> = actions(&mut d)
        .into_iter()
        .filter_map(|a| {
            if let Out::E(Event::PostcopyState(s)) = a {
                Some(s)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        states,
        vec![P::Advised, P::Discarding, P::Listening, P::Running, P::End]
    );
}

#[test]
fn listen_straight_after_advise() {
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 3, cmd(Command::PostcopyListen)).unwrap();
    assert_eq!(d.postcopy_state(), PostcopyState::Listening);
}

#[test]
fn illegal_transitions() {
    use PostcopyState as P;
    let mut d = with_ram(4 * PS);
    illegal(feed(&mut d, 1, cmd(Command::PostcopyListen)), P::None);
    let mut d = with_ram(4 * PS);
    illegal(feed(&mut d, 1, cmd(Command::PostcopyRun)), P::None);
    let mut d = with_ram(4 * PS);
    illegal(feed(&mut d, 1, discard("pc.ram", &[])), P::None);
    let mut d = with_ram(4 * PS);
    illegal(feed(&mut d, 1, cmd(Command::PostcopyResume)), P::None);
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    illegal(
        feed(&mut d, 2, cmd(Command::PostcopyAdvise(None))),
        P::Advised,
    );
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    illegal(feed(&mut d, 2, cmd(Command::PostcopyRun)), P::Advised);
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 2, cmd(Command::PostcopyListen)).unwrap();
    illegal(feed(&mut d, 3, discard("pc.ram", &[])), P::Listening);
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 2, cmd(Command::PostcopyListen)).unwrap();
    illegal(feed(&mut d, 3, cmd(Command::PostcopyListen)), P::Listening);
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 2, cmd(Command::PostcopyListen)).unwrap();
    feed(&mut d, 3, cmd(Command::PostcopyRun)).unwrap();
    illegal(feed(&mut d, 4, cmd(Command::PostcopyRun)), P::Running);
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 2, cmd(Command::PostcopyListen)).unwrap();
    let e = feed(
        &mut d,
        3,
        ram(RamRecord::mem_size(vec![mb("pc.ram", 4 * PS)])),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        RamDstError::NotInPostcopy {
            kind: "MEM_SIZE",
            ..
        }
    ));
    let mut d = with_ram(4 * PS);
    feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 2, cmd(Command::PostcopyListen)).unwrap();
    feed(&mut d, 3, Item::Eof).unwrap();
    illegal(
        feed(&mut d, 4, ram(RamRecord::zero(0, Some("pc.ram")))),
        P::End,
    );
}

#[test]
fn advise_checks_page_sizes() {
    let mut d = with_ram(4 * PS);
    let e = feed(
        &mut d,
        1,
        cmd(Command::PostcopyAdvise(Some(Advise {
            page_size_summary: PS,
            target_page_size: 8192,
        }))),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        RamDstError::PageSizeMismatch {
            offset: 1,
            remote: 8192,
            ..
        }
    ));
    let mut d = fixed(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    let a = Advise {
        page_size_summary: PS | (2 << 20),
        target_page_size: PS,
    };
    assert!(matches!(
        feed(&mut d, 1, cmd(Command::PostcopyAdvise(Some(a)))),
        Err(RamDstError::PageSizeMismatch { .. })
    ));
}

fn listening(d: &mut RamDst<VecMemory>) {
    feed(d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(d, 2, cmd(Command::PostcopyListen)).unwrap();
    let _ = actions(d);
}

fn huge_block() -> LocalBlock {
    LocalBlock {
        page_size: 2 * PS,
        ..LocalBlock::fixed("pc.ram", 8 * PS)
    }
}

#[test]
fn postcopy_refuses_xbzrle_and_compressed() {
    let mut d = with_ram(4 * PS);
    listening(&mut d);
    let e = feed(&mut d, 9, ram(RamRecord::xbzrle(0, Some("pc.ram"), &[]))).unwrap_err();
    assert!(matches!(
        e,
        RamDstError::NotInPostcopy {
            offset: 9,
            kind: "XBZRLE"
        }
    ));
    let mut d = with_ram(4 * PS);
    listening(&mut d);
    let e = feed(
        &mut d,
        9,
        ram(RamRecord::compressed(0, Some("pc.ram"), &[])),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        RamDstError::NotInPostcopy {
            kind: "COMPRESS_PAGE",
            ..
        }
    ));
    let mut d = with_ram(4 * PS);
    listening(&mut d);
    feed(&mut d, 9, ram(RamRecord::eos())).unwrap();
}

#[test]
fn postcopy_assembles_host_pages_and_emits_placements() {
    let mut d = emit(vec![huge_block()]);
    listening(&mut d);
    let a = [1u8; 4096];
    let b = [2u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    assert!(actions(&mut d).is_empty(), "half a host page is not placed");
    assert!(!d.blocks()[0].received().get(2));
    feed(&mut d, 20, ram(RamRecord::page(3 * PS, None, &b))).unwrap();
    let mut want = a.to_vec();
    want.extend_from_slice(&b);
    assert_eq!(
        actions(&mut d),
        vec![Out::P(Place::HostPage {
            block: 0,
            offset: 2 * PS,
            data: want
        })]
    );
    assert!(
        !d.blocks()[0].received().get(2),
        "received only once the host reports the placement"
    );
    assert_eq!(
        d.stats().placed_host_pages,
        0,
        "counted once placed, not when handed out"
    );
    d.handle_placed(0, 2 * PS, 2 * PS).unwrap();
    assert_eq!(d.stats().placed_host_pages, 1);
    assert!(d.blocks()[0].received().get(2) && d.blocks()[0].received().get(3));
    assert!(
        mem(&d).iter().all(|&x| x == 0),
        "Emit mode leaves memory to the host"
    );
    feed(&mut d, 30, ram(RamRecord::zero(4 * PS, None))).unwrap();
    feed(&mut d, 40, ram(RamRecord::zero(5 * PS, None))).unwrap();
    assert_eq!(
        actions(&mut d),
        vec![Out::P(Place::ZeroPage {
            block: 0,
            offset: 4 * PS,
            len: 2 * PS
        })]
    );
    assert_eq!(d.stats().placed_zero_pages, 0, "handed out, not placed");
    d.handle_placed(0, 4 * PS, 2 * PS).unwrap();
    assert_eq!(d.stats().placed_host_pages, 1);
    assert_eq!(d.stats().placed_zero_pages, 1);
}

#[test]
fn a_recycled_page_buffer_assembles_the_next_host_page() {
    let mut d = emit(vec![huge_block()]);
    listening(&mut d);
    let host_page = |d: &mut RamDst<VecMemory>, at: u64, off: u64, v: u8| {
        feed(d, at, ram(RamRecord::page(off, Some("pc.ram"), &[v; 4096]))).unwrap();
        feed(
            d,
            at + 1,
            ram(RamRecord::page(off + PS, None, &[v + 1; 4096])),
        )
        .unwrap();
        match d.poll_placement() {
            Some(Place::HostPage { offset, data, .. }) if offset == off => data,
            other => panic!("{other:?}"),
        }
    };
    let first = host_page(&mut d, 10, 2 * PS, 1);
    let ptr = first.as_ptr();
    d.handle_placed(0, 2 * PS, 2 * PS).unwrap();
    d.recycle_page_buffer(first);
    let second = host_page(&mut d, 20, 4 * PS, 5);
    assert_eq!(second.as_ptr(), ptr, "assembled in the given-back buffer");
    assert_eq!(second.len(), 2 * PS as usize);
    assert!(second[..4096].iter().all(|&x| x == 5) && second[4096..].iter().all(|&x| x == 6));
}

#[test]
fn postcopy_apply_mode_writes_memory() {
    let mut d = fixed(vec![huge_block()]);
    listening(&mut d);
    let a = [1u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    // Replay applies target pages as they come (no host-page buffer), but the
    // host page counts as received only once complete.
    assert_eq!(&mem(&d)[..4096], &a[..]);
    assert!(!d.blocks()[0].received().get(0));
    feed(&mut d, 20, ram(RamRecord::zero(PS, None))).unwrap();
    assert!(d.blocks()[0].received().get(0) && d.blocks()[0].received().get(1));
    assert_eq!(&mem(&d)[..4096], &a[..]);
    assert!(mem(&d)[4096..].iter().all(|&x| x == 0));
}

#[test]
fn postcopy_order_is_enforced() {
    let a = [1u8; 4096];
    // Starting in the middle of a host page.
    let mut d = fixed(vec![huge_block()]);
    listening(&mut d);
    let e = feed(&mut d, 10, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap_err();
    assert!(matches!(
        e,
        RamDstError::PostcopyOrder {
            offset: 10,
            page_offset: 4096,
            ..
        }
    ));
    // Skipping a target page.
    let mut d = fixed(vec![huge_block()]);
    listening(&mut d);
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    assert!(matches!(
        feed(&mut d, 20, ram(RamRecord::page(3 * PS, None, &a))),
        Err(RamDstError::PostcopyOrder { .. })
    ));
    // A new host page before the previous one is complete.
    let mut d = fixed(vec![huge_block()]);
    listening(&mut d);
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    assert!(matches!(
        feed(&mut d, 20, ram(RamRecord::page(2 * PS, None, &a))),
        Err(RamDstError::PostcopyOrder { .. })
    ));
    // The stream ends inside a host page.
    let mut d = fixed(vec![huge_block()]);
    listening(&mut d);
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    assert!(matches!(
        feed(&mut d, 20, Item::Eof),
        Err(RamDstError::PostcopyOrder { offset: 20, .. })
    ));
}

#[test]
fn recv_bitmap_and_resume_only_in_recovery() {
    // Issue 14 case 3: RECV_BITMAP outside postcopy-recover is refused, as
    // QEMU's loadvm_handle_recv_bitmap does, so no bitmap is ever sent.
    for state_setup in [false, true] {
        let mut d = with_ram(4 * PS);
        feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
        if state_setup {
            listening(&mut d);
        }
        actions(&mut d);
        let e = feed(&mut d, 1, cmd(Command::RecvBitmap { block: "pc.ram" })).unwrap_err();
        assert!(
            matches!(
                e,
                RamDstError::QemuRule {
                    offset: 1,
                    function: "loadvm_handle_recv_bitmap",
                    ..
                }
            ),
            "{e}"
        );
        assert!(actions(&mut d).is_empty());
    }
    // POSTCOPY_RESUME outside recovery: refused (QEMU's
    // loadvm_postcopy_handle_resume sends no RESUME_ACK then), a typed error.
    let mut d = with_ram(4 * PS);
    listening(&mut d);
    actions(&mut d);
    let e = feed(&mut d, 3, cmd(Command::PostcopyResume)).unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::IllegalTransition {
                offset: 3,
                state: PostcopyState::Listening,
                event: "POSTCOPY_RESUME"
            }
        ),
        "{e}"
    );
    assert!(d.is_stopped());
}

#[test]
fn ping_needs_a_return_path() {
    let mut d = adopt();
    let e = feed(&mut d, 7, cmd(Command::Ping(1))).unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::QemuRule {
                offset: 7,
                function: "loadvm_process_command",
                ..
            }
        ),
        "{e}"
    );
    assert!(actions(&mut d).is_empty());
}

// ---- received bitmap wire form -------------------------------------------------------

#[test]
fn recv_bitmap_reply_round_trip() {
    let mut d = with_ram(130 * PS);
    let a = [1u8; 4096];
    for p in [0u64, 1, 63, 64, 129] {
        feed(&mut d, 10, ram(RamRecord::page(p * PS, Some("pc.ram"), &a))).unwrap();
    }
    let mut out = Vec::new();
    assert!(d.recv_bitmap_reply(0, &mut out).unwrap());
    assert!(!d.recv_bitmap_reply(5, &mut Vec::new()).unwrap());
    // be16 type 5, be16 len 7, counted name, be64 size 24, 24 bytes, end marker.
    assert_eq!(&out[..4], &[0, 5, 0, 7]);
    assert_eq!(&out[4..11], b"\x06pc.ram");
    assert_eq!(&out[11..19], &24u64.to_be_bytes());
    assert_eq!(out[19], 0b11);
    assert_eq!(out[19 + 7], 0x80);
    assert_eq!(out[19 + 8], 1);
    assert_eq!(out[19 + 16], 0b10);
    assert_eq!(&out[43..], &0x0123_4567_89ab_cdefu64.to_be_bytes());
    let (name, bm, len) =
        parse_recv_bitmap_reply(&out, |n| (n == "pc.ram").then_some(130)).unwrap();
    assert_eq!((name.as_str(), len), ("pc.ram", out.len()));
    assert_eq!(&bm, d.blocks()[0].received());
    assert!(matches!(
        parse_recv_bitmap_reply(&out, |_| None),
        Err(RamDstError::UnknownBlock { .. })
    ));
    assert!(matches!(
        parse_recv_bitmap_reply(&out, |_| Some(500)),
        Err(RamDstError::Bitmap { .. })
    ));
    let mut bad = out.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(parse_recv_bitmap_reply(&bad, |_| Some(130)).is_err());
    assert!(parse_recv_bitmap_reply(&out[..20], |_| Some(130)).is_err());
}

// ---- mmap'd memory -------------------------------------------------------------------

#[test]
fn mmap_memory_keeps_data_across_page_releases() {
    // Writes and reads back more than RELEASE_EVERY several times over, so the
    // mapped pages are released (MADV_DONTNEED) between accesses: every byte
    // written must still read back, through the mapping and in the file.
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-ram-dst-release-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    let mut mem = MmapMemory::create(&dir).unwrap();
    let len = 3 * crate::mmap::RELEASE_EVERY;
    mem.set_block_len(0, "pc.ram", len).unwrap();
    mem.set_block_len(1, "small", 2 * PS).unwrap();
    let page = |p: u64| [(p % 251) as u8 | 1; PS as usize];
    for p in 0..len / PS {
        mem.write(0, p * PS, &page(p)).unwrap();
        if p % 1000 == 0 {
            mem.write(1, PS, &page(p)).unwrap();
            assert_eq!(mem.bytes_mut(1, PS, PS as usize).unwrap(), &page(p)[..]);
        }
    }
    for p in (0..len / PS).rev() {
        assert_eq!(mem.bytes_mut(0, p * PS, PS as usize).unwrap(), &page(p)[..]);
    }
    let file = std::fs::read(dir.join("pc.ram.img")).unwrap();
    for p in 0..len / PS {
        let at = (p * PS) as usize;
        assert_eq!(&file[at..at + PS as usize], &page(p)[..]);
    }
    drop(mem);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mapped_input_reads_the_file_while_its_pages_are_released() {
    // A releaser thread drops the mapping's pages every millisecond while the
    // whole file is read over and over: every read sees the file's bytes,
    // and dropping the value (which stops the thread before unmapping) and
    // mapping again works.
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-ram-dst-input-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("image");
    let want: Vec<u8> = (0..(8u32 << 20) + 123)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&path, &want).unwrap();
    for _ in 0..3 {
        let mut m = crate::MappedInput::new(std::fs::File::open(&path).unwrap()).unwrap();
        m.release_periodically(std::time::Duration::from_millis(1))
            .unwrap();
        m.release_periodically(std::time::Duration::from_millis(1))
            .unwrap();
        for _ in 0..20 {
            assert!(m.as_slice() == &want[..]);
        }
        drop(m);
    }
    // An empty file has nothing to release.
    std::fs::write(&path, b"").unwrap();
    let mut m = crate::MappedInput::new(std::fs::File::open(&path).unwrap()).unwrap();
    m.release_periodically(std::time::Duration::from_millis(1))
        .unwrap();
    assert!(m.as_slice().is_empty());
    drop(m);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mmap_memory_writes_files_sparsely_and_punches_holes() {
    use std::os::unix::fs::MetadataExt;
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-ram-dst-test-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    let mem = MmapMemory::create(&dir).unwrap();
    let mut d = RamDst::new(Config::default(), mem).unwrap();
    let len = 64u64 << 20;
    d.handle_item(
        0,
        10,
        &ram(RamRecord::mem_size(vec![
            mb("pc.ram", len),
            mb("a/b", PS),
            mb("manifest", PS),
        ])),
    )
    .unwrap();
    let a = [0xabu8; 4096];
    d.handle_item(10, 10, &ram(RamRecord::page(5 * PS, Some("pc.ram"), &a)))
        .unwrap();
    d.handle_item(20, 10, &ram(RamRecord::page(0, Some("a/b"), &a)))
        .unwrap();
    let files = d.memory().files();
    assert_eq!(files[0].file_name, "pc.ram.img");
    assert_eq!(files[1].file_name, "a_b.img");
    assert_eq!(
        files[2].file_name, "manifest-2.img",
        "never clobbers manifest.json's stem"
    );
    let img = dir.join("pc.ram.img");
    let content = std::fs::read(&img).unwrap();
    assert_eq!(content.len() as u64, len);
    assert_eq!(&content[5 * 4096..6 * 4096], &a[..]);
    assert!(
        std::fs::metadata(&img).unwrap().blocks() * 512 < 1 << 20,
        "image stays sparse"
    );
    d.handle_item(30, 10, &cmd(Command::PostcopyAdvise(None)))
        .unwrap();
    d.handle_item(40, 10, &discard("pc.ram", &[(4 * PS, 4 * PS)]))
        .unwrap();
    let content = std::fs::read(&img).unwrap();
    assert!(content[5 * 4096..6 * 4096].iter().all(|&b| b == 0));
    // Out-of-range access is refused by the memory itself.
    let mut m = d.into_memory();
    assert!(m.bytes_mut(0, len - 4095, 4096).is_err());
    assert!(m.bytes_mut(7, 0, 1).is_err());
    m.set_block_len(1, "a/b", 2 * PS).unwrap();
    assert_eq!(m.bytes_mut(1, 0, 4096).unwrap()[0], 0xab);
    drop(m);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vec_memory_limit_and_bounds() {
    let mut m = VecMemory::with_limit(3 * PS);
    m.set_block_len(0, "a", 2 * PS).unwrap();
    assert!(m.set_block_len(1, "b", 2 * PS).is_err());
    assert!(m.set_block_len(5, "b", PS).is_err());
    assert!(m.bytes_mut(0, 2 * PS, 1).is_err());
    assert!(m.bytes_mut(0, u64::MAX, 2).is_err());
    m.discard(0, 0, PS).unwrap();
    assert!(m.discard(0, PS, 2 * PS).is_err());
}

#[test]
fn file_memory_combines_writes_and_writes_back_modified_pages() {
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-ram-dst-file-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    let mut d = RamDst::new(Config::default(), FileMemory::create(&dir).unwrap()).unwrap();
    d.handle_item(0, 10, &ram(RamRecord::mem_size(vec![mb("pc.ram", 8 * PS)])))
        .unwrap();
    let a = [1u8; 4096];
    let b = [2u8; 4096];
    for p in 0..3 {
        d.handle_item(10, 10, &ram(RamRecord::page(p * PS, Some("pc.ram"), &a)))
            .unwrap();
    }
    // XBZRLE reads the buffered page back, modifies it, writes it back later.
    let mut new = a;
    new[10] = 9;
    let mut enc = vec![0u8; 4096];
    let n = qmig_xbzrle::encode(&a, &new, &mut enc).unwrap();
    d.handle_item(20, 10, &ram(RamRecord::xbzrle(PS, None, &enc[..n])))
        .unwrap();
    d.handle_item(30, 10, &ram(RamRecord::page(7 * PS, None, &b)))
        .unwrap();
    d.handle_item(40, 10, &ram(RamRecord::zero(0, None)))
        .unwrap();
    d.handle_item(50, 10, &cmd(Command::PostcopyAdvise(None)))
        .unwrap();
    d.handle_item(60, 10, &discard("pc.ram", &[(2 * PS, PS)]))
        .unwrap();
    d.memory_mut().flush().unwrap();
    let img = std::fs::read(dir.join("pc.ram.img")).unwrap();
    assert!(img[..4096].iter().all(|&x| x == 0));
    assert_eq!(&img[4096..8192], &new[..]);
    assert!(img[8192..12288].iter().all(|&x| x == 0), "discarded");
    assert_eq!(&img[7 * 4096..], &b[..]);
    assert_eq!(d.memory().files()[0].length, 8 * PS);
    let mut m = d.into_memory();
    assert!(m.write(0, 8 * PS, &a).is_err());
    assert!(m.bytes_mut(1, 0, 1).is_err());
    drop(m);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- parity with QEMU 10's loader ----------------------------------------------------

fn config(machine: &str) -> Item<'_> {
    Item::Configuration(qmig_wire::Configuration {
        machine,
        subsections: vec![],
    })
}

fn zero_fill(off: u64, fill: u8) -> Item<'static> {
    let mut r = RamRecord::zero(off, Some("pc.ram"));
    r.body = qmig_wire::RamBody::Zero { fill };
    ram(r)
}

#[test]
fn machine_versions() {
    for (m, v) in [
        ("pc-i440fx-10.0", Some((10, 0))),
        ("pc-q35-8.2", Some((8, 2))),
        ("virt-9.1", Some((9, 1))),
        ("pseries-7.2", Some((7, 2))),
        ("s390-ccw-virtio-8.1", Some((8, 1))),
        ("microvm", None),
        ("pc-q35-rhel9.4.0", None),
        ("pc", None),
        ("none", None),
    ] {
        assert_eq!(machine_qemu_version(m), v, "{m}");
    }
}

/// Issue 14 case 4: ZERO fill 0x55 from a QEMU >= 8.2 machine is refused
/// (ram_load_precopy's "Found a zero page with value 85"); from an older or
/// unversioned machine it is applied and reported as a leniency.
#[test]
fn zero_fill_follows_the_machine_version() {
    for (machine, strict) in [
        ("pc-i440fx-10.0", true),
        ("pc-q35-8.2", true),
        ("pc-i440fx-8.1", false),
        ("pc-i440fx-7.2", false),
        ("microvm", false),
    ] {
        let mut d = adopt();
        feed(&mut d, 0, config(machine)).unwrap();
        feed(
            &mut d,
            5,
            ram(RamRecord::mem_size(vec![mb("pc.ram", 4 * PS)])),
        )
        .unwrap();
        let r = feed(&mut d, 10, zero_fill(PS, 0x55));
        if strict {
            let e = r.unwrap_err();
            assert!(
                matches!(
                    e,
                    RamDstError::QemuRule {
                        offset: 10,
                        function: "ram_load_precopy",
                        ..
                    }
                ),
                "{machine}: {e}"
            );
            assert!(e.to_string().contains("value 85"), "{e}");
            assert!(mem(&d)[4096..8192].iter().all(|&b| b == 0));
            assert!(d.leniencies().is_empty());
        } else {
            r.unwrap();
            assert!(mem(&d)[4096..8192].iter().all(|&b| b == 0x55), "{machine}");
            assert_eq!(d.leniencies(), &[Leniency::NonZeroFill]);
        }
    }
}

#[test]
fn ram_section_instance_and_version() {
    use qmig_wire::SectionHeader;
    let mut d = adopt();
    feed(
        &mut d,
        0,
        Item::Section(SectionHeader::start(2, "ram", 0, 4)),
    )
    .unwrap();
    feed(
        &mut d,
        0,
        Item::Section(SectionHeader::start(3, "other", 7, 9)),
    )
    .unwrap();
    let e = feed(
        &mut d,
        3,
        Item::Section(SectionHeader::start(4, "ram", 1, 4)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::QemuRule {
                offset: 3,
                function: "qemu_loadvm_section_start_full",
                ..
            }
        ),
        "{e}"
    );
    let mut d = adopt();
    let e = feed(
        &mut d,
        3,
        Item::Section(SectionHeader::start(2, "ram", 0, 3)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::QemuRule {
                function: "ram_load",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn postcopy_refuses_multifd_flush_and_fill() {
    let mut d = with_ram(4 * PS);
    listening(&mut d);
    let mut r = RamRecord::eos();
    r.body = qmig_wire::RamBody::MultifdFlush;
    r.flags = 0x200;
    let e = feed(&mut d, 9, ram(r)).unwrap_err();
    assert!(
        matches!(e, RamDstError::NotInPostcopy { offset: 9, .. }),
        "{e}"
    );

    let mut d = with_ram(4 * PS);
    feed(&mut d, 0, config("pc-q35-9.2")).unwrap();
    listening(&mut d);
    let e = feed(&mut d, 9, zero_fill(0, 1)).unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::QemuRule {
                function: "ram_load_postcopy",
                ..
            }
        ),
        "{e}"
    );
}

/// QEMU places each host page once (postcopy_place_page: EEXIST is fatal):
/// a page received before LISTEN and not discarded, or placed already.
#[test]
fn postcopy_page_placed_twice_is_refused() {
    let a = [7u8; 4096];
    let mut d = with_ram(4 * PS);
    feed(&mut d, 3, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap();
    listening(&mut d);
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    for (at, off) in [(20, 0), (30, PS)] {
        let e = feed(&mut d, at, ram(RamRecord::page(off, Some("pc.ram"), &a))).unwrap_err();
        assert!(
            matches!(
                e,
                RamDstError::QemuRule {
                    function: "postcopy_place_page",
                    ..
                }
            ),
            "{e}"
        );
        d = with_ram(4 * PS);
        feed(&mut d, 3, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap();
        listening(&mut d);
    }
    // Discarded first: fine.
    let mut d = with_ram(4 * PS);
    feed(&mut d, 3, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 4, cmd(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut d, 5, discard("pc.ram", &[(PS, PS)])).unwrap();
    feed(&mut d, 6, cmd(Command::PostcopyListen)).unwrap();
    feed(&mut d, 30, ram(RamRecord::page(PS, Some("pc.ram"), &a))).unwrap();
}

#[test]
fn compressed_page_from_a_9_1_machine_is_refused() {
    let mut d = with_ram(4 * PS);
    feed(&mut d, 0, config("pc-q35-9.1")).unwrap();
    let z = deflate(&[0u8; 4096]);
    let e = feed(&mut d, 8, ram(RamRecord::compressed(0, Some("pc.ram"), &z))).unwrap_err();
    assert!(
        matches!(
            e,
            RamDstError::QemuRule {
                function: "ram_load_precopy",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn adopted_pages_are_capped_for_bitmap_memory() {
    let mut d = adopt();
    let e = feed(
        &mut d,
        0,
        ram(RamRecord::mem_size(vec![
            mb("a", MAX_ADOPTED_PAGES * PS),
            mb("b", PS),
        ])),
    )
    .unwrap_err();
    assert!(e.to_string().contains("target pages"), "{e}");
    assert!(d.blocks().is_empty());
    let mut d = RamDst::new(Config::default(), CountingMemory::default()).unwrap();
    d.handle_item(
        0,
        1,
        &ram(RamRecord::mem_size(vec![mb("a", MAX_ADOPTED_PAGES * PS)])),
    )
    .unwrap();
}

// ---- page faults and the return path (handle_page_fault / poll_transmit) ----------

/// Every return-path message queued so far.
fn transmitted<M: GuestMemory>(d: &mut RamDst<M>) -> Vec<qmig_wire::RpMessage<'static>> {
    let mut out = Vec::new();
    d.poll_transmit(&mut out);
    let out: &'static [u8] = Box::leak(out.into_boxed_slice());
    qmig_wire::parse_return_path(out)
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

/// Two blocks (huge pages in the first), return path open, listening.
fn faulting() -> RamDst<VecMemory> {
    let mut d = emit(vec![huge_block(), LocalBlock::fixed("vram", 4 * PS)]);
    feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
    listening(&mut d);
    d
}

#[test]
fn pong_is_transmitted_by_the_state_machine() {
    let mut d = adopt();
    feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
    feed(&mut d, 5, cmd(Command::Ping(7))).unwrap();
    feed(&mut d, 9, cmd(Command::Ping(8))).unwrap();
    use qmig_wire::RpMessage as M;
    assert_eq!(transmitted(&mut d), vec![M::Pong(7), M::Pong(8)]);
    assert!(!d.poll_transmit(&mut Vec::new()), "drained");
}

#[test]
fn faults_request_whole_host_pages_once_with_block_names_when_they_change() {
    use qmig_wire::RpMessage as M;
    let mut d = faulting();
    // 2 target pages per host page in pc.ram: a fault inside one asks for it whole.
    assert_eq!(
        d.handle_page_fault(0, 3 * PS + 100).unwrap(),
        FaultOutcome::Requested
    );
    assert_eq!(
        d.handle_page_fault(0, 2 * PS).unwrap(),
        FaultOutcome::AlreadyRequested
    );
    assert_eq!(
        d.handle_page_fault(0, 6 * PS).unwrap(),
        FaultOutcome::Requested
    );
    assert_eq!(d.handle_page_fault(1, PS).unwrap(), FaultOutcome::Requested);
    assert_eq!(d.handle_page_fault(0, 0).unwrap(), FaultOutcome::Requested);
    assert_eq!(
        transmitted(&mut d),
        vec![
            M::ReqPagesId {
                start: 2 * PS,
                len: 2 * PS as u32,
                block: "pc.ram"
            },
            M::ReqPages {
                start: 6 * PS,
                len: 2 * PS as u32
            },
            M::ReqPagesId {
                start: PS,
                len: PS as u32,
                block: "vram"
            },
            M::ReqPagesId {
                start: 0,
                len: 2 * PS as u32,
                block: "pc.ram"
            },
        ]
    );
    assert_eq!(d.stats().page_requests, 4);
    assert_eq!(d.stats().faults_already_requested, 1);
    assert_eq!(d.outstanding_requests(), 4);
    // The page arrives and is placed: no longer outstanding, and received.
    let a = [3u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 20, ram(RamRecord::page(3 * PS, None, &a))).unwrap();
    let placed = actions(&mut d);
    assert!(
        matches!(placed[..], [Out::P(Place::HostPage { block: 0, offset, .. })] if offset == 2 * PS)
    );
    d.handle_placed(0, 2 * PS, 2 * PS).unwrap();
    assert_eq!(d.outstanding_requests(), 3);
    assert!(d.blocks()[0].received().get(2) && d.blocks()[0].received().get(3));
}

#[test]
fn a_fault_on_a_received_page_is_placed_locally_as_zero() {
    let mut d = emit(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
    // Precopy: page 1 arrives as ZERO (never written to memory).
    feed(
        &mut d,
        1,
        ram(RamRecord::mem_size(vec![mb("pc.ram", 4 * PS)])),
    )
    .unwrap();
    feed(&mut d, 2, ram(RamRecord::zero(PS, Some("pc.ram")))).unwrap();
    listening(&mut d);
    assert_eq!(
        d.handle_page_fault(0, PS).unwrap(),
        FaultOutcome::PlaceLocally
    );
    assert_eq!(
        actions(&mut d),
        vec![Out::P(Place::ZeroPage {
            block: 0,
            offset: PS,
            len: PS
        })]
    );
    assert!(
        transmitted(&mut d).is_empty(),
        "nothing asked of the source"
    );
    assert_eq!(d.stats().faults_resolved_locally, 1);
    d.handle_placed(0, PS, PS).unwrap();
    assert_eq!(
        (d.stats().placed_host_pages, d.stats().placed_zero_pages),
        (0, 0),
        "a local zero page is not a page of the stream"
    );
}

/// The machine stopped with SHUT(1) as the last (and only new) return-path message.
fn assert_shut_1<M: GuestMemory>(d: &mut RamDst<M>) {
    assert!(d.is_stopped());
    assert_eq!(d.shut_code(), Some(1));
    let msgs = transmitted(d);
    assert_eq!(
        msgs.last(),
        Some(&qmig_wire::RpMessage::Shut(1)),
        "{msgs:?}"
    );
}

#[test]
fn bad_faults_are_typed_errors_with_shut_1() {
    let bad = |r: Result<FaultOutcome, RamDstError>, why: &str| match r {
        Err(e @ RamDstError::BadFault { .. }) => {
            assert!(e.to_string().contains(why), "{e} (wanted {why:?})")
        }
        other => panic!("{other:?}"),
    };
    for (block, off, why) in [
        (2, 0, "no such block"),
        (1, 4 * PS, "outside \"vram\""),
        (0, u64::MAX, "outside \"pc.ram\""),
    ] {
        let mut d = faulting();
        bad(d.handle_page_fault(block, off), why);
        assert_shut_1(&mut d);
        // Stopped: later input is refused, nothing more is sent.
        assert!(matches!(
            d.handle_page_fault(0, 0),
            Err(RamDstError::Stopped { .. })
        ));
        assert!(!d.poll_transmit(&mut Vec::new()));
    }
    // Before any block exists.
    let mut d = RamDst::new(
        Config {
            placement: Placement::Emit,
            ..Config::default()
        },
        VecMemory::new(),
    )
    .unwrap();
    feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
    bad(d.handle_page_fault(0, 0), "no such block (0 blocks)");
    assert_shut_1(&mut d);
    // Placement reports that do not match a placement handed out.
    for (block, off, len, why) in [
        (0, PS, 2 * PS, "not whole host pages"),
        (0, 0, 3 * PS, "not whole host pages"),
        (0, 6 * PS, 4 * PS, "not whole host pages"),
        (9, 0, 2 * PS, "no such block"),
        (0, 0, 2 * PS, "not handed out"),
    ] {
        let mut d = faulting();
        let e = d.handle_placed(block, off, len).unwrap_err();
        assert!(
            matches!(e, RamDstError::BadFault { .. }) && e.to_string().contains(why),
            "{e} (wanted {why:?})"
        );
        assert_shut_1(&mut d);
    }
    // Before LISTEN (a return path open): SHUT(1).
    let mut e = emit(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    feed(&mut e, 0, cmd(Command::OpenReturnPath)).unwrap();
    bad(e.handle_page_fault(0, 0), "before POSTCOPY_LISTEN");
    assert_shut_1(&mut e);
    // Without a return path: a typed error, and no SHUT (nowhere to send it).
    let mut e = emit(vec![LocalBlock::fixed("pc.ram", 4 * PS)]);
    listening(&mut e);
    bad(e.handle_page_fault(0, 0), "return path");
    assert!(e.is_stopped() && e.shut_code().is_none());
    assert!(!e.poll_transmit(&mut Vec::new()));
    // After the stream ended, an unreceived page has nobody to ask.
    let mut f = faulting();
    feed(&mut f, 3, Item::Eof).unwrap();
    assert_eq!(f.postcopy_state(), PostcopyState::End);
    bad(f.handle_page_fault(0, 0), "nobody left to ask");
    assert_shut_1(&mut f);
}

#[test]
fn received_bits_are_set_only_when_the_placement_succeeded() {
    let mut d = faulting();
    let a = [5u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 20, ram(RamRecord::page(3 * PS, None, &a))).unwrap();
    assert!(matches!(
        actions(&mut d)[..],
        [Out::P(Place::HostPage { offset, .. })] if offset == 2 * PS
    ));
    // A fault while the placement is outstanding asks nothing.
    assert_eq!(
        d.handle_page_fault(0, 2 * PS).unwrap(),
        FaultOutcome::AlreadyRequested
    );
    assert!(transmitted(&mut d).is_empty());
    // The same host page again in the stream before the report: refused.
    let mut dup = faulting();
    feed(
        &mut dup,
        10,
        ram(RamRecord::page(2 * PS, Some("pc.ram"), &a)),
    )
    .unwrap();
    feed(&mut dup, 20, ram(RamRecord::page(3 * PS, None, &a))).unwrap();
    let e = feed(&mut dup, 30, ram(RamRecord::page(2 * PS, None, &a))).unwrap_err();
    assert!(e.to_string().contains("being placed"), "{e}");
    assert_shut_1(&mut dup);
    // The host reports a failure: bits stay clear, typed error, SHUT(1).
    let e = d.handle_place_failed(0, 2 * PS, 2 * PS, "UFFDIO_COPY: ENOMEM");
    assert!(
        matches!(
            &e,
            RamDstError::PlacementFailed { page_offset, len, block, .. }
                if *page_offset == 2 * PS && *len == 2 * PS && block == "pc.ram"
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("ENOMEM"), "{e}");
    assert!(!d.blocks()[0].received().get(2) && !d.blocks()[0].received().get(3));
    assert_eq!(
        (d.stats().placed_host_pages, d.stats().placed_zero_pages),
        (0, 0),
        "a failed placement is not counted"
    );
    assert_shut_1(&mut d);
}

#[test]
fn end_of_input_queues_shut_0_once() {
    let mut d = faulting();
    feed(&mut d, 3, Item::Eof).unwrap();
    d.handle_end_of_input().unwrap();
    assert_eq!(d.shut_code(), Some(0));
    assert_eq!(transmitted(&mut d), vec![qmig_wire::RpMessage::Shut(0)]);
    d.handle_failure();
    assert!(!d.poll_transmit(&mut Vec::new()), "one SHUT only");
    // Input ending inside a host page: SHUT(1).
    let mut d = faulting();
    let a = [5u8; 4096];
    feed(&mut d, 10, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    let e = d.handle_end_of_input().unwrap_err();
    assert!(e.to_string().contains("inside a host page"), "{e}");
    assert_shut_1(&mut d);
    // No return path: nothing to send either way.
    let mut d = adopt();
    d.handle_end_of_input().unwrap();
    assert!(d.shut_code().is_none() && !d.poll_transmit(&mut Vec::new()));
}

// ---- postcopy model: faults in any order, any discard set ---------------------------

/// Guest memory that also tracks which 4 KiB pages are *present* (written
/// at least once and not discarded), as anonymous memory registered with
/// userfaultfd would: touching a page that is not present faults.
#[derive(Default)]
struct PresentMemory {
    data: Vec<u8>,
    present: Vec<bool>,
}

impl GuestMemory for PresentMemory {
    fn set_block_len(&mut self, index: usize, _name: &str, len: u64) -> std::io::Result<()> {
        assert_eq!(index, 0, "one block");
        self.data.resize(len as usize, 0);
        self.present.resize((len / PS) as usize, false);
        Ok(())
    }

    fn bytes_mut(&mut self, _index: usize, offset: u64, len: usize) -> std::io::Result<&mut [u8]> {
        let (a, b) = (offset / PS, (offset + len as u64).div_ceil(PS));
        for p in a..b {
            self.present[p as usize] = true;
        }
        Ok(&mut self.data[offset as usize..offset as usize + len])
    }

    /// Like anonymous memory: the page is dropped, not written.
    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        self.discard(index, offset, len)
    }

    fn discard(&mut self, _index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        self.data[offset as usize..(offset + len) as usize].fill(0);
        for p in offset / PS..(offset + len) / PS {
            self.present[p as usize] = false;
        }
        Ok(())
    }
}

/// The host side of the model: executes placements into `PresentMemory`
/// (as UFFDIO_COPY / UFFDIO_ZEROPAGE would, EEXIST leaving the page alone)
/// and reports them.
fn model_drain(d: &mut RamDst<PresentMemory>) {
    while d.poll_event().is_some() {}
    while let Some(a) = d.poll_placement() {
        let (off, data, len) = match a {
            Place::HostPage { offset, data, .. } => {
                let n = data.len() as u64;
                (offset, Some(data), n)
            }
            Place::ZeroPage { offset, len, .. } => (offset, None, len),
            Place::Discard { offset, len, .. } => {
                d.memory_mut().discard(0, offset, len).unwrap();
                continue;
            }
        };
        let p = (off / PS) as usize;
        let m = d.memory_mut();
        assert!(
            !m.present[p],
            "placement onto a present page at {off:#x} (would be EEXIST)"
        );
        if let Some(data) = data {
            m.data[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        m.present[p] = true;
        d.handle_placed(0, off, len).unwrap();
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any precopy subset, any set of pages dirtied afterwards (discarded),
    /// any order of faults interleaved with the background stream: every
    /// fault on a page not received is asked for exactly once, every page
    /// is placed once, and the memory ends equal to the source's.
    #[test]
    fn postcopy_faults_in_any_order_end_equal_to_the_source(
        pages in proptest::collection::vec(
            (0u8..3, proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY),
            1..40,
        ),
        faults in proptest::collection::vec(0usize..40, 0..80),
        interleave in proptest::collection::vec(0u8..3, 0..120),
    ) {
        // Per page: content kind (0 zero, 1/2 data), sent in precopy, dirtied
        // after, and (if sent) zeroed by a later precopy ZERO record.
        let n = pages.len() as u64;
        let content = |p: usize, v: u8| -> Vec<u8> {
            if v == 0 { vec![0; PS as usize] } else { vec![(p as u8).wrapping_mul(7) ^ v; PS as usize] }
        };
        let mut d = RamDst::new(
            Config {
                layout: Layout::Fixed(vec![LocalBlock::fixed("pc.ram", n * PS)]),
                placement: Placement::Emit,
                ..Config::default()
            },
            PresentMemory::default(),
        )
        .unwrap();
        let mut at = 0;
        let mut next = |d: &mut RamDst<PresentMemory>, item: Item<'_>| {
            at += 10;
            d.handle_item(at, 10, &item).unwrap();
            model_drain(d);
        };
        next(&mut d, cmd(Command::OpenReturnPath));
        next(&mut d, ram(RamRecord::mem_size(vec![mb("pc.ram", n * PS)])));
        next(&mut d, cmd(Command::PostcopyAdvise(None)));
        // Precopy: the old content (1) of the sent pages.
        for (p, &(_, sent, _, rezero)) in pages.iter().enumerate() {
            if sent {
                let c = content(p, 1);
                next(&mut d, ram(RamRecord::page(p as u64 * PS, Some("pc.ram"), &c)));
                if rezero {
                    next(&mut d, ram(RamRecord::zero(p as u64 * PS, Some("pc.ram"))));
                }
            }
        }
        // The source's final content: dirtied pages take their kind; pages
        // sent and not dirtied keep the old content.
        let fin: Vec<Vec<u8>> = pages
            .iter()
            .enumerate()
            .map(|(p, &(v, sent, dirty, rezero))| {
                content(p, match (sent && !dirty, rezero) {
                    (true, true) => 0,
                    (true, false) => 1,
                    _ => v,
                })
            })
            .collect();
        let ranges: Vec<(u64, u64)> = pages
            .iter()
            .enumerate()
            .filter(|(_, &(_, sent, dirty, _))| sent && dirty)
            .map(|(p, _)| (p as u64 * PS, PS))
            .collect();
        if !ranges.is_empty() {
            next(&mut d, discard("pc.ram", &ranges));
        }
        next(&mut d, cmd(Command::PostcopyListen));
        next(&mut d, cmd(Command::PostcopyRun));
        let _ = d.poll_transmit(&mut Vec::new());
        // Postcopy: the source still owes every page not sent or dirtied.
        let mut owed: std::collections::VecDeque<usize> = pages
            .iter()
            .enumerate()
            .filter(|(_, &(_, sent, dirty, _))| !sent || dirty)
            .map(|(p, _)| p)
            .collect();
        let mut requested = std::collections::HashSet::new();
        let mut faults = faults.into_iter().map(|f| f % pages.len());
        let mut steps = interleave.into_iter();
        let send = |d: &mut RamDst<PresentMemory>, at: &mut u64, p: usize| {
            *at += 10;
            let rec = if fin[p].iter().all(|&b| b == 0) {
                RamRecord::zero(p as u64 * PS, Some("pc.ram"))
            } else {
                RamRecord::page(p as u64 * PS, Some("pc.ram"), &fin[p])
            };
            d.handle_item(*at, 10, &Item::Ram(rec)).unwrap();
            model_drain(d);
        };
        loop {
            let step = steps.next().unwrap_or(0);
            if step == 0 || owed.is_empty() {
                // A thread touches a page: it faults if the page is not present.
                let Some(p) = faults.next() else {
                    if owed.is_empty() { break; }
                    let q = owed.pop_front().unwrap();
                    send(&mut d, &mut at, q);
                    continue;
                };
                if d.memory().present[p] {
                    continue;
                }
                match d.handle_page_fault(0, p as u64 * PS + 5).unwrap() {
                    FaultOutcome::Requested => {
                        proptest::prop_assert!(requested.insert(p), "page {} asked twice", p);
                        let mut out = Vec::new();
                        proptest::prop_assert!(d.poll_transmit(&mut out));
                        // The source serves the request first (if still owed).
                        if let Some(i) = owed.iter().position(|&q| q == p) {
                            owed.remove(i);
                            send(&mut d, &mut at, p);
                        }
                    }
                    FaultOutcome::AlreadyRequested => {
                        proptest::prop_assert!(requested.contains(&p));
                    }
                    FaultOutcome::PlaceLocally => model_drain(&mut d),
                }
            } else if let Some(q) = owed.pop_front() {
                send(&mut d, &mut at, q);
            }
        }
        d.handle_item(at + 10, 1, &Item::Eof).unwrap();
        proptest::prop_assert_eq!(d.postcopy_state(), PostcopyState::End);
        proptest::prop_assert_eq!(d.outstanding_requests(), 0);
        proptest::prop_assert_eq!(d.stats().page_requests, requested.len() as u64);
        // Every page is received; a page not present reads as zero (anonymous memory).
        for (p, want) in fin.iter().enumerate() {
            proptest::prop_assert!(d.blocks()[0].received().get(p as u64));
            let got = &d.memory().data[p * PS as usize..(p + 1) * PS as usize];
            proptest::prop_assert_eq!(got, &want[..], "page {}", p);
        }
    }
}

// ---- postcopy recovery and the preempt channel (dst/recovery.rs) --------------------

/// Return path open, POSTCOPY_RUN received, over a huge-page pc.ram (2
/// target pages per host page) and a 4 KiB vram.
fn running() -> RamDst<VecMemory> {
    let mut d = faulting();
    feed(&mut d, 3, cmd(Command::PostcopyRun)).unwrap();
    let _ = actions(&mut d);
    d
}

/// Carries out (reports as placed) every placement queued.
fn place_all(d: &mut RamDst<VecMemory>) -> Vec<(usize, u64)> {
    let mut placed = Vec::new();
    while let Some(p) = d.poll_placement() {
        let (b, off, len) = match p {
            Place::HostPage {
                block,
                offset,
                data,
            } => (block, offset, data.len() as u64),
            Place::ZeroPage { block, offset, len } => (block, offset, len),
            Place::Discard { .. } => continue,
        };
        d.handle_placed(b, off, len).unwrap();
        placed.push((b, off));
    }
    placed
}

#[test]
fn a_cut_before_postcopy_run_fails_cleanly() {
    use qmig_wire::RpMessage as M;
    // Every phase before RUN: precopy, advised, discarding, listening.
    for phase in 0..4 {
        let mut d = with_ram(8 * PS);
        feed(&mut d, 0, cmd(Command::OpenReturnPath)).unwrap();
        if phase >= 1 {
            feed(&mut d, 1, cmd(Command::PostcopyAdvise(None))).unwrap();
        }
        if phase >= 2 {
            let d0 = Discard {
                block: "pc.ram",
                ranges: vec![DiscardRange { start: 0, len: PS }],
            };
            feed(&mut d, 2, cmd(Command::RamDiscard(d0))).unwrap();
        }
        if phase >= 3 {
            feed(&mut d, 3, cmd(Command::PostcopyListen)).unwrap();
        }
        let state = d.postcopy_state();
        let _ = actions(&mut d);
        let e = d.handle_connection_lost().unwrap_err();
        assert!(
            matches!(e, RamDstError::ConnectionLost { state: s, .. } if s == state),
            "{e}"
        );
        assert!(d.is_stopped());
        assert_eq!(transmitted(&mut d), vec![M::Shut(1)], "phase {phase}");
        assert!(d.handle_recovery_connection().is_err());
    }
}

#[test]
fn a_cut_after_run_pauses_keeps_requests_and_resumes() {
    use qmig_wire::RpMessage as M;
    let mut d = running();
    let a = [3u8; 4096];
    // Host page 0 of pc.ram placed; requests for pc.ram 4 and vram 2.
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 20, ram(RamRecord::page(PS, None, &a))).unwrap();
    assert_eq!(place_all(&mut d), vec![(0, 0)]);
    assert_eq!(
        d.handle_page_fault(0, 4 * PS).unwrap(),
        FaultOutcome::Requested
    );
    assert_eq!(
        d.handle_page_fault(1, 2 * PS).unwrap(),
        FaultOutcome::Requested
    );
    let _ = transmitted(&mut d);
    // Half of host page 2 arrives, then the connection is cut; a PONG queued
    // for the dead return path is dropped.
    feed(&mut d, 30, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 40, cmd(Command::Ping(9))).unwrap();
    assert!(d.handle_connection_lost().unwrap());
    assert_eq!(d.postcopy_state(), PostcopyState::Paused);
    assert_eq!(
        actions(&mut d),
        vec![Out::E(Event::PostcopyState(PostcopyState::Paused))]
    );
    assert!(
        !d.poll_transmit(&mut Vec::new()),
        "nothing for a dead return path"
    );
    // A fault while paused is recorded, not sent; the page being assembled
    // was dropped (its bits stay clear).
    assert_eq!(
        d.handle_page_fault(0, 6 * PS).unwrap(),
        FaultOutcome::Requested
    );
    assert!(!d.poll_transmit(&mut Vec::new()));
    assert!(!d.blocks()[0].received().get(2));
    assert!(d.blocks()[0].received().get(1));
    // No item without a recovery connection.
    let mut e2 = running();
    feed(&mut e2, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    assert!(e2.handle_connection_lost().unwrap());
    assert!(matches!(
        feed(&mut e2, 0, cmd(Command::PostcopyResume)),
        Err(RamDstError::IllegalTransition {
            state: PostcopyState::Paused,
            ..
        })
    ));
    // The recovery connection: bitmaps, then RESUME.
    d.handle_recovery_connection().unwrap();
    assert_eq!(d.postcopy_state(), PostcopyState::Recovering);
    feed(&mut d, 0, cmd(Command::RecvBitmap { block: "pc.ram" })).unwrap();
    feed(&mut d, 10, cmd(Command::RecvBitmap { block: "vram" })).unwrap();
    let msgs = transmitted(&mut d);
    assert_eq!(msgs.len(), 2);
    let M::RecvBitmap { block, bitmap } = &msgs[0] else {
        panic!("{msgs:?}")
    };
    assert_eq!((*block, bitmap.len()), ("pc.ram", 8));
    assert_eq!(bitmap[0], 0b11, "pages 0 and 1 placed, 2 dropped");
    // No page record before RESUME (the source sends none).
    let mut e3 = running();
    assert!(e3.handle_connection_lost().unwrap());
    e3.handle_recovery_connection().unwrap();
    assert!(matches!(
        feed(&mut e3, 5, ram(RamRecord::page(0, Some("pc.ram"), &a))),
        Err(RamDstError::IllegalTransition {
            state: PostcopyState::Recovering,
            ..
        })
    ));
    feed(&mut d, 20, cmd(Command::PostcopyResume)).unwrap();
    assert_eq!(d.postcopy_state(), PostcopyState::Running);
    assert_eq!(
        transmitted(&mut d),
        vec![
            M::ResumeAck(1),
            M::ReqPagesId {
                start: 4 * PS,
                len: 2 * PS as u32,
                block: "pc.ram"
            },
            M::ReqPages {
                start: 6 * PS,
                len: 2 * PS as u32
            },
            M::ReqPagesId {
                start: 2 * PS,
                len: PS as u32,
                block: "vram"
            },
        ]
    );
    // The source sends the dropped host page again, whole, naming its block.
    feed(&mut d, 30, ram(RamRecord::page(2 * PS, Some("pc.ram"), &a))).unwrap();
    feed(&mut d, 40, ram(RamRecord::page(3 * PS, None, &a))).unwrap();
    assert_eq!(place_all(&mut d), vec![(0, 2 * PS)]);
    let st = d.stats();
    assert_eq!((st.pauses, st.resumes, st.requests_resent), (1, 1, 3));
    // A second RESUME is in the wrong state.
    assert!(matches!(
        feed(&mut d, 50, cmd(Command::PostcopyResume)),
        Err(RamDstError::IllegalTransition {
            state: PostcopyState::Running,
            ..
        })
    ));
}

#[test]
fn a_cut_during_recovery_pauses_again_and_repeated_cuts_recover() {
    use qmig_wire::RpMessage as M;
    let mut d = running();
    assert_eq!(d.handle_page_fault(0, 0).unwrap(), FaultOutcome::Requested);
    let _ = transmitted(&mut d);
    for round in 0..3 {
        assert!(d.handle_connection_lost().unwrap(), "round {round}");
        d.handle_recovery_connection().unwrap();
        feed(&mut d, 0, cmd(Command::RecvBitmap { block: "pc.ram" })).unwrap();
        // Cut inside the recovery handshake: paused again.
        assert!(d.handle_connection_lost().unwrap());
        assert_eq!(d.postcopy_state(), PostcopyState::Paused);
        d.handle_recovery_connection().unwrap();
        feed(&mut d, 0, cmd(Command::RecvBitmap { block: "pc.ram" })).unwrap();
        feed(&mut d, 9, cmd(Command::PostcopyResume)).unwrap();
        let msgs = transmitted(&mut d);
        assert!(
            matches!(
                msgs[0],
                M::RecvBitmap {
                    block: "pc.ram",
                    ..
                }
            ),
            "{msgs:?}"
        );
        assert_eq!(
            msgs[1..],
            [
                M::ResumeAck(1),
                M::ReqPagesId {
                    start: 0,
                    len: 2 * PS as u32,
                    block: "pc.ram"
                }
            ]
        );
    }
    assert_eq!(d.stats().pauses, 6);
    assert_eq!(d.stats().resumes, 3);
}

#[test]
fn recovery_messages_are_validated() {
    let mut d = running();
    assert!(d.handle_connection_lost().unwrap());
    d.handle_recovery_connection().unwrap();
    let e = feed(&mut d, 4, cmd(Command::RecvBitmap { block: "nope" })).unwrap_err();
    assert!(
        matches!(e, RamDstError::UnknownBlock { offset: 4, ref name } if name == "nope"),
        "{e}"
    );
    assert!(d.is_stopped());
    // A recovery connection while running, EOF before RESUME.
    let mut d = running();
    assert!(matches!(
        d.handle_recovery_connection(),
        Err(RamDstError::IllegalTransition {
            state: PostcopyState::Running,
            ..
        })
    ));
    let mut d = running();
    assert!(d.handle_connection_lost().unwrap());
    d.handle_recovery_connection().unwrap();
    assert!(matches!(
        feed(&mut d, 7, Item::Eof),
        Err(RamDstError::IllegalTransition {
            offset: 7,
            state: PostcopyState::Recovering,
            ..
        })
    ));
    // After EOF a cut changes nothing.
    let mut d = running();
    feed(&mut d, 7, Item::Eof).unwrap();
    assert!(!d.handle_connection_lost().unwrap());
    assert_eq!(d.postcopy_state(), PostcopyState::End);
}

#[test]
fn preempt_channel_has_its_own_host_page_and_last_block() {
    let mut d = running();
    let (a, b) = ([1u8; 4096], [2u8; 4096]);
    // Main: first half of host page 0; preempt: host page 4 whole, then
    // vram 1 by name and vram 2 by CONTINUE (its own last block).
    feed(&mut d, 10, ram(RamRecord::page(0, Some("pc.ram"), &a))).unwrap();
    d.handle_preempt_item(0, &ram(RamRecord::page(4 * PS, Some("pc.ram"), &b)))
        .unwrap();
    assert!(d.preempt_in_host_page());
    d.handle_preempt_item(10, &ram(RamRecord::page(5 * PS, None, &b)))
        .unwrap();
    d.handle_preempt_item(20, &ram(RamRecord::page(PS, Some("vram"), &b)))
        .unwrap();
    d.handle_preempt_item(30, &ram(RamRecord::zero(2 * PS, None)))
        .unwrap();
    // Main goes on with its own host page and its own last block (pc.ram).
    feed(&mut d, 20, ram(RamRecord::page(PS, None, &a))).unwrap();
    assert_eq!(
        place_all(&mut d),
        vec![(0, 4 * PS), (1, PS), (1, 2 * PS), (0, 0)]
    );
    assert_eq!(d.stats().preempt_records, 4);
    // Only RAM records; a CONTINUE needs a block named on this channel.
    let mut e = running();
    assert!(matches!(
        e.handle_preempt_item(0, &ram(RamRecord::page(0, None, &a))),
        Err(RamDstError::NoCurrentBlock { .. })
    ));
    let mut e = running();
    assert!(matches!(
        e.handle_preempt_item(0, &cmd(Command::PostcopyRun)),
        Err(RamDstError::IllegalTransition { .. })
    ));
    // A cut drops the preempt channel's half host page too.
    let mut e = running();
    e.handle_preempt_item(0, &ram(RamRecord::page(4 * PS, Some("pc.ram"), &b)))
        .unwrap();
    assert!(e.handle_connection_lost().unwrap());
    assert!(!e.preempt_in_host_page());
    // Before LISTEN the preempt channel carries nothing.
    let mut e = with_ram(4 * PS);
    assert!(matches!(
        e.handle_preempt_item(0, &ram(RamRecord::page(0, Some("pc.ram"), &a))),
        Err(RamDstError::IllegalTransition {
            state: PostcopyState::None,
            ..
        })
    ));
}

// ---- FileMemory writing pages straight from a mapped input ----------------------------

/// A mapped input of `pages` pages, page `k` filled with a pattern of `k`.
fn mapped_pages(dir: &std::path::Path, pages: usize) -> std::sync::Arc<MappedInput> {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("input.bin");
    let mut data = Vec::with_capacity(pages * 4096);
    for k in 0..pages {
        data.extend((0..4096).map(|i| (k as u8).wrapping_mul(31) ^ (i as u8) ^ 0x5a));
    }
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    std::sync::Arc::new(MappedInput::new(f).unwrap())
}

/// Applies the records `recs(input)` to a `FileMemory` that refers to `input` and
/// to a `VecMemory`; the image must equal the `Vec` block.
fn file_matches_vec(
    name: &str,
    pages: usize,
    block_pages: u64,
    recs: impl Fn(&[u8]) -> Vec<RamRecord<'_>>,
) {
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix(&format!("qmig-ram-dst-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("d");
    let input = mapped_pages(&dir, pages);
    let out = dir.join("out");
    let mut mem = FileMemory::create(&out).unwrap();
    mem.refer_to_input(Some(input.clone())).unwrap();
    let mut f = RamDst::new(Config::default(), mem).unwrap();
    let mut v = adopt();
    let size = ram(RamRecord::mem_size(vec![mb("pc.ram", block_pages * PS)]));
    f.handle_item(0, 10, &size).unwrap();
    v.handle_item(0, 10, &size).unwrap();
    let bytes = input.as_slice();
    for (k, r) in recs(bytes).into_iter().enumerate() {
        let item = ram(r);
        let at = 10 + k as u64 * 10;
        f.handle_item(at, 10, &item).unwrap();
        v.handle_item(at, 10, &item).unwrap();
    }
    // The mapping may go (the memory keeps it alive) before the last flush.
    drop(input);
    f.memory_mut().flush().unwrap();
    let img = std::fs::read(out.join("pc.ram.img")).unwrap();
    let want = v.memory().block("pc.ram").unwrap();
    assert_eq!(img.len(), want.len());
    for (p, (a, b)) in img.chunks(4096).zip(want.chunks(4096)).enumerate() {
        assert!(
            a == b,
            "{name}: page {p} differs from the Vec-memory result"
        );
    }
    drop(f);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn input_page(bytes: &[u8], k: usize) -> &[u8] {
    &bytes[k * 4096..(k + 1) * 4096]
}

#[test]
fn file_memory_from_input_later_pass_overwrites_pending_pages() {
    file_matches_vec("xcp-pass", 40, 32, |b| {
        let mut r = Vec::new();
        // Pass 1: pages 0..16 of the block, contiguous, all still pending.
        for p in 0..16 {
            r.push(RamRecord::page(
                p * PS,
                Some("pc.ram"),
                input_page(b, p as usize),
            ));
        }
        // Pass 2 overwrites pages 3..6 and 0 of that run with other content.
        for p in 3..6 {
            r.push(RamRecord::page(
                p * PS,
                None,
                input_page(b, 20 + p as usize),
            ));
        }
        r.push(RamRecord::page(0, None, input_page(b, 39)));
        // Continue the run past the overwritten pages, then overwrite its end.
        for p in 6..20 {
            r.push(RamRecord::page(p * PS, None, input_page(b, p as usize)));
        }
        r.push(RamRecord::page(19 * PS, None, input_page(b, 1)));
        r
    });
}

#[test]
fn file_memory_from_input_zero_after_page_in_same_batch() {
    file_matches_vec("xcp-zero", 16, 16, |b| {
        let mut r = Vec::new();
        for p in 0..8 {
            r.push(RamRecord::page(
                p * PS,
                Some("pc.ram"),
                input_page(b, p as usize),
            ));
        }
        // ZERO of a page of the pending run, then the run goes on.
        r.push(RamRecord::zero(5 * PS, None));
        r.push(RamRecord::page(8 * PS, None, input_page(b, 8)));
        r.push(RamRecord::page(9 * PS, None, input_page(b, 9)));
        // ZERO of the page just written, immediately after it.
        r.push(RamRecord::zero(9 * PS, None));
        r.push(RamRecord::page(10 * PS, None, input_page(b, 10)));
        r.push(RamRecord::page(11 * PS, None, input_page(b, 11)));
        r.push(RamRecord::zero(10 * PS, None));
        r
    });
}

#[test]
fn file_memory_from_input_mixed_copied_and_long_runs() {
    static OTHER: [u8; 4096] = [0xc3; 4096];
    // More pages in one contiguous run than one pwritev takes (IOV_MAX).
    let n = 1500usize;
    file_matches_vec("xcp-long", n, n as u64 + 4, move |b| {
        let mut r = Vec::new();
        for p in 0..n {
            // Every 7th page comes from outside the mapping (copied).
            let d: &[u8] = if p % 7 == 3 { &OTHER } else { input_page(b, p) };
            r.push(RamRecord::page(p as u64 * PS, Some("pc.ram"), d));
        }
        r.push(RamRecord::page(n as u64 * PS, None, input_page(b, 2)));
        // XBZRLE reads back a page of the last (pending) run and changes it.
        let old = input_page(b, n - 1);
        let mut new = old.to_vec();
        new[100..108].fill(0xee);
        let mut enc = vec![0u8; 4096];
        let k = qmig_xbzrle::encode(old, &new, &mut enc).unwrap();
        enc.truncate(k);
        let enc: &'static [u8] = enc.leak();
        r.push(RamRecord::xbzrle((n - 1) as u64 * PS, None, enc));
        r
    });
}
