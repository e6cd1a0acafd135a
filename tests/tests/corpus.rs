//! The committed real-QEMU corpus through qmig-wire: every capture parses,
//! re-serializes to identical bytes, has QEMU's record counts, and every
//! prefix of it gives a truncation error (never a panic, never success).

use qmig_tests::{captures, Capture};
use qmig_wire::{Item, RamKind, SliceReader, Step};
use std::collections::BTreeMap;

fn items(c: &Capture) -> Vec<(u64, Item<'_>)> {
    SliceReader::new(&c.stream)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

#[test]
fn corpus_is_present() {
    let caps = captures();
    let names: Vec<&str> = caps.iter().map(|c| c.name.as_str()).collect();
    for want in [
        "q10-stopped",
        "q10-passes",
        "q10-xbzrle",
        "q10-postcopy",
        "q72-compress",
        "q72-xbzrle",
        "q35-backends",
        "q10-zpd-none",
    ] {
        assert!(names.contains(&want), "missing capture {want}: {names:?}");
    }
}

#[test]
fn every_capture_roundtrips() {
    for c in captures() {
        let mut out = Vec::with_capacity(c.stream.len());
        let its = items(&c);
        for (off, it) in &its {
            assert_eq!(
                *off as usize,
                out.len(),
                "{}: item offsets are contiguous",
                c.name
            );
            it.write(&mut out).unwrap();
        }
        assert!(out == c.stream, "{}: re-serialization differs", c.name);
        assert!(
            matches!(its.last(), Some((_, Item::Eof | Item::Vmdesc(_)))),
            "{}: ends with EOF or vmdesc",
            c.name
        );
    }
}

/// Record counts: totals by kind, and by block then kind.
type Counts = (
    BTreeMap<&'static str, u64>,
    BTreeMap<String, BTreeMap<&'static str, u64>>,
);

fn counts(its: &[(u64, Item<'_>)]) -> Counts {
    let mut totals = BTreeMap::new();
    let mut per_block: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut cur = String::new();
    for (_, it) in its {
        if let Item::Ram(r) = it {
            if let Some(b) = r.block {
                cur = b.to_string();
            }
            let k = match r.kind() {
                RamKind::Zero => "zero",
                RamKind::Page => "page",
                RamKind::Xbzrle => "xbzrle",
                RamKind::Compressed => "compressed",
                RamKind::Eos => "eos",
                _ => continue,
            };
            *totals.entry(k).or_insert(0) += 1;
            if r.is_page() {
                *per_block
                    .entry(cur.clone())
                    .or_default()
                    .entry(k)
                    .or_insert(0) += 1;
            }
        }
    }
    (totals, per_block)
}

/// Counts equal QEMU's own counters (as the capture script recorded which
/// ones QEMU guarantees) and an independent reader's per-block counts.
#[test]
fn counts_match_qemu_and_reference_reader() {
    for c in captures() {
        let its = items(&c);
        let (totals, per_block) = counts(&its);
        let exp = c.expectations();
        assert!(!exp.is_empty(), "{}: oracle has expectations", c.name);
        for (k, v) in exp {
            let key = k.trim_start_matches("totals.");
            assert_eq!(totals.get(key).copied().unwrap_or(0), v, "{}: {k}", c.name);
        }
        if c.qemu_major() >= 10 {
            let ram = &c.query_migrate["source"]["ram"];
            assert_eq!(
                totals.get("zero").copied().unwrap_or(0),
                ram["duplicate"].as_u64().unwrap(),
                "{}: ram.duplicate",
                c.name
            );
            assert_eq!(
                totals.get("page").copied().unwrap_or(0),
                ram["normal"].as_u64().unwrap(),
                "{}: ram.normal",
                c.name
            );
        }
        // The independent Python reader's counts (scripts/qemustream.py).
        if let Some(blocks) = c.oracle["reference"]["blocks"].as_array() {
            for b in blocks {
                let name = b["name"].as_str().unwrap();
                for k in ["zero", "page", "xbzrle", "compressed"] {
                    let ours = per_block
                        .get(name)
                        .and_then(|m| m.get(k))
                        .copied()
                        .unwrap_or(0);
                    assert_eq!(ours, b[k].as_u64().unwrap(), "{}: block {name} {k}", c.name);
                }
            }
        }
    }
}

#[test]
fn return_paths_parse_and_roundtrip() {
    let mut seen = 0;
    for c in captures() {
        let Some(rp) = &c.rp else { continue };
        let msgs = qmig_wire::parse_return_path(rp).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let mut out = Vec::new();
        for (_, m) in &msgs {
            m.write(&mut out).unwrap();
        }
        assert_eq!(&out, rp, "{}", c.name);
        assert!(
            msgs.iter()
                .any(|(_, m)| matches!(m, qmig_wire::RpMessage::Shut(0))),
            "{}: SHUT(0)",
            c.name
        );
        seen += 1;
    }
    assert!(seen >= 1);
}

/// Every prefix of every capture is rejected with a truncation error that
/// points inside the prefix, except a prefix that ends right after EOF
/// (a complete stream without vmdesc, as postcopy sends).
///
/// Checking all prefixes from scratch is quadratic, so the decoder is
/// checkpointed before each item (it is `Clone` and deterministic): a prefix
/// ending inside item k is decoded from checkpoint k. A sample of prefixes is
/// also parsed from scratch to check the checkpoint model.
#[test]
fn every_prefix_is_a_truncation() {
    for c in captures() {
        let s = &c.stream;
        // Start from the decoder a slice reader sets up (vmdesc installed).
        let mut dec = SliceReader::new(s).decoder().clone();
        let mut checkpoints = Vec::new();
        loop {
            let pos = dec.position() as usize;
            let step = dec.decode(&s[pos..], true).unwrap();
            let Step::Item { item, len } = step else {
                break;
            };
            checkpoints.push((dec.clone(), pos, len));
            dec.commit(&item, len);
        }
        for (d, start, len) in &checkpoints {
            for end in *start..start + len {
                match d.decode(&s[*start..end], true) {
                    Err(e) => {
                        assert!(e.is_truncation(), "{}: prefix {end}: {e}", c.name);
                        assert!(
                            e.offset() <= end as u64,
                            "{}: prefix {end}: offset {} beyond",
                            c.name,
                            e.offset()
                        );
                    }
                    Ok(Step::Item { item, len }) => {
                        // Only a zero-length item may complete on a shorter prefix.
                        assert!(
                            len == 0 && end == *start,
                            "{}: prefix {end} decoded {}",
                            c.name,
                            item.kind_name()
                        );
                    }
                    // The prefix that ends right after EOF is a complete stream.
                    Ok(Step::End) if end == *start && d.phase() == qmig_wire::Phase::AfterEof => {}
                    Ok(other) => panic!("{}: prefix {end}: {other:?}", c.name),
                }
            }
        }
        // From scratch, on a sample including every item boundary's neighbours.
        // (Bounded per capture: each sample parses its prefix from scratch.)
        let mut sample: Vec<usize> = (0..s.len()).step_by(4099.max(s.len() / 200)).collect();
        for (_, start, len) in checkpoints.iter().step_by(7.max(checkpoints.len() / 200)) {
            sample.extend([*start, start + 1, start + len - 1]);
        }
        for end in sample {
            let end = end.min(s.len() - 1);
            let mut last = None;
            for it in SliceReader::new(&s[..end]) {
                last = Some(it.map(|(o, i)| (o, i.kind_name())));
            }
            match last {
                Some(Err(e)) => assert!(
                    e.is_truncation() || e.offset() as usize <= end,
                    "{}: prefix {end}: {e}",
                    c.name
                ),
                Some(Ok((_, "EOF"))) => {}
                Some(Ok((o, k))) => panic!(
                    "{}: prefix {end} parsed completely, last item {k} at {o}",
                    c.name
                ),
                None => panic!("{}: prefix {end}: no items", c.name),
            }
        }
    }
}

/// A reader over `io::Read` (non-seekable, tiny reads) gives the same items.
#[test]
fn stream_reader_matches_slice_reader() {
    struct Trickle<'a>(&'a [u8], usize);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 = self.1 % 9973 + 1;
            Ok(n)
        }
    }
    for c in captures() {
        let want = items(&c);
        let mut r = qmig_wire::StreamReader::new(Trickle(&c.stream, 1));
        let mut i = 0;
        while let Some(ri) = r.next_item().unwrap_or_else(|e| panic!("{}: {e}", c.name)) {
            assert_eq!(
                (ri.offset, &ri.item),
                (want[i].0, &want[i].1),
                "{}: item {i}",
                c.name
            );
            i += 1;
        }
        assert_eq!(i, want.len(), "{}", c.name);
    }
}

/// The hugepage-backed block carries its page size in MEM_SIZE (postcopy was
/// advised with a summary that includes 2 MiB); the others do not.
#[test]
fn mem_size_page_size_field_from_real_hugepage_stream() {
    let c = captures()
        .into_iter()
        .find(|c| c.name == "q10-hugepage-postcopy")
        .expect("capture");
    let its = items(&c);
    let advise = its.iter().find_map(|(_, i)| match i {
        Item::Command(qmig_wire::Command::PostcopyAdvise(Some(a))) => Some(*a),
        _ => None,
    });
    assert_eq!(advise.map(|a| a.page_size_summary), Some(0x201000));
    let blocks = mem_size_blocks(&its);
    for b in &blocks {
        let want = (b.name == "hp").then_some(0x200000);
        assert_eq!(b.page_size, want, "block {}", b.name);
    }
}

/// With `x-ignore-shared` in the configuration, every MEM_SIZE entry carries
/// the block's guest address, and the shared block's pages are not sent.
#[test]
fn mem_size_addr_field_from_real_ignore_shared_stream() {
    let c = captures()
        .into_iter()
        .find(|c| c.name == "q10-ignore-shared")
        .expect("capture");
    let its = items(&c);
    let blocks = mem_size_blocks(&its);
    let want = c.oracle["reference"]["mem_size_addrs"]
        .as_object()
        .expect("reference addrs");
    assert_eq!(blocks.len(), want.len());
    for b in &blocks {
        assert_eq!(b.addr, want[b.name].as_u64(), "block {}", b.name);
    }
    let (_, per_block) = counts(&its);
    assert!(
        !per_block.contains_key("m0"),
        "shared block m0 has records: {per_block:?}"
    );
}

/// The block list of the stream's MEM_SIZE record.
fn mem_size_blocks<'a>(its: &[(u64, Item<'a>)]) -> Vec<qmig_wire::MemBlock<'a>> {
    its.iter()
        .find_map(|(_, i)| match i {
            Item::Ram(qmig_wire::RamRecord {
                body: qmig_wire::RamBody::MemSize(b),
                ..
            }) => Some(b.clone()),
            _ => None,
        })
        .expect("MEM_SIZE")
}
