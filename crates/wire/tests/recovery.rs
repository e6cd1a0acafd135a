//! Postcopy recovery (wire-format §11) and preempt channels (§12): the
//! recovery messages round-trip and are validated against the layout, and
//! the real QEMU 10 captures of a recovered migration (tests/data/recovery)
//! read connection by connection.

use std::collections::HashMap;
use std::path::PathBuf;

use proptest::prelude::*;
use qmig_wire::command::decode_command;
use qmig_wire::recovery::{
    check_rp_message, parse_recv_bitmap_command, parse_recv_bitmap_reply, parse_resume_ack,
    write_resume_ack, RecoveryChannel, RecoveryStage, RecvBitmapReply,
};
use qmig_wire::{
    Command, Decoder, Item, PageBitmap, RamBody, ReturnPathReader, RpMessage, SliceReader,
    WireError,
};

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9/@._:-]{1,60}"
}

fn layout(name: &str, pages: u64) -> impl Fn(&str) -> Option<u64> + '_ {
    move |n| (n == name).then_some(pages)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn recv_bitmap_and_resume_commands_roundtrip(n in name(), base in 0u64..1 << 40) {
        for c in [Command::RecvBitmap { block: &n }, Command::PostcopyResume] {
            let mut b = Vec::new();
            c.write(&mut b).unwrap();
            let (back, len) = decode_command(&b, base, 1 << 20).unwrap();
            prop_assert_eq!(len, b.len());
            prop_assert_eq!(&back, &c);
            let mut again = Vec::new();
            back.write(&mut again).unwrap();
            prop_assert_eq!(again, b.clone());
            if let Command::RecvBitmap { .. } = c {
                let (blk, len) = parse_recv_bitmap_command(&b, base, layout(&n, 1)).unwrap();
                prop_assert_eq!(blk, n.as_str());
                prop_assert_eq!(len, b.len());
                match parse_recv_bitmap_command(&b, base, |_| None) {
                    Err(WireError::UnknownBlock { offset, .. }) => prop_assert_eq!(offset, base),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }
    }

    /// serialize(parse(b)) == b for the reply, and the bitmap survives.
    #[test]
    fn recv_bitmap_reply_roundtrip(
        n in name(),
        pages in 0u64..5000,
        set in prop::collection::vec(any::<u64>(), 0..200),
        base in 0u64..1 << 40,
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut bm = PageBitmap::new(pages);
        for s in &set {
            if pages > 0 {
                bm.set(s % pages);
            }
        }
        let mut b = Vec::new();
        RecvBitmapReply { block: &n, bitmap: bm.clone() }.write(&mut b).unwrap();
        let whole = b.len();
        b.extend_from_slice(&tail);
        let (r, len) = parse_recv_bitmap_reply(&b, base, layout(&n, pages)).unwrap();
        prop_assert_eq!(len, whole);
        prop_assert_eq!(r.block, n.as_str());
        prop_assert_eq!(&r.bitmap, &bm);
        let mut again = Vec::new();
        r.write(&mut again).unwrap();
        prop_assert_eq!(&again[..], &b[..whole]);
        // The generic return-path reader agrees, and its message checks out.
        let (off, m) = ReturnPathReader::new(&b[..whole]).next().unwrap().unwrap();
        prop_assert_eq!(off, 0);
        check_rp_message(&m, base, layout(&n, pages)).unwrap();
        // Every cut of it is a truncation at the reply's offset, never a panic.
        for cut in 0..whole {
            match parse_recv_bitmap_reply(&b[..cut], base, layout(&n, pages)) {
                Err(WireError::Truncated { offset, .. }) => prop_assert_eq!(offset, base),
                other => prop_assert!(false, "cut at {}: {:?}", cut, other),
            }
        }
    }

    /// A layout that disagrees: another size, another block, a broken end
    /// marker, a bit past the last page; each a typed error at its field.
    #[test]
    fn recv_bitmap_reply_refusals(n in name(), pages in 1u64..3000, other in 1u64..3000, base in 0u64..1 << 40) {
        let mut bm = PageBitmap::new(pages);
        bm.set(pages - 1);
        let mut b = Vec::new();
        RecvBitmapReply { block: &n, bitmap: bm }.write(&mut b).unwrap();
        let size_at = base + 4 + 1 + n.len() as u64;
        let want = qmig_wire::return_path::recv_bitmap_size(other);
        match parse_recv_bitmap_reply(&b, base, layout(&n, other)) {
            Ok(_) => {
                // Same rounded size: only a bit past `other` pages can refuse it.
                prop_assert_eq!(want, qmig_wire::return_path::recv_bitmap_size(pages));
                prop_assert!(other >= pages);
            }
            Err(WireError::RecvBitmapSize { offset, size, expected, .. }) => {
                prop_assert_eq!(offset, size_at);
                prop_assert_eq!(expected, want);
                prop_assert_eq!(size, qmig_wire::return_path::recv_bitmap_size(pages));
            }
            Err(WireError::Bitmap { offset, .. }) => {
                prop_assert_eq!(offset, size_at + 8);
                prop_assert!(other < pages);
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
        match parse_recv_bitmap_reply(&b, base, |_| None) {
            Err(WireError::UnknownBlock { offset, name, .. }) => {
                prop_assert_eq!(offset, base);
                prop_assert_eq!(name, n.clone());
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let mut bad = b.clone();
        let end = bad.len();
        bad[end - 1] ^= 0x40;
        match parse_recv_bitmap_reply(&bad, base, layout(&n, pages)) {
            Err(WireError::BitmapEndMarker { offset, .. }) => prop_assert_eq!(offset, base + end as u64 - 8),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn resume_ack_value(v in any::<u32>(), base in 0u64..1 << 40) {
        let mut b = Vec::new();
        RpMessage::ResumeAck(v).write(&mut b).unwrap();
        if v == 1 {
            prop_assert_eq!(parse_resume_ack(&b, base).unwrap(), 8);
            let mut w = Vec::new();
            write_resume_ack(&mut w);
            prop_assert_eq!(w, b);
        } else {
            match parse_resume_ack(&b, base) {
                Err(WireError::ResumeAck { offset, value }) => {
                    prop_assert_eq!(offset, base);
                    prop_assert_eq!(value, v);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert!(check_rp_message(&RpMessage::ResumeAck(v), base, |_| None).is_err());
        }
    }

    /// Arbitrary bytes never panic the recovery parsers, and errors stay
    /// inside the input.
    #[test]
    fn recovery_parsers_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..600), pages in 0u64..4096) {
        let lay = |_: &str| Some(pages);
        for r in [
            parse_recv_bitmap_reply(&b, 0, lay).map(|x| x.1),
            parse_resume_ack(&b, 0),
            parse_recv_bitmap_command(&b, 0, lay).map(|x| x.1),
        ] {
            match r {
                Ok(n) => prop_assert!(n <= b.len()),
                Err(e) => prop_assert!(e.offset() <= b.len() as u64),
            }
        }
    }
}

#[test]
fn recovery_order() {
    let lay = |n: &str| (n == "pc.ram").then_some(8u64);
    let bm = Item::Command(Command::RecvBitmap { block: "pc.ram" });
    let resume = Item::Command(Command::PostcopyResume);
    let mut c = RecoveryChannel::new();
    assert!(matches!(
        c.check(0, &resume, lay),
        Err(WireError::Recovery { offset: 0, .. })
    ));
    assert!(matches!(
        c.check(3, &Item::Eof, lay),
        Err(WireError::Recovery { offset: 3, .. })
    ));
    assert!(matches!(
        c.check(
            5,
            &Item::Command(Command::RecvBitmap { block: "nope" }),
            lay
        ),
        Err(WireError::UnknownBlock { offset: 5, .. })
    ));
    c.check(0, &bm, lay).unwrap();
    c.check(12, &bm, lay).unwrap();
    assert_eq!(c.stage(), RecoveryStage::Bitmaps);
    c.check(24, &resume, lay).unwrap();
    assert_eq!(c.stage(), RecoveryStage::Resumed);
    assert_eq!(c.bitmaps_requested(), 2);
    assert!(matches!(
        c.check(29, &bm, lay),
        Err(WireError::Recovery { offset: 29, .. })
    ));
    assert!(matches!(
        c.check(29, &resume, lay),
        Err(WireError::Recovery { offset: 29, .. })
    ));
    c.check(29, &Item::Eof, lay).unwrap();
}

// --- the real captures ------------------------------------------------------

fn recovery_dir() -> PathBuf {
    qmig_tests::data_dir().join("recovery")
}

fn load(scenario: &str, file: &str) -> Option<Vec<u8>> {
    let p = recovery_dir().join(scenario).join(file);
    std::fs::read(p).ok().map(|b| qmig_tests::gunzip(&b))
}

const SCENARIOS: [&str; 3] = [
    "q10-postcopy-recover",
    "q10-postcopy-relay-cut",
    "q10-preempt-recover",
];

/// Reads `buf` with `dec`, re-serializing every item; returns the decoder
/// at the end of the last whole item and the error that stopped it (None
/// at a clean end).
fn read_all(
    buf: &[u8],
    dec: Decoder,
    mut each: impl FnMut(u64, &Item<'_>),
) -> (Decoder, Option<WireError>) {
    let mut rd = SliceReader::with_decoder(buf, dec);
    let mut out = Vec::new();
    let mut err = None;
    for r in rd.by_ref() {
        match r {
            Ok((off, item)) => {
                assert_eq!(off as usize, out.len());
                item.write(&mut out).unwrap();
                each(off, &item);
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(&out[..], &buf[..out.len()], "re-serialized bytes differ");
    (rd.decoder().clone(), err)
}

#[test]
fn real_recovered_captures_read_connection_by_connection() {
    for sc in SCENARIOS {
        let (Some(m1), Some(m2), Some(rp2)) = (
            load(sc, "main-1.bin.gz"),
            load(sc, "main-2.bin.gz"),
            load(sc, "rp-2.bin.gz"),
        ) else {
            panic!(
                "{sc}: capture files missing under {}",
                recovery_dir().display()
            );
        };
        // A connection without a header is never taken for a continuation.
        match SliceReader::new(&m2).next() {
            Some(Err(WireError::BadMagic { offset: 0, found })) => assert_eq!(found, 0x0800_0a00),
            other => panic!("{sc}: {other:?}"),
        }
        let mut blocks: HashMap<String, u64> = HashMap::new();
        let mut tps = 0u64;
        let (dec, err) = read_all(&m1, Decoder::new(Default::default()), |_, item| {
            if let Item::Ram(r) = item {
                if let RamBody::MemSize(bl) = &r.body {
                    for b in bl {
                        blocks.insert(b.name.to_string(), b.used_length);
                    }
                }
            }
        });
        tps = tps.max(dec.ram_context().page_size() as u64);
        let err = err.expect("the first connection was cut");
        assert!(err.is_truncation(), "{sc}: {err}");
        assert_eq!(err.offset(), dec.position());
        assert!(dec.postcopy_running(), "{sc}: cut after RUN");
        let pages = |n: &str| blocks.get(n).map(|l| l / tps);
        // The second connection: RECV_BITMAP per block, RESUME, then RAM to EOF.
        let mut order = RecoveryChannel::new();
        let mut named = Vec::new();
        let cont = dec.continuation().unwrap();
        assert_eq!(cont.position(), 0);
        let (end, err) = read_all(&m2, cont, |off, item| {
            order.check(off, item, pages).unwrap();
            if let Item::Command(Command::RecvBitmap { block }) = item {
                named.push(block.to_string());
            }
        });
        assert!(err.is_none(), "{sc}: {err:?}");
        assert!(end.is_done(), "{sc}: the second connection reaches EOF");
        assert_eq!(order.stage(), RecoveryStage::Resumed);
        let mut all: Vec<String> = blocks.keys().cloned().collect();
        all.sort();
        named.sort();
        assert_eq!(named, all, "{sc}: one RECV_BITMAP per block");
        // Its return path: one reply per block, each the block's size, then RESUME_ACK(1).
        let mut replies = 0;
        let mut acks = 0;
        for r in ReturnPathReader::new(&rp2) {
            let (off, m) = r.unwrap();
            check_rp_message(&m, off, pages).unwrap();
            match m {
                RpMessage::RecvBitmap { .. } => {
                    let (reply, _) =
                        parse_recv_bitmap_reply(&rp2[off as usize..], off, pages).unwrap();
                    assert_eq!(Some(reply.bitmap.len()), pages(reply.block));
                    assert_eq!(acks, 0, "replies come before RESUME_ACK");
                    replies += 1;
                }
                RpMessage::ResumeAck(_) => {
                    assert_eq!(parse_resume_ack(&rp2[off as usize..], off).unwrap(), 8);
                    acks += 1;
                }
                _ => {}
            }
        }
        assert_eq!(replies, blocks.len(), "{sc}");
        assert_eq!(acks, 1, "{sc}");
        // Preempt channels: page records only, read from the main context.
        for k in 1..=2 {
            let Some(p) = load(sc, &format!("preempt-{k}.bin.gz")) else {
                assert!(!sc.contains("preempt"), "{sc}: preempt-{k} missing");
                continue;
            };
            let mut n = 0;
            let (pd, err) = read_all(&p, end.preempt_channel(), |_, item| {
                assert!(matches!(
                    item,
                    Item::Ram(r) if matches!(r.body, RamBody::Page(_) | RamBody::Zero { .. })
                ));
                n += 1;
            });
            assert!(err.is_none(), "{sc}: preempt-{k}: {err:?}");
            assert_eq!(pd.position(), p.len() as u64);
            assert!(n > 0, "{sc}: preempt-{k} carries requested pages");
        }
    }
}

#[test]
fn continuation_is_refused_before_run_and_after_eof() {
    let s = std::fs::read(qmig_tests::data_dir().join("q10-stopped/stream")).unwrap();
    let (dec, err) = read_all(
        &s[..s.len() / 2],
        Decoder::new(Default::default()),
        |_, _| {},
    );
    assert!(err.unwrap().is_truncation());
    match dec.continuation() {
        Err(WireError::Recovery { offset, .. }) => assert_eq!(offset, dec.position()),
        other => panic!("{other:?}"),
    }
    let m1 = load("q10-postcopy-recover", "main-1.bin.gz").unwrap();
    let m2 = load("q10-postcopy-recover", "main-2.bin.gz").unwrap();
    let (dec, _) = read_all(&m1, Decoder::new(Default::default()), |_, _| {});
    let (end, _) = read_all(&m2, dec.continuation().unwrap(), |_, _| {});
    assert!(matches!(
        end.continuation(),
        Err(WireError::Recovery { .. })
    ));
}

#[test]
fn preempt_channel_refuses_other_records() {
    let m1 = load("q10-postcopy-recover", "main-1.bin.gz").unwrap();
    let (dec, _) = read_all(&m1, Decoder::new(Default::default()), |_, _| {});
    // A MEM_SIZE record and an XBZRLE record are not what the channel carries.
    for bad in [
        {
            let mut v = (0x3000u64 | 0x40).to_be_bytes().to_vec();
            v.extend_from_slice(&[6, b'p', b'c', b'.', b'r', b'a', b'm', 1, 0, 2, 0, 1]);
            v
        },
        {
            let mut v = (0x1000u64 | 4).to_be_bytes().to_vec();
            v.extend_from_slice(&[6, b'p', b'c', b'.', b'r', b'a', b'm']);
            v.extend_from_slice(&0x1000u64.to_be_bytes());
            v
        },
    ] {
        let mut rd = SliceReader::with_decoder(&bad, dec.preempt_channel());
        match rd.next() {
            Some(Err(e)) => assert_eq!(e.offset(), 0, "{e}"),
            other => panic!("{other:?}"),
        }
    }
    // A CONTINUE first record has no block on a fresh channel.
    let mut cont = (0x2000u64 | 0x20 | 0x02).to_be_bytes().to_vec();
    cont.push(0);
    let mut rd = SliceReader::with_decoder(&cont, dec.preempt_channel());
    assert!(matches!(
        rd.next(),
        Some(Err(WireError::ContinueWithoutBlock { offset: 0 }))
    ));
    // QEMU 7.2's last EOS ends the channel; nothing may follow it.
    let eos = 0x10u64.to_be_bytes();
    let mut rd = SliceReader::with_decoder(&eos, dec.preempt_channel());
    assert!(rd.next().unwrap().is_ok());
    assert!(rd.next().is_none());
    let mut two = eos.to_vec();
    two.extend_from_slice(&eos);
    let mut rd = SliceReader::with_decoder(&two, dec.preempt_channel());
    assert!(rd.next().unwrap().is_ok());
    assert!(matches!(
        rd.next(),
        Some(Err(WireError::Structure { offset: 8, .. }))
    ));
}
