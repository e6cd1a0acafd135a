//! The vmdesc-driven VMState decoder over every real capture: the committed
//! corpus (tests/data) and the field inputs (`../shared/field` from the
//! repository root, or `$QMIG_FIELD_DIR`; skipped when absent).
//!
//! For each stream with a vmdesc trailer:
//! - walking the FULL device sections with `DeviceDesc::payload_len` alone
//!   (header, payload, footer, next header...) covers the stream exactly up
//!   to its EOF byte, and every payload decodes;
//! - wherever the stream reader reads the stream without error, the device
//!   payload it delimits has exactly `payload_len` bytes and decodes.

use std::path::{Path, PathBuf};

use qmig_tests::{captures, gunzip};
use qmig_wire::vmdesc::find_trailer;
use qmig_wire::{Item, SectionKind, SliceReader, VmDesc};

struct Stream {
    name: String,
    bytes: Vec<u8>,
}

fn field_dir() -> Option<PathBuf> {
    let d = match std::env::var_os("QMIG_FIELD_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/field"),
    };
    d.is_dir().then_some(d)
}

fn streams() -> Vec<Stream> {
    let mut out: Vec<Stream> = captures()
        .into_iter()
        .map(|c| Stream {
            name: c.name,
            bytes: c.stream,
        })
        .collect();
    match field_dir() {
        Some(dir) => {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .expect("read field dir")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for d in dirs {
                let name = format!("field/{}", d.file_name().unwrap().to_string_lossy());
                if let Ok(b) = std::fs::read(d.join("stream")) {
                    out.push(Stream { name, bytes: b });
                } else if let Ok(b) = std::fs::read(d.join("stream.gz")) {
                    out.push(Stream {
                        name,
                        bytes: gunzip(&b),
                    });
                }
            }
        }
        None => eprintln!("field inputs not found (../shared/field or $QMIG_FIELD_DIR): skipped"),
    }
    out
}

/// The vmdesc and the offset of the EOF byte before it.
fn vmdesc(b: &[u8]) -> Option<(VmDesc, usize)> {
    let h = find_trailer(b)?;
    let d = VmDesc::parse(&b[h + 6..]).unwrap_or_else(|e| panic!("vmdesc: {e}"));
    Some((d, h))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks the FULL sections of `d.devices()` in order from `start`; returns
/// where the walk ends and the number of payload bytes decoded, or None
/// when a header or footer does not match.
fn walk(b: &[u8], d: &VmDesc, start: usize) -> Option<(usize, u64)> {
    let mut pos = start;
    let mut decoded = 0;
    for dev in d.devices() {
        if *b.get(pos)? != 0x04 {
            return None;
        }
        let id = be32(b, pos + 1)?;
        let name = dev.name().as_bytes();
        if *b.get(pos + 5)? as usize != name.len()
            || b.get(pos + 6..pos + 6 + name.len())? != name
            || be32(b, pos + 6 + name.len())? != dev.instance_id()
        {
            return None;
        }
        let p = pos + 6 + name.len() + 8;
        let end = p.checked_add(usize::try_from(dev.payload_len()).ok()?)?;
        // Machine types without section footers (send-section-footer=off)
        // go straight on to the next section.
        let footer = b.get(end) == Some(&0x7e) && be32(b, end + 1) == Some(id);
        if !footer && !matches!(b.get(end), Some(0x00 | 0x04)) {
            return None;
        }
        let st = dev.decode(&b[p..end], p as u64);
        assert!(
            st.is_ok(),
            "{} {}: {:?}",
            dev.name(),
            dev.instance_id(),
            st.err()
        );
        decoded += dev.payload_len();
        pos = if footer { end + 5 } else { end };
    }
    Some((pos, decoded))
}

#[test]
fn payload_len_covers_every_device_section_up_to_eof() {
    let mut checked = 0;
    for s in streams() {
        let Some((d, eof)) = vmdesc(&s.bytes) else {
            eprintln!("{}: no vmdesc (postcopy), skipped", s.name);
            continue;
        };
        assert!(!d.devices().is_empty(), "{}", s.name);
        // Candidate starts: every FULL header naming the first device.
        let first = &d.devices()[0];
        let mut pat = vec![first.name().len() as u8];
        pat.extend_from_slice(first.name().as_bytes());
        pat.extend_from_slice(&first.instance_id().to_be_bytes());
        let mut ends = Vec::new();
        for i in 5..s.bytes.len().saturating_sub(pat.len()) {
            if s.bytes[i..i + pat.len()] == pat[..] {
                if let Some((end, n)) = walk(&s.bytes, &d, i - 5) {
                    ends.push((i - 5, end, n));
                }
            }
        }
        let whole: Vec<_> = ends.iter().filter(|(_, e, _)| *e == eof).collect();
        assert_eq!(
            whole.len(),
            1,
            "{}: walks from FULL headers of {}: {ends:?}, EOF at {eof}",
            s.name,
            first.name()
        );
        eprintln!(
            "{}: {} devices, {} payload bytes, sections {}..{eof}",
            s.name,
            d.devices().len(),
            whole[0].2,
            whole[0].0
        );
        checked += 1;
    }
    assert!(checked >= 11, "only {checked} streams with a vmdesc");
}

#[test]
fn reader_delimits_payload_len_and_decode_consumes_it() {
    let mut sections = 0;
    for s in streams() {
        let Some((d, _)) = vmdesc(&s.bytes) else {
            continue;
        };
        // (idstr, instance, payload offset, payload bytes) per FULL section.
        let mut found: Vec<(String, u32, u64, Vec<u8>)> = Vec::new();
        let mut open = false;
        let mut failed = None;
        for it in SliceReader::new(&s.bytes) {
            match it {
                Ok((off, Item::Section(h))) => {
                    open = false;
                    if let (SectionKind::Full, Some(id)) = (h.kind, h.ident) {
                        if id.idstr != "ram" {
                            found.push((id.idstr.to_string(), id.instance, 0, Vec::new()));
                            open = true;
                        }
                    }
                    let _ = off;
                }
                Ok((off, Item::DeviceData(p))) if open => {
                    let e = found.last_mut().unwrap();
                    if e.3.is_empty() {
                        e.2 = off;
                    }
                    e.3.extend_from_slice(p);
                }
                Ok((_, Item::DeviceData(_))) => {}
                Ok(_) => open = false,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // The reader cannot read this stream yet (e.g. 1 KiB target
            // pages); the walk test above covers its sections.
            eprintln!("{}: reader stops: {e}; its delimiting not compared", s.name);
            continue;
        }
        assert_eq!(found.len(), d.devices().len(), "{}", s.name);
        for (name, inst, off, payload) in &found {
            let dev = d
                .device(name, *inst)
                .unwrap_or_else(|| panic!("{}: no vmdesc entry for {name} {inst}", s.name));
            assert_eq!(
                dev.payload_len(),
                payload.len() as u64,
                "{}: {name} {inst}",
                s.name
            );
            dev.decode(payload, *off)
                .unwrap_or_else(|e| panic!("{}: {e}", s.name));
            sections += 1;
        }
    }
    assert!(sections > 100, "only {sections} sections compared");
}
