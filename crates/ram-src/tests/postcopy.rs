//! The source's postcopy parts: host-page canonicalisation, discard
//! commands (at most 12 ranges each), page-request checks, the urgent queue
//! served before the background scan, and the switchover order.

use proptest::prelude::*;
use qmig_ram_src::{
    canonicalize_host_pages, dirty_runs, template::tests_support, Config, GuestRam, Progress,
    RamSrc, RamSrcError, RequestRule, Source, SrcBlock, State, Template, MAX_DISCARDS_PER_COMMAND,
};
use qmig_wire::command::decode_command;
use qmig_wire::{Command, Item, PageBitmap, RamBody, RpMessage, SliceReader};

const PS: u64 = 4096;

fn bitmap(bits: u64, ones: &[u64]) -> PageBitmap {
    let mut b = PageBitmap::new(bits);
    for &i in ones {
        b.set(i % bits);
    }
    b
}

/// The POSTCOPY_RAM_DISCARD commands at the start of `out`, as (block,
/// ranges) pairs, and how many bytes they took.
/// A block name and its (start, length) ranges.
type BlockRanges = (String, Vec<(u64, u64)>);

fn discards(out: &[u8]) -> (Vec<BlockRanges>, usize) {
    let mut at = 0;
    let mut v = Vec::new();
    while at < out.len() {
        let (c, n) = decode_command(&out[at..], at as u64, u32::MAX).expect("command");
        match c {
            Command::RamDiscard(d) => v.push((
                d.block.to_string(),
                d.ranges.iter().map(|r| (r.start, r.len)).collect(),
            )),
            _ => break,
        }
        at += n;
    }
    (v, at)
}

/// Page records of the last of `payloads` written by `poll_iterate` (the
/// earlier ones give CONTINUE its context): (block name as carried, offset).
fn page_records(payloads: &[&[u8]]) -> Vec<(Option<String>, u64)> {
    // Wrap in a minimal stream so that the reader can take it.
    let t = tests_support::tiny_template();
    let tpl = Template::parse(&t).unwrap();
    let mut s = Vec::new();
    tpl.write_prefix(&mut s);
    tpl.begin_section(qmig_wire::SectionKind::Start, &mut s)
        .unwrap();
    qmig_wire::RamRecord::mem_size(vec![qmig_wire::MemBlock {
        name: "a",
        used_length: 64 * PS,
        page_size: None,
        addr: None,
    }])
    .write(&mut s)
    .unwrap();
    qmig_wire::RamRecord::eos().write(&mut s).unwrap();
    tpl.end_section(&mut s);
    let mut last = 0;
    for payload in payloads {
        last = s.len();
        tpl.begin_section(qmig_wire::SectionKind::Part, &mut s)
            .unwrap();
        s.extend_from_slice(payload);
        tpl.end_section(&mut s);
    }
    s.push(qmig_wire::section::EOF);
    let mut v = Vec::new();
    for r in SliceReader::new(&s) {
        let (at, item) = r.expect("payload decodes");
        if (at as usize) < last {
            continue;
        }
        if let Item::Ram(rec) = item {
            if matches!(rec.body, RamBody::Zero { .. } | RamBody::Page(_)) {
                v.push((rec.block.map(str::to_string), rec.offset));
            } else {
                assert!(
                    matches!(rec.body, RamBody::Eos | RamBody::MemSize(_)),
                    "only ZERO/PAGE in postcopy, got {:?}",
                    rec.body
                );
            }
        }
    }
    v
}

fn src_after_switchover(pages: u64, host_pages: u64) -> (RamSrc, Vec<Vec<u8>>) {
    let mut b = SrcBlock::sequential([("a", pages * PS)]);
    b[0].host_page_size = host_pages * PS;
    let mut src = RamSrc::new(b, Config::default()).unwrap();
    let mut out = Vec::new();
    src.poll_setup(&mut out).unwrap();
    out.clear();
    src.postcopy_switchover(&mut out).unwrap();
    let mem: Vec<Vec<u8>> = vec![(0..pages * PS).map(|i| (i / PS) as u8 | 1).collect()];
    (src, mem)
}

proptest! {
    #[test]
    fn canonicalisation_makes_whole_host_pages(
        bits in 1u64..5000,
        ones in proptest::collection::vec(any::<u64>(), 0..60),
        shift in 0u32..6,
    ) {
        let hp = 1u64 << shift;
        let orig = bitmap(bits, &ones);
        let mut b = orig.clone();
        canonicalize_host_pages(&mut b, hp);
        for h in 0..bits.div_ceil(hp) {
            let r = h * hp..((h + 1) * hp).min(bits);
            let any = r.clone().any(|i| orig.get(i));
            for i in r {
                // Set exactly where the host page had any dirty target page.
                prop_assert_eq!(b.get(i), any, "page {} host page {}", i, h);
            }
        }
    }

    #[test]
    fn runs_cover_exactly_the_set_bits(
        bits in 1u64..5000,
        ones in proptest::collection::vec(any::<u64>(), 0..80),
    ) {
        let b = bitmap(bits, &ones);
        let runs = dirty_runs(&b, PS);
        let mut covered = PageBitmap::new(bits);
        let mut last_end = None;
        for r in &runs {
            prop_assert!(r.len > 0 && r.start % PS == 0 && r.len % PS == 0);
            if let Some(e) = last_end {
                // Sorted and maximal: a gap separates runs.
                prop_assert!(r.start > e);
            }
            covered.set_range(r.start / PS, r.len / PS);
            last_end = Some(r.start + r.len);
        }
        prop_assert_eq!(covered, b);
    }

    #[test]
    fn switchover_discards_the_canonical_dirty_set_in_commands_of_at_most_12(
        blocks in proptest::collection::vec((1u64..200, 0u32..3), 1..4),
        writes in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..120),
        precopy in any::<bool>(),
    ) {
        let names: Vec<String> = (0..blocks.len()).map(|i| format!("b{i}")).collect();
        let mut sb = SrcBlock::sequential(names.iter().map(String::as_str).zip(blocks.iter().map(|b| b.0 * PS)));
        for (s, (_, sh)) in sb.iter_mut().zip(&blocks) {
            s.host_page_size = PS << sh;
        }
        // Host pages must divide the block: round blocks up.
        for s in &mut sb {
            s.used_length = s.used_length.div_ceil(s.host_page_size) * s.host_page_size;
        }
        let mem: Vec<Vec<u8>> = sb.iter().map(|b| vec![7u8; b.used_length as usize]).collect();
        let mut src = RamSrc::new(sb.clone(), Config::default()).unwrap();
        let mut out = Vec::new();
        src.poll_setup(&mut out).unwrap();
        let mut want: Vec<PageBitmap> = sb.iter().map(|b| {
            let mut m = PageBitmap::new(b.used_length / PS);
            m.set_range(0, m.len());
            m
        }).collect();
        if precopy {
            while src.poll_iterate(&mem, usize::MAX, &mut out).unwrap() == Progress::Budget {}
            for w in &mut want { w.clear_range(0, w.len()); }
        }
        for (bi, pi) in &writes {
            let b = bi.index(sb.len());
            let p = pi.index((sb[b].used_length / PS) as usize) as u64;
            src.handle_dirty_page(b, p).unwrap();
            want[b].set(p);
        }
        for (w, b) in want.iter_mut().zip(&sb) {
            canonicalize_host_pages(w, b.host_page_size / PS);
        }
        out.clear();
        src.postcopy_switchover(&mut out).unwrap();
        prop_assert_eq!(src.state(), State::Postcopy);
        let (cmds, used) = discards(&out);
        prop_assert_eq!(used, out.len(), "only discard commands");
        let mut got: Vec<PageBitmap> = sb.iter().map(|b| PageBitmap::new(b.used_length / PS)).collect();
        for (name, ranges) in &cmds {
            prop_assert!(!ranges.is_empty() && ranges.len() <= MAX_DISCARDS_PER_COMMAND);
            let b = names.iter().position(|n| n == name).expect("known block");
            let hps = sb[b].host_page_size;
            for &(s, l) in ranges {
                prop_assert!(s % hps == 0 && l % hps == 0, "range {s:#x}+{l:#x} not whole host pages");
                got[b].set_range(s / PS, l / PS);
            }
        }
        prop_assert_eq!(&got, &want);
        let total: u64 = want.iter().map(PageBitmap::count_ones).sum();
        prop_assert_eq!(src.remaining_pages(), total);
        prop_assert_eq!(src.counters().discard_commands, cmds.len() as u64);
    }

    #[test]
    fn any_request_is_checked_never_a_panic(
        start in any::<u64>(), len in any::<u32>(), name in "[a-c]{1,2}", id in any::<bool>(),
    ) {
        let (mut src, _) = src_after_switchover(16, 1);
        let msg = if id {
            RpMessage::ReqPagesId { start, len, block: &name }
        } else {
            RpMessage::ReqPages { start, len }
        };
        let r = src.handle_return_path(&msg);
        let ok = id && name == "a" && start % PS == 0 && u64::from(len) % PS == 0
            && start.checked_add(u64::from(len)).is_some_and(|e| e <= 16 * PS);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
    }
}

fn rule(r: Result<(), RamSrcError>) -> RequestRule {
    match r {
        Err(RamSrcError::PageRequest { rule, .. }) => rule,
        other => panic!("expected a page-request error, got {other:?}"),
    }
}

#[test]
fn bad_requests_get_typed_errors() {
    let (mut src, _) = src_after_switchover(16, 1);
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPages {
            start: 0,
            len: 4096
        })),
        RequestRule::NoPreviousBlock
    );
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPagesId {
            start: 0,
            len: 4096,
            block: "zz"
        })),
        RequestRule::UnknownBlock
    );
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPagesId {
            start: 100,
            len: 4096,
            block: "a"
        })),
        RequestRule::Unaligned { align: PS }
    );
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPagesId {
            start: 0,
            len: 100,
            block: "a"
        })),
        RequestRule::Unaligned { align: PS }
    );
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPagesId {
            start: 15 * PS,
            len: 8192,
            block: "a"
        })),
        RequestRule::OutOfBlock {
            used_length: 16 * PS
        }
    );
    assert_eq!(
        rule(src.handle_return_path(&RpMessage::ReqPagesId {
            start: !(PS - 1),
            len: 4096,
            block: "a"
        })),
        RequestRule::OutOfBlock {
            used_length: 16 * PS
        }
    );
    // The message names offset and rule.
    let e = src
        .handle_return_path(&RpMessage::ReqPagesId {
            start: 0x11000,
            len: 4096,
            block: "a",
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("0x11000") && e.contains("used length"), "{e}");
    // Recovery messages outside a recovery are refused, SHUT and PONG
    // recorded.
    assert!(matches!(
        src.handle_return_path(&RpMessage::ResumeAck(1)),
        Err(RamSrcError::Recovery {
            rule: qmig_ram_src::RecoveryRule::WrongState { .. }
        })
    ));
    src.handle_return_path(&RpMessage::Pong(2)).unwrap();
    src.handle_return_path(&RpMessage::Shut(0)).unwrap();
    assert_eq!((src.last_pong(), src.shut()), (Some(2), Some(0)));
    assert_eq!(
        src.pending_requests().count(),
        0,
        "nothing queued by bad requests"
    );
}

#[test]
fn requests_before_setup_are_refused() {
    let mut src = RamSrc::new(SrcBlock::sequential([("a", 4 * PS)]), Config::default()).unwrap();
    assert!(matches!(
        src.handle_return_path(&RpMessage::ReqPagesId {
            start: 0,
            len: 4096,
            block: "a"
        }),
        Err(RamSrcError::State { .. })
    ));
}

#[test]
fn requested_pages_go_first_in_request_order_then_the_scan_resumes() {
    let (mut src, mem) = src_after_switchover(64, 1);
    for (start, id) in [(40u64, true), (5, false), (50, false), (41, true)] {
        let m = if id {
            RpMessage::ReqPagesId {
                start: start * PS,
                len: 4096,
                block: "a",
            }
        } else {
            RpMessage::ReqPages {
                start: start * PS,
                len: 4096,
            }
        };
        src.handle_return_path(&m).unwrap();
    }
    let mut out = Vec::new();
    // Budget 0: only the requested pages.
    let _ = src.poll_iterate(&mem, 0, &mut out).unwrap();
    let first = out.clone();
    let recs = page_records(&[&first]);
    let offs: Vec<u64> = recs.iter().map(|r| r.1 / PS).collect();
    assert_eq!(offs, [40, 5, 50, 41]);
    // The first record after the switchover names its block.
    assert_eq!(recs[0].0.as_deref(), Some("a"));
    assert_eq!(src.counters().requested_pages, 4);
    assert_eq!(src.counters().postcopy_requests, 4);
    // Asking again for a page already sent sends nothing.
    src.handle_return_path(&RpMessage::ReqPages {
        start: 5 * PS,
        len: 4096,
    })
    .unwrap();
    out.clear();
    let _ = src.poll_iterate(&mem, 3 * PS as usize, &mut out).unwrap();
    let offs: Vec<u64> = page_records(&[&first, &out])
        .iter()
        .map(|r| r.1 / PS)
        .collect();
    // The background scan continues after the last request (41).
    assert_eq!(offs, [42, 43, 44]);
    assert_eq!(src.counters().requested_pages, 4);
}

#[test]
fn requests_for_huge_host_pages_send_the_whole_host_page_in_order() {
    // Host pages of 4 target pages: a request for the third target page of
    // a host page sends all four, in order.
    let (mut src, mem) = src_after_switchover(32, 4);
    src.handle_return_path(&RpMessage::ReqPagesId {
        start: 10 * PS,
        len: 4096,
        block: "a",
    })
    .unwrap();
    let mut out = Vec::new();
    let _ = src.poll_iterate(&mem, 0, &mut out).unwrap();
    let offs: Vec<u64> = page_records(&[&out]).iter().map(|r| r.1 / PS).collect();
    assert_eq!(offs, [8, 9, 10, 11]);
}

#[test]
fn postcopy_never_sends_xbzrle_or_compressed_pages() {
    let cfg = Config {
        xbzrle_cache_size: Some(1 << 20),
        ..Config::default()
    };
    let mut src = RamSrc::new(SrcBlock::sequential([("a", 64 * PS)]), cfg).unwrap();
    let mut mem = vec![vec![3u8; 64 * PS as usize]];
    let mut out = Vec::new();
    src.poll_setup(&mut out).unwrap();
    while src.poll_iterate(&mem, usize::MAX, &mut out).unwrap() == Progress::Budget {}
    // A second pass starts XBZRLE...
    for p in 0..64 {
        mem[0][p * PS as usize] ^= 1;
        src.handle_dirty_page(0, p as u64).unwrap();
    }
    src.handle_sync().unwrap();
    out.clear();
    let _ = src.poll_iterate(&mem, 10 * PS as usize, &mut out).unwrap();
    assert!(src.xbzrle_started());
    // ...but postcopy pages are PAGE/ZERO only (page_records asserts it).
    out.clear();
    src.postcopy_switchover(&mut out).unwrap();
    let left = src.remaining_pages() as usize;
    assert!(left > 0 && left < 64, "{left}");
    let mut n = 0;
    let mut all: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut out = Vec::new();
        let p = src.poll_iterate(&mem, 8 * PS as usize, &mut out).unwrap();
        all.push(out);
        let refs: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
        n += page_records(&refs).len();
        if p == Progress::Clean {
            break;
        }
    }
    assert_eq!(n, left);
    assert!(matches!(
        src.handle_dirty_page(0, 0),
        Err(RamSrcError::State { .. })
    ));
}

#[test]
fn source_writes_qemu_10s_switchover_order() {
    let t = tests_support::tiny_template();
    let tpl = Template::parse(&t).unwrap();
    let ram = RamSrc::new(
        SrcBlock::sequential([("pc.ram", 16 * PS)]),
        Config::default(),
    )
    .unwrap();
    let mem = vec![vec![1u8; 16 * PS as usize]];
    let mut src = Source::new(tpl, ram, true);
    let mut out = Vec::new();
    src.write_setup(&mut out).unwrap();
    let _ = src
        .write_iteration(&mem, 4 * PS as usize, &mut out)
        .unwrap();
    src.write_postcopy_switchover(&mut out).unwrap();
    src.handle_return_path(&RpMessage::ReqPagesId {
        start: 15 * PS,
        len: 4096,
        block: "pc.ram",
    })
    .unwrap();
    while !src.postcopy_done() {
        let _ = src
            .write_iteration(&mem, 2 * PS as usize, &mut out)
            .unwrap();
    }
    src.write_completion(&mem, &mut out).unwrap();
    let mut names = Vec::new();
    for r in SliceReader::new(&out) {
        let (_, item) = r.expect("decodes");
        match item {
            Item::Command(Command::Ping(v)) => names.push(format!("PING({v})")),
            Item::Command(c) => names.push(c.name().to_string()),
            Item::Section(h) => names.push(h.kind.name().to_string()),
            Item::Eof => names.push("EOF".into()),
            Item::Vmdesc(_) => names.push("VMDESC".into()),
            _ => {}
        }
    }
    names.dedup();
    assert_eq!(
        names,
        [
            "OPEN_RETURN_PATH",
            "PING(1)",
            "POSTCOPY_ADVISE",
            "START",
            "PART",
            "SWITCHOVER_START",
            "POSTCOPY_RAM_DISCARD",
            "PING(2)",
            "PACKAGED",
            "POSTCOPY_LISTEN",
            "PING(3)",
            "POSTCOPY_RUN",
            "PING(4)",
            "PART",
            "END",
            "EOF"
        ],
        "{names:?}"
    );
    assert_eq!(src.ram().counters().requested_pages, 1);
}

#[test]
fn postcopy_capture_serves_as_template() {
    let stream = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/q10-postcopy/stream"
    ))
    .unwrap();
    let t = Template::parse(&stream).expect("a postcopy capture is a template");
    assert!(t.postcopy);
    // The package's device sections: timer first, globalstate last.
    let dev = t.device_state();
    let mut idstrs = Vec::new();
    let mut s = Vec::new();
    t.write_prefix(&mut s);
    let pre = s.len();
    s.extend_from_slice(dev);
    s.push(0);
    for r in SliceReader::new(&s) {
        let (at, item) = r.expect("device state decodes");
        if let Item::Section(h) = item {
            assert!(at as usize >= pre);
            idstrs.push(h.ident.expect("FULL").idstr.to_string());
        }
    }
    assert_eq!(idstrs.first().map(String::as_str), Some("timer"));
    assert_eq!(idstrs.last().map(String::as_str), Some("globalstate"));
    assert_eq!(idstrs.len(), 31);
    assert_eq!(t.trailer(), [0]);
    // And a precopy stream written with it decodes to the end.
    let ram_blocks: Vec<(&str, u64)> = t
        .mem_blocks
        .iter()
        .map(|b| (b.name, b.used_length))
        .collect();
    let mem: Vec<Vec<u8>> = ram_blocks.iter().map(|b| vec![0u8; b.1 as usize]).collect();
    let ram = RamSrc::new(
        SrcBlock::sequential(ram_blocks.iter().copied()),
        Config::default(),
    )
    .unwrap();
    let mut src = Source::new(t.clone(), ram, false);
    let mut out = Vec::new();
    src.write_setup(&mut out).unwrap();
    while src.write_iteration(&mem, 1 << 20, &mut out).unwrap() == Progress::Budget {}
    src.write_completion(&mem, &mut out).unwrap();
    let items: Vec<_> = SliceReader::new(&out)
        .collect::<Result<_, _>>()
        .expect("decodes");
    assert!(matches!(items.last(), Some((_, Item::Eof))));
    assert_eq!(mem.blocks(), 6);
}
