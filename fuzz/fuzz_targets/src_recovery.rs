//! Arbitrary return-path bytes into a paused postcopy source that is
//! recovering (`RamSrc` after RECV_BITMAP × blocks), with the QEMU 10
//! recovery captures' block layout: RECV_BITMAP replies, RESUME_ACK and
//! page requests are checked, a bad one gives a typed error and never a
//! panic. The first byte's bits inject cuts (pause, a new recovery) between
//! messages; the pages still to send never exceed the pages of the layout.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qmig_ram_src::{Config, RamSrc, SrcBlock, State};

const LAYOUT: [(&str, u64); 6] = [
    ("pc.ram", 32 << 20),
    ("/rom@etc/acpi/tables", 128 << 10),
    ("pc.bios", 256 << 10),
    ("pc.rom", 128 << 10),
    ("/rom@etc/table-loader", 4096),
    ("/rom@etc/acpi/rsdp", 4096),
];

fn memory() -> &'static Vec<Vec<u8>> {
    static MEM: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    MEM.get_or_init(|| LAYOUT.iter().map(|&(_, l)| vec![7u8; l as usize]).collect())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, data)) = data.split_first() else {
        return;
    };
    let mem = memory();
    let mut src = RamSrc::new(SrcBlock::sequential(LAYOUT), Config::default()).expect("layout");
    let total: u64 = LAYOUT.iter().map(|&(_, l)| l / 4096).sum();
    let mut out = Vec::new();
    src.poll_setup(&mut out).expect("setup");
    src.postcopy_switchover(&mut out).expect("switchover");
    src.handle_run_sent().expect("run sent");
    src.handle_connection_lost().expect("pauses after RUN");
    out.clear();
    src.poll_recovery_start(&mut out).expect("recovery");
    let mut at = 0usize;
    let mut n = 0u32;
    while at < data.len() {
        let Ok(Some(used)) = src.handle_return_path_bytes(&data[at..], at as u64) else {
            break;
        };
        at += used;
        n += 1;
        if cuts & (1 << (n % 8)) != 0 && n % 3 == 0 {
            src.handle_connection_lost().expect("pauses");
            assert_eq!(src.state(), State::Paused);
            out.clear();
            src.poll_recovery_start(&mut out).expect("recovery again");
        }
        if src.ready_to_resume() {
            out.clear();
            src.poll_resume(&mut out).expect("resume");
        }
        if src.state() == State::Postcopy {
            out.clear();
            src.poll_preempt(mem, &mut out).expect("preempt");
            let _ = src.poll_iterate(mem, 0, &mut out).expect("iterate");
        }
        assert!(src.remaining_pages() <= total);
    }
});
