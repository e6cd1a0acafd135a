//! proptest: random sequences of RAM records and commands, applied by `RamDst`
//! and by a naive model of guest memory, must give the same memory and received
//! bitmaps; hostile records must be refused without changing anything.

use std::io::Write;

use proptest::prelude::*;
use qmig_ram_dst::{Config, PostcopyState, RamDst, RamDstError, VecMemory};
use qmig_wire::{Command, Discard, DiscardRange, Item, MemBlock, RamBody, RamRecord};

const PS: usize = 4096;
const BLOCKS: [(&str, usize); 2] = [("pc.ram", 16), ("vga.vram", 4)];

#[derive(Debug, Clone)]
enum Op {
    Page {
        block: usize,
        page: usize,
        seed: u8,
    },
    Zero {
        block: usize,
        page: usize,
        fill: u8,
    },
    Xbzrle {
        block: usize,
        page: usize,
        edits: Vec<(usize, usize, u8)>,
    },
    Compressed {
        block: usize,
        page: usize,
        seed: u8,
    },
    Discard {
        block: usize,
        ranges: Vec<(usize, usize)>,
    },
    Ping(u32),
    /// A page one past the end of the block (hostile).
    PastEnd {
        block: usize,
    },
    /// A page record naming a block that does not exist (hostile).
    Unknown,
    /// An XBZRLE page whose data run overflows the page (hostile).
    BadXbzrle {
        block: usize,
        page: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let blk = 0..BLOCKS.len();
    prop_oneof![
        8 => (blk.clone(), 0..16usize, any::<u8>()).prop_map(|(block, page, seed)| Op::Page { block, page, seed }),
        4 => (blk.clone(), 0..16usize, prop_oneof![9 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(block, page, fill)| Op::Zero { block, page, fill }),
        4 => (blk.clone(), 0..16usize, prop::collection::vec((0..PS, 1..64usize, any::<u8>()), 0..6))
            .prop_map(|(block, page, edits)| Op::Xbzrle { block, page, edits }),
        2 => (blk.clone(), 0..16usize, any::<u8>()).prop_map(|(block, page, seed)| Op::Compressed { block, page, seed }),
        2 => (blk.clone(), prop::collection::vec((0..17usize, 0..6usize), 0..4))
            .prop_map(|(block, ranges)| Op::Discard { block, ranges }),
        1 => any::<u32>().prop_map(Op::Ping),
        1 => blk.clone().prop_map(|block| Op::PastEnd { block }),
        1 => Just(Op::Unknown),
        1 => (blk, 0..16usize).prop_map(|(block, page)| Op::BadXbzrle { block, page }),
    ]
}

struct Model {
    mem: Vec<Vec<u8>>,
    received: Vec<Vec<bool>>,
}

fn page_data(seed: u8) -> Vec<u8> {
    (0..PS)
        .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed))
        .collect()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut dst = RamDst::new(Config::default(), VecMemory::new()).unwrap();
    // PINGs need a return path (QEMU's loadvm_process_command).
    dst.handle_item(0, 0, &Item::Command(Command::OpenReturnPath))
        .unwrap();
    while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    let blocks: Vec<MemBlock> = BLOCKS
        .iter()
        .map(|&(name, pages)| MemBlock {
            name,
            used_length: (pages * PS) as u64,
            page_size: None,
            addr: None,
        })
        .collect();
    dst.handle_item(0, 1, &Item::Ram(RamRecord::mem_size(blocks)))
        .unwrap();
    dst.handle_item(1, 1, &Item::Command(Command::PostcopyAdvise(None)))
        .unwrap();
    while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    let mut model = Model {
        mem: BLOCKS.iter().map(|&(_, p)| vec![0; p * PS]).collect(),
        received: BLOCKS.iter().map(|&(_, p)| vec![false; p]).collect(),
    };
    let mut current: Option<usize> = None;
    let name = |b: usize| BLOCKS[b].0;
    for (i, op) in ops.into_iter().enumerate() {
        let at = 100 + i as u64 * 10;
        // Owned bodies for the records of this step.
        let mut owned: Vec<u8> = Vec::new();
        let in_range = |b: usize, p: usize| p < BLOCKS[b].1;
        let blk_of =
            |b: usize, cur: Option<usize>| if cur == Some(b) { None } else { Some(name(b)) };
        let (item, expect_ok): (Item, bool) = match &op {
            Op::Page { block, page, seed } => {
                owned = page_data(*seed);
                let ok = in_range(*block, *page);
                (
                    Item::Ram(RamRecord::page(
                        (page * PS) as u64,
                        blk_of(*block, current),
                        &owned,
                    )),
                    ok,
                )
            }
            Op::Zero { block, page, fill } => {
                let mut r = RamRecord::zero((page * PS) as u64, blk_of(*block, current));
                r.body = RamBody::Zero { fill: *fill };
                (Item::Ram(r), in_range(*block, *page))
            }
            Op::Xbzrle { block, page, edits } => {
                if !in_range(*block, *page) {
                    continue;
                }
                let old = model.mem[*block][page * PS..(page + 1) * PS].to_vec();
                let mut new = old.clone();
                for &(pos, len, byte) in edits {
                    let end = (pos + len).min(PS);
                    new[pos..end].iter_mut().for_each(|b| *b ^= byte | 1);
                }
                let mut enc = vec![0u8; PS];
                let Ok(n @ 1..) = qmig_xbzrle::encode(&old, &new, &mut enc) else {
                    continue;
                };
                owned = enc[..n].to_vec();
                (
                    Item::Ram(RamRecord::xbzrle(
                        (page * PS) as u64,
                        blk_of(*block, current),
                        &owned,
                    )),
                    true,
                )
            }
            Op::Compressed { block, page, seed } => {
                owned = deflate(&page_data(*seed));
                (
                    Item::Ram(RamRecord::compressed(
                        (page * PS) as u64,
                        blk_of(*block, current),
                        &owned,
                    )),
                    in_range(*block, *page),
                )
            }
            Op::Discard { block, ranges } => {
                let ok = ranges.iter().all(|&(s, l)| s + l <= BLOCKS[*block].1);
                let d = Discard {
                    block: name(*block),
                    ranges: ranges
                        .iter()
                        .map(|&(s, l)| DiscardRange {
                            start: (s * PS) as u64,
                            len: (l * PS) as u64,
                        })
                        .collect(),
                };
                (Item::Command(Command::RamDiscard(d)), ok)
            }
            Op::Ping(v) => (Item::Command(Command::Ping(*v)), true),
            Op::PastEnd { block } => (
                Item::Ram(RamRecord::zero(
                    (BLOCKS[*block].1 * PS) as u64,
                    Some(name(*block)),
                )),
                false,
            ),
            Op::Unknown => (Item::Ram(RamRecord::zero(0, Some("nope"))), false),
            Op::BadXbzrle { block, page } => {
                owned = vec![0x00, 0x80, 0x40, 1, 2, 3];
                (
                    Item::Ram(RamRecord::xbzrle(
                        (page * PS) as u64,
                        Some(name(*block)),
                        &owned,
                    )),
                    false,
                )
            }
        };
        let r = dst.handle_item(at, 10, &item);
        if !expect_ok {
            let e = r.expect_err("hostile item accepted");
            prop_assert_eq!(e.offset(), at);
            prop_assert!(
                !matches!(e, RamDstError::Memory { .. }),
                "checks must catch it first: {}",
                e
            );
            prop_assert_eq!(dst.applied_up_to(), at);
            break;
        }
        r.map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
        // Apply to the model.
        match op {
            Op::Page { block, page, .. } | Op::Compressed { block, page, .. } => {
                let data = match &op {
                    Op::Page { seed, .. } | Op::Compressed { seed, .. } => page_data(*seed),
                    _ => unreachable!(),
                };
                model.mem[block][page * PS..(page + 1) * PS].copy_from_slice(&data);
                model.received[block][page] = true;
                current = Some(block);
            }
            Op::Zero { block, page, fill } => {
                model.mem[block][page * PS..(page + 1) * PS].fill(fill);
                model.received[block][page] = true;
                current = Some(block);
            }
            Op::Xbzrle { block, page, .. } => {
                qmig_xbzrle::decode(&owned, &mut model.mem[block][page * PS..(page + 1) * PS])
                    .unwrap();
                model.received[block][page] = true;
                current = Some(block);
            }
            Op::Discard { block, ranges } => {
                for (s, l) in ranges {
                    model.mem[block][s * PS..(s + l) * PS].fill(0);
                    model.received[block][s..s + l]
                        .iter_mut()
                        .for_each(|r| *r = false);
                }
            }
            Op::Ping(v) => {
                let mut rp = Vec::new();
                prop_assert!(dst.poll_transmit(&mut rp));
                let mut want = Vec::new();
                qmig_wire::RpMessage::Pong(v).write(&mut want).unwrap();
                prop_assert_eq!(rp, want);
            }
            _ => {}
        }
        while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    }
    prop_assert!(matches!(
        dst.postcopy_state(),
        PostcopyState::Advised | PostcopyState::Discarding
    ));
    for (b, &(name, pages)) in BLOCKS.iter().enumerate() {
        prop_assert!(
            dst.memory().block(name).unwrap() == &model.mem[b][..],
            "memory of {} differs",
            name
        );
        let got: Vec<bool> = (0..pages as u64)
            .map(|p| dst.blocks()[b].received().get(p))
            .collect();
        prop_assert_eq!(&got, &model.received[b]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ram_dst_matches_naive_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
