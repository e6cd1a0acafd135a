//! `qmig extract --format raw|elf|lime`: the physical images hold the
//! source's memory (the oracle's pmemsave digests, by guest-physical
//! address) at the addresses the oracle's layout gives, and the ELF and
//! LiME files parse back to the same ranges.

use std::path::Path;
use std::process::Command;

use qmig_tests::{captures, sha256, Capture};

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn tmpdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-phys-{}-", tag.replace('/', "_")))
        .tempdir()
        .unwrap()
}

fn extract(c: &Capture, format: &str, extra: &[&str]) -> (tempfile::TempDir, Vec<u8>) {
    let out_tmp = tmpdir(&format!("{}-{format}", c.name));
    let out = out_tmp.path();
    let o = qmig()
        .arg("extract")
        .arg(&c.stream_path)
        .arg("-o")
        .arg(out)
        .args(["--format", format])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} {format}: {}",
        c.name,
        String::from_utf8_lossy(&o.stderr)
    );
    let img = std::fs::read(out.join(format!("physical.{format}"))).unwrap();
    (out_tmp, img)
}

/// The legacy hole qmig-phys leaves out on x86.
const HOLE: (u64, u64) = (0xa_0000, 0x10_0000);

/// (gpa, length, sha256) of the oracle's digests that carry an address, of
/// machine RAM (not ROM or flash), outside the legacy hole.
fn gpa_digests(c: &Capture) -> Vec<(u64, u64, String)> {
    c.oracle["digests"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| {
                    let b = d["block"].as_str()?;
                    if !(b.ends_with(".ram") || ["m0", "m1", "hp"].contains(&b)) {
                        return None;
                    }
                    let (g, l) = (d["gpa"].as_u64()?, d["length"].as_u64()?);
                    if g < HOLE.1 && g + l > HOLE.0 {
                        return None;
                    }
                    Some((
                        d["gpa"].as_u64()?,
                        d["length"].as_u64()?,
                        d["sha256"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parses an ELF64 core into (paddr, bytes) per PT_LOAD.
fn parse_elf(f: &[u8]) -> Vec<(u64, &[u8])> {
    assert_eq!(&f[..6], b"\x7fELF\x02\x01");
    assert_eq!(u16::from_le_bytes([f[16], f[17]]), 4, "ET_CORE");
    let phoff = u64_at(f, 32) as usize;
    let phnum = u16::from_le_bytes([f[56], f[57]]) as usize;
    (0..phnum)
        .map(|i| {
            let p = phoff + 56 * i;
            assert_eq!(u32::from_le_bytes(f[p..p + 4].try_into().unwrap()), 1);
            let off = u64_at(f, p + 8) as usize;
            let paddr = u64_at(f, p + 24);
            let len = u64_at(f, p + 32) as usize;
            assert_eq!(u64_at(f, p + 40) as usize, len, "p_memsz = p_filesz");
            (paddr, &f[off..off + len])
        })
        .collect()
}

/// Parses a LiME file into (start, bytes) per range.
fn parse_lime(f: &[u8]) -> Vec<(u64, &[u8])> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < f.len() {
        assert_eq!(
            u32::from_le_bytes(f[at..at + 4].try_into().unwrap()),
            0x4C69_4D45
        );
        assert_eq!(u32::from_le_bytes(f[at + 4..at + 8].try_into().unwrap()), 1);
        let s = u64_at(f, at + 8);
        let e = u64_at(f, at + 16);
        assert!(e >= s);
        let len = (e - s + 1) as usize;
        out.push((s, &f[at + 32..at + 32 + len]));
        at += 32 + len;
    }
    out
}

/// The bytes of `[gpa, gpa + len)` in a segment list.
fn phys_read(segs: &[(u64, &[u8])], gpa: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut a = gpa;
    while a < gpa + len {
        let (s, d) = segs
            .iter()
            .find(|(s, d)| *s <= a && a < *s + d.len() as u64)
            .unwrap_or_else(|| panic!("{a:#x} is in no segment"));
        let o = (a - s) as usize;
        let n = (d.len() - o).min((gpa + len - a) as usize);
        out.extend_from_slice(&d[o..o + n]);
        a += n as u64;
    }
    out
}

#[test]
fn raw_images_equal_pmemsave_outside_the_hole() {
    let mut checked = 0;
    for c in captures() {
        let digests = gpa_digests(&c);
        if digests.is_empty() {
            continue;
        }
        // Machine types without a known layout keep RAM at 0 here (the
        // oracle's layout); q72-no-config has no machine type in the stream.
        let machine = c.oracle["machine_args"][1].as_str().unwrap_or("");
        let extra: &[&str] = if c.name == "q72-no-config" {
            &["--machine-layout", "pc"]
        } else if machine.starts_with("pc") || machine.starts_with("q35") || machine == "virt" {
            &[]
        } else {
            &["--machine-layout", "flat"]
        };
        let (out_tmp, img) = extract(&c, "raw", extra);
        let out = out_tmp.path();
        for (gpa, len, sha) in &digests {
            let part = &img[*gpa as usize..(gpa + len) as usize];
            assert_eq!(
                &sha256::hex(part),
                sha,
                "{}: raw [{gpa:#x}, +{len:#x})",
                c.name
            );
        }
        // The legacy hole is left out (reads as zero).
        if let Some(h) = c.oracle["hole"].as_array() {
            let (a, b) = (h[0].as_u64().unwrap(), h[1].as_u64().unwrap());
            assert!(
                img[a as usize..b as usize].iter().all(|&x| x == 0),
                "{}",
                c.name
            );
        }
        checked += 1;
        let _ = std::fs::remove_dir_all(out);
    }
    assert!(checked >= 10, "only {checked} captures with gpa digests");
}

#[test]
fn elf_and_lime_parse_back_to_pmemsave() {
    let all = captures();
    for name in ["q35-backends", "q72-plain", "q10-hugepage-postcopy"] {
        let c = all.iter().find(|c| c.name == name).unwrap();
        for fmt in ["elf", "lime"] {
            let (out_tmp, img) = extract(c, fmt, &[]);
            let out = out_tmp.path();
            let segs = if fmt == "elf" {
                parse_elf(&img)
            } else {
                parse_lime(&img)
            };
            assert_eq!(segs[0].0, 0, "{name} {fmt}");
            for (s, d) in &segs {
                let e = s + d.len() as u64;
                assert!(
                    e <= HOLE.0 || *s >= HOLE.1,
                    "{name} {fmt}: range in the hole"
                );
            }
            for (gpa, len, sha) in gpa_digests(c) {
                assert_eq!(
                    sha256::hex(&phys_read(&segs, gpa, len)),
                    sha,
                    "{name} {fmt}: [{gpa:#x}, +{len:#x})"
                );
            }
            let _ = std::fs::remove_dir_all(out);
        }
    }
}

/// aarch64 virt: RAM at 1 GiB, as in the oracle's layout; the ELF says EM_AARCH64.
#[test]
fn aarch64_virt_ram_is_at_1g() {
    let all = captures();
    let c = all.iter().find(|c| c.name == "aarch64-virt").unwrap();
    let (out_tmp, img) = extract(c, "elf", &[]);
    let out = out_tmp.path();
    assert_eq!(u16::from_le_bytes([img[18], img[19]]), 183);
    let segs = parse_elf(&img);
    let block = std::fs::read(out.join(image_file(out, "mach-virt.ram"))).unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].0, 0x4000_0000);
    assert_eq!(segs[0].1, &block[..]);
    let _ = std::fs::remove_dir_all(out);
}

fn image_file(out: &Path, block: &str) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    m["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == block)
        .unwrap()["file"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Overrides: the NUMA backends given in the other order swap places; an
/// unknown machine type is a typed error naming the override; a bad
/// max-ram-below-4g is refused.
#[test]
fn overrides_and_errors() {
    let all = captures();
    let c = all.iter().find(|c| c.name == "q35-backends").unwrap();
    let (out_tmp, img) = extract(c, "raw", &["--machine-layout", "q35:m1,m0"]);
    let out = out_tmp.path();
    let m1 = std::fs::read(out.join(image_file(out, "m1"))).unwrap();
    assert_eq!(&img[..0xa0000], &m1[..0xa0000]);
    let _ = std::fs::remove_dir_all(out);

    let c = all.iter().find(|c| c.name == "sparc64-sun4u").unwrap();
    let out_tmp = tmpdir("sun4u");
    let out = out_tmp.path();
    let o = qmig()
        .arg("extract")
        .arg(&c.stream_path)
        .arg("-o")
        .arg(out)
        .args(["--format", "raw"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--machine-layout"), "{err}");
    let (out2_tmp, img) = extract(c, "raw", &["--machine-layout", "flat"]);
    let out2 = out2_tmp.path();
    assert_eq!(img.len(), 16 << 20);
    let _ = std::fs::remove_dir_all(out2);
    let _ = std::fs::remove_dir_all(out);

    let c = all.iter().find(|c| c.name == "q10-stopped").unwrap();
    let out_tmp = tmpdir("mrb");
    let out = out_tmp.path();
    let o = qmig()
        .arg("extract")
        .arg(&c.stream_path)
        .arg("-o")
        .arg(out)
        .args(["--format", "raw", "--max-ram-below-4g", "8G"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("max-ram-below-4g"));
    let _ = std::fs::remove_dir_all(out);
}
