//! Arbitrary bytes as a recorded multifd channel file read by
//! `qmig_ram_dst::multifd_offline` (the packet reader behind
//! `qmig extract --multifd-channel`, `qmig recv` and the Python package):
//! channel header, then packets applied sync by sync to a destination with
//! pc.ram (4 MiB) and pc.rom (128 KiB). No panic, every error names an
//! offset inside the input, and the memory keeps its block sizes.
#![no_main]
#[path = "../common/multifd.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::multifd::ChannelDecoder;
use qmig_ram_dst::multifd_offline::{Channel, PacketReader, Reached};

fuzz_target!(|data: &[u8]| {
    let mut dst = common::destination();
    let mut rd = PacketReader::new(data, 1, 4096, None);
    let init = match rd.init() {
        Ok(Some(i)) => i,
        Ok(None) => {
            assert!(data.is_empty());
            return;
        }
        Err(e) => {
            assert!(e.offset() <= data.len() as u64);
            return;
        }
    };
    let mut ch = Channel {
        rd,
        dec: ChannelDecoder::new(u32::from(init.id), 4096),
    };
    loop {
        match ch.run_to_sync(|id, d| dst.apply_multifd(id, d)) {
            Ok(Reached::Sync(at)) => assert!(at < data.len() as u64),
            Ok(Reached::End(at)) => {
                assert_eq!(at, data.len() as u64);
                break;
            }
            Err(e) => {
                assert!(e.offset() <= data.len() as u64);
                break;
            }
        }
    }
    common::assert_block_sizes(&dst);
});
