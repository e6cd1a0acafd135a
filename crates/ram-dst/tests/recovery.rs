//! The destination's pause / recovery / preempt transitions over the real
//! QEMU 10 recovered-postcopy captures (tests/data/recovery): the first
//! main connection is fed until its cut, the machine pauses, the recovery
//! connection is fed from offset 0 with `Decoder::continuation`, and what
//! the machine answers on the return path (RECV_BITMAP replies framed with
//! be64 size, little-endian bitmap and end marker, RESUME_ACK(1), the
//! pending requests) is compared with what QEMU 10's destination sent
//! (rp-2.bin); pc.ram ends equal to the source's pmemsave (oracle digests).

use std::path::PathBuf;

use qmig_ram_dst::{Config, Layout, Placement, PostcopyState, RamDst, VecMemory};
use qmig_tests::sha256::hex as sha256_hex;
use qmig_wire::{Decoder, Limits, RpMessage, StreamReader, WireError};
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    qmig_tests::data_dir().join("recovery").join(name)
}

fn gz(name: &str, file: &str) -> Vec<u8> {
    let p = dir(name).join(file);
    qmig_tests::gunzip(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// Return-path messages of `bytes` (RECV_BITMAP with its bitmap).
fn rp_messages(bytes: &[u8]) -> Vec<RpMessage<'_>> {
    qmig_wire::parse_return_path(bytes)
        .unwrap()
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

/// Feeds main connection 1 until its cut, pauses, feeds `preempt` channel
/// files after main 1 (cut) / before the end, and the recovery connection.
/// Returns the machine and the return-path bytes of the recovery connection.
fn replay(name: &str, preempt: &[&str]) -> (RamDst<VecMemory>, Vec<u8>) {
    let cfg = Config {
        layout: Layout::Adopt,
        placement: Placement::Apply,
        ..Config::default()
    };
    let mut dst = RamDst::new(cfg, VecMemory::new()).unwrap();
    let mut sink = Vec::new();
    let main1 = gz(name, "main-1.bin.gz");
    let mut rd = StreamReader::with_decoder(&main1[..], Decoder::new(Limits::default()));
    let cut = loop {
        match rd.next_item() {
            Ok(Some(ri)) => {
                dst.handle_read_item(&ri).unwrap();
                dst.poll_transmit(&mut sink);
            }
            Ok(None) => panic!("main-1 of {name} is not cut"),
            Err(WireError::Truncated { .. }) => break rd.decoder().clone(),
            Err(e) => panic!("{name}: {e}"),
        }
    };
    assert_eq!(dst.postcopy_state(), PostcopyState::Running);
    if let Some(p) = preempt.first() {
        feed_preempt(&mut dst, &cut, &gz(name, p));
    }
    assert!(dst.handle_connection_lost().unwrap());
    assert_eq!(dst.postcopy_state(), PostcopyState::Paused);
    assert!(
        !dst.poll_transmit(&mut sink),
        "nothing is sent while paused"
    );
    dst.handle_recovery_connection().unwrap();
    let main2 = gz(name, "main-2.bin.gz");
    let mut rd = StreamReader::with_decoder(&main2[..], cut.continuation().unwrap());
    let mut rp = Vec::new();
    while let Some(ri) = rd.next_item().unwrap() {
        if matches!(ri.item, qmig_wire::Item::Eof) {
            if let Some(p) = preempt.get(1) {
                feed_preempt(&mut dst, ri.decoder, &gz(name, p));
            }
        }
        dst.handle_read_item(&ri).unwrap();
        dst.poll_transmit(&mut rp);
    }
    dst.handle_end_of_input().unwrap();
    dst.poll_transmit(&mut rp);
    (dst, rp)
}

fn feed_preempt(dst: &mut RamDst<VecMemory>, main: &Decoder, bytes: &[u8]) {
    let mut rd = StreamReader::with_decoder(bytes, main.preempt_channel());
    loop {
        match rd.next_item() {
            Ok(Some(ri)) => dst.handle_preempt_item(ri.offset, &ri.item).unwrap(),
            Ok(None) | Err(WireError::Truncated { .. }) => break,
            Err(e) => panic!("preempt: {e}"),
        }
    }
}

fn oracle(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir(name).join("oracle.json")).unwrap()).unwrap()
}

fn check_digests(dst: &RamDst<VecMemory>, o: &Value) {
    for d in o["digests"].as_array().unwrap() {
        let name = d["block"].as_str().unwrap();
        let (at, len) = (
            d["offset"].as_u64().unwrap() as usize,
            d["length"].as_u64().unwrap() as usize,
        );
        let mem = dst.memory().block(name).unwrap();
        assert_eq!(
            sha256_hex(&mem[at..at + len]),
            d["sha256"].as_str().unwrap(),
            "{} at {at:#x}",
            d["block"]
        );
    }
}

/// The replies equal QEMU 10's byte for byte up to and including
/// RESUME_ACK: the same blocks in the same order, the same framing and
/// size, and the same received bitmaps (qmig placed exactly the pages
/// QEMU's destination had placed when the connection was cut).
#[test]
fn recovery_replies_equal_qemu_10s() {
    for name in ["q10-postcopy-recover", "q10-postcopy-relay-cut"] {
        let (dst, rp) = replay(name, &[]);
        let q = gz(name, "rp-2.bin.gz");
        let ours = rp_messages(&rp);
        let theirs = rp_messages(&q);
        let ack = |m: &[RpMessage<'_>]| {
            m.iter()
                .position(|x| matches!(x, RpMessage::ResumeAck(1)))
                .unwrap_or_else(|| panic!("{name}: no RESUME_ACK(1) in {m:?}"))
        };
        let (a, b) = (ack(&ours), ack(&theirs));
        assert!(a > 0, "{name}: RECV_BITMAP replies before RESUME_ACK");
        assert_eq!(ours[..=a], theirs[..=b], "{name}");
        assert!(
            matches!(ours.last(), Some(RpMessage::Shut(0))),
            "{name}: {:?}",
            ours.last()
        );
        let st = dst.stats();
        assert_eq!((st.pauses, st.resumes), (1, 1));
        assert_eq!(st.recv_bitmaps_sent as usize, a);
        assert_eq!(dst.postcopy_state(), PostcopyState::End);
        check_digests(&dst, &oracle(name));
    }
}

/// The preempt capture: the preempt channels' page records go through
/// their own host page and last block; memory equals the source's.
#[test]
fn preempt_capture_recovers_equal_to_pmemsave() {
    let name = "q10-preempt-recover";
    let (dst, rp) = replay(name, &["preempt-1.bin.gz", "preempt-2.bin.gz"]);
    let ours = rp_messages(&rp);
    let theirs_b = gz(name, "rp-2.bin.gz");
    let theirs = rp_messages(&theirs_b);
    let a = ours
        .iter()
        .position(|x| matches!(x, RpMessage::ResumeAck(1)))
        .unwrap();
    assert_eq!(ours[..=a], theirs[..=a]);
    assert!(dst.stats().preempt_records > 0, "{:?}", dst.stats());
    check_digests(&dst, &oracle(name));
}

// ---- property: any sequence of cuts and resumes loses nothing ---------------------------

use proptest::prelude::*;
use qmig_ram_dst::{FaultOutcome, LocalBlock};
use qmig_wire::{Command, Item, RamRecord};

const PS: u64 = 4096;
/// Blocks of the model: pc.ram with 8 KiB host pages (two target pages:
/// a cut can fall inside one), vram with 4 KiB pages.
const BLOCKS: [(&str, u64, u64); 2] = [("pc.ram", 16, 2), ("vram", 6, 1)];

/// A source model: every page has a fill byte; on each connection it sends,
/// in host-page order, the target pages whose received bit the
/// destination's RECV_BITMAP replies (or, on the first connection, the
/// discard-free start) say are missing. The first record of each
/// connection names its block, later ones of the same block are CONTINUE.
fn model_run(
    content: &[Vec<u8>],
    cuts: &[usize],
    faults: &[(usize, u64)],
) -> Result<(), TestCaseError> {
    let layout = BLOCKS
        .iter()
        .map(|&(n, pages, tp)| LocalBlock {
            page_size: tp * PS,
            ..LocalBlock::fixed(n, pages * PS)
        })
        .collect();
    let cfg = Config {
        layout: Layout::Fixed(layout),
        placement: Placement::Apply,
        ..Config::default()
    };
    let mut dst = RamDst::new(cfg, VecMemory::new()).unwrap();
    let feed = |d: &mut RamDst<VecMemory>, it: Item<'_>| d.handle_item(0, 1, &it);
    feed(&mut dst, Item::Command(Command::OpenReturnPath)).unwrap();
    feed(&mut dst, Item::Command(Command::PostcopyAdvise(None))).unwrap();
    feed(&mut dst, Item::Command(Command::PostcopyListen)).unwrap();
    feed(&mut dst, Item::Command(Command::PostcopyRun)).unwrap();
    let mut received: Vec<Vec<bool>> = BLOCKS.iter().map(|b| vec![false; b.1 as usize]).collect();
    let pages: Vec<Vec<u8>> = content.iter().map(|c| c.to_vec()).collect();
    let mut conn = 0usize;
    let mut fault_at = 0usize;
    loop {
        // This connection's records: every target page not received, in
        // order, whole host pages.
        let todo: Vec<(usize, u64)> = received
            .iter()
            .enumerate()
            .flat_map(|(b, r)| {
                r.iter()
                    .enumerate()
                    .filter(|(_, got)| !**got)
                    .map(move |(p, _)| (b, p as u64))
            })
            .collect();
        let cut = cuts.get(conn).copied().filter(|&c| c < todo.len());
        let mut last: Option<usize> = None;
        let mut page_bytes = Vec::new();
        for (k, &(b, p)) in todo.iter().enumerate() {
            if Some(k) == cut {
                break;
            }
            page_bytes.clear();
            page_bytes.resize(PS as usize, pages[b][p as usize]);
            let name = (last != Some(b)).then_some(BLOCKS[b].0);
            last = Some(b);
            feed(
                &mut dst,
                Item::Ram(RamRecord::page(p * PS, name, &page_bytes)),
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(&(fb, fp)) = faults.get(fault_at).filter(|_| k % 3 == 0) {
                fault_at += 1;
                let off = fp % BLOCKS[fb].1 * PS;
                let o = dst.handle_page_fault(fb, off).unwrap();
                prop_assert!(
                    o != FaultOutcome::PlaceLocally || dst.blocks()[fb].received().get(off / PS)
                );
            }
        }
        let mut sink = Vec::new();
        dst.poll_transmit(&mut sink);
        if cut.is_none() {
            feed(&mut dst, Item::Eof).unwrap();
            dst.handle_end_of_input().unwrap();
            break;
        }
        // Cut: pause, a fault while paused, recovery connection.
        prop_assert!(dst.handle_connection_lost().unwrap());
        if let Some(&(fb, fp)) = faults.get(fault_at) {
            fault_at += 1;
            let _ = dst.handle_page_fault(fb, fp % BLOCKS[fb].1 * PS).unwrap();
        }
        prop_assert!(!dst.poll_transmit(&mut sink));
        dst.handle_recovery_connection().unwrap();
        let mut rp = Vec::new();
        for (b, &(name, pages_n, _)) in BLOCKS.iter().enumerate() {
            feed(&mut dst, Item::Command(Command::RecvBitmap { block: name })).unwrap();
            rp.clear();
            dst.poll_transmit(&mut rp);
            let (_, bm, _) =
                qmig_ram_dst::parse_recv_bitmap_reply(&rp, |n| (n == name).then_some(pages_n))
                    .unwrap();
            for p in 0..pages_n {
                received[b][p as usize] = bm.get(p);
            }
        }
        feed(&mut dst, Item::Command(Command::PostcopyResume)).unwrap();
        rp.clear();
        dst.poll_transmit(&mut rp);
        let msgs = qmig_wire::parse_return_path(&rp).unwrap();
        prop_assert!(matches!(msgs[0].1, RpMessage::ResumeAck(1)));
        // Every request sent again is for a host page not received.
        let mut blk = None;
        for (_, m) in &msgs[1..] {
            let (start, b) = match m {
                RpMessage::ReqPagesId { start, block, .. } => {
                    blk = dst.block_index(block);
                    (*start, blk.unwrap())
                }
                RpMessage::ReqPages { start, .. } => (*start, blk.unwrap()),
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert!(!received[b][(start / PS) as usize]);
        }
        conn += 1;
    }
    // Memory equals the source's, every page received.
    for (b, &(name, pages_n, _)) in BLOCKS.iter().enumerate() {
        let mem = dst.memory().block(name).unwrap();
        for p in 0..pages_n as usize {
            prop_assert!(
                dst.blocks()[b].received().get(p as u64),
                "{name} page {p} not received"
            );
            prop_assert!(
                mem[p * PS as usize..(p + 1) * PS as usize]
                    .iter()
                    .all(|&x| x == pages[b][p]),
                "{name} page {p}"
            );
        }
    }
    prop_assert_eq!(dst.stats().pauses as usize, conn);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    /// Any sequence of cuts (anywhere, inside host pages too) and resumes,
    /// with faults before, during and after pauses, ends with every page
    /// received and memory equal to the source's.
    #[test]
    fn any_cuts_and_resumes_end_equal_to_the_source(
        content in (proptest::collection::vec(1u8..=255, 16), proptest::collection::vec(1u8..=255, 6)),
        cuts in proptest::collection::vec(0usize..22, 0..6),
        faults in proptest::collection::vec((0usize..2, 0u64..16), 0..12),
    ) {
        model_run(&[content.0, content.1], &cuts, &faults)?;
    }
}
