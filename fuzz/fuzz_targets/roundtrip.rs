//! Whatever parses re-serializes to exactly the input bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_wire::SliceReader;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::with_capacity(data.len());
    for it in SliceReader::new(data) {
        match it {
            Ok((off, item)) => {
                assert_eq!(off as usize, out.len());
                item.write(&mut out).expect("what parses is writable");
            }
            Err(_) => break,
        }
    }
    assert_eq!(&out[..], &data[..out.len()]);
});
