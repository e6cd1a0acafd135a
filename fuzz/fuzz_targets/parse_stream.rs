//! Arbitrary bytes as a whole migration stream: never a panic; any error
//! points inside the input; the incremental reader agrees with the slice reader.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_wire::{SliceReader, StreamReader};

fuzz_target!(|data: &[u8]| {
    let mut items = Vec::new();
    let mut err = None;
    for it in SliceReader::new(data) {
        match it {
            Ok((off, item)) => items.push((off, item.kind_name())),
            Err(e) => {
                assert!(e.offset() <= data.len() as u64);
                err = Some(e.offset());
                break;
            }
        }
    }
    // The streaming reader (no vmdesc hint: not seekable) must agree until
    // the last device section, which only the hint can delimit differently.
    let mut r = StreamReader::new(data);
    let mut n = 0;
    while let Ok(Some(ri)) = r.next_item() {
        if n >= items.len() {
            break;
        }
        if ri.item.kind_name() == "DEVICE_DATA" {
            break;
        }
        assert_eq!((ri.offset, ri.item.kind_name()), items[n]);
        n += 1;
    }
    let _ = err;
});
