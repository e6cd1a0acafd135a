//! `RamDst` driven against a fake postcopy source in memory (quinn-style
//! pair harness), through the real wire format in both directions: the
//! source's stream is written with qmig-wire's writers and decoded
//! incrementally; the destination's return path (REQ_PAGES / REQ_PAGES_ID,
//! SHUT) is parsed by the source, which serves requested host pages before
//! its background scan and skips pages it already sent (as QEMU's
//! `get_queued_page` does). A fake fault source plays the vCPUs: it faults
//! on pages that are not present, in any order, interleaved with the stream.
//!
//! Property: whatever was sent in precopy, dirtied and discarded, and
//! whatever the fault order, the destination ends with the source's memory,
//! every page received, SHUT(0) last on the return path, and no host page
//! asked for twice while a request for it was outstanding.

use std::collections::{HashSet, VecDeque};

use proptest::prelude::*;
use qmig_ram_dst::{
    testing, Config, FaultOutcome, GuestMemory, Layout, LocalBlock, Place, Placement,
    PostcopyState, RamDst, RamDstError,
};
use qmig_wire::header::Configuration;
use qmig_wire::section::SectionHeader;
use qmig_wire::{
    Advise, Command, Decoder, Discard, DiscardRange, Item, Limits, MemBlock, RamRecord, RpMessage,
    Step, WireError,
};

/// Target page size.
const TPS: u64 = 4096;

/// Guest memory that tracks which host pages are *present* (some byte
/// written and not discarded), as memory registered with userfaultfd would
/// (a huge page is present as a whole once any of it was written): reading
/// a page that is not present faults. Placing onto a present page is the
/// EEXIST the destination must never cause.
struct PresentMemory {
    hps: u64,
    data: Vec<u8>,
    /// Per host page.
    present: Vec<bool>,
}

impl PresentMemory {
    fn new(hps: u64) -> Self {
        PresentMemory {
            hps,
            data: Vec::new(),
            present: Vec::new(),
        }
    }

    fn host_pages(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        (offset / self.hps) as usize..(offset + len).div_ceil(self.hps) as usize
    }
}

impl GuestMemory for PresentMemory {
    fn set_block_len(&mut self, index: usize, _name: &str, len: u64) -> std::io::Result<()> {
        assert_eq!(index, 0, "one block");
        self.data.resize(len as usize, 0);
        self.present.resize(len.div_ceil(self.hps) as usize, false);
        Ok(())
    }

    fn bytes_mut(&mut self, _index: usize, offset: u64, len: usize) -> std::io::Result<&mut [u8]> {
        let end = offset + len as u64;
        if end > self.data.len() as u64 {
            return Err(std::io::Error::other("outside the block"));
        }
        for h in self.host_pages(offset, len as u64) {
            self.present[h] = true;
        }
        Ok(&mut self.data[offset as usize..end as usize])
    }

    /// Like anonymous memory: whole host pages are dropped, a part of one
    /// is written with zeros.
    fn zero_page(&mut self, index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.is_multiple_of(self.hps) && len.is_multiple_of(self.hps) {
            self.discard(index, offset, len)
        } else {
            self.bytes_mut(index, offset, len as usize)?.fill(0);
            Ok(())
        }
    }

    fn discard(&mut self, _index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        assert!(offset.is_multiple_of(self.hps) && len.is_multiple_of(self.hps));
        self.data[offset as usize..(offset + len) as usize].fill(0);
        for h in self.host_pages(offset, len) {
            self.present[h] = false;
        }
        Ok(())
    }
}

/// The fake source: its memory, what it sent, its urgent queue.
struct Source {
    /// Final memory (after the dirtying), one block "pc.ram".
    mem: Vec<u8>,
    /// Host page size, bytes.
    hps: u64,
    /// Host pages still to send in postcopy.
    unsent: Vec<bool>,
    /// Host pages asked for, in order (QEMU's `src_page_requests`).
    urgent: VecDeque<u64>,
    /// Host pages asked for and not yet sent: a second request for one of
    /// these means the destination failed to deduplicate.
    outstanding: HashSet<u64>,
    /// Block named by the last REQ_PAGES_ID.
    rp_block: Option<String>,
    requests: u64,
    shut: Option<u32>,
}

impl Source {
    /// Reads return-path bytes as the source's return-path thread does.
    fn take_return_path(&mut self, bytes: &[u8]) {
        for (at, m) in qmig_wire::parse_return_path(bytes).expect("return path parses") {
            assert!(self.shut.is_none(), "message after SHUT at {at}");
            let (start, len) = match m {
                RpMessage::ReqPagesId { start, len, block } => {
                    self.rp_block = Some(block.to_string());
                    (start, len)
                }
                RpMessage::ReqPages { start, len } => (start, len),
                RpMessage::Shut(c) => {
                    self.shut = Some(c);
                    continue;
                }
                other => panic!("unexpected return-path message {other:?}"),
            };
            assert_eq!(
                self.rp_block.as_deref(),
                Some("pc.ram"),
                "request names the block"
            );
            assert_eq!(u64::from(len), self.hps, "whole host pages are asked for");
            assert_eq!(start % self.hps, 0, "host-page aligned");
            let hp = start / self.hps;
            assert!(
                self.outstanding.insert(hp),
                "host page {hp} asked for twice while outstanding"
            );
            self.requests += 1;
            self.urgent.push_back(hp);
        }
    }

    /// The next host page to send in postcopy: requested first (skipping
    /// pages sent already), then the background scan.
    fn next_host_page(&mut self) -> Option<u64> {
        while let Some(hp) = self.urgent.pop_front() {
            if self.unsent[hp as usize] {
                return Some(hp);
            }
        }
        self.unsent.iter().position(|&u| u).map(|p| p as u64)
    }

    /// The records of host page `hp` (ZERO for zero target pages).
    fn host_page_items(&mut self, hp: u64, out: &mut Vec<u8>) {
        self.unsent[hp as usize] = false;
        self.outstanding.remove(&hp);
        for k in 0..self.hps / TPS {
            let off = hp * self.hps + k * TPS;
            let page = &self.mem[off as usize..(off + TPS) as usize];
            let block = (k == 0).then_some("pc.ram");
            let rec = if page.iter().all(|&b| b == 0) {
                RamRecord::zero(off, block)
            } else {
                RamRecord::page(off, block, page)
            };
            Item::Ram(rec).write(out).unwrap();
        }
    }
}

/// The destination side: the state machine, its decoder and the bytes not
/// decoded yet.
struct Dst {
    dst: RamDst<PresentMemory>,
    dec: Decoder,
    wire: Vec<u8>,
    consumed: usize,
}

impl Dst {
    /// Decodes and applies everything complete in `wire`, carrying out
    /// placements and handing return-path bytes to `src` after each item.
    fn drive(&mut self, src: &mut Source) -> Result<(), RamDstError> {
        loop {
            let buf = &self.wire[self.consumed..];
            match self.dec.decode(buf, false).expect("stream decodes") {
                Step::Item { item, len } => {
                    let at = self.dec.position();
                    self.dst.handle_item(at, len, &item)?;
                    self.dec.commit(&item, len);
                    self.consumed += len;
                    self.host(src);
                }
                Step::NeedVmdesc => self.dec.give_up_vmdesc(),
                Step::PageSize { bits } => self
                    .dec
                    .set_page_bits(bits, qmig_wire::target_page::PageSizeSource::Inferred),
                Step::NeedMore | Step::End => return Ok(()),
            }
        }
    }

    /// The host's duties after any input: events, placements (reported
    /// back), return-path bytes (to the source).
    fn host(&mut self, src: &mut Source) {
        while self.dst.poll_event().is_some() {}
        testing::drain_placements(&mut self.dst, |m, p| {
            match p {
                Place::HostPage { offset, data, .. } => {
                    let range = m.host_pages(*offset, data.len() as u64);
                    assert!(
                        m.present[range.clone()].iter().all(|p| !p),
                        "UFFDIO_COPY onto a present page at {offset:#x} (EEXIST)"
                    );
                    m.data[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                    m.present[range].iter_mut().for_each(|p| *p = true);
                }
                Place::ZeroPage { offset, len, .. } => {
                    let range = m.host_pages(*offset, *len);
                    assert!(
                        m.present[range.clone()].iter().all(|p| !p),
                        "UFFDIO_ZEROPAGE onto a present page at {offset:#x}"
                    );
                    m.present[range].iter_mut().for_each(|p| *p = true);
                }
                Place::Discard { block, offset, len } => m.discard(*block, *offset, *len)?,
            }
            Ok(())
        })
        .unwrap();
        let mut rp = Vec::new();
        if self.dst.poll_transmit(&mut rp) {
            src.take_return_path(&rp);
        }
    }
}

/// One run of the pair. `content[p]`: 0 for a zero target page, else a
/// pattern seed; `sent[p]`: sent in precopy; `dirty[h]`: host page `h`
/// changed after precopy (its content is then `content ^ 0x55`);
/// `schedule`: `None` = the source sends its next item, `Some(h)` = a vCPU
/// touches host page `h` (a fault if it is not present).
#[derive(Debug)]
struct Case {
    hps_pages: u64,
    content: Vec<u8>,
    sent: Vec<bool>,
    dirty: Vec<bool>,
    schedule: Vec<Option<usize>>,
}

fn fill(p: u64, v: u8) -> Vec<u8> {
    if v == 0 {
        vec![0; TPS as usize]
    } else {
        (0..TPS)
            .map(|i| (i as u8 ^ p as u8).wrapping_mul(v) | 1)
            .collect()
    }
}

/// Runs `case`; returns the destination and the source after the end.
fn run(case: &Case) -> (RamDst<PresentMemory>, Source) {
    let pages = case.content.len() as u64;
    let hps = case.hps_pages * TPS;
    let n_hp = pages / case.hps_pages;
    let len = pages * TPS;
    // Memory at precopy time, then after the dirtying.
    let mut before = Vec::new();
    for p in 0..pages {
        before.extend(fill(p, case.content[p as usize]));
    }
    let mut after = before.clone();
    for h in 0..n_hp {
        if case.dirty[h as usize] {
            for p in h * case.hps_pages..(h + 1) * case.hps_pages {
                let v = case.content[p as usize] ^ 0x55;
                after[(p * TPS) as usize..((p + 1) * TPS) as usize].copy_from_slice(&fill(p, v));
            }
        }
    }
    // A host page is clean when all of it was sent and none of it changed;
    // the rest goes in postcopy, discarded first if any of it was sent.
    let hp_sent =
        |h: u64| (h * case.hps_pages..(h + 1) * case.hps_pages).map(|p| case.sent[p as usize]);
    let clean: Vec<bool> = (0..n_hp)
        .map(|h| hp_sent(h).all(|s| s) && !case.dirty[h as usize])
        .collect();
    let discard: Vec<u64> = (0..n_hp)
        .filter(|&h| !clean[h as usize] && hp_sent(h).any(|s| s))
        .collect();

    let mut src = Source {
        mem: after,
        hps,
        unsent: clean.iter().map(|c| !c).collect(),
        urgent: VecDeque::new(),
        outstanding: HashSet::new(),
        rp_block: None,
        requests: 0,
        shut: None,
    };
    let mut d = Dst {
        dst: RamDst::new(
            Config {
                layout: Layout::Fixed(vec![LocalBlock {
                    name: "pc.ram".into(),
                    used_length: len,
                    max_length: len,
                    page_size: hps,
                    resizable: false,
                }]),
                placement: Placement::Emit,
                ..Config::default()
            },
            PresentMemory::new(hps),
        )
        .unwrap(),
        dec: Decoder::new(Limits::default()),
        wire: Vec::new(),
        consumed: 0,
    };

    // Setup and precopy.
    let w = &mut d.wire;
    for it in [
        Item::Header { version: 3 },
        Item::Configuration(Configuration {
            machine: "pc",
            subsections: vec![],
        }),
        Item::Command(Command::OpenReturnPath),
        Item::Command(Command::PostcopyAdvise(Some(Advise {
            page_size_summary: hps,
            target_page_size: TPS,
        }))),
        Item::Section(SectionHeader::start(2, "ram", 0, 4)),
        Item::Ram(RamRecord::mem_size(vec![MemBlock {
            name: "pc.ram",
            used_length: len,
            // QEMU writes the page size only when it differs from the host page size.
            page_size: (hps != TPS).then_some(hps),
            addr: None,
        }])),
    ] {
        it.write(w).unwrap();
    }
    for p in 0..pages {
        if case.sent[p as usize] {
            let page = &before[(p * TPS) as usize..((p + 1) * TPS) as usize];
            let rec = if page.iter().all(|&b| b == 0) {
                RamRecord::zero(p * TPS, Some("pc.ram"))
            } else {
                RamRecord::page(p * TPS, Some("pc.ram"), page)
            };
            Item::Ram(rec).write(w).unwrap();
        }
    }
    Item::Ram(RamRecord::eos()).write(w).unwrap();
    Item::Footer(2).write(w).unwrap();
    // Switchover: discards of at most 12 ranges per command, LISTEN, RUN.
    for chunk in discard.chunks(12) {
        Item::Command(Command::RamDiscard(Discard {
            block: "pc.ram",
            ranges: chunk
                .iter()
                .map(|&h| DiscardRange {
                    start: h * hps,
                    len: hps,
                })
                .collect(),
        }))
        .write(w)
        .unwrap();
    }
    Item::Command(Command::PostcopyListen).write(w).unwrap();
    Item::Command(Command::PostcopyRun).write(w).unwrap();
    Item::Section(SectionHeader::part(2)).write(w).unwrap();
    d.drive(&mut src)
        .expect("setup, precopy and switchover accepted");
    assert_eq!(d.dst.postcopy_state(), PostcopyState::Running);

    // Postcopy: the schedule, then the rest of the background scan.
    let mut ended = false;
    let step = |d: &mut Dst, src: &mut Source, ended: &mut bool| {
        if *ended {
            return;
        }
        match src.next_host_page() {
            Some(h) => src.host_page_items(h, &mut d.wire),
            None => {
                Item::Ram(RamRecord::eos()).write(&mut d.wire).unwrap();
                Item::Footer(2).write(&mut d.wire).unwrap();
                Item::Eof.write(&mut d.wire).unwrap();
                *ended = true;
            }
        }
        d.drive(src).expect("postcopy stream accepted");
    };
    for s in &case.schedule {
        match s {
            None => step(&mut d, &mut src, &mut ended),
            Some(h) => {
                let h = (*h as u64) % n_hp;
                if d.dst.memory().present[h as usize] || ended {
                    continue; // no fault: the page is there (or reads as zero after the end)
                }
                // A fault anywhere inside the host page asks for all of it.
                let off = h * hps + (h % case.hps_pages) * TPS + 17;
                let o = d.dst.handle_page_fault(0, off).expect("fault accepted");
                if clean[h as usize] {
                    // Clean and not present: received as zero, never written.
                    assert_eq!(o, FaultOutcome::PlaceLocally);
                }
                d.host(&mut src);
            }
        }
    }
    while !ended {
        step(&mut d, &mut src, &mut ended);
    }
    assert_eq!(d.dst.postcopy_state(), PostcopyState::End);
    d.dst.handle_end_of_input().unwrap();
    d.host(&mut src);
    (d.dst, src)
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1u64..=2, 1u64..=12).prop_flat_map(|(hps_pages, n_hp)| {
        let pages = (hps_pages * n_hp) as usize;
        (
            Just(hps_pages),
            proptest::collection::vec(0u8..3, pages),
            proptest::collection::vec(any::<bool>(), pages),
            proptest::collection::vec(any::<bool>(), n_hp as usize),
            proptest::collection::vec(proptest::option::weighted(0.6, 0usize..12), 0..60),
        )
            .prop_map(|(hps_pages, content, sent, dirty, schedule)| Case {
                hps_pages,
                content,
                sent,
                dirty,
                schedule,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any fault order, any precopy subset and any discard set: the
    /// destination ends equal to the source.
    #[test]
    fn any_fault_order_and_discard_set_ends_equal_to_the_source(case in case_strategy()) {
        let (dst, src) = run(&case);
        prop_assert!(dst.memory().data == src.mem, "memory differs from the source");
        let b = &dst.blocks()[0];
        prop_assert_eq!(b.received().count_ones(), case.content.len() as u64, "every page received");
        prop_assert_eq!(src.shut, Some(0));
        prop_assert_eq!(dst.outstanding_requests(), 0);
        prop_assert_eq!(dst.stats().page_requests, src.requests);
        prop_assert!(src.outstanding.is_empty());
    }
}

#[test]
fn faults_on_every_page_first_are_all_served_by_requests() {
    // Nothing sent in precopy, every host page faulted before the source
    // sends anything: one request per host page, each served first.
    let case = Case {
        hps_pages: 2,
        content: vec![1, 2, 0, 0, 2, 1, 1, 0],
        sent: vec![false; 8],
        dirty: vec![false; 4],
        schedule: vec![Some(3), Some(0), Some(3), Some(2), Some(1)],
    };
    let (dst, src) = run(&case);
    assert_eq!(src.requests, 4);
    assert_eq!(
        dst.stats().faults_already_requested,
        1,
        "the second fault on 3"
    );
    assert_eq!(dst.memory().data, src.mem);
    assert_eq!(src.shut, Some(0));
}

// ---- hostile postcopy commands: typed errors naming offset and rule, SHUT(1) ----

/// A destination over one fixed 8-page block (4 KiB pages) with a return
/// path, fed `items` from offset 0 through the decoder. Returns the error
/// of the first refused item (decoder errors are reported to the machine
/// with `handle_failure`, as `qmig recv` does) and the return-path bytes.
fn hostile(
    items: &[Item<'_>],
    limits: Limits,
) -> (
    Result<(), String>,
    RamDst<PresentMemory>,
    Vec<RpMessage<'static>>,
) {
    let mut dst = RamDst::new(
        Config {
            layout: Layout::Fixed(vec![LocalBlock::fixed("pc.ram", 8 * TPS)]),
            placement: Placement::Emit,
            ..Config::default()
        },
        PresentMemory::new(TPS),
    )
    .unwrap();
    let mut wire = Vec::new();
    Item::Header { version: 3 }.write(&mut wire).unwrap();
    Item::Command(Command::OpenReturnPath)
        .write(&mut wire)
        .unwrap();
    for it in items {
        it.write(&mut wire).unwrap();
    }
    let mut dec = Decoder::new(limits);
    let mut at = 0usize;
    let r = loop {
        match dec.decode(&wire[at..], true) {
            Ok(Step::Item { item, len }) => {
                let off = dec.position();
                if let Err(e) = dst.handle_item(off, len, &item) {
                    break Err(format!("{e:?} / {e}"));
                }
                dec.commit(&item, len);
                at += len;
            }
            Ok(Step::NeedVmdesc) => dec.give_up_vmdesc(),
            Ok(Step::PageSize { bits }) => {
                dec.set_page_bits(bits, qmig_wire::target_page::PageSizeSource::Inferred)
            }
            Ok(Step::NeedMore | Step::End) => break Ok(()),
            Err(e) => {
                dst.handle_failure();
                break Err(format!("{e:?} / {e}"));
            }
        }
    };
    let mut rp = Vec::new();
    dst.poll_transmit(&mut rp);
    let rp: &'static [u8] = Box::leak(rp.into_boxed_slice());
    let msgs = qmig_wire::parse_return_path(rp)
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    (r, dst, msgs)
}

fn advise() -> Item<'static> {
    Item::Command(Command::PostcopyAdvise(None))
}

fn discard(start: u64, len: u64) -> Item<'static> {
    Item::Command(Command::RamDiscard(Discard {
        block: "pc.ram",
        ranges: vec![DiscardRange { start, len }],
    }))
}

/// The error names the offset of the offending item and the rule; the
/// machine stopped with SHUT(1) as the only return-path message.
fn refused(items: &[Item<'_>], offset: u64, rule: &[&str]) {
    let (r, dst, rp) = hostile(items, Limits::default());
    let e = r.expect_err("refused");
    assert!(
        e.contains(&format!("offset: {offset}")),
        "offset {offset} not named: {e}"
    );
    for w in rule {
        assert!(e.contains(w), "{w:?} not in {e}");
    }
    assert!(dst.is_stopped());
    assert_eq!(rp, vec![RpMessage::Shut(1)]);
}

#[test]
fn discard_outside_the_block_is_refused_with_shut_1() {
    // Header 8 bytes, OPEN_RETURN_PATH 5, ADVISE 5 (no payload): DISCARD at 18.
    refused(
        &[advise(), discard(6 * TPS, 4 * TPS)],
        18,
        &["Discard", "outside the block"],
    );
    refused(
        &[advise(), discard(u64::MAX - 4095, 8192)],
        18,
        &["outside the block"],
    );
    refused(&[advise(), discard(100, TPS)], 18, &["not aligned"]);
    // Unknown block.
    let bad = Item::Command(Command::RamDiscard(Discard {
        block: "nope",
        ranges: vec![DiscardRange { start: 0, len: TPS }],
    }));
    refused(&[advise(), bad], 18, &["UnknownBlock", "nope"]);
    // Before ADVISE.
    refused(
        &[discard(0, TPS)],
        13,
        &["IllegalTransition", "POSTCOPY_RAM_DISCARD", "none"],
    );
}

#[test]
fn listen_twice_and_run_before_listen_are_refused_with_shut_1() {
    let listen = Item::Command(Command::PostcopyListen);
    let run = Item::Command(Command::PostcopyRun);
    // ADVISE at 13 (5 bytes), LISTEN at 18 (5 bytes), the second at 23.
    refused(
        &[advise(), listen.clone(), listen.clone()],
        23,
        &["IllegalTransition", "POSTCOPY_LISTEN", "listening"],
    );
    refused(
        &[advise(), run.clone()],
        18,
        &["IllegalTransition", "POSTCOPY_RUN", "advised"],
    );
    refused(&[run], 13, &["POSTCOPY_RUN", "none"]);
    refused(
        std::slice::from_ref(&listen),
        13,
        &["POSTCOPY_LISTEN", "none"],
    );
    // DISCARD after LISTEN.
    refused(
        &[advise(), listen, discard(0, TPS)],
        23,
        &["POSTCOPY_RAM_DISCARD", "listening"],
    );
}

#[test]
fn packaged_length_beyond_the_limit_is_refused_with_shut_1() {
    let limits = Limits {
        max_packaged: 1 << 20,
        ..Limits::default()
    };
    let pkg = Item::Command(Command::Packaged { len: (1 << 20) + 1 });
    let (r, dst, rp) = hostile(&[advise(), pkg], limits);
    let e = r.expect_err("refused");
    assert!(e.contains("TooLarge") && e.contains("PACKAGED"), "{e}");
    // PACKAGED at 18 (header 8, OPEN_RETURN_PATH 5, ADVISE 5); its be32
    // length field after the 5-byte command header, at 23.
    assert!(e.contains("offset: 23"), "{e}");
    assert!(dst.is_stopped());
    assert_eq!(rp, vec![RpMessage::Shut(1)]);
}

#[test]
fn a_decoder_error_is_typed() {
    // The wire error the host turns into handle_failure names its offset.
    let mut dec = Decoder::new(Limits {
        max_packaged: 16,
        ..Limits::default()
    });
    let mut w = Vec::new();
    Item::Header { version: 3 }.write(&mut w).unwrap();
    Item::Command(Command::Packaged { len: 17 })
        .write(&mut w)
        .unwrap();
    let Ok(Step::Item { item, len }) = dec.decode(&w, true) else {
        panic!("header")
    };
    dec.commit(&item, len);
    match dec.decode(&w[len..], true) {
        // The be32 length after the 8-byte header and the 5-byte command header.
        Err(WireError::TooLarge {
            offset,
            len: 17,
            cap: 16,
            ..
        }) => assert_eq!(offset, 13),
        other => panic!("{other:?}"),
    }
}
