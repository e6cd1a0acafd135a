//! Arbitrary bytes as a multifd channel applied to a destination with
//! pc.ram (4 MiB, small to keep runs fast) and pc.rom (128 KiB), through the channel's decoder
//! (none/zlib/zstd streams): no panic, every error names an offset inside
//! the input, and the memory keeps its block sizes.
#![no_main]
#[path = "../common/multifd.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::multifd::ChannelDecoder;
use qmig_wire::multifd::{ChannelItem, ChannelReader, Packet, PacketContext};

fuzz_target!(|data: &[u8]| {
    let mut dst = common::destination();
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
    common::assert_block_sizes(&dst);
});
