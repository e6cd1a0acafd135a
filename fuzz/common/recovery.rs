//! The main connection shared by the recovery fuzz targets (`recovery`,
//! `dst_recovery`): a postcopy stream cut after POSTCOPY_RUN, between items.

use qmig_wire::target_page::PageSizeSource;
use qmig_wire::{Decoder, Limits, StreamStart};

/// The cut main connection's bytes, from the first section on: RAM START
/// (MEM_SIZE pc.ram 1 MiB + small 12 KiB, EOS, footer), then the commands
/// LISTEN and RUN.
pub fn cut_main_bytes() -> Vec<u8> {
    let mut b = vec![0x01u8];
    b.extend_from_slice(&2u32.to_be_bytes());
    b.push(3);
    b.extend_from_slice(b"ram");
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&4u32.to_be_bytes());
    b.extend_from_slice(&(((1u64 << 20) + 3 * 4096) | 4).to_be_bytes());
    b.push(6);
    b.extend_from_slice(b"pc.ram");
    b.extend_from_slice(&(1u64 << 20).to_be_bytes());
    b.push(5);
    b.extend_from_slice(b"small");
    b.extend_from_slice(&(3u64 * 4096).to_be_bytes());
    b.extend_from_slice(&0x10u64.to_be_bytes());
    b.push(0x7e);
    b.extend_from_slice(&2u32.to_be_bytes());
    b.extend_from_slice(&[8, 0, 4, 0, 0, 8, 0, 5, 0, 0]);
    b
}

/// A decoder for [`cut_main_bytes`]: sections from offset 0, 4 KiB target
/// pages.
pub fn main_decoder() -> Decoder {
    let mut dec = Decoder::with_start(StreamStart::Sections, 0, Limits::default());
    dec.set_page_bits(12, PageSizeSource::Override);
    dec
}
