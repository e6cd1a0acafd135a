//! The destination shared by the multifd fuzz targets (`multifd_apply`,
//! `multifd_offline`): pc.ram (4 MiB, small to keep runs fast) and pc.rom
//! (128 KiB) in `VecMemory`, as a MEM_SIZE record makes them, and the check
//! every run ends with.

use qmig_ram_dst::{Config, RamDst, VecMemory};
use qmig_wire::{Item, MemBlock, RamRecord};

/// pc.ram's used length.
pub const RAM_LEN: usize = 4 << 20;
/// pc.rom's used length.
pub const ROM_LEN: usize = 128 << 10;

/// A destination whose blocks were set by a MEM_SIZE record.
pub fn destination() -> RamDst<VecMemory> {
    let mut dst = RamDst::new(Config::default(), VecMemory::new()).unwrap();
    let blocks = vec![
        MemBlock {
            name: "pc.ram",
            used_length: RAM_LEN as u64,
            page_size: None,
            addr: None,
        },
        MemBlock {
            name: "pc.rom",
            used_length: ROM_LEN as u64,
            page_size: None,
            addr: None,
        },
    ];
    dst.handle_item(0, 1, &Item::Ram(RamRecord::mem_size(blocks)))
        .unwrap();
    dst
}

/// Whatever the input did, the memory kept its block sizes.
pub fn assert_block_sizes(dst: &RamDst<VecMemory>) {
    assert_eq!(dst.memory().block("pc.ram").map(<[u8]>::len), Some(RAM_LEN));
    assert_eq!(dst.memory().block("pc.rom").map(<[u8]>::len), Some(ROM_LEN));
}
