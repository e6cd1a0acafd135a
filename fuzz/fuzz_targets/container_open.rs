//! Arbitrary bytes as a wrapped stream (libvirt save image, whole-file
//! compression, nested): no panic, errors name an offset inside the input's
//! layer, a header that parses re-encodes to the same bytes, and the data
//! after it parses or fails with an offset inside `data_len`.
#![no_main]
use std::io::Read;

use libfuzzer_sys::fuzz_target;
use qmig_container::libvirt::{self, DEFAULT_MAX_DATA_LEN, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = libvirt::parse_header(data, DEFAULT_MAX_DATA_LEN) {
        let e = libvirt::encode_header(&h, DEFAULT_MAX_DATA_LEN).expect("re-encode");
        assert_eq!(&e[..], &data[..HEADER_LEN]);
        match libvirt::parse_data(&h, &data[HEADER_LEN..], HEADER_LEN as u64) {
            Ok(_) => {}
            Err(e) => assert!(e.offset() <= (HEADER_LEN as u64 + u64::from(h.data_len))),
        }
    }
    let limits = qmig_container::Limits {
        max_data_len: 1 << 16,
        max_layers: 3,
    };
    // Decompressed bytes are offsets of an inner layer: only bound-check the
    // outermost one, and read at most 1 MiB of output (bombs).
    match qmig_container::open(Box::new(std::io::Cursor::new(data.to_vec())), &limits) {
        Ok(mut o) => {
            let mut sink = Vec::new();
            let _ = (&mut o.reader).take(1 << 20).read_to_end(&mut sink);
        }
        Err(e) => {
            if qmig_container::sniff(data).is_none() {
                assert!(e.offset() <= data.len() as u64, "{e}");
            }
        }
    }
});
