//! Replays every real QEMU capture of the committed corpus (`tests/data/*/`)
//! through `RamDst` into `Vec`-backed memory and compares the memory with the
//! capture's oracle (sha256 of the source's `pmemsave`, per block range) and
//! the record counts with QEMU's counters.

use qmig_ram_dst::{Config, RamDst, VecMemory};
use qmig_tests::sha256::hex as sha256_hex;
use qmig_tests::{captures, Capture};
use qmig_wire::header::Configuration;
use qmig_wire::section::SectionHeader;
use qmig_wire::{Item, MemBlock, RamRecord, SliceReader};

/// Replays a whole stream; returns the destination and the error, if any.
fn replay(stream: &[u8]) -> (RamDst<VecMemory>, Option<String>) {
    let mut dst = RamDst::new(Config::default(), VecMemory::new()).expect("empty layout");
    let mut rd = SliceReader::new(stream);
    while let Some(r) = rd.next() {
        let (off, item) = match r {
            Ok(x) => x,
            Err(e) => return (dst, Some(e.to_string())),
        };
        let decoder = rd.decoder();
        let len = (decoder.position() - off) as usize;
        let ri = qmig_wire::ReadItem {
            offset: off,
            len,
            item,
            decoder,
        };
        // handle_read_item: the target page size is the decoder's.
        if let Err(e) = dst.handle_read_item(&ri) {
            return (dst, Some(e.to_string()));
        }
        while dst.poll_event().is_some() || dst.poll_placement().is_some() {}
    }
    (dst, None)
}

/// Checks one capture; returns the number of digests compared.
fn check_capture(c: &Capture) -> Result<usize, String> {
    let (dst, err) = replay(&c.stream);
    if let Some(e) = err {
        return Err(format!("replay stopped: {e}"));
    }
    if dst.applied_up_to() != c.stream.len() as u64 {
        return Err(format!(
            "applied up to {} of {} bytes",
            dst.applied_up_to(),
            c.stream.len()
        ));
    }
    let digests = c.digests();
    if digests.is_empty() {
        return Err("oracle has no digests".into());
    }
    for (block, off, len, want) in &digests {
        let (off, len) = (*off as usize, *len as usize);
        let mem = dst
            .memory()
            .block(block)
            .ok_or_else(|| format!("block {block} not in the stream"))?;
        let part = mem
            .get(off..off + len)
            .ok_or_else(|| format!("{block}@{off:#x}+{len:#x} out of range"))?;
        let got = sha256_hex(part);
        if &got != want {
            return Err(format!("{block}@{off:#x}+{len:#x}: memory differs from the source's (sha256 {got} != {want})"));
        }
    }
    let st = dst.stats();
    for (k, v) in c.expectations() {
        let got = match k.as_str() {
            "totals.zero" => st.zero,
            "totals.page" => st.page,
            "totals.xbzrle" => st.xbzrle,
            "totals.compressed" => st.compressed,
            _ => continue,
        };
        if got != v {
            return Err(format!("{k}: replay counted {got}, QEMU says {v}"));
        }
    }
    Ok(digests.len())
}

#[test]
fn replay_of_every_capture_equals_the_source_memory() {
    let caps = captures();
    assert!(
        caps.len() >= 8,
        "the committed corpus is missing ({} captures)",
        caps.len()
    );
    let mut failures = Vec::new();
    for c in &caps {
        match check_capture(c) {
            Ok(n) => eprintln!("{}: {n} digests match", c.name),
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} captures fail:\n{}",
        failures.len(),
        caps.len(),
        failures.join("\n")
    );
}

/// The replay path itself, on a small stream built with qmig-wire's writers.
#[test]
fn replay_of_a_synthetic_stream() {
    let mut s = Vec::new();
    let page_a = [0x11u8; 4096];
    let page_b: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let items = vec![
        Item::Header { version: 3 },
        Item::Configuration(Configuration {
            machine: "pc",
            subsections: vec![],
        }),
        Item::Section(SectionHeader::start(2, "ram", 0, 4)),
        Item::Ram(RamRecord::mem_size(vec![MemBlock {
            name: "pc.ram",
            used_length: 4 * 4096,
            page_size: None,
            addr: None,
        }])),
        Item::Ram(RamRecord::eos()),
        Item::Footer(2),
        Item::Section(SectionHeader::part(2)),
        Item::Ram(RamRecord::page(4096, Some("pc.ram"), &page_a)),
        Item::Ram(RamRecord::zero(0, None)),
        Item::Ram(RamRecord::page(3 * 4096, None, &page_b)),
        Item::Ram(RamRecord::eos()),
        Item::Footer(2),
        Item::Eof,
    ];
    for i in &items {
        i.write(&mut s).unwrap();
    }
    let (dst, err) = replay(&s);
    assert_eq!(err, None);
    assert_eq!(dst.applied_up_to(), s.len() as u64);
    let mut want = vec![0u8; 4 * 4096];
    want[4096..8192].copy_from_slice(&page_a);
    want[3 * 4096..].copy_from_slice(&page_b);
    assert_eq!(
        sha256_hex(dst.memory().block("pc.ram").unwrap()),
        sha256_hex(&want)
    );
    // A truncated stream stops at the last whole item, with nothing half-applied.
    let cut = s.len() - 13 - 4096 / 2;
    let (dst, err) = replay(&s[..cut]);
    assert!(err.unwrap().contains("truncated"));
    assert!(dst.memory().block("pc.ram").unwrap()[3 * 4096..]
        .iter()
        .all(|&b| b == 0));
}
