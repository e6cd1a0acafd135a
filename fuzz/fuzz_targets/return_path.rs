//! Arbitrary bytes as a return-path stream: no panic, errors inside the
//! input, parsed messages re-serialize to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_wire::ReturnPathReader;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    for m in ReturnPathReader::new(data) {
        match m {
            Ok((off, m)) => {
                assert_eq!(off as usize, out.len());
                m.write(&mut out).expect("what parses is writable");
            }
            Err(e) => {
                assert!(e.offset() <= data.len() as u64);
                break;
            }
        }
    }
    assert_eq!(&out[..], &data[..out.len()]);
    // The live decoder agrees on the first message.
    if let Ok(Some((_, n))) = qmig_wire::decode_rp_message(data, 0) {
        assert!(n <= data.len());
    }
});
