//! Real-stream oracle for the XBZRLE encoder: for every XBZRLE record of the
//! real QEMU 7.2 and 10 captures, the page as the destination had it before
//! the record (replayed from the stream) and after it, re-encoded by qmig,
//! give exactly QEMU's bytes.

use std::collections::HashMap;

use qmig_tests::captures;
use qmig_wire::{Item, RamBody, SliceReader};

#[test]
fn reencoding_every_real_xbzrle_record_gives_qemus_bytes() {
    let mut per_major: HashMap<u32, usize> = HashMap::new();
    for c in captures() {
        let mut mem: HashMap<String, Vec<u8>> = HashMap::new();
        let mut cur = String::new();
        let mut checked = 0usize;
        let mut out = vec![0u8; 65536];
        let mut rd = SliceReader::new(&c.stream);
        while let Some(it) = rd.next() {
            let (off, it) = it.unwrap();
            let Item::Ram(r) = it else { continue };
            // The decoder's target page size (1 KiB on 32-bit ARM boards).
            let page_size = rd.decoder().ram_context().page_size();
            if let Some(b) = r.block {
                cur = b.to_string();
            }
            let o = r.offset as usize;
            match &r.body {
                RamBody::MemSize(blocks) => {
                    for b in blocks {
                        mem.entry(b.name.to_string())
                            .or_insert_with(|| vec![0; b.used_length as usize]);
                    }
                }
                RamBody::Zero { fill } => mem.get_mut(&cur).unwrap()[o..o + page_size].fill(*fill),
                RamBody::Page(d) => mem.get_mut(&cur).unwrap()[o..o + page_size].copy_from_slice(d),
                RamBody::Compressed(z) => {
                    use std::io::Read;
                    let page = &mut mem.get_mut(&cur).unwrap()[o..o + page_size];
                    flate2::read::ZlibDecoder::new(&z[..])
                        .read_exact(page)
                        .unwrap();
                }
                RamBody::Xbzrle(enc) => {
                    let page = &mut mem.get_mut(&cur).unwrap()[o..o + page_size];
                    let old = page.to_vec();
                    qmig_xbzrle::decode(enc, page)
                        .unwrap_or_else(|e| panic!("{} at {off}: {e}", c.name));
                    let n = qmig_xbzrle::encode(&old, page, &mut out[..page_size]).unwrap_or_else(
                        |_| panic!("{} at {off}: qmig overflows where QEMU did not", c.name),
                    );
                    assert!(
                        out[..n] == enc[..],
                        "{} at {off}: qmig's encoding differs from QEMU's ({n} vs {} bytes)",
                        c.name,
                        enc.len()
                    );
                    let r =
                        qmig_xbzrle::reference::encode(&old, page, &mut out[..page_size]).unwrap();
                    assert!(
                        out[..r] == enc[..],
                        "{} at {off}: reference encoder differs",
                        c.name
                    );
                    checked += 1;
                }
                _ => {}
            }
        }
        if checked > 0 {
            *per_major.entry(c.qemu_major()).or_default() += checked;
            eprintln!(
                "{}: {checked} XBZRLE records re-encoded identically",
                c.name
            );
        }
    }
    assert!(
        per_major.get(&10).copied().unwrap_or(0) >= 1000,
        "QEMU 10 XBZRLE records: {per_major:?}"
    );
    assert!(
        per_major.get(&7).copied().unwrap_or(0) >= 1000,
        "QEMU 7.2 XBZRLE records: {per_major:?}"
    );
}
