//! Arbitrary bytes as a multifd channel (first byte: target page bits 10-16
//! and the mode; then a whole channel, or one packet): no panic, errors
//! inside the input, what parses re-serializes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_wire::multifd::{parse_packet, ChannelReader, PacketContext};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let ps = 1u64 << (10 + u32::from(sel % 7));
    let ctx = PacketContext::new(ps);
    if sel & 0x80 != 0 {
        let mut out = Vec::new();
        for it in ChannelReader::new(rest, ctx) {
            match it {
                Ok((off, item)) => {
                    assert_eq!(off as usize, out.len());
                    item.write(&mut out, ps).expect("what parses is writable");
                }
                Err(e) => {
                    assert!(e.offset() <= rest.len() as u64);
                    break;
                }
            }
        }
        assert_eq!(&out[..], &rest[..out.len()]);
    } else {
        match parse_packet(rest, 0, &ctx) {
            Ok(Some((p, n))) => {
                assert!(n <= rest.len());
                let mut out = Vec::new();
                p.write(&mut out, ps).expect("what parses is writable");
                assert_eq!(&out[..], &rest[..n]);
            }
            Ok(None) => {}
            Err(e) => assert!(e.offset() <= rest.len() as u64),
        }
    }
});
