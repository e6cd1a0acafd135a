//! Multifd channels: real QEMU 10 captures (`tests/data/multifd/`, 2
//! channels, compression none / zlib / zstd) read and re-serialized byte for
//! byte, their page counts equal to QEMU's `query-migrate` counters and
//! pc.ram rebuilt from the packets equal to the source's memory; property
//! tests for the encoder/decoder pair; hostile fields refused with typed
//! errors at their offsets.

use proptest::prelude::*;
use qmig_tests::{gunzip, sha256};
use qmig_wire::multifd::{self, *};
use qmig_wire::WireError;
use serde_json::Value;

const PS: u64 = 4096;

fn capture(name: &str) -> (Value, Vec<(Value, Vec<u8>)>) {
    let dir = qmig_tests::data_dir().join("multifd").join(name);
    let o: Value =
        serde_json::from_slice(&std::fs::read(dir.join("oracle.json")).unwrap()).unwrap();
    let conns = o["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let f = format!("{}.gz", c["file"].as_str().unwrap());
            (c.clone(), gunzip(&std::fs::read(dir.join(f)).unwrap()))
        })
        .collect();
    (o, conns)
}

/// A channel's decompressor: QEMU keeps one zlib or zstd stream per
/// channel for the whole migration and sync-flushes it at the end of each
/// packet, so a packet's payload continues the previous packets' stream.
struct Inflater {
    zlib: flate2::Decompress,
    zstd: zstd::stream::raw::Decoder<'static>,
}

impl Inflater {
    fn new() -> Self {
        Inflater {
            zlib: flate2::Decompress::new(true),
            zstd: zstd::stream::raw::Decoder::new().unwrap(),
        }
    }

    fn inflate(&mut self, p: &RamPacket<'_>) -> Vec<u8> {
        let want = (u64::from(p.normal_pages) * PS) as usize;
        match p.compression() {
            Compression::None => p.payload.to_vec(),
            Compression::Zlib => {
                let mut out = vec![0u8; want];
                let (i0, o0) = (self.zlib.total_in(), self.zlib.total_out());
                self.zlib
                    .decompress(p.payload, &mut out, flate2::FlushDecompress::Sync)
                    .unwrap();
                assert_eq!(self.zlib.total_in() - i0, p.payload.len() as u64);
                assert_eq!(self.zlib.total_out() - o0, want as u64);
                out
            }
            Compression::Zstd => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut out = vec![0u8; want];
                let mut input = InBuffer::around(p.payload);
                let mut output = OutBuffer::around(&mut out[..]);
                while input.pos() < p.payload.len() {
                    self.zstd.run(&mut input, &mut output).unwrap();
                }
                assert_eq!(output.pos(), want);
                out
            }
        }
    }
}

fn check_capture(name: &str, compression: Compression) {
    let (o, conns) = capture(name);
    let mut normal = 0u64;
    let mut zero = 0u64;
    let mut channels = 0;
    let mut syncs = Vec::new();
    let mut pc_ram = vec![0u8; 64 << 20];
    let mut flushes = 0;
    for (c, bytes) in &conns {
        if c["kind"] != "multifd" {
            assert_eq!(&bytes[..4], b"QEVM");
            for it in qmig_wire::SliceReader::new(bytes) {
                if let qmig_wire::Item::Ram(r) = it.unwrap().1 {
                    assert!(!r.is_page(), "{name}: a page in the main stream");
                    flushes += usize::from(r.body == qmig_wire::RamBody::MultifdFlush);
                }
            }
            continue;
        }
        channels += 1;
        let mut out = Vec::new();
        let mut n_sync = 0;
        let mut inflater = Inflater::new();
        for it in ChannelReader::new(bytes, PacketContext::new(PS)) {
            let (off, item) = it.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(off as usize, out.len());
            item.write(&mut out, PS).unwrap();
            match item {
                ChannelItem::Init(i) => assert_eq!(Some(u64::from(i.id)), c["channel_id"].as_u64()),
                ChannelItem::Packet(Packet::Ram(p)) => {
                    if p.is_sync() {
                        n_sync += 1;
                        continue;
                    }
                    if p.normal_pages > 0 {
                        assert_eq!(p.compression(), compression, "{name}");
                    }
                    normal += u64::from(p.normal_pages);
                    zero += u64::from(p.zero_pages);
                    let data = inflater.inflate(&p);
                    assert_eq!(data.len() as u64, u64::from(p.normal_pages) * PS);
                    if p.block_name() == b"pc.ram" {
                        for (k, off) in p.normal_offsets().enumerate() {
                            let off = off as usize;
                            pc_ram[off..off + PS as usize]
                                .copy_from_slice(&data[k * PS as usize..(k + 1) * PS as usize]);
                        }
                        for off in p.zero_offsets() {
                            let off = off as usize;
                            pc_ram[off..off + PS as usize].fill(0);
                        }
                    }
                }
                ChannelItem::Packet(Packet::DeviceState(_)) => panic!("no VFIO here"),
            }
        }
        assert_eq!(out, *bytes, "{name}: channel re-serialized");
        syncs.push(n_sync);
    }
    let qm = &o["query_migrate_ram"];
    assert_eq!(
        channels,
        o["parameters"]["multifd-channels"].as_u64().unwrap()
    );
    assert_eq!(Some(normal), qm["normal"].as_u64(), "{name}: normal pages");
    assert_eq!(Some(zero), qm["duplicate"].as_u64(), "{name}: zero pages");
    // Every channel saw one SYNC packet per MULTIFD_FLUSH of the main stream.
    assert!(flushes > 0);
    assert!(
        syncs.iter().all(|&n| n == flushes),
        "{syncs:?} vs {flushes}"
    );
    for r in o["ranges"].as_array().unwrap() {
        let (off, len) = (
            r["offset"].as_u64().unwrap() as usize,
            r["length"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            sha256::hex(&pc_ram[off..off + len]),
            r["sha256"].as_str().unwrap(),
            "{name}: pc.ram [{off:#x}, +{len:#x})"
        );
    }
}

#[test]
fn qemu10_nocomp() {
    check_capture("q10-none", Compression::None);
}

#[test]
fn qemu10_zlib() {
    check_capture("q10-zlib", Compression::Zlib);
}

#[test]
fn qemu10_zstd() {
    check_capture("q10-zstd", Compression::Zstd);
}

/// A valid RAM packet with `normal` pages of `fill` bytes and `zero` zero pages.
fn ram_packet(flags: u32, normal: u32, zero: u32, payload: &[u8]) -> Vec<u8> {
    let count = multifd::page_count(PS) as usize;
    let mut name = [0u8; 256];
    name[..6].copy_from_slice(b"pc.ram");
    let mut offsets = vec![0u8; 8 * count];
    for i in 0..(normal + zero) as usize {
        offsets[i * 8..i * 8 + 8].copy_from_slice(&(i as u64 * PS).to_be_bytes());
    }
    let p = RamPacket {
        flags,
        pages_alloc: count as u32,
        normal_pages: normal,
        next_packet_size: payload.len() as u32,
        packet_num: 7,
        zero_pages: zero,
        reserved: &[0; 28],
        ramblock: &name,
        offsets: &offsets,
        payload,
    };
    let mut out = Vec::new();
    Packet::Ram(p).write(&mut out, PS).unwrap();
    out
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn parse_err(b: &[u8]) -> WireError {
    match parse_packet(b, 1000, &PacketContext::new(PS)) {
        Err(e) => e,
        Ok(x) => panic!("accepted: {x:?}"),
    }
}

#[test]
fn hostile_packets_are_typed_errors_at_the_field() {
    let good = ram_packet(0, 1, 1, &[5u8; 4096]);
    assert!(parse_packet(&good, 0, &PacketContext::new(PS))
        .unwrap()
        .is_some());
    let cases: Vec<(usize, u32, u64, &str)> = vec![
        (0, 0xdead_beef, 1000, "magic"),
        (4, 2, 1004, "version"),
        (8, 1 << 9, 1008, "unknown flag"),
        (8, flags::QPL, 1008, "QPL"),
        (8, 3 << 1, 1008, "unknown compression"),
        (12, 129, 1012, "pages_alloc"),
        (16, 200, 1016, "normal_pages"),
        (32, 128, 1032, "zero_pages"),
        (20, 8192, 1020, "next_packet_size"),
    ];
    for (at, v, off, want) in cases {
        let mut b = good.clone();
        set32(&mut b, at, v);
        let e = parse_err(&b);
        assert_eq!(e.offset(), off, "{want}: {e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    // A compressed payload over the cap, refused before it is waited for.
    let mut b = ram_packet(flags::ZLIB, 1, 0, &[1, 2, 3]);
    set32(&mut b, 20, u32::MAX);
    let e = parse_err(&b[..multifd::ram_packet_len(PS)]);
    assert!(matches!(e, WireError::TooLarge { offset: 1020, .. }), "{e}");
    // Pages without a block name.
    let mut b = good.clone();
    b[64..70].fill(0);
    let e = parse_err(&b);
    assert!(e.to_string().contains("empty RAM block name"), "{e}");
    // A device-state packet announcing 4 GiB.
    let mut d = Vec::new();
    d.extend_from_slice(&MAGIC.to_be_bytes());
    d.extend_from_slice(&VERSION.to_be_bytes());
    d.extend_from_slice(&flags::DEVICE_STATE.to_be_bytes());
    let mut id = [0u8; 256];
    id[..4].copy_from_slice(b"vfio");
    d.extend_from_slice(&id);
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&u32::MAX.to_be_bytes());
    let e = parse_err(&d);
    assert!(matches!(e, WireError::TooLarge { offset: 1272, .. }), "{e}");
    // A bad channel header.
    let e = ChannelInit::parse(&[0u8; 64], 0).unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
    // Truncated packets ask for more.
    for n in [0, 11, 12, 700, good.len() - 1] {
        assert!(parse_packet(&good[..n], 0, &PacketContext::new(PS))
            .unwrap()
            .is_none());
    }
}

#[test]
fn writer_refuses_what_readers_refuse() {
    let count = multifd::page_count(PS) as usize;
    let offsets = vec![0u8; 8 * count];
    let name = [0u8; 256];
    let p = RamPacket {
        flags: 0,
        pages_alloc: 0,
        normal_pages: 1,
        next_packet_size: 4096,
        packet_num: 0,
        zero_pages: 0,
        reserved: &[0; 28],
        ramblock: &name,
        offsets: &offsets,
        payload: &[0; 4096],
    };
    let mut out = Vec::new();
    assert!(Packet::Ram(p).write(&mut out, PS).is_err());
    assert!(out.is_empty());
    let p = RamPacket {
        offsets: &offsets[..8],
        ..p
    };
    assert!(Packet::Ram(p).write(&mut out, PS).is_err());
    assert!(out.is_empty());
}

proptest! {
    /// Valid packets of every kind: encode, decode, same fields and bytes.
    #[test]
    fn ram_packets_roundtrip(
        comp in prop_oneof![Just(0u32), Just(flags::ZLIB), Just(flags::ZSTD)],
        sync: bool,
        normal in 0u32..4,
        zero in 0u32..120,
        stale in proptest::collection::vec(any::<u8>(), 0..200),
        num: u64,
        bits in 10u32..=16,
    ) {
        let ps = 1u64 << bits;
        let count = multifd::page_count(ps) as u32;
        let zero = zero.min(count - normal);
        let payload: Vec<u8> = if comp == 0 {
            vec![0xab; (u64::from(normal) * ps) as usize]
        } else if normal > 0 {
            stale.iter().copied().chain([1]).collect()
        } else {
            vec![]
        };
        let mut name = [0u8; 256];
        name[..6].copy_from_slice(b"pc.ram");
        // Stale bytes after the NUL, as QEMU's reused packet buffer leaves.
        for (i, b) in stale.iter().enumerate().take(249) {
            name[7 + i] = *b;
        }
        let mut offsets = vec![0u8; 8 * count as usize];
        for (i, b) in stale.iter().enumerate().take(offsets.len()) {
            offsets[i] = *b;
        }
        let p = RamPacket {
            flags: comp | u32::from(sync),
            pages_alloc: count,
            normal_pages: normal,
            next_packet_size: payload.len() as u32,
            packet_num: num,
            zero_pages: zero,
            reserved: &[0; 28],
            ramblock: &name,
            offsets: &offsets,
            payload: &payload,
        };
        let mut out = Vec::new();
        Packet::Ram(p).write(&mut out, ps).unwrap();
        let (q, n) = parse_packet(&out, 0, &PacketContext::new(ps)).unwrap().unwrap();
        prop_assert_eq!(n, out.len());
        prop_assert_eq!(q, Packet::Ram(p));
    }

    #[test]
    fn device_state_packets_roundtrip(
        name in "[a-z/0-9.:]{1,255}",
        instance: u32,
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        sync: bool,
    ) {
        let mut id = [0u8; 256];
        id[..name.len()].copy_from_slice(name.as_bytes());
        let p = DeviceStatePacket {
            flags: flags::DEVICE_STATE | u32::from(sync),
            idstr: &id,
            instance_id: instance,
            data: &data,
        };
        let mut out = Vec::new();
        Packet::DeviceState(p).write(&mut out, PS).unwrap();
        prop_assert_eq!(out.len(), multifd::DEVICE_STATE_LEN + data.len());
        let (q, n) = parse_packet(&out, 0, &PacketContext::new(PS)).unwrap().unwrap();
        prop_assert_eq!(n, out.len());
        prop_assert_eq!(q, Packet::DeviceState(p));
        prop_assert_eq!(p.name(), name.as_bytes());
    }

    /// Arbitrary bytes: decode then encode gives the bytes taken; never a panic.
    #[test]
    fn bytes_decode_then_encode(mut bytes in proptest::collection::vec(any::<u8>(), 0..1500), head: u8, dev: bool) {
        if bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
            bytes[8..12].copy_from_slice(&u32::from(head & 0x7f | if dev { 0x40 } else { 0 }).to_be_bytes());
        }
        let ps = 1024;
        if let Ok(Some((p, n))) = parse_packet(&bytes, 0, &PacketContext::new(ps)) {
            let mut out = Vec::new();
            p.write(&mut out, ps).unwrap();
            prop_assert_eq!(&out[..], &bytes[..n]);
        }
    }

    #[test]
    fn channel_init_roundtrip(uuid: [u8; 16], id: u8, reserved in proptest::collection::vec(any::<u8>(), 39)) {
        let mut r = [0u8; 39];
        r.copy_from_slice(&reserved);
        let i = ChannelInit { uuid, id, reserved: r };
        let mut out = Vec::new();
        i.write(&mut out);
        prop_assert_eq!(out.len(), INIT_LEN);
        prop_assert_eq!(ChannelInit::parse(&out, 0).unwrap(), Some(i));
    }
}
