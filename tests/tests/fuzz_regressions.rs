//! Every committed fuzz regression input (`fuzz/regressions/<target>/*`:
//! crashes found by cargo-fuzz, plus small hand-made seeds) replayed through
//! the same checks as the fuzz target, in the normal test suite.

use std::path::PathBuf;

use qmig_wire::{ReturnPathReader, SliceReader};

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn parse_stream_and_roundtrip_regressions() {
    for target in ["parse_stream", "roundtrip"] {
        for (p, data) in inputs(target) {
            let mut out = Vec::new();
            for it in SliceReader::new(&data) {
                match it {
                    Ok((off, item)) => {
                        assert_eq!(off as usize, out.len(), "{}", p.display());
                        item.write(&mut out).unwrap();
                    }
                    Err(e) => {
                        assert!(e.offset() <= data.len() as u64, "{}: {e}", p.display());
                        break;
                    }
                }
            }
            assert_eq!(&out[..], &data[..out.len()], "{}", p.display());
        }
    }
}

#[test]
fn return_path_regressions() {
    for (p, data) in inputs("return_path") {
        let mut out = Vec::new();
        for m in ReturnPathReader::new(&data) {
            match m {
                Ok((_, m)) => m.write(&mut out).expect("what parses is writable"),
                Err(e) => {
                    assert!(e.offset() <= data.len() as u64, "{}: {e}", p.display());
                    break;
                }
            }
        }
        assert_eq!(&out[..], &data[..out.len()], "{}", p.display());
    }
}

/// The `vmstate_decode` target's checks: a vmdesc JSON and a device payload
/// split at the first NUL byte; every device decodes the payload to exactly
/// its length or refuses it with an offset inside it.
#[test]
fn vmstate_decode_regressions() {
    for (p, data) in inputs("vmstate_decode") {
        let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        let (json, payload) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
        let desc = match qmig_wire::VmDesc::parse(json) {
            Ok(d) => d,
            Err(e) => {
                assert!(e.offset() <= json.len() as u64, "{}: {e}", p.display());
                continue;
            }
        };
        for dev in desc.devices() {
            match dev.decode(payload, 1000) {
                Ok(st) => {
                    assert_eq!(payload.len() as u64, dev.payload_len(), "{}", p.display());
                    serde_json::to_vec(&st).unwrap();
                    let _ = st.to_text();
                }
                Err(e) => assert!(
                    e.offset() >= 1000 && e.offset() <= 1000 + payload.len() as u64,
                    "{}: {e}",
                    p.display()
                ),
            }
        }
    }
}
