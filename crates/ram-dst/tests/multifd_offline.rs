//! `multifd_offline::OfflineChannels` over the real QEMU 10 multifd capture
//! sets (tests/data/multifd/q10-*: main stream and channel files, nocomp,
//! zlib, zstd): with the channels applied at the main stream's sync points,
//! pc.ram equals the source's pmemsave (oracle digests) and the firmware
//! blocks, whose pages travel only in the channels, are filled; channel
//! errors are typed.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use qmig_ram_dst::multifd::MultifdError;
use qmig_ram_dst::multifd_offline::OfflineChannels;
use qmig_ram_dst::{Config, Layout, Placement, RamDst, VecMemory};
use qmig_tests::sha256::hex as sha256_hex;
use qmig_wire::{Decoder, Limits, StreamReader};
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    qmig_tests::data_dir().join("multifd").join(name)
}

fn gunzip_file(p: &Path) -> Result<Cursor<Vec<u8>>, String> {
    let raw = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(Cursor::new(qmig_tests::gunzip(&raw)))
}

/// Applies `main` with the channel files `chans`.
fn apply(main: &Path, chans: &[PathBuf]) -> Result<RamDst<VecMemory>, MultifdError> {
    let cfg = Config {
        layout: Layout::Adopt,
        placement: Placement::Apply,
        ..Config::default()
    };
    let mut dst = RamDst::new(cfg, VecMemory::new()).unwrap();
    let mut rd =
        StreamReader::with_decoder(gunzip_file(main).unwrap(), Decoder::new(Limits::default()));
    let mut off = OfflineChannels::new(chans, gunzip_file);
    while let Some(ri) = rd.next_item().unwrap() {
        off.before_item(&ri, &mut dst)?;
        dst.handle_read_item(&ri).unwrap();
    }
    off.finish(&mut dst)?;
    if !chans.is_empty() {
        let stats = off.stats();
        assert_eq!(stats.len(), chans.len());
        assert!(stats.iter().all(|(_, s)| s.syncs > 0));
    }
    Ok(dst)
}

fn set(name: &str) -> (PathBuf, Vec<PathBuf>, Value) {
    let d = dir(name);
    let o: Value = serde_json::from_slice(&std::fs::read(d.join("oracle.json")).unwrap()).unwrap();
    let mut main = None;
    let mut chans = Vec::new();
    for c in o["connections"].as_array().unwrap() {
        let f = d.join(format!("{}.gz", c["file"].as_str().unwrap()));
        match c["kind"].as_str().unwrap() {
            "main" => main = Some(f),
            _ => chans.push(f),
        }
    }
    (main.unwrap(), chans, o)
}

#[test]
fn channels_applied_at_sync_points_equal_pmemsave() {
    for name in ["q10-none", "q10-zlib", "q10-zstd"] {
        let (main, mut chans, o) = set(name);
        assert!(chans.len() >= 2);
        // Channels are told apart by their header, not by the order given.
        chans.reverse();
        let dst = apply(&main, &chans).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mem = dst.into_memory();
        let ram = mem.block("pc.ram").unwrap();
        let ranges = o["ranges"].as_array().unwrap();
        assert!(!ranges.is_empty());
        for r in ranges {
            let (off, n) = (
                r["offset"].as_u64().unwrap() as usize,
                r["length"].as_u64().unwrap() as usize,
            );
            assert_eq!(
                sha256_hex(&ram[off..off + n]),
                r["sha256"].as_str().unwrap(),
                "{name}"
            );
        }
        assert!(
            mem.block("pc.bios").unwrap().iter().any(|&b| b != 0),
            "{name}"
        );
        // The main stream alone leaves the firmware empty.
        let alone = apply(&main, &[]).unwrap().into_memory();
        assert!(
            alone.block("pc.bios").unwrap().iter().all(|&b| b == 0),
            "{name}"
        );
    }
}

#[test]
fn channel_errors_are_typed() {
    let (main, chans, _) = set("q10-zlib");
    // The same channel twice.
    let e = apply(&main, &[chans[0].clone(), chans[0].clone()])
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            MultifdError::Rule {
                rule: "multifd_recv_new_channel",
                ..
            }
        ),
        "{e}"
    );
    // A file that does not open: the opener's message.
    let e = apply(&main, &[dir("no-such-file")]).err().unwrap();
    assert!(e.to_string().contains("no-such-file"), "{e}");
    // A channel cut inside a packet.
    // Removed with its contents when `tmp` drops (also on panic).
    let tmp = tempfile::Builder::new()
        .prefix("qmig-offline-cut-")
        .tempdir()
        .unwrap();
    let cut = tmp.path().join("cut.gz");
    let bytes = qmig_tests::gunzip(&std::fs::read(&chans[0]).unwrap());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&cut, gz.finish().unwrap()).unwrap();
    let e = apply(&main, &[cut.clone(), chans[1].clone()])
        .err()
        .unwrap();
    let _ = std::fs::remove_file(&cut);
    assert!(e.offset() > 0, "{e}");
}
