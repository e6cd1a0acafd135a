//! Postcopy recovery and preempt connections (wire-format §11, §12). The
//! first byte picks what the rest is read as:
//! 0: a recovery connection (continuing a postcopy stream cut after RUN),
//!    each item checked by `RecoveryChannel`;
//! 1: a postcopy-preempt channel;
//! 2: a return path with the recovery checks (RECV_BITMAP replies against
//!    the layout, RESUME_ACK), and the reply / RESUME_ACK parsers directly.
//! No panic; errors inside the input; what parses re-serializes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../common/recovery.rs"]
mod common;
use qmig_wire::recovery::{
    check_rp_message, parse_recv_bitmap_reply, parse_resume_ack, RecoveryChannel,
};
use qmig_wire::{Decoder, ReturnPathReader, SliceReader};

/// "pc.ram" (256 target pages of 4 KiB), "small" (3 pages), and the other
/// blocks of the seeds (the real captures' pc machine).
fn pages(n: &str) -> Option<u64> {
    match n {
        "pc.ram" => Some(256),
        "small" => Some(3),
        "pc.bios" => Some(64),
        "pc.rom" | "/rom@etc/acpi/tables" => Some(32),
        "/rom@etc/table-loader" | "/rom@etc/acpi/rsdp" => Some(1),
        _ => None,
    }
}

/// A decoder at the end of a postcopy main connection cut after RUN: RAM
/// START (MEM_SIZE pc.ram 1 MiB + small 12 KiB, EOS, footer), LISTEN, RUN.
fn cut_main() -> Decoder {
    let b = common::cut_main_bytes();
    let mut rd = SliceReader::with_decoder(&b, common::main_decoder());
    for r in rd.by_ref() {
        if let Err(e) = r {
            // The connection was cut after RUN, between items.
            assert!(e.is_truncation() && e.offset() == b.len() as u64, "{e}");
            break;
        }
    }
    rd.decoder().clone()
}

fn read(data: &[u8], dec: Decoder, check: bool) {
    let mut order = RecoveryChannel::new();
    let mut out = Vec::new();
    for r in SliceReader::with_decoder(data, dec) {
        match r {
            Ok((off, item)) => {
                assert_eq!(off as usize, out.len());
                item.write(&mut out).expect("what parses is writable");
                if check && order.check(off, &item, pages).is_err() {
                    break;
                }
            }
            Err(e) => {
                assert!(e.offset() <= data.len() as u64);
                break;
            }
        }
    }
    assert_eq!(&out[..], &data[..out.len()]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => read(data, cut_main().continuation().expect("cut after RUN"), true),
        1 => read(data, cut_main().preempt_channel(), false),
        _ => {
            let mut out = Vec::new();
            for m in ReturnPathReader::new(data) {
                match m {
                    Ok((off, m)) => {
                        assert_eq!(off as usize, out.len());
                        let _ = check_rp_message(&m, off, pages);
                        m.write(&mut out).expect("what parses is writable");
                    }
                    Err(e) => {
                        assert!(e.offset() <= data.len() as u64);
                        break;
                    }
                }
            }
            assert_eq!(&out[..], &data[..out.len()]);
            match parse_recv_bitmap_reply(data, 0, pages) {
                Ok((r, n)) => {
                    let mut w = Vec::new();
                    r.write(&mut w).expect("a parsed reply is writable");
                    assert_eq!(&w[..], &data[..n]);
                }
                Err(e) => assert!(e.offset() <= data.len() as u64),
            }
            if let Err(e) = parse_resume_ack(data, 0) {
                assert!(e.offset() <= data.len() as u64);
            }
        }
    }
});
