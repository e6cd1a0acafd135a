//! `RamSrc` and `RamDst` driven against each other in memory (quinn-style
//! pair harness): whatever the memory and the dirty sequence, the
//! destination ends with the source's final memory.

use proptest::prelude::*;
use qmig_ram_dst::{RamDst, VecMemory};
use qmig_ram_src::{template::tests_support, Config, Progress, RamSrc, SrcBlock, Template};
use qmig_wire::{Decoder, Limits, SectionKind};

mod common;
use common::{memory, PS};

/// A source, a destination, and the bytes in flight between them.
struct Pair {
    src: RamSrc,
    mem: Vec<Vec<u8>>,
    dst: RamDst<VecMemory>,
    dec: Decoder,
    wire: Vec<u8>,
    consumed: usize,
    template: Vec<u8>,
}

impl Pair {
    fn new(lengths: &[u64], config: Config, mem: Vec<Vec<u8>>) -> Self {
        Pair {
            src: RamSrc::new(common::blocks(lengths.iter().copied()), config)
                .expect("valid layout"),
            mem,
            dst: RamDst::new(qmig_ram_dst::Config::default(), VecMemory::new()).expect("dst"),
            dec: Decoder::new(Limits::default()),
            wire: Vec::new(),
            consumed: 0,
            template: tests_support::tiny_template(),
        }
    }

    /// Feeds everything written so far to the destination.
    fn drive(&mut self) {
        while common::apply_next(&mut self.dec, &mut self.dst, &self.wire, &mut self.consumed)
            .expect("destination accepts")
        {}
    }

    fn start(&mut self) {
        let t = Template::parse(&self.template).expect("template");
        t.write_prefix(&mut self.wire);
        t.begin_section(SectionKind::Start, &mut self.wire).unwrap();
        self.src.poll_setup(&mut self.wire).expect("setup");
        t.end_section(&mut self.wire);
        self.drive();
    }

    /// One PART section of at most about `budget` bytes.
    fn step(&mut self, budget: usize) -> Progress {
        let t = Template::parse(&self.template).expect("template");
        t.begin_section(SectionKind::Part, &mut self.wire).unwrap();
        let p = self
            .src
            .poll_iterate(&self.mem, budget, &mut self.wire)
            .expect("iterate");
        t.end_section(&mut self.wire);
        self.drive();
        p
    }

    fn finish(&mut self) {
        let t = Template::parse(&self.template).expect("template");
        t.write_switchover(&mut self.wire).unwrap();
        t.begin_section(SectionKind::End, &mut self.wire).unwrap();
        self.src
            .poll_complete(&self.mem, &mut self.wire)
            .expect("complete");
        t.end_section(&mut self.wire);
        t.write_tail(&mut self.wire);
        self.drive();
        assert_eq!(self.consumed, self.wire.len(), "every byte consumed");
    }

    fn write(&mut self, blk: usize, page: usize, how: u8, salt: u8) {
        let p = &mut self.mem[blk][page * PS..(page + 1) * PS];
        match how % 4 {
            0 => p.fill(0),
            1 => p
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u8) ^ salt),
            _ => {
                let at = (salt as usize * 37) % PS;
                p[at] = p[at].wrapping_add(salt | 1);
            }
        }
        self.src
            .handle_dirty_page(blk, page as u64)
            .expect("in range");
    }

    fn assert_same_memory(&self) {
        let got = self.dst.memory().blocks();
        assert_eq!(got.len(), self.mem.len());
        for (i, ((_, g), w)) in got.iter().zip(&self.mem).enumerate() {
            assert!(g == w, "block {i} differs");
        }
    }
}

prop_compose! {
    fn config()(xbzrle in prop::option::of(0u32..4), compress in prop::option::of(0u32..10),
                zero in any::<bool>()) -> Config {
        Config {
            // Tiny caches (1..8 slots) exercise refused inserts.
            xbzrle_cache_size: xbzrle.map(|s| (PS as u64) << s),
            compress_level: compress,
            zero_page_detection: zero,
            ..Config::default()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn destination_ends_with_source_memory(
        pages in prop::collection::vec(1u64..12, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..16),
        config in config(),
        rounds in prop::collection::vec(
            (prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 0..24),
             1usize..20000),
            0..5),
        final_writes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 0..24),
    ) {
        let lengths: Vec<u64> = pages.iter().map(|p| p * PS as u64).collect();
        let total_pages: usize = pages.iter().map(|&p| p as usize).sum();
        let locate = |i: &prop::sample::Index| {
            let mut n = i.index(total_pages.max(1));
            for (b, &p) in pages.iter().enumerate() {
                if n < p as usize { return (b, n); }
                n -= p as usize;
            }
            unreachable!()
        };
        let mut pair = Pair::new(&lengths, config, memory(&lengths, &seeds));
        pair.start();
        // Bulk pass in small sections.
        while pair.step(9000) == Progress::Budget {}
        for (writes, budget) in &rounds {
            if total_pages > 0 {
                for (i, how, salt) in writes {
                    let (b, p) = locate(i);
                    pair.write(b, p, *how, *salt);
                }
            }
            pair.src.handle_sync().expect("sync");
            while pair.step(*budget) == Progress::Budget {}
        }
        if total_pages > 0 {
            for (i, how, salt) in &final_writes {
                let (b, p) = locate(i);
                pair.write(b, p, *how, *salt);
            }
        }
        pair.finish();
        pair.assert_same_memory();
        prop_assert_eq!(pair.src.remaining_pages(), 0);
        let c = pair.src.counters();
        prop_assert_eq!(c.dirty_sync_count, 2 + rounds.len() as u64);
        let d = pair.dst.stats();
        prop_assert_eq!(
            (d.zero, d.page, d.xbzrle, d.compressed),
            (c.duplicate, c.normal, c.xbzrle_pages, c.compressed_pages)
        );
    }

    /// The START payload decodes to the layout given, with the optional
    /// per-block fields exactly where they were asked for.
    #[test]
    fn mem_size_roundtrip(
        blocks in prop::collection::vec(("[a-z./@]{1,40}", 1u64..64, prop::option::of(13u32..22),
                                          prop::option::of(any::<u64>())), 1..6),
        ignore_shared in any::<bool>(),
    ) {
        let mut seen = std::collections::HashSet::new();
        let mut list = Vec::new();
        for (name, pages, huge, addr) in &blocks {
            if !seen.insert(name.clone()) { continue; }
            let mut b = SrcBlock::new(name, pages * PS as u64);
            b.mem_size_page_size = huge.map(|h| 1u64 << h);
            b.mem_size_addr = ignore_shared.then(|| addr.unwrap_or(0) & !0xfff);
            list.push(b);
        }
        let mut src = RamSrc::new(list.clone(), Config::default()).expect("layout");
        let mut out = Vec::new();
        src.poll_setup(&mut out).expect("setup");
        let ctx = qmig_wire::RamContext {
            postcopy_advised: Some(None),
            ignore_shared,
            ..Default::default()
        };
        let (rec, n) = qmig_wire::ram::decode_record(&out, 0, &ctx, false).expect("decodes");
        let qmig_wire::RamBody::MemSize(got) = &rec.body else { panic!("not MEM_SIZE") };
        prop_assert_eq!(got.len(), list.len());
        for (g, w) in got.iter().zip(&list) {
            prop_assert_eq!(g.name, w.name.as_str());
            prop_assert_eq!(g.used_length, w.used_length);
            prop_assert_eq!(g.page_size, w.mem_size_page_size);
            prop_assert_eq!(g.addr, w.mem_size_addr);
        }
        prop_assert_eq!(&out[n..], &0x10u64.to_be_bytes()[..]);
        let mut back = Vec::new();
        rec.write(&mut back).unwrap();
        prop_assert_eq!(&back[..], &out[..n]);
    }
}

/// Container parts: a template with any section id, with or without
/// footers and SWITCHOVER_START, regenerates byte for byte when the same
/// RAM records are written into it.
#[test]
fn template_regenerates_itself() {
    for footers in [false, true] {
        for switchover in [false, true] {
            for id in [0u32, 1, 7, 0xdead_beef] {
                let t = synthetic_template(id, footers, switchover);
                let tpl = Template::parse(&t).expect("parses");
                assert_eq!(tpl.ram_section_id, id);
                assert_eq!(tpl.footers, footers);
                assert_eq!(tpl.switchover_start, switchover);
                assert_eq!(tpl.tail(), &[0u8][..]);
                let blocks = SrcBlock::sequential([("pc.ram", 2 * PS as u64)]);
                let mem = vec![{
                    let mut v = vec![0u8; 2 * PS];
                    v[PS] = 0x5a;
                    v
                }];
                let mut src = RamSrc::new(blocks, Config::default()).expect("layout");
                let mut out = Vec::new();
                tpl.write_prefix(&mut out);
                tpl.begin_section(SectionKind::Start, &mut out).unwrap();
                src.poll_setup(&mut out).expect("setup");
                tpl.end_section(&mut out);
                tpl.begin_section(SectionKind::Part, &mut out).unwrap();
                assert_eq!(
                    src.poll_iterate(&mem, usize::MAX, &mut out)
                        .expect("iterate"),
                    Progress::Clean
                );
                tpl.end_section(&mut out);
                tpl.write_switchover(&mut out).unwrap();
                tpl.begin_section(SectionKind::End, &mut out).unwrap();
                src.poll_complete(&mem, &mut out).expect("complete");
                tpl.end_section(&mut out);
                tpl.write_tail(&mut out);
                assert_eq!(out, t, "footers {footers} switchover {switchover} id {id}");
            }
        }
    }
}

/// header, config, START(MEM_SIZE pc.ram 8 KiB), PART(ZERO 0, PAGE 0x1000), [SWITCHOVER], END, EOF.
fn synthetic_template(id: u32, footers: bool, switchover: bool) -> Vec<u8> {
    use qmig_wire::ram::flags;
    use qmig_wire::{Command, Configuration, MemBlock, RamRecord, SectionHeader};
    let mut s = Vec::new();
    qmig_wire::header::write_header(&mut s);
    Configuration {
        machine: "pc-i440fx-10.0",
        subsections: vec![],
    }
    .write(&mut s)
    .unwrap();
    let foot = |s: &mut Vec<u8>| {
        s.extend_from_slice(&flags::EOS.to_be_bytes());
        if footers {
            qmig_wire::section::write_footer(s, id);
        }
    };
    SectionHeader::start(id, "ram", 0, 4).write(&mut s).unwrap();
    RamRecord::mem_size(vec![MemBlock {
        name: "pc.ram",
        used_length: 2 * PS as u64,
        page_size: None,
        addr: None,
    }])
    .write(&mut s)
    .unwrap();
    foot(&mut s);
    SectionHeader::part(id).write(&mut s).unwrap();
    RamRecord::zero(0, Some("pc.ram")).write(&mut s).unwrap();
    let mut page = vec![0u8; PS];
    page[0] = 0x5a;
    RamRecord::page(PS as u64, None, &page)
        .write(&mut s)
        .unwrap();
    foot(&mut s);
    if switchover {
        Command::SwitchoverStart.write(&mut s).unwrap();
    }
    SectionHeader::end(id).write(&mut s).unwrap();
    foot(&mut s);
    s.push(0);
    s
}

#[test]
fn state_errors() {
    let mut src =
        RamSrc::new(SrcBlock::sequential([("a", PS as u64)]), Config::default()).expect("layout");
    let mem = vec![vec![0u8; PS]];
    let mut out = Vec::new();
    assert!(
        src.poll_iterate(&mem, 1, &mut out).is_err(),
        "iterate before setup"
    );
    src.poll_setup(&mut out).expect("setup");
    assert!(src.poll_setup(&mut out).is_err(), "setup twice");
    assert!(
        src.handle_dirty(0, PS as u64, 1).is_err(),
        "outside the block"
    );
    assert!(src.handle_dirty(1, 0, 1).is_err(), "no such block");
    let short = vec![vec![0u8; 16]];
    assert!(matches!(
        src.poll_iterate(&short, 1, &mut out),
        Err(qmig_ram_src::RamSrcError::MemoryMismatch { .. })
    ));
    src.poll_complete(&mem, &mut out).expect("complete");
    assert!(src.handle_sync().is_err(), "sync after completion");
    assert!(RamSrc::new(SrcBlock::sequential([("a", 100)]), Config::default()).is_err());
    assert!(RamSrc::new(SrcBlock::sequential([("a", 0)]), Config::default()).is_err());
    assert!(RamSrc::new(
        SrcBlock::sequential([("a", PS as u64), ("a", PS as u64)]),
        Config::default()
    )
    .is_err());
    let bad_cache = Config {
        xbzrle_cache_size: Some(3 * PS as u64),
        ..Config::default()
    };
    assert!(RamSrc::new(SrcBlock::sequential([("a", PS as u64)]), bad_cache).is_err());
}

/// QEMU's XBZRLE decisions: nothing during the bulk pass; a miss inserts and
/// sends PAGE; a hit encodes; an unchanged page is not sent; the last stage
/// does not insert.
#[test]
fn xbzrle_decisions_follow_qemu() {
    let config = Config {
        xbzrle_cache_size: Some(4 * PS as u64),
        ..Config::default()
    };
    let mut src =
        RamSrc::new(SrcBlock::sequential([("pc.ram", 4 * PS as u64)]), config).expect("layout");
    let mut mem = vec![vec![0x11u8; 4 * PS]];
    let mut out = Vec::new();
    src.poll_setup(&mut out).expect("setup");
    assert_eq!(
        src.poll_iterate(&mem, usize::MAX, &mut out).expect("bulk"),
        Progress::Clean
    );
    assert_eq!(src.counters().normal, 4);
    assert!(src.xbzrle_started(), "the scan wrapped: XBZRLE on");
    assert_eq!(
        src.xbzrle_cache().map(|c| c.len()),
        Some(0),
        "bulk pass caches nothing"
    );
    let pass = |mem: &Vec<Vec<u8>>, src: &mut RamSrc, page: u64| {
        src.handle_dirty_page(0, page).expect("dirty");
        src.handle_sync().expect("sync");
        let mut out = Vec::new();
        assert_eq!(
            src.poll_iterate(mem, usize::MAX, &mut out).expect("pass"),
            Progress::Clean
        );
        out
    };
    mem[0][PS + 5] = 0x22;
    let out = pass(&mem, &mut src, 1);
    let c = src.counters().clone();
    assert_eq!((c.xbzrle_cache_miss, c.normal, c.xbzrle_pages), (1, 5, 0));
    assert!(out.len() > PS, "a miss sends the whole page");
    mem[0][PS + 6] = 0x33;
    let out = pass(&mem, &mut src, 1);
    let c = src.counters().clone();
    assert_eq!((c.xbzrle_cache_miss, c.normal, c.xbzrle_pages), (1, 5, 1));
    // header word (CONTINUE), 0x01, be16 len 3: skip 6, 1 new byte 0x33; then EOS.
    assert_eq!(
        &out[8..],
        &[1, 0, 3, 6, 1, 0x33, 0, 0, 0, 0, 0, 0, 0, 0x10][..]
    );
    let out = pass(&mem, &mut src, 1);
    assert_eq!(src.counters().xbzrle_unchanged, 1);
    assert_eq!(out, 0x10u64.to_be_bytes(), "unchanged: only EOS");
    mem[0][2 * PS] = 0x44;
    src.handle_dirty_page(0, 2).expect("dirty");
    let mut out = Vec::new();
    src.poll_complete(&mem, &mut out).expect("complete");
    assert_eq!(src.counters().xbzrle_cache_miss, 2);
    assert_eq!(
        src.xbzrle_cache().map(|c| c.len()),
        Some(1),
        "last stage does not insert"
    );
}

/// One `poll_iterate` call reads at most `SCAN_FACTOR` × its budget of guest
/// memory (plus the host page it was in), even where pages cost only a few
/// bytes of output (zero pages), and the calls still cover the whole block.
#[test]
fn one_iteration_reads_bounded_memory() {
    const PAGES: usize = 4096; // 16 MiB of zero pages
    let blocks = SrcBlock::sequential([("pc.ram", (PAGES * 4096) as u64)]);
    let mem = vec![vec![0u8; PAGES * 4096]];
    let mut src = RamSrc::new(blocks, Config::default()).unwrap();
    let mut out = Vec::new();
    src.poll_setup(&mut out).unwrap();
    let budget = 64 << 10;
    let limit = budget * qmig_ram_src::SCAN_FACTOR;
    let mut calls = 0;
    loop {
        let c = src.counters();
        let before = c.duplicate + c.normal;
        let p = src.poll_iterate(&mem, budget, &mut out).unwrap();
        let c = src.counters();
        let read = (c.duplicate + c.normal - before) as usize * 4096;
        assert!(read <= limit + 4096, "one call read {read} bytes");
        calls += 1;
        if p == Progress::Clean {
            break;
        }
    }
    assert_eq!(src.counters().duplicate as usize, PAGES);
    assert!(calls >= PAGES * 4096 / (limit + 4096), "{calls} calls");
}
