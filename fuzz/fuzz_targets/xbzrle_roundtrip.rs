//! Input split into an old and a new page (a multiple of 8 bytes): the fast encoder
//! equals the reference encoder for the page-size limit and a fuzzed smaller limit, and
//! decoding the encoding onto the old page gives the new page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_xbzrle::{decode, encode, encode_portable, reference};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    // Pages are (old, delta) halves; the delta is XORed onto old so that mostly-zero
    // fuzz input means few changes.
    let page_len = (rest.len() / 2) & !7;
    let (old, delta) = rest.split_at(page_len);
    let new: Vec<u8> = old.iter().zip(delta).map(|(o, x)| o ^ x).collect();
    let limits = [page_len, page_len.saturating_sub(usize::from(sel))];
    for dlen in limits {
        let mut want = vec![0u8; dlen];
        let r = reference::encode(old, &new, &mut want);
        let mut got = vec![0u8; dlen];
        assert_eq!(encode(old, &new, &mut got), r);
        if let Ok(n) = r {
            assert_eq!(got[..n], want[..n]);
            let mut got2 = vec![0u8; dlen];
            assert_eq!(encode_portable(old, &new, &mut got2), r);
            assert_eq!(got2[..n], want[..n]);
            let mut page = old.to_vec();
            decode(&want[..n], &mut page).expect("own encoding decodes");
            assert_eq!(page, new);
        }
    }
});
