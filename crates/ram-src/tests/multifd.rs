//! The multifd source against the wire parser and the destination's
//! multifd apply: packets decode back to what was encoded, and a
//! `RamSrc` with multifd channels (every compression, zero-page mode,
//! channel count, sync mode), applied by `qmig_ram_dst`'s offline multifd
//! apply, leaves the destination with the source's memory.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use qmig_ram_dst::multifd_offline::OfflineChannels;
use qmig_ram_dst::{Layout, Placement, RamDst, VecMemory};
use qmig_ram_src::multifd::{
    write_ram_packet, write_sync_packet, MultifdConfig, MultifdSender, ZeroPageDetection,
};
use qmig_ram_src::{template::tests_support, Config, Progress, RamSrc, Template};
use qmig_wire::multifd::{parse_packet, ChannelReader, Compression, Packet, PacketContext};
use qmig_wire::{Decoder, Limits, SectionKind, StreamReader};

mod common;
use common::{memory, PS};

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Zlib),
        Just(Compression::Zstd)
    ]
}

fn zero_mode() -> impl Strategy<Value = ZeroPageDetection> {
    prop_oneof![
        Just(ZeroPageDetection::None),
        Just(ZeroPageDetection::Legacy),
        Just(ZeroPageDetection::Multifd)
    ]
}

/// The destination's channel decoder over one channel's bytes: (block,
/// offset, page) for every page, zero pages as `None`.
type Decoded = Vec<(String, u64, Option<Vec<u8>>)>;

fn decode_channel(bytes: &[u8], ps: u64) -> (Decoded, u64) {
    let mut dec = qmig_ram_dst::multifd::ChannelDecoder::new(0, ps);
    let mut got = Vec::new();
    let mut syncs = 0;
    for item in ChannelReader::new(bytes, PacketContext::new(ps)) {
        let (at, item) = item.expect("channel parses");
        let qmig_wire::multifd::ChannelItem::Packet(Packet::Ram(p)) = item else {
            continue;
        };
        let name = String::from_utf8(p.block_name().to_vec()).unwrap();
        let d = dec.decode(at, &p).expect("decodes");
        if p.is_sync() {
            syncs += 1;
        }
        for (i, o) in p.normal_offsets().enumerate() {
            let page = d.data[i * ps as usize..(i + 1) * ps as usize].to_vec();
            got.push((name.clone(), o, Some(page)));
        }
        for o in p.zero_offsets() {
            got.push((name.clone(), o, None));
        }
    }
    (got, syncs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// `write_ram_packet` → `parse_packet`: the same fields and payload,
    /// and the packet's bytes are exactly what the parser consumed.
    #[test]
    fn ram_packet_encode_decode_identity(
        ps_bits in 10u32..=16,
        comp in compression(),
        num in any::<u64>(),
        name in "[a-z./@:0-9-]{1,40}",
        normal_n in 0usize..20,
        zero_n in 0usize..20,
        seed in any::<u8>(),
    ) {
        let ps = 1u64 << ps_bits;
        let count = qmig_wire::multifd::page_count(ps) as usize;
        let normal_n = normal_n.min(count);
        let zero_n = zero_n.min(count - normal_n);
        let normal: Vec<u64> = (0..normal_n as u64).map(|i| (i * 3 + 1) * ps).collect();
        let zero: Vec<u64> = (0..zero_n as u64).map(|i| (i * 3 + 2) * ps).collect();
        let payload: Vec<u8> = match comp {
            Compression::None => (0..normal_n * ps as usize).map(|i| (i as u8) ^ seed).collect(),
            _ if normal_n == 0 => Vec::new(),
            _ => (0..(seed as usize % 300) + 1).map(|i| i as u8).collect(),
        };
        let mut out = Vec::new();
        write_ram_packet(&mut out, ps, comp, num, &name, &normal, &zero, &payload).unwrap();
        let (p, used) = parse_packet(&out, 0, &PacketContext::new(ps)).unwrap().unwrap();
        prop_assert_eq!(used, out.len());
        let Packet::Ram(p) = p else { panic!("not a RAM packet") };
        prop_assert_eq!(p.compression(), comp);
        prop_assert!(!p.is_sync());
        prop_assert_eq!(p.packet_num, num);
        prop_assert_eq!(p.pages_alloc as usize, count);
        prop_assert_eq!(p.block_name(), name.as_bytes());
        prop_assert_eq!(p.normal_offsets().collect::<Vec<_>>(), normal);
        prop_assert_eq!(p.zero_offsets().collect::<Vec<_>>(), zero);
        prop_assert_eq!(p.payload, &payload[..]);
        // serialize(parse(b)) == b
        let mut again = Vec::new();
        Packet::Ram(p).write(&mut again, ps).unwrap();
        prop_assert_eq!(again, out);
    }

    /// `MultifdSender` output decoded by the destination's channel decoder
    /// gives back every queued page (zero pages listed, not carried, under
    /// `zero-page-detection=multifd`), one SYNC per sync point per channel.
    #[test]
    fn sender_output_decodes_to_the_queued_pages(
        comp in compression(),
        zmode in zero_mode(),
        channels in 1u8..5,
        pages in prop::collection::vec((0usize..3, 0u64..300, any::<u8>()), 0..400),
        syncs in prop::collection::vec(0usize..400, 0..4),
    ) {
        let cfg = MultifdConfig {
            channels,
            compression: comp,
            zero_page_detection: zmode,
            ..MultifdConfig::default()
        };
        let mut m = MultifdSender::new(cfg, PS).unwrap();
        let mut want: HashMap<(String, u64), Option<Vec<u8>>> = HashMap::new();
        let mut expected = Vec::new();
        for (k, &(blk, page, fill)) in pages.iter().enumerate() {
            if syncs.contains(&k) {
                m.sync().unwrap();
            }
            let name = format!("blk{blk}");
            let mut data = vec![0u8; PS];
            if fill % 3 != 0 {
                data.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8).wrapping_mul(fill));
            }
            m.queue_page(blk, &name, page * PS as u64, &data).unwrap();
            let zero = data.iter().all(|&b| b == 0);
            let entry = if zero && zmode == ZeroPageDetection::Multifd { None } else { Some(data) };
            // A page queued twice is not deduplicated: both go out.
            expected.push((name.clone(), page * PS as u64, entry.clone()));
            want.insert((name, page * PS as u64), entry);
        }
        m.sync().unwrap();
        let n_syncs = syncs.iter().filter(|&&s| s < pages.len()).collect::<std::collections::HashSet<_>>().len() as u64 + 1;
        let mut got = Vec::new();
        for ch in 0..m.channels() {
            let bytes = m.take_output(ch);
            prop_assert_eq!(u32::from_be_bytes(bytes[0..4].try_into().unwrap()), 0x1122_3344);
            prop_assert_eq!(bytes[24] as usize, ch);
            let (pages, s) = decode_channel(&bytes, PS as u64);
            prop_assert_eq!(s, n_syncs);
            got.extend(pages);
        }
        got.sort();
        expected.sort();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(m.stats().normal_pages + m.stats().zero_pages, pages.len() as u64);
        prop_assert_eq!(m.pending_bytes(), 0);
    }
}

/// SYNC packets are what QEMU 10 sends (checked on the q10 captures):
/// flags 1, every count 0, full offset array.
#[test]
fn sync_packet_layout() {
    let mut out = Vec::new();
    write_sync_packet(&mut out, 4096, 7);
    assert_eq!(out.len(), 320 + 8 * 128);
    let (p, n) = parse_packet(&out, 0, &PacketContext::new(4096))
        .unwrap()
        .unwrap();
    assert_eq!(n, out.len());
    let Packet::Ram(p) = p else { panic!() };
    assert!(p.is_sync());
    assert_eq!(p.flags, 1);
    assert_eq!((p.pages_alloc, p.normal_pages, p.zero_pages), (0, 0, 0));
    assert_eq!(p.packet_num, 7);
}

/// The first packet of an all-zero block: QEMU's swap leaves offsets
/// 1, 2, ..., 127, 0 (pages) — as in tests/data/multifd/q10-none.
#[test]
fn zero_detection_swap_order_matches_qemu() {
    let mut m = MultifdSender::new(
        MultifdConfig {
            channels: 1,
            ..MultifdConfig::default()
        },
        PS,
    )
    .unwrap();
    let zero = vec![0u8; PS];
    for p in 0..128u64 {
        m.queue_page(0, "pc.ram", p * PS as u64, &zero).unwrap();
    }
    m.sync().unwrap();
    let bytes = m.take_output(0);
    let (p, _) = parse_packet(&bytes[64..], 64, &PacketContext::new(PS as u64))
        .unwrap()
        .unwrap();
    let Packet::Ram(p) = p else { panic!() };
    let offs: Vec<u64> = p.zero_offsets().map(|o| o / PS as u64).collect();
    let mut want: Vec<u64> = (1..128).collect();
    want.push(0);
    assert_eq!(offs, want);
    assert_eq!(p.normal_pages, 0);
}

/// The whole migration in memory: main stream and channel outputs.
struct Run {
    main: Vec<u8>,
    channels: Vec<Vec<u8>>,
}

/// Runs a source with multifd over `mem`, changing pages between passes.
fn run(
    mem: &mut [Vec<u8>],
    cfg: MultifdConfig,
    budget: usize,
    writes: &[Vec<(usize, usize, u8)>],
    template: &[u8],
) -> Run {
    let blocks = common::blocks(mem.iter().map(|m| m.len() as u64));
    let mut src = RamSrc::new(blocks, Config::default()).unwrap();
    src.set_multifd(MultifdSender::new(cfg, PS).unwrap())
        .unwrap();
    let t = Template::parse(template).unwrap();
    let mut main = Vec::new();
    t.write_prefix(&mut main);
    t.begin_section(SectionKind::Start, &mut main).unwrap();
    src.poll_setup(&mut main).unwrap();
    t.end_section(&mut main);
    let pass = |src: &mut RamSrc, mem: &[Vec<u8>], main: &mut Vec<u8>| loop {
        t.begin_section(SectionKind::Part, main).unwrap();
        let p = src.poll_iterate(mem, budget, main).unwrap();
        t.end_section(main);
        if p == Progress::Clean {
            break;
        }
    };
    pass(&mut src, mem, &mut main);
    for (k, round) in writes.iter().enumerate() {
        for &(blk, page, v) in round {
            let blk = blk % mem.len();
            let page = page % (mem[blk].len() / PS);
            mem[blk][page * PS..(page + 1) * PS].fill(if v % 2 == 0 { 0 } else { v });
            src.handle_dirty_page(blk, page as u64).unwrap();
        }
        if k + 1 < writes.len() {
            src.handle_sync().unwrap();
            pass(&mut src, mem, &mut main);
        }
    }
    t.write_switchover(&mut main).unwrap();
    t.begin_section(SectionKind::End, &mut main).unwrap();
    src.poll_complete(mem, &mut main).unwrap();
    t.end_section(&mut main);
    t.write_tail(&mut main);
    let m = src.multifd_mut().unwrap();
    let channels = (0..m.channels()).map(|c| m.take_output(c)).collect();
    Run { main, channels }
}

/// Applies a run with the destination's offline multifd apply.
fn apply(r: &Run) -> RamDst<VecMemory> {
    let cfg = qmig_ram_dst::Config {
        layout: Layout::Adopt,
        placement: Placement::Apply,
        ..qmig_ram_dst::Config::default()
    };
    let mut dst = RamDst::new(cfg, VecMemory::new()).unwrap();
    let files: HashMap<PathBuf, Vec<u8>> = r
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| (PathBuf::from(format!("ch{i}")), c.clone()))
        .collect();
    let paths: Vec<PathBuf> = (0..r.channels.len())
        .rev()
        .map(|i| PathBuf::from(format!("ch{i}")))
        .collect();
    let mut off = OfflineChannels::new(&paths, move |p: &Path| {
        files
            .get(p)
            .cloned()
            .map(Cursor::new)
            .ok_or_else(|| "no such channel".to_string())
    });
    let mut rd =
        StreamReader::with_decoder(Cursor::new(&r.main[..]), Decoder::new(Limits::default()));
    while let Some(ri) = rd.next_item().expect("main stream decodes") {
        off.before_item(&ri, &mut dst).expect("channels apply");
        dst.handle_read_item(&ri).expect("destination accepts");
    }
    off.finish(&mut dst).expect("no pages after the last sync");
    dst
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Pair test: ram-src multifd output applied by ram-dst's multifd
    /// apply gives the source's final memory.
    #[test]
    fn multifd_pair_destination_ends_with_source_memory(
        pages in prop::collection::vec(1u64..200, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..16),
        comp in compression(),
        zmode in zero_mode(),
        channels in 1u8..5,
        budget in prop_oneof![Just(1usize << 30), 4096usize..200_000],
        writes in prop::collection::vec(
            prop::collection::vec((any::<usize>(), any::<usize>(), any::<u8>()), 0..40), 0..3),
    ) {
        let lengths: Vec<u64> = pages.iter().map(|p| p * PS as u64).collect();
        let mut mem = memory(&lengths, &seeds);
        let cfg = MultifdConfig {
            channels,
            compression: comp,
            zero_page_detection: zmode,
            ..MultifdConfig::default()
        };
        let r = run(&mut mem, cfg, budget, &writes, &tests_support::tiny_template());
        let dst = apply(&r);
        let got = dst.memory().blocks();
        prop_assert_eq!(got.len(), mem.len());
        for (i, ((_, g), w)) in got.iter().zip(&mem).enumerate() {
            prop_assert!(g == w, "block {} differs", i);
        }
    }
}

/// The main stream of a multifd source carries no pages (but for legacy
/// zero pages) and one MULTIFD_FLUSH per sync point; every channel has as
/// many SYNC packets.
#[test]
fn flush_records_pair_with_sync_packets() {
    let mut mem = memory(&[64 * PS as u64, 8 * PS as u64], &[1, 2, 3, 4, 5]);
    let cfg = MultifdConfig {
        channels: 3,
        compression: Compression::Zstd,
        ..MultifdConfig::default()
    };
    let writes = vec![vec![(0, 3, 7), (1, 2, 0)], vec![(0, 9, 9)]];
    let r = run(
        &mut mem,
        cfg,
        1 << 30,
        &writes,
        &tests_support::tiny_template(),
    );
    let mut flushes = 0;
    let mut pages = 0;
    for item in qmig_wire::SliceReader::new(&r.main) {
        if let qmig_wire::Item::Ram(rec) = item.unwrap().1 {
            match rec.body {
                qmig_wire::RamBody::MultifdFlush => flushes += 1,
                _ if rec.is_page() => pages += 1,
                _ => {}
            }
        }
    }
    assert_eq!(pages, 0);
    // setup, one round per pass (2), completion's round and final sync.
    assert!(flushes >= 4, "{flushes} flushes");
    for c in &r.channels {
        let (_, s) = decode_channel(c, PS as u64);
        assert_eq!(s, flushes);
    }
    let dst = apply(&r);
    for ((_, g), w) in dst.memory().blocks().iter().zip(&mem) {
        assert!(g == w);
    }
}

/// `tiny_template` with machine type `pc-i440fx-7.2` (a machine type up to
/// 8.0: `multifd-flush-after-each-section` is on).
fn template_72() -> Vec<u8> {
    let t = tests_support::tiny_template();
    assert_eq!(t[8], 7, "configuration section");
    assert_eq!(&t[9..15], b"\0\0\0\x02pc");
    let mut out = t[..9].to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(b"pc-i440fx-7.2");
    out.extend_from_slice(&t[15..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// With `multifd-flush-after-each-section` every RAM EOS is the sync
    /// point (no MULTIFD_FLUSH record): the destination, which takes the
    /// sync point from the 7.2 machine type, still ends with the memory.
    #[test]
    fn flush_after_each_section_pairs_with_eos(
        pages in prop::collection::vec(1u64..150, 1..3),
        seeds in prop::collection::vec(any::<u8>(), 1..8),
        comp in compression(),
        channels in 1u8..4,
        budget in prop_oneof![Just(1usize << 30), 4096usize..100_000],
        writes in prop::collection::vec(
            prop::collection::vec((any::<usize>(), any::<usize>(), any::<u8>()), 0..20), 0..3),
    ) {
        let lengths: Vec<u64> = pages.iter().map(|p| p * PS as u64).collect();
        let mut mem = memory(&lengths, &seeds);
        let cfg = MultifdConfig {
            channels,
            compression: comp,
            flush_after_each_section: true,
            ..MultifdConfig::default()
        };
        let r = run(&mut mem, cfg, budget, &writes, &template_72());
        let mut flushes = 0;
        for item in qmig_wire::SliceReader::new(&r.main) {
            if let qmig_wire::Item::Ram(rec) = item.unwrap().1 {
                if rec.body == qmig_wire::RamBody::MultifdFlush {
                    flushes += 1;
                }
            }
        }
        prop_assert_eq!(flushes, 0);
        let dst = apply(&r);
        for (i, ((_, g), w)) in dst.memory().blocks().iter().zip(&mem).enumerate() {
            prop_assert!(g == w, "block {} differs", i);
        }
    }
}
