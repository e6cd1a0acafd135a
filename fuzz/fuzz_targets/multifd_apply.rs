//! Arbitrary bytes as a multifd channel applied to a destination with
//! pc.ram (4 MiB, small to keep runs fast) and pc.rom (128 KiB), through the channel's decoder
//! (none/zlib/zstd streams): no panic, every error names an offset inside
//! the input, and the memory keeps its block sizes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::multifd::ChannelDecoder;
use qmig_ram_dst::{Config, RamDst, VecMemory};
use qmig_wire::multifd::{ChannelItem, ChannelReader, Packet, PacketContext};
use qmig_wire::{Item, MemBlock, RamRecord};

fuzz_target!(|data: &[u8]| {
    let mut dst = RamDst::new(Config::default(), VecMemory::new()).unwrap();
    let blocks = vec![
        MemBlock {
            name: "pc.ram",
            used_length: 4 << 20,
            page_size: None,
            addr: None,
        },
        MemBlock {
            name: "pc.rom",
            used_length: 128 << 10,
            page_size: None,
            addr: None,
        },
    ];
    dst.handle_item(0, 1, &Item::Ram(RamRecord::mem_size(blocks)))
        .unwrap();
    let mut dec = ChannelDecoder::new(0, 4096);
    for it in ChannelReader::new(data, PacketContext::new(4096)) {
        match it {
            Ok((at, ChannelItem::Packet(Packet::Ram(r)))) => {
                let r = dec.decode(at, &r).and_then(|d| dst.apply_multifd(0, &d));
                if let Err(e) = r {
                    assert!(e.offset() <= data.len() as u64);
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(dst.memory().block("pc.ram").map(<[u8]>::len), Some(4 << 20));
    assert_eq!(
        dst.memory().block("pc.rom").map(<[u8]>::len),
        Some(128 << 10)
    );
});
