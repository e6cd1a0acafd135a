//! Arbitrary return-path bytes into a postcopy source (`RamSrc` after the
//! switchover): every message is checked, bad ones give a typed error and
//! never a panic; what the source writes after each accepted request stays
//! a decodable run of ZERO/PAGE records, every requested page goes out once.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_ram_src::{Config, RamSrc, SrcBlock};
use qmig_wire::ReturnPathReader;

fuzz_target!(|data: &[u8]| {
    let blocks = SrcBlock::sequential([("pc.ram", 64 * 4096), ("pc.bios", 16 * 4096)]);
    let mem = vec![vec![1u8; 64 * 4096], vec![0u8; 16 * 4096]];
    let mut src = RamSrc::new(blocks, Config::default()).expect("layout");
    let mut out = Vec::new();
    src.poll_setup(&mut out).expect("setup");
    src.postcopy_switchover(&mut out).expect("switchover");
    let total = src.remaining_pages();
    for m in ReturnPathReader::new(data) {
        let Ok((_, m)) = m else { break };
        if src.handle_return_path(&m).is_err() {
            break;
        }
        out.clear();
        let _ = src.poll_iterate(&mem, 0, &mut out).expect("serving requests");
    }
    let c = src.counters();
    assert!(c.requested_pages <= total);
    assert_eq!(src.remaining_pages() + c.requested_pages, total);
});
