//! Arbitrary encoded input applied onto an arbitrary page: never panics, never changes the
//! page length, leaves the page untouched on error, and agrees with the naive reference
//! decoder (accept/reject and result).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the page size (multiple of 8 up to 2 KiB); the rest is split
    // between the page's current content and the encoded input.
    let Some((&sel, rest)) = data.split_first() else { return };
    let page_len = 8 * (usize::from(sel) + 1);
    let split = rest.len().min(page_len);
    let (content, encoded) = rest.split_at(split);
    let mut page = vec![0u8; page_len];
    page[..content.len()].copy_from_slice(content);
    let before = page.clone();

    let result = qmig_xbzrle::decode(encoded, &mut page);
    assert_eq!(page.len(), page_len);
    assert_eq!(result, qmig_xbzrle::validate(encoded, page_len));
    let oracle = qmig_xbzrle::reference::decode(encoded, &before);
    match result {
        Ok(()) => assert_eq!(Some(page), oracle),
        Err(_) => {
            assert_eq!(page, before, "page modified on error");
            assert_eq!(oracle, None);
        }
    }
});
