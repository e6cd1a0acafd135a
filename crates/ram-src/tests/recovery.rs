//! Postcopy recovery on the source side: injected cuts at every phase
//! (before LISTEN and in the package the migration fails cleanly; after
//! RUN and during a recovery it pauses), the recovery connection's opening
//! (RECV_BITMAP per block, POSTCOPY_RESUME only after every reply), the
//! checks of every recovery message, the preempt channel, and the
//! recovery opening of a real QEMU 10 capture (tests/data/recovery) fed
//! through `RamSrc`.

use std::io::Read;

use proptest::prelude::*;
use qmig_ram_dst::{GuestMemory, Place, PostcopyState, RamDst, VecMemory};
use qmig_ram_src::{
    template::tests_support, Config, Progress, RamSrc, RamSrcError, RecoveryRule, Source, SrcBlock,
    State, Template,
};
use qmig_wire::{
    Command, Decoder, Item, Limits, PageBitmap, RamBody, ReturnPathReader, RpMessage, Step,
};

mod common;
use common::{memory_pages as memory, PS};

/// One connection's bytes as the destination receives them.
struct Conn {
    wire: Vec<u8>,
    consumed: usize,
    dec: Decoder,
}

/// `Source` → (cuttable connection) → `RamDst`, with the destination's side
/// of a recovery (RECV_BITMAP replies from its received bitmaps,
/// RESUME_ACK) answered by the harness.
struct Harness<'t> {
    src: Source<'t>,
    mem: Vec<Vec<u8>>,
    dst: RamDst<VecMemory>,
    conn: Conn,
    rp: Vec<u8>,
    rp_consumed: usize,
    cuts: u64,
}

impl Harness<'_> {
    fn new(pages: &[usize], seeds: &[u8]) -> Self {
        Harness {
            src: common::postcopy_source(pages),
            mem: memory(pages, seeds),
            dst: common::emit_dst(),
            conn: Conn {
                wire: Vec::new(),
                consumed: 0,
                dec: Decoder::new(Limits::default()),
            },
            rp: Vec::new(),
            rp_consumed: 0,
            cuts: 0,
        }
    }

    /// Delivers `bytes` (all of them, or the first `cut_at` and then the
    /// connection breaks) and lets the destination take every whole item.
    fn deliver(&mut self, bytes: &[u8], cut_at: Option<usize>) {
        let n = cut_at.map_or(bytes.len(), |c| c.min(bytes.len()));
        self.conn.wire.extend_from_slice(&bytes[..n]);
        self.drive();
    }

    fn drive(&mut self) {
        while let Some((item, len)) =
            common::next_item(&mut self.conn.dec, &self.conn.wire[self.conn.consumed..])
        {
            let at = self.conn.dec.position();
            match &item {
                // The destination's side of a recovery.
                Item::Command(Command::RecvBitmap { block }) => {
                    let i = self.dst.block_index(block).expect("known block");
                    assert!(self.dst.recv_bitmap_reply(i, &mut self.rp).unwrap());
                }
                Item::Command(Command::PostcopyResume) => {
                    qmig_wire::recovery::write_resume_ack(&mut self.rp);
                }
                _ => self
                    .dst
                    .handle_item(at, len, &item)
                    .expect("destination accepts"),
            }
            self.conn.dec.commit(&item, len);
            self.conn.consumed += len;
            self.place();
        }
    }

    fn place(&mut self) {
        while self.dst.poll_event().is_some() {}
        while let Some(p) = self.dst.poll_placement() {
            match p {
                Place::HostPage {
                    block,
                    offset,
                    data,
                } => {
                    let len = data.len() as u64;
                    self.dst.memory_mut().write(block, offset, &data).unwrap();
                    self.dst.handle_placed(block, offset, len).unwrap();
                }
                Place::ZeroPage { block, offset, len } => {
                    let z = vec![0u8; len as usize];
                    self.dst.memory_mut().write(block, offset, &z).unwrap();
                    self.dst.handle_placed(block, offset, len).unwrap();
                }
                Place::Discard { block, offset, len } => {
                    self.dst.memory_mut().discard(block, offset, len).unwrap()
                }
            }
        }
        self.dst.poll_transmit(&mut self.rp);
    }

    /// The return-path bytes so far go to the source (`cut_at`: only the
    /// first bytes of them, then the return path breaks).
    fn carry_back(&mut self, cut_at: Option<usize>) -> Result<(), RamSrcError> {
        let end = cut_at.map_or(self.rp.len(), |c| (self.rp_consumed + c).min(self.rp.len()));
        while self.rp_consumed < end {
            match self.src.ram_mut().handle_return_path_bytes(
                &self.rp[self.rp_consumed..end],
                self.rp_consumed as u64,
            )? {
                Some(n) => self.rp_consumed += n,
                None => break,
            }
        }
        Ok(())
    }

    /// The connection breaks: the source pauses, the destination's decoder
    /// continues on a new connection, the unread return path is lost.
    fn cut(&mut self) {
        self.src.handle_connection_lost().expect("pauses after RUN");
        assert_eq!(self.src.ram().state(), State::Paused);
        let dec = self.conn.dec.continuation().expect("cut after RUN");
        self.conn = Conn {
            wire: Vec::new(),
            consumed: 0,
            dec,
        };
        self.rp.clear();
        self.rp_consumed = 0;
        self.cuts += 1;
    }

    /// A whole recovery; `cut_after` bytes of its opening (then a cut and a
    /// new try) when given.
    fn recover(&mut self, mut cut_after: Option<usize>) {
        loop {
            let mut out = Vec::new();
            self.src.write_recovery_start(&mut out).unwrap();
            assert_eq!(self.src.ram().state(), State::Recovering);
            if let Some(c) = cut_after.take() {
                self.deliver(&out, Some(c));
                let _ = self.carry_back(Some(c / 2));
                self.cut();
                continue;
            }
            self.deliver(&out, None);
            self.carry_back(None).unwrap();
            assert!(self.src.ram().ready_to_resume());
            out.clear();
            self.src.write_resume(&mut out).unwrap();
            self.deliver(&out, None);
            self.carry_back(None).unwrap();
            assert_eq!(self.src.ram().state(), State::Postcopy);
            return;
        }
    }
}

#[test]
fn cut_before_listen_fails_cleanly() {
    let mut h = Harness::new(&[8], &[1, 2]);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    let _ = h.src.write_iteration(&h.mem, 4 * PS, &mut out).unwrap();
    let e = h.src.handle_connection_lost().unwrap_err();
    assert!(
        matches!(
            e,
            RamSrcError::NotPausable {
                state: State::Iterating
            }
        ),
        "{e}"
    );
    assert_eq!(h.src.ram().state(), State::Failed);
    // Nothing more is accepted.
    assert!(h.src.write_iteration(&h.mem, PS, &mut out).is_err());
    assert!(h.src.write_recovery_start(&mut out).is_err());
    assert!(h.src.handle_return_path(&RpMessage::ResumeAck(1)).is_err());
}

#[test]
fn cut_in_the_package_fails_cleanly() {
    // The switchover (discards, PACKAGED{LISTEN, .., RUN}) is written but not
    // reported sent: the destination may never have seen RUN.
    let mut h = Harness::new(&[8, 3], &[5]);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    h.src.write_postcopy_switchover(&mut out).unwrap();
    // Cut inside the package (its RUN is 5 bytes before the last PING).
    h.deliver(&out.clone(), Some(out.len() - 9 - 2));
    assert_ne!(h.dst.postcopy_state(), PostcopyState::Running);
    let e = h.src.handle_connection_lost().unwrap_err();
    assert!(
        matches!(
            e,
            RamSrcError::NotPausable {
                state: State::Postcopy
            }
        ),
        "{e}"
    );
    assert_eq!(h.src.ram().state(), State::Failed);
}

#[test]
fn recovery_messages_are_checked() {
    let mut h = Harness::new(&[8, 70], &[7]);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    h.src.write_postcopy_switchover(&mut out).unwrap();
    h.src.handle_run_sent().unwrap();
    // Recovery messages outside a recovery.
    let rule = |r: Result<(), RamSrcError>| match r {
        Err(RamSrcError::Recovery { rule }) => rule,
        other => panic!("expected a recovery error, got {other:?}"),
    };
    let bm = PageBitmap::new(8).to_le_bytes();
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::RecvBitmap {
            block: "blk0",
            bitmap: &bm
        })),
        RecoveryRule::WrongState { .. }
    ));
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::ResumeAck(1))),
        RecoveryRule::WrongState { .. }
    ));
    h.src.handle_connection_lost().unwrap();
    // Paused: a second loss does nothing; recovery calls need a recovery.
    h.src.handle_connection_lost().unwrap();
    assert!(matches!(
        h.src.write_resume(&mut out),
        Err(RamSrcError::State { .. })
    ));
    out.clear();
    h.src.write_recovery_start(&mut out).unwrap();
    // RECV_BITMAP × 2, back to back, in block order, then nothing else.
    let mut at = 0;
    for want in ["blk0", "blk1"] {
        let (c, n) = qmig_wire::command::decode_command(&out[at..], at as u64, 1 << 20).unwrap();
        assert_eq!(c, Command::RecvBitmap { block: want });
        at += n;
    }
    assert_eq!(at, out.len());
    // POSTCOPY_RESUME before the replies.
    assert_eq!(
        rule(h.src.write_resume(&mut out)),
        RecoveryRule::BitmapsPending { missing: 2 }
    );
    // Unknown block, wrong size, bits past the end, duplicates.
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::RecvBitmap {
            block: "nope",
            bitmap: &bm
        })),
        RecoveryRule::UnknownBlock { .. }
    ));
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::RecvBitmap {
            block: "blk1",
            bitmap: &bm
        })),
        RecoveryRule::BitmapSize {
            size: 8,
            pages: 70,
            expected: 16,
            ..
        }
    ));
    let mut past = vec![0u8; 16];
    past[8] = 0x80; // bit 71 of 70
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::RecvBitmap {
            block: "blk1",
            bitmap: &past
        })),
        RecoveryRule::BitmapBits { .. }
    ));
    // A wrong end marker, from the bytes.
    let mut wire = Vec::new();
    RpMessage::RecvBitmap {
        block: "blk0",
        bitmap: &bm,
    }
    .write(&mut wire)
    .unwrap();
    let end = wire.len() - 8;
    wire[end] ^= 1;
    let e = h
        .src
        .ram_mut()
        .handle_return_path_bytes(&wire, 100)
        .unwrap_err();
    assert!(
        matches!(
            e,
            RamSrcError::Wire(qmig_wire::WireError::BitmapEndMarker { .. })
        ),
        "{e}"
    );
    h.src
        .handle_return_path(&RpMessage::RecvBitmap {
            block: "blk0",
            bitmap: &bm,
        })
        .unwrap();
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::RecvBitmap {
            block: "blk0",
            bitmap: &bm
        })),
        RecoveryRule::DuplicateBitmap { .. }
    ));
    // RESUME_ACK before POSTCOPY_RESUME.
    assert!(matches!(
        rule(h.src.handle_return_path(&RpMessage::ResumeAck(1))),
        RecoveryRule::WrongState { .. }
    ));
    let mut all = PageBitmap::new(70);
    all.set_range(0, 70);
    h.src
        .handle_return_path(&RpMessage::RecvBitmap {
            block: "blk1",
            bitmap: &all.to_le_bytes(),
        })
        .unwrap();
    // Nothing received in blk0, everything in blk1: 8 pages to send.
    assert_eq!(h.src.ram().remaining_pages(), 8);
    out.clear();
    h.src.write_resume(&mut out).unwrap();
    assert_eq!(
        qmig_wire::command::decode_command(&out, 0, 1 << 20).unwrap(),
        (Command::PostcopyResume, out.len())
    );
    assert!(matches!(
        rule(h.src.write_resume(&mut out)),
        RecoveryRule::WrongState { .. }
    ));
    assert_eq!(
        rule(h.src.handle_return_path(&RpMessage::ResumeAck(2))),
        RecoveryRule::ResumeAckValue { value: 2 }
    );
    h.src.handle_return_path(&RpMessage::ResumeAck(1)).unwrap();
    assert_eq!(h.src.ram().state(), State::Postcopy);
    assert_eq!(h.src.ram().counters().resumes, 1);
}

#[test]
fn discarded_ranges_stay_unsent_after_recovery() {
    let template = tests_support::tiny_template();
    let t = Template::parse(&template).unwrap();
    let mut ram = RamSrc::new(
        SrcBlock::sequential([("a", 16 * PS as u64)]),
        Config::default(),
    )
    .unwrap();
    // Pages 2..6 discarded (partial pages at the ends do not count).
    ram.set_discarded(0, 2 * PS as u64 - 5, 4 * PS as u64 + 10)
        .unwrap();
    let mut src = Source::new(t, ram, true);
    let mut out = Vec::new();
    src.write_setup(&mut out).unwrap();
    assert_eq!(src.ram().remaining_pages(), 12);
    src.write_postcopy_switchover(&mut out).unwrap();
    src.handle_run_sent().unwrap();
    src.handle_connection_lost().unwrap();
    src.write_recovery_start(&mut out).unwrap();
    let mut got = PageBitmap::new(16);
    got.set_range(0, 1);
    src.handle_return_path(&RpMessage::RecvBitmap {
        block: "a",
        bitmap: &got.to_le_bytes(),
    })
    .unwrap();
    // 16 - 1 received - 4 discarded (pages 2, 3, 4, 5).
    assert_eq!(src.ram().remaining_pages(), 11);
}

/// The first page record of a channel names its block.
fn first_page_names_block(bytes: &[u8], dec: Decoder) {
    let mut dec = dec;
    let mut at = 0;
    loop {
        match dec.decode(&bytes[at..], true).expect("decodes") {
            Step::Item { item, len } => {
                if let Item::Ram(r) = &item {
                    if matches!(r.body, RamBody::Page(_) | RamBody::Zero { .. }) {
                        assert!(r.block.is_some(), "first record has CONTINUE");
                        return;
                    }
                }
                dec.commit(&item, len);
                at += len;
            }
            Step::NeedMore | Step::End => panic!("no page record"),
            _ => panic!("unexpected step"),
        }
    }
}

#[test]
fn preempt_channel_serves_requests_with_its_own_block_context() {
    let mut h = Harness::new(&[32, 8], &[9, 4]);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    h.deliver(&out.clone(), None);
    out.clear();
    h.src.write_postcopy_switchover(&mut out).unwrap();
    h.deliver(&out.clone(), None);
    h.src.handle_run_sent().unwrap();
    // The background scan starts on block 0 (main channel).
    out.clear();
    let _ = h.src.write_iteration(&h.mem, 3 * PS, &mut out).unwrap();
    h.deliver(&out.clone(), None);
    let before = h.src.ram().remaining_pages();
    // Requests: page 20 of blk0, page 1 of blk0 (already sent on main),
    // pages 2..4 of blk1.
    for m in [
        RpMessage::ReqPagesId {
            start: 20 * PS as u64,
            len: PS as u32,
            block: "blk0",
        },
        RpMessage::ReqPages {
            start: PS as u64,
            len: PS as u32,
        },
        RpMessage::ReqPagesId {
            start: 2 * PS as u64,
            len: 2 * PS as u32,
            block: "blk1",
        },
    ] {
        h.src.handle_return_path(&m).unwrap();
    }
    let mut pre = Vec::new();
    h.src.handle_preempt_connected();
    let n = h.src.write_preempt(&h.mem, &mut pre).unwrap();
    assert_eq!(n, 3, "page 1 of blk0 was sent on main already");
    assert_eq!(h.src.ram().remaining_pages(), before - 3);
    assert_eq!(h.src.ram().pending_requests().count(), 0);
    // Raw records only: ZERO/PAGE with a name at each block change.
    let dec = h.conn.dec.preempt_channel();
    first_page_names_block(&pre, dec.clone());
    let mut dec = dec;
    let mut at = 0;
    let mut seen = Vec::new();
    while at < pre.len() {
        match dec.decode(&pre[at..], true).unwrap() {
            Step::Item { item, len } => {
                let Item::Ram(r) = &item else {
                    panic!("preempt carries records only")
                };
                seen.push((r.block.map(str::to_string), r.offset));
                if let RamBody::Page(p) = r.body {
                    let b = if seen.iter().rev().find_map(|s| s.0.clone()).unwrap() == "blk0" {
                        0
                    } else {
                        1
                    };
                    let o = r.offset as usize;
                    assert_eq!(p, &h.mem[b][o..o + PS]);
                }
                dec.commit(&item, len);
                at += len;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            (Some("blk0".into()), 20 * PS as u64),
            (Some("blk1".into()), 2 * PS as u64),
            (None, 3 * PS as u64),
        ]
    );
    // The background scan goes on where it was on main (its cursor did not
    // move) and names its block again only when it changes.
    let c = h.src.ram().counters();
    assert_eq!((c.preempt_pages, c.preempt_bytes), (3, pre.len() as u64));
    out.clear();
    let _ = h.src.write_iteration(&h.mem, 1, &mut out).unwrap();
    // PART header (type, be32 section id), then ZERO|CONTINUE of page 6
    // (the first pass sent pages 0..6 of blk0, zero and non-zero in turn).
    let word = u64::from_be_bytes(out[5..13].try_into().unwrap());
    assert_eq!(word, (6 * PS as u64) | 0x02 | 0x20);
}

#[test]
fn qemu10_recovery_opening_and_replies() {
    // The blocks of the captured guest, in QEMU's RAM list order (the
    // RECV_BITMAP order of main-2).
    for scenario in [
        "q10-postcopy-recover",
        "q10-preempt-recover",
        "q10-postcopy-relay-cut",
    ] {
        let dir = format!(
            "{}/../../tests/data/recovery/{scenario}",
            env!("CARGO_MANIFEST_DIR")
        );
        let gz = |f: &str| {
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(std::fs::File::open(format!("{dir}/{f}")).unwrap())
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        let oracle: serde_json::Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/oracle.json")).unwrap()).unwrap();
        let main2 = gz("main-2.bin.gz");
        let rp2 = gz("rp-2.bin.gz");
        // Block order from main-2's RECV_BITMAP commands; lengths from the
        // oracle's block list.
        let mut order = Vec::new();
        let mut at = 0;
        let (resume_at, resume_end) = loop {
            let (c, n) =
                qmig_wire::command::decode_command(&main2[at..], at as u64, 1 << 20).unwrap();
            match c {
                Command::RecvBitmap { block } => order.push(block.to_string()),
                Command::PostcopyResume => break (at, at + n),
                other => panic!("{other:?}"),
            }
            at += n;
        };
        let blocks: Vec<SrcBlock> = order
            .iter()
            .map(|name| {
                let used = oracle["ramblocks_hmp"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["name"] == name.as_str())
                    .unwrap()["used"]
                    .as_u64()
                    .unwrap();
                SrcBlock::new(name, used)
            })
            .collect();
        let template = tests_support::tiny_template();
        let t = Template::parse(&template).unwrap();
        let ram = RamSrc::new(blocks.clone(), Config::default()).unwrap();
        let mut src = Source::new(t, ram, true);
        let mut out = Vec::new();
        src.write_setup(&mut out).unwrap();
        src.write_postcopy_switchover(&mut out).unwrap();
        src.handle_run_sent().unwrap();
        src.handle_connection_lost().unwrap();
        // Byte for byte QEMU 10's opening of the recovery connection.
        out.clear();
        src.write_recovery_start(&mut out).unwrap();
        assert_eq!(out, main2[..resume_at], "{scenario}: RECV_BITMAP commands");
        // QEMU 10's replies, from its return path.
        let mut rp_at = 0usize;
        let mut received: Vec<PageBitmap> = Vec::new();
        for m in ReturnPathReader::new(&rp2) {
            let (off, msg) = m.unwrap();
            if let RpMessage::RecvBitmap { block, bitmap } = &msg {
                let i = order.iter().position(|b| b == block).unwrap();
                let pages = blocks[i].used_length / PS as u64;
                assert_eq!(received.len(), i, "replies in request order");
                received.push(PageBitmap::from_le_bytes(bitmap, pages).unwrap());
            } else {
                rp_at = off as usize;
                break;
            }
            let used = src
                .ram_mut()
                .handle_return_path_bytes(&rp2[off as usize..], off)
                .unwrap()
                .unwrap();
            rp_at = off as usize + used;
        }
        assert_eq!(received.len(), order.len());
        let not_received: u64 = received.iter().map(|b| b.len() - b.count_ones()).sum();
        assert_eq!(src.ram().remaining_pages(), not_received, "{scenario}");
        assert!(not_received > 0);
        out.clear();
        src.write_resume(&mut out).unwrap();
        assert_eq!(
            out,
            main2[resume_at..resume_end],
            "{scenario}: POSTCOPY_RESUME"
        );
        // RESUME_ACK(1), then the re-sent requests (the first names its block).
        let mut first_req = true;
        let mut n_req = 0;
        for m in ReturnPathReader::new(&rp2[rp_at..]) {
            let (_, msg) = m.unwrap();
            match &msg {
                RpMessage::ReqPagesId { .. } if first_req => first_req = false,
                RpMessage::ReqPages { .. } => assert!(!first_req),
                _ => {}
            }
            if matches!(
                msg,
                RpMessage::ReqPagesId { .. } | RpMessage::ReqPages { .. }
            ) {
                n_req += 1;
            }
            src.handle_return_path(&msg).unwrap();
        }
        assert_eq!(src.ram().state(), State::Postcopy, "{scenario}");
        // The first record after the resume names its block, as QEMU's does.
        let mem: Vec<Vec<u8>> = blocks
            .iter()
            .map(|b| vec![0x5a; b.used_length as usize])
            .collect();
        out.clear();
        let _ = src.write_iteration(&mem, PS, &mut out).unwrap();
        // A minimal prefix for the decoder: the template and a START section.
        let mut s = Vec::new();
        let t2 = Template::parse(&template).unwrap();
        t2.write_prefix(&mut s);
        t2.begin_section(qmig_wire::SectionKind::Start, &mut s)
            .unwrap();
        qmig_wire::RamRecord::mem_size(
            blocks
                .iter()
                .map(|b| qmig_wire::MemBlock {
                    name: &b.name,
                    used_length: b.used_length,
                    page_size: None,
                    addr: None,
                })
                .collect(),
        )
        .write(&mut s)
        .unwrap();
        qmig_wire::RamRecord::eos().write(&mut s).unwrap();
        t2.end_section(&mut s);
        s.extend_from_slice(&out);
        first_page_names_block(&s[s.len() - out.len()..], {
            let mut d = Decoder::new(Limits::default());
            let mut at = 0;
            while at < s.len() - out.len() {
                match d.decode(&s[at..s.len() - out.len()], false).unwrap() {
                    Step::Item { item, len } => {
                        d.commit(&item, len);
                        at += len;
                    }
                    Step::PageSize { bits } => {
                        d.set_page_bits(bits, qmig_wire::target_page::PageSizeSource::Inferred)
                    }
                    _ => break,
                }
            }
            d
        });
        if n_req > 0 {
            assert!(src.ram().counters().requested_pages > 0, "{scenario}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of cuts after RUN (inside PART sections, in the
    /// recovery opening) ends with the destination's memory equal to the
    /// source's.
    #[test]
    fn cuts_after_run_recover_to_equal_memory(
        pages in prop::collection::vec(1usize..24, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..12),
        precopy in any::<bool>(),
        budget in 1usize..20000,
        cuts in prop::collection::vec((0usize..6, 0usize..30000, prop::option::of(0usize..200)), 0..5),
        requests in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut h = Harness::new(&pages, &seeds);
        let mut out = Vec::new();
        h.src.write_setup(&mut out).unwrap();
        h.deliver(&out, None);
        if precopy {
            loop {
                out.clear();
                let p = h.src.write_iteration(&h.mem, budget, &mut out).unwrap();
                h.deliver(&out, None);
                if p == Progress::Clean { break; }
            }
        }
        out.clear();
        h.src.write_postcopy_switchover(&mut out).unwrap();
        h.deliver(&out, None);
        h.src.handle_run_sent().unwrap();
        prop_assert_eq!(h.dst.postcopy_state(), PostcopyState::Running);
        let total: usize = pages.iter().sum();
        let mut cuts = cuts.into_iter();
        let mut next_cut = cuts.next();
        let mut round = 0usize;
        let mut reqs = requests.iter();
        while !h.src.postcopy_done() {
            // A page request now and then, for a page not yet received.
            if let Some(i) = reqs.next() {
                let mut n = i.index(total);
                let mut b = 0;
                while n >= pages[b] { n -= pages[b]; b += 1; }
                if !h.dst.blocks()[b].received().get(n as u64) {
                    h.src.handle_return_path(&RpMessage::ReqPagesId {
                        start: (n * PS) as u64,
                        len: PS as u32,
                        block: &format!("blk{b}"),
                    }).unwrap();
                }
            }
            out.clear();
            let _ = h.src.write_iteration(&h.mem, budget, &mut out).unwrap();
            match next_cut {
                Some((at_round, at_byte, in_recovery)) if round >= at_round => {
                    h.deliver(&out, Some(at_byte % (out.len() + 1)));
                    h.cut();
                    h.recover(in_recovery);
                    next_cut = cuts.next();
                }
                _ => h.deliver(&out, None),
            }
            h.carry_back(None).unwrap();
            round += 1;
        }
        out.clear();
        h.src.write_completion(&h.mem, &mut out).unwrap();
        h.deliver(&out, None);
        prop_assert_eq!(h.conn.consumed, h.conn.wire.len());
        // Every cut started one recovery (a cut in a recovery starts another).
        prop_assert_eq!(h.src.ram().counters().recoveries, h.cuts);
        let got = h.dst.memory().blocks();
        for (i, ((_, g), w)) in got.iter().zip(&h.mem).enumerate() {
            prop_assert!(g == w, "block {} differs after {} cuts", i, h.cuts);
        }
    }
}

#[test]
fn cuts_after_run_and_during_recovery_pause_and_resume() {
    let pages = [20, 5];
    let mut h = Harness::new(&pages, &[1, 2, 3, 4]);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    h.deliver(&out, None);
    out.clear();
    h.src.write_postcopy_switchover(&mut out).unwrap();
    h.deliver(&out, None);
    h.src.handle_run_sent().unwrap();
    // A cut inside a PART section (mid-record).
    out.clear();
    let _ = h.src.write_iteration(&h.mem, 6 * PS, &mut out).unwrap();
    h.deliver(&out, Some(3 * PS + 100));
    h.cut();
    // The first recovery connection breaks after two bytes of its second
    // RECV_BITMAP: paused again; the second one resumes.
    h.recover(Some(15));
    assert_eq!(h.cuts, 2);
    assert_eq!(h.src.ram().counters().recoveries, 2);
    assert_eq!(h.src.ram().counters().resumes, 1);
    // The first record after the resume names its block.
    out.clear();
    let _ = h.src.write_iteration(&h.mem, PS, &mut out).unwrap();
    let word = u64::from_be_bytes(out[5..13].try_into().unwrap());
    assert_eq!(
        word & 0x20,
        0,
        "no CONTINUE on the first record of a connection"
    );
    h.deliver(&out, None);
    while !h.src.postcopy_done() {
        out.clear();
        let _ = h.src.write_iteration(&h.mem, 4 * PS, &mut out).unwrap();
        h.deliver(&out, None);
    }
    out.clear();
    h.src.write_completion(&h.mem, &mut out).unwrap();
    h.deliver(&out, None);
    let got = h.dst.memory().blocks();
    for ((_, g), w) in got.iter().zip(&h.mem) {
        assert!(g == w);
    }
}
