//! `qmig recv`'s destination state: arbitrary bytes as the incoming stream,
//! return-path bytes out (`RamDst::poll_transmit`, as recv writes them).
//! Never a panic, and the return path stays bounded by the input: at most
//! one 8-byte reply per 9-byte command read, plus the final 8-byte SHUT
//! (so no hostile input can make the destination send gigabytes, as 8
//! RECV_BITMAP commands once did).
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::{Config, Event, RamDst, VecMemory};
use qmig_wire::{Item, SliceReader};

fuzz_target!(|data: &[u8]| {
    // Adopted blocks are real Vecs here: keep them small.
    let cfg = Config {
        max_adopted_bytes: 16 << 20,
        ..Config::default()
    };
    let Ok(mut dst) = RamDst::new(cfg, VecMemory::with_limit(16 << 20)) else {
        return;
    };
    let mut rp = Vec::new();
    let mut rp_open = false;
    let mut commands = 0u64;
    let mut ok = true;
    for it in SliceReader::new(data) {
        let Ok((off, item)) = it else {
            ok = false;
            break;
        };
        if matches!(item, Item::Command(_)) {
            commands += 1;
        }
        // Items are not given their lengths here: 1 is enough for the state.
        let r = dst.handle_item(off, 1, &item);
        while let Some(e) = dst.poll_event() {
            if e == Event::OpenReturnPath {
                rp_open = true;
            }
        }
        while dst.poll_placement().is_some() {}
        let before = rp.len();
        dst.poll_transmit(&mut rp);
        assert!(rp.len() - before <= 8, "one reply is at most 8 bytes");
        assert!(
            rp.len() as u64 <= 8 * commands + 8,
            "more reply than commands"
        );
        if r.is_err() {
            ok = false;
            break;
        }
    }
    let code = if ok && dst.handle_end_of_input().is_ok() {
        0
    } else {
        dst.handle_failure();
        1
    };
    dst.poll_transmit(&mut rp);
    if rp_open {
        // The last message is the SHUT, with the right code.
        let msgs = qmig_wire::parse_return_path(&rp).expect("own replies parse");
        let shut = msgs.last().map(|(_, m)| m.clone());
        assert!(
            matches!(shut, Some(qmig_wire::RpMessage::Shut(c)) if c == code),
            "{shut:?}"
        );
    }
    assert!(
        rp.len() <= data.len() + 8,
        "return path grew past the input"
    );
    // What was written parses back as return-path messages.
    qmig_wire::parse_return_path(&rp).expect("own replies parse");
});
