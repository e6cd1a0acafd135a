//! The destination state machine in postcopy recovery (wire-format §11,
//! §12): a `RamDst` that ran a postcopy stream (pc.ram 1 MiB + small 12 KiB)
//! until a cut after POSTCOPY_RUN is paused, then the input is, by its first
//! byte: 0: a recovery connection (items of `Decoder::continuation`, through
//! `handle_read_item`); 1: a preempt channel after a resume (through
//! `handle_preempt_item`); 2: a recovery connection cut at the byte the
//! second byte names, paused again, and the rest as a new recovery
//! connection. Never a panic; the return path stays bounded by the input
//! (a RECV_BITMAP reply per command of at most the largest block's bitmap).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../common/recovery.rs"]
mod common;
use qmig_ram_dst::{Config, RamDst, VecMemory};
use qmig_wire::{Command, Decoder, Item, SliceReader};

/// The cut main connection: RAM START (MEM_SIZE pc.ram 1 MiB + small
/// 12 KiB, EOS, footer), LISTEN, RUN; fed to `dst` with OPEN_RETURN_PATH
/// and ADVISE first. Returns the decoder at the cut.
fn cut_main(dst: &mut RamDst<VecMemory>) -> Decoder {
    let b = common::cut_main_bytes();
    let mut rd = SliceReader::with_decoder(&b, common::main_decoder());
    let mut first_cmd = true;
    for r in rd.by_ref() {
        let Ok((off, item)) = r else { break };
        if first_cmd && matches!(item, Item::Command(_)) {
            first_cmd = false;
            dst.handle_item(off, 0, &Item::Command(Command::OpenReturnPath))
                .unwrap();
            dst.handle_item(off, 0, &Item::Command(Command::PostcopyAdvise(None)))
                .unwrap();
        }
        dst.handle_item(off, 1, &item).unwrap();
    }
    rd.decoder().clone()
}

/// Feeds `data` as a recovery connection; returns the decoder where it
/// stopped and whether it was cut (not refused).
fn recovery(dst: &mut RamDst<VecMemory>, data: &[u8], dec: Decoder, rp: &mut Vec<u8>) -> (Decoder, bool) {
    let mut rd = SliceReader::with_decoder(data, dec);
    let mut cut = false;
    for r in rd.by_ref() {
        match r {
            Ok((off, item)) => {
                if dst.handle_item(off, 1, &item).is_err() {
                    break;
                }
                dst.poll_transmit(rp);
            }
            Err(e) => {
                cut = e.is_truncation();
                break;
            }
        }
    }
    (rd.decoder().clone(), cut)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cfg = Config {
        max_adopted_bytes: 4 << 20,
        ..Config::default()
    };
    let mut dst = RamDst::new(cfg, VecMemory::with_limit(4 << 20)).unwrap();
    let dec = cut_main(&mut dst);
    let mut rp = Vec::new();
    dst.poll_transmit(&mut rp);
    rp.clear();
    assert!(dst.handle_connection_lost().unwrap());
    dst.handle_recovery_connection().unwrap();
    let cont = dec.continuation().unwrap();
    match mode % 3 {
        0 => {
            recovery(&mut dst, rest, cont, &mut rp);
        }
        1 => {
            dst.handle_item(0, 1, &Item::Command(Command::PostcopyResume))
                .unwrap();
            for r in SliceReader::with_decoder(rest, dec.preempt_channel()) {
                let Ok((off, item)) = r else { break };
                if dst.handle_preempt_item(off, &item).is_err() {
                    break;
                }
            }
        }
        _ => {
            let Some((&at, rest)) = rest.split_first() else {
                return;
            };
            let at = (at as usize).min(rest.len());
            let (d, _) = recovery(&mut dst, &rest[..at], cont, &mut rp);
            if dst.handle_connection_lost().unwrap_or(false) {
                if let Ok(next) = d.continuation() {
                    dst.handle_recovery_connection().unwrap();
                    recovery(&mut dst, &rest[at..], next, &mut rp);
                }
            }
        }
    }
    dst.poll_transmit(&mut rp);
    // pc.ram's reply is the largest: 4 + 7 + 8 + 32 + 8 bytes; one per
    // 9-byte command at most, plus RESUME_ACK, requests and SHUT.
    assert!(rp.len() <= 64 * (data.len() / 9 + 2), "{} bytes for {}", rp.len(), data.len());
});
