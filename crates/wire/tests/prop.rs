//! Property tests: every record, command, message and whole synthetic
//! streams survive `parse(write(x)) == x` and `write(parse(b)) == b`.

use proptest::prelude::*;
use qmig_wire::command::decode_command;
use qmig_wire::header::{decode_configuration, write_header};
use qmig_wire::ram::{decode_record, flags};
use qmig_wire::section::{decode_section_header, write_footer};
use qmig_wire::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9/@._:-]{1,40}"
}

fn page(ps: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), ps..=ps)
}

#[derive(Debug, Clone)]
enum R {
    Zero(u8),
    Page(Vec<u8>),
    Xbzrle(Vec<u8>),
    Compressed(Vec<u8>),
    Eos,
    Hook,
    Flush,
}

fn rec_strategy() -> impl Strategy<Value = (u64, Option<String>, R)> {
    let body = prop_oneof![
        any::<u8>().prop_map(R::Zero),
        page(4096).prop_map(R::Page),
        prop::collection::vec(any::<u8>(), 0..=4096).prop_map(R::Xbzrle),
        prop::collection::vec(any::<u8>(), 0..=4110).prop_map(R::Compressed),
        Just(R::Eos),
        Just(R::Hook),
        Just(R::Flush),
    ];
    (0u64..(1 << 40), prop::option::of(name()), body)
}

fn build<'a>(off: u64, block: &'a Option<String>, r: &'a R) -> RamRecord<'a> {
    let b = block.as_deref();
    let off = off << 12;
    match r {
        R::Zero(f) => {
            let mut rec = RamRecord::zero(off, b);
            rec.body = RamBody::Zero { fill: *f };
            rec
        }
        R::Page(d) => RamRecord::page(off, b, d),
        R::Xbzrle(d) => RamRecord::xbzrle(off, b, d),
        R::Compressed(d) => RamRecord::compressed(off, b, d),
        R::Eos => RamRecord::eos(),
        R::Hook => RamRecord {
            offset: 0,
            flags: flags::HOOK,
            block: None,
            body: RamBody::Hook,
        },
        R::Flush => RamRecord {
            offset: 0,
            flags: flags::MULTIFD_FLUSH,
            block: None,
            body: RamBody::MultifdFlush,
        },
    }
}

fn commands() -> impl Strategy<Value = (u16, Vec<u8>)> {
    // A command as (number, encoded payload) produced through the typed API.
    let discard = (
        name(),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..12),
    )
        .prop_map(|(n, r)| {
            let mut out = Vec::new();
            Command::RamDiscard(Discard {
                block: &n,
                ranges: r
                    .iter()
                    .map(|&(start, len)| DiscardRange { start, len })
                    .collect(),
            })
            .write(&mut out)
            .unwrap();
            (6u16, out)
        });
    let simple = prop_oneof![
        Just(Command::OpenReturnPath),
        any::<u32>().prop_map(Command::Ping),
        Just(Command::PostcopyAdvise(None)),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Command::PostcopyAdvise(Some(Advise {
            page_size_summary: a,
            target_page_size: b
        }))),
        Just(Command::PostcopyListen),
        Just(Command::PostcopyRun),
        (0u32..(256 << 20)).prop_map(|len| Command::Packaged { len }),
        Just(Command::EnableColo),
        Just(Command::PostcopyResume),
        Just(Command::SwitchoverStart),
    ]
    .prop_map(|c| {
        let mut out = Vec::new();
        c.write(&mut out).unwrap();
        (c.number(), out)
    });
    let bitmap = name().prop_map(|n| {
        let mut out = Vec::new();
        Command::RecvBitmap { block: &n }.write(&mut out).unwrap();
        (10u16, out)
    });
    let unknown = (12u16.., prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(c, p)| {
        let mut out = Vec::new();
        Command::Unknown {
            cmd: c,
            payload: &p,
        }
        .write(&mut out)
        .unwrap();
        (c, out)
    });
    prop_oneof![discard, simple, bitmap, unknown]
}

fn rp_messages() -> impl Strategy<Value = Vec<u8>> {
    let m = prop_oneof![
        any::<u32>().prop_map(|v| {
            let mut o = Vec::new();
            RpMessage::Shut(v).write(&mut o).unwrap();
            o
        }),
        any::<u32>().prop_map(|v| {
            let mut o = Vec::new();
            RpMessage::Pong(v).write(&mut o).unwrap();
            o
        }),
        (any::<u64>(), any::<u32>(), name()).prop_map(|(s, l, n)| {
            let mut o = Vec::new();
            RpMessage::ReqPagesId {
                start: s,
                len: l,
                block: &n,
            }
            .write(&mut o)
            .unwrap();
            o
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(s, l)| {
            let mut o = Vec::new();
            RpMessage::ReqPages { start: s, len: l }
                .write(&mut o)
                .unwrap();
            o
        }),
        (name(), prop::collection::vec(any::<u64>(), 0..40)).prop_map(|(n, w)| {
            let bits: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut o = Vec::new();
            RpMessage::RecvBitmap {
                block: &n,
                bitmap: &bits,
            }
            .write(&mut o)
            .unwrap();
            o
        }),
        any::<u32>().prop_map(|v| {
            let mut o = Vec::new();
            RpMessage::ResumeAck(v).write(&mut o).unwrap();
            o
        }),
        Just({
            let mut o = Vec::new();
            RpMessage::SwitchoverAck.write(&mut o).unwrap();
            o
        }),
        (8u16.., prop::collection::vec(any::<u8>(), 0..100)).prop_map(|(t, p)| {
            let mut o = Vec::new();
            RpMessage::Unknown {
                msg_type: t,
                payload: &p,
            }
            .write(&mut o)
            .unwrap();
            o
        }),
    ];
    prop::collection::vec(m, 0..20).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ram_record_roundtrip((off, block, body) in rec_strategy()) {
        let rec = build(off, &block, &body);
        let mut bytes = Vec::new();
        rec.write(&mut bytes).unwrap();
        let ctx = RamContext::default();
        let (parsed, len) = decode_record(&bytes, 0, &ctx, true).unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(&parsed, &rec);
        let mut again = Vec::new();
        parsed.write(&mut again).unwrap();
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn mem_size_roundtrip(
        blocks in prop::collection::vec((
            name(),
            1u64..(1 << 20),
            prop::option::of(prop_oneof![Just(21u32), Just(30u32), 13u32..31]),
            // Guest addresses that look like page sizes make the block list
            // ambiguous; the MEM_SIZE total must resolve it.
            prop_oneof![Just(0u64), Just(0x20_0000u64), Just(0x4000_0000u64), any::<u64>()],
        ), 1..8),
        advised in any::<bool>(),
        with_summary in any::<bool>(),
        ignore_shared in any::<bool>(),
    ) {
        let mbs: Vec<MemBlock<'_>> = blocks.iter().map(|(n, pages, ps, addr)| MemBlock {
            name: n,
            used_length: pages << 12,
            page_size: if advised { ps.map(|b| 1u64 << b) } else { None },
            addr: ignore_shared.then_some(*addr),
        }).collect();
        let summary = mbs.iter().fold(4096u64, |a, b| a | b.page_size.unwrap_or(4096));
        let ctx = RamContext {
            postcopy_advised: advised.then_some(with_summary.then_some(summary)),
            ignore_shared,
            ..RamContext::default()
        };
        let rec = RamRecord::mem_size(mbs);
        let mut bytes = Vec::new();
        rec.write(&mut bytes).unwrap();
        let n = bytes.len();
        RamRecord::eos().write(&mut bytes).unwrap();
        let (parsed, len) = decode_record(&bytes, 0, &ctx, false).unwrap();
        prop_assert_eq!(len, n);
        prop_assert_eq!(parsed, rec);
    }

    #[test]
    fn command_roundtrip((num, bytes) in commands()) {
        let (c, len) = decode_command(&bytes, 0, 256 << 20).unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(c.number(), num);
        let mut again = Vec::new();
        c.write(&mut again).unwrap();
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn return_path_roundtrip(bytes in rp_messages()) {
        let msgs = parse_return_path(&bytes).unwrap();
        let mut again = Vec::new();
        for (_, m) in &msgs {
            m.write(&mut again).unwrap();
        }
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn configuration_roundtrip(machine in "[a-z0-9.-]{1,40}", bits in prop::option::of(10u32..=16), caps in prop::option::of(prop::collection::vec("[a-z-]{1,20}", 0..4)), uuid in prop::option::of(any::<[u8; 16]>())) {
        let mut subsections = Vec::new();
        if let Some(b) = bits { subsections.push(ConfigSubsection { name: "configuration/target-page-bits", version: 1, body: ConfigBody::TargetPageBits(b) }); }
        let caps_ref: Option<Vec<&str>> = caps.as_ref().map(|c| c.iter().map(String::as_str).collect());
        if let Some(c) = caps_ref { subsections.push(ConfigSubsection { name: "configuration/capabilities", version: 1, body: ConfigBody::Capabilities(c) }); }
        if let Some(u) = uuid { subsections.push(ConfigSubsection { name: "configuration/uuid", version: 1, body: ConfigBody::Uuid(u) }); }
        let c = Configuration { machine: &machine, subsections };
        let mut bytes = Vec::new();
        c.write(&mut bytes).unwrap();
        let n = bytes.len();
        bytes.push(0x01); // the next section's type byte ends the subsection list
        let (parsed, len) = decode_configuration(&bytes, 0).unwrap();
        prop_assert_eq!(len, n);
        prop_assert_eq!(parsed, c);
    }

    #[test]
    fn section_header_roundtrip(kind in 0usize..4, id in any::<u32>(), idstr in name(), inst in any::<u32>(), ver in any::<u32>()) {
        let kind = [SectionKind::Start, SectionKind::Part, SectionKind::End, SectionKind::Full][kind];
        let h = SectionHeader { kind, section_id: id, ident: kind.introduces().then_some(SectionIdent { idstr: &idstr, instance: inst, version: ver }) };
        let mut bytes = Vec::new();
        h.write(&mut bytes).unwrap();
        let (p, len) = decode_section_header(&bytes, 0).unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(p, h);
    }

    /// Whole synthetic precopy streams: header, configuration, commands, a RAM
    /// START/PART/END, device FULL sections with arbitrary payloads, EOF and
    /// vmdesc; the items re-serialize to the same bytes.
    #[test]
    fn synthetic_stream_roundtrip(
        pages in prop::collection::vec((0u64..64, any::<bool>(), any::<u8>()), 0..40),
        devices in prop::collection::vec(("[a-z0-9_]{1,12}", prop::collection::vec(any::<u8>(), 0..200), prop::option::of((0usize..200, 0usize..4))), 0..6),
        ping in prop::option::of(any::<u32>()),
        vmdesc in any::<bool>(),
    ) {
        // Device payloads may hold copies of their own footer followed by
        // what a section could start with (guest-controlled bytes).
        let devices: Vec<(String, Vec<u8>)> = devices.into_iter().enumerate().map(|(i, (n, mut p, fake))| {
            if let Some((at, kind)) = fake {
                let id = 10 + i as u32;
                let mut f = Vec::new();
                write_footer(&mut f, id);
                match kind {
                    0 => { SectionHeader::part(2).write(&mut f).unwrap(); RamRecord::eos().write(&mut f).unwrap(); write_footer(&mut f, 2); }
                    1 => SectionHeader::full(id + 100, "fake", 0, 1).write(&mut f).unwrap(),
                    2 => f.push(0),
                    _ => Command::Ping(7).write(&mut f).unwrap(),
                }
                let at = at.min(p.len());
                p.splice(at..at, f);
            }
            (n, p)
        }).collect();
        let mut s = Vec::new();
        write_header(&mut s);
        Configuration { machine: "pc-i440fx-10.0", subsections: vec![] }.write(&mut s).unwrap();
        if let Some(p) = ping {
            Command::OpenReturnPath.write(&mut s).unwrap();
            Command::Ping(p).write(&mut s).unwrap();
        }
        SectionHeader::start(2, "ram", 0, 4).write(&mut s).unwrap();
        RamRecord::mem_size(vec![MemBlock { name: "pc.ram", used_length: 64 << 12, page_size: None, addr: None }]).write(&mut s).unwrap();
        RamRecord::eos().write(&mut s).unwrap();
        write_footer(&mut s, 2);
        SectionHeader::part(2).write(&mut s).unwrap();
        let data: Vec<Vec<u8>> = pages.iter().map(|(_, _, b)| vec![*b; 4096]).collect();
        for (i, (pg, zero, _)) in pages.iter().enumerate() {
            let block = if i == 0 { Some("pc.ram") } else { None };
            if *zero { RamRecord::zero(pg << 12, block).write(&mut s).unwrap() } else { RamRecord::page(pg << 12, block, &data[i]).write(&mut s).unwrap() }
        }
        RamRecord::eos().write(&mut s).unwrap();
        write_footer(&mut s, 2);
        SectionHeader::end(2).write(&mut s).unwrap();
        RamRecord::eos().write(&mut s).unwrap();
        write_footer(&mut s, 2);
        for (i, (n, payload)) in devices.iter().enumerate() {
            let id = 10 + i as u32;
            SectionHeader::full(id, n, i as u32, 1).write(&mut s).unwrap();
            s.extend_from_slice(payload);
            write_footer(&mut s, id);
        }
        s.push(0);
        if vmdesc {
            let devs: Vec<String> = devices.iter().enumerate().map(|(i, (n, p))| format!(
                r#"{{"name":"{n}","instance_id":{i},"vmsd_name":"{n}","version":1,"fields":[{{"name":"data","type":"buffer","size":{}}}]}}"#, p.len())).collect();
            let json = format!(r#"{{"page_size":4096,"devices":[{}]}}"#, devs.join(","));
            qmig_wire::vmdesc::write_vmdesc(&mut s, json.as_bytes()).unwrap();
        }
        // With a vmdesc every payload is read exactly; without one the
        // reader either reads it exactly or refuses, never another reading.
        let mut again = Vec::new();
        let mut payloads = Vec::new();
        let mut failed = false;
        for it in SliceReader::new(&s) {
            match it {
                Ok((_, it)) => {
                    if let Item::DeviceData(d) = it { payloads.push(d.to_vec()); }
                    it.write(&mut again).unwrap();
                }
                Err(e) => {
                    prop_assert!(!vmdesc, "with a vmdesc: {}", e);
                    failed = true;
                    break;
                }
            }
        }
        let want: Vec<Vec<u8>> = devices.iter().map(|(_, p)| p.clone()).collect();
        if failed {
            prop_assert_eq!(&payloads[..], &want[..payloads.len()]);
        } else {
            prop_assert_eq!(payloads, want);
            prop_assert_eq!(again, s);
        }
    }

    /// Arbitrary bytes never panic the decoder, and whatever prefix parses
    /// re-serializes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut s = Vec::new();
        write_header(&mut s);
        s.extend_from_slice(&tail);
        let mut again = Vec::new();
        let mut last = 0;
        for it in SliceReader::new(&s) {
            match it {
                Ok((off, it)) => { it.write(&mut again).unwrap(); last = off; }
                Err(e) => { prop_assert!(e.offset() >= last); prop_assert!(e.offset() <= s.len() as u64); break; }
            }
        }
        prop_assert_eq!(&again[..], &s[..again.len()]);
    }
}
