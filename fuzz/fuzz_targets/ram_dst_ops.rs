//! Arbitrary sequences of RAM records and commands fed to `RamDst`: it must
//! never panic, never touch memory outside a block (the guarded memory below
//! panics if asked to), and keep its bookkeeping consistent with the memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::{parse_recv_bitmap_reply, Config, GuestMemory, Placement, RamDst, VecMemory};
use qmig_wire::{Advise, Command, Discard, DiscardRange, Item, MemBlock, RamBody, RamRecord};

/// `VecMemory` that treats any access outside a block as a bug.
struct Guarded(VecMemory);

impl Guarded {
    fn len_of(&self, index: usize) -> u64 {
        self.0
            .blocks()
            .get(index)
            .map_or(0, |(_, v)| v.len() as u64)
    }
}

impl GuestMemory for Guarded {
    fn set_block_len(&mut self, index: usize, name: &str, len: u64) -> std::io::Result<()> {
        self.0.set_block_len(index, name, len)
    }

    fn bytes_mut(&mut self, index: usize, offset: u64, len: usize) -> std::io::Result<&mut [u8]> {
        let have = self.len_of(index);
        assert!(
            offset.checked_add(len as u64).is_some_and(|e| e <= have),
            "access {offset:#x}+{len:#x} outside block {index} of {have:#x} bytes"
        );
        self.0.bytes_mut(index, offset, len)
    }

    fn discard(&mut self, index: usize, offset: u64, len: u64) -> std::io::Result<()> {
        let have = self.len_of(index);
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= have),
            "discard outside block {index}"
        );
        self.0.discard(index, offset, len)
    }
}

const NAMES: [&str; 4] = ["pc.ram", "vga.vram", "rom", "x"];

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |a, _| a << 8 | self.u8() as u64)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    fn name(&mut self) -> &'static str {
        NAMES[self.u8() as usize % NAMES.len()]
    }

    /// A page offset: mostly small page multiples, sometimes anything.
    fn offset(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => self.u64() & !0xfff,
            _ => (self.u8() as u64 % 40) * 4096,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A zlib stream of one stored (uncompressed) deflate block holding `data`.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01, 0x01];
    let n = data.len() as u16;
    z.extend_from_slice(&n.to_le_bytes());
    z.extend_from_slice(&(!n).to_le_bytes());
    z.extend_from_slice(data);
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&(b << 16 | a).to_be_bytes());
    z
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor(data);
    let placement = if c.u8() & 1 == 0 {
        Placement::Apply
    } else {
        Placement::Emit
    };
    let cfg = Config {
        placement,
        max_adopted_bytes: 8 << 20,
        ..Config::default()
    };
    let Ok(mut dst) = RamDst::new(cfg, Guarded(VecMemory::with_limit(16 << 20))) else {
        return;
    };
    let mut at = 0u64;
    let mut owned: Vec<u8>;
    while !c.is_empty() {
        let op = c.u8() % 16;
        let item = match op {
            0 => {
                let n = 1 + c.u8() as usize % 3;
                let blocks: Vec<MemBlock> = (0..n)
                    .map(|_| {
                        let name = c.name();
                        let b = c.u8();
                        let mut used_length = (b as u64 % 48) * 4096;
                        if b & 0x80 != 0 {
                            used_length += c.u8() as u64;
                        }
                        let page_size = match c.u8() % 4 {
                            0 => Some(8192),
                            1 => Some(c.u64()),
                            _ => None,
                        };
                        MemBlock {
                            name,
                            used_length,
                            page_size,
                            addr: None,
                        }
                    })
                    .collect();
                let total = blocks
                    .iter()
                    .fold(0u64, |s, b| s.wrapping_add(b.used_length));
                Item::Ram(RamRecord {
                    offset: total,
                    flags: 4,
                    block: None,
                    body: RamBody::MemSize(blocks),
                })
            }
            1 | 2 => {
                let block = if c.u8() & 1 == 0 {
                    None
                } else {
                    Some(c.name())
                };
                let off = c.offset();
                owned = c.bytes(4096).to_vec();
                owned.resize(if c.u8() == 0 { 100 } else { 4096 }, 0x5a);
                Item::Ram(RamRecord::page(off, block, &owned))
            }
            3 | 4 => {
                let block = if c.u8() & 1 == 0 {
                    None
                } else {
                    Some(c.name())
                };
                let mut r = RamRecord::zero(c.offset(), block);
                let fill = c.u8();
                r.body = RamBody::Zero {
                    fill: if fill < 200 { 0 } else { fill },
                };
                Item::Ram(r)
            }
            5 => {
                let block = if c.u8() & 1 == 0 {
                    None
                } else {
                    Some(c.name())
                };
                let off = c.offset();
                let n = c.u8() as usize * 17;
                owned = c.bytes(n).to_vec();
                Item::Ram(RamRecord::xbzrle(off, block, &owned))
            }
            6 => {
                let block = if c.u8() & 1 == 0 {
                    None
                } else {
                    Some(c.name())
                };
                let off = c.offset();
                owned = match c.u8() % 3 {
                    0 => {
                        let b = c.u8();
                        zlib_stored(&[b; 4096])
                    }
                    1 => zlib_stored(c.bytes(64)),
                    _ => {
                        let n = c.u8() as usize;
                        c.bytes(n).to_vec()
                    }
                };
                Item::Ram(RamRecord::compressed(off, block, &owned))
            }
            7 => {
                let block = c.name();
                let n = c.u8() % 4;
                let ranges = (0..n)
                    .map(|_| {
                        if c.u8().is_multiple_of(4) {
                            DiscardRange {
                                start: c.u64(),
                                len: c.u64(),
                            }
                        } else {
                            DiscardRange {
                                start: (c.u8() as u64 % 50) * 4096,
                                len: (c.u8() as u64 % 8) * 4096,
                            }
                        }
                    })
                    .collect();
                Item::Command(Command::RamDiscard(Discard { block, ranges }))
            }
            8 => Item::Command(Command::PostcopyAdvise(match c.u8() % 3 {
                0 => None,
                1 => Some(Advise {
                    page_size_summary: 4096 | 8192,
                    target_page_size: 4096,
                }),
                _ => Some(Advise {
                    page_size_summary: c.u64(),
                    target_page_size: c.u64(),
                }),
            })),
            9 => Item::Command(Command::PostcopyListen),
            10 => Item::Command(Command::PostcopyRun),
            11 => Item::Eof,
            12 => Item::Command(Command::Ping(c.u8() as u32)),
            13 => Item::Command(Command::RecvBitmap { block: c.name() }),
            14 => Item::Command(Command::PostcopyResume),
            _ => Item::Ram(RamRecord::eos()),
        };
        let len = 1 + c.u8() as usize;
        let before = dst.applied_up_to();
        match dst.handle_item(at, len, &item) {
            Ok(()) => assert_eq!(dst.applied_up_to(), at + len as u64),
            Err(e) => {
                assert!(dst.applied_up_to() == at || dst.applied_up_to() == before);
                let _ = e.to_string();
                let _ = e.offset();
            }
        }
        // A thread faults somewhere (any block index, any offset): a typed
        // outcome or error, never a panic.
        if c.u8() % 4 == 0 {
            let block = c.u8() as usize % 5;
            let off = if c.u8() & 1 == 0 { c.u64() } else { c.offset() };
            if let Err(e) = dst.handle_page_fault(block, off) {
                let _ = e.to_string();
            }
        }
        while dst.poll_event().is_some() {}
        while let Some(a) = dst.poll_placement() {
            // The host places what the machine asks for and reports it.
            match &a {
                qmig_ram_dst::Place::HostPage {
                    block,
                    offset,
                    data,
                } => dst
                    .handle_placed(*block, *offset, data.len() as u64)
                    .expect("own placement is whole host pages"),
                qmig_ram_dst::Place::ZeroPage { block, offset, len } => dst
                    .handle_placed(*block, *offset, *len)
                    .expect("own placement is whole host pages"),
                qmig_ram_dst::Place::Discard { .. } => {}
            }
        }
        // The RECV_BITMAP reply of every block parses back to its bitmap.
        for block in 0..dst.blocks().len().min(2) {
            let mut out = Vec::new();
            assert!(dst
                .recv_bitmap_reply(block, &mut out)
                .expect("own block names are writable"));
            let b = &dst.blocks()[block];
            let pages = b.used_length() / dst.page_size();
            let (name, bm, n) =
                parse_recv_bitmap_reply(&out, |_| Some(pages)).expect("own reply parses");
            assert_eq!((name.as_str(), n), (b.name(), out.len()));
            assert_eq!(&bm, b.received());
        }
        // Return-path bytes are whole, parseable messages.
        let mut out = Vec::new();
        if dst.poll_transmit(&mut out) {
            qmig_wire::parse_return_path(&out).expect("own return-path bytes parse");
        }
        at += len as u64;
    }
    // Bookkeeping matches the memory.
    for (i, b) in dst.blocks().iter().enumerate() {
        assert_eq!(dst.memory().len_of(i), b.used_length());
        assert_eq!(b.received().len(), b.used_length() / dst.page_size());
    }
});
