//! `qmig extract` of a mapped-ram file: read in place (pages copied file to
//! file), the same file gzip'd and through a pipe (pages written from the
//! items' bytes) give the same images and the same manifest (but for the
//! `source` it names), on QEMU 10's mapped-ram files and on a sparse copy.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-mrx-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// The manifest without its `source`, and every image's bytes.
fn extract(input: Option<&Path>, stdin: Option<&[u8]>, out: &Path) -> (Value, Vec<Vec<u8>>) {
    let o = match (input, stdin) {
        (Some(p), _) => qmig()
            .args(["extract", "-q"])
            .arg(p)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap(),
        (None, Some(b)) => qmig_tests::run_with_stdin(
            qmig().args(["extract", "-q", "/dev/stdin", "-o"]).arg(out),
            b,
        ),
        _ => unreachable!("an input is given"),
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("source");
    let images = m["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| std::fs::read(out.join(b["file"].as_str().unwrap())).unwrap())
        .collect();
    (m, images)
}

#[test]
fn in_place_equals_pipe() {
    for name in ["field/mapped-ram-file", "multifd/mapped-ram-multifd4"] {
        let gz = qmig_tests::data_dir().join(name).join("stream.gz");
        let bytes = qmig_tests::gunzip(&std::fs::read(&gz).unwrap());
        let d_tmp = scratch(&name.replace('/', "-"));
        let d = d_tmp.path();
        // A sparse plain copy: zero 4 KiB chunks are holes.
        let plain = d.join("stream");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&plain).unwrap();
            f.set_len(bytes.len() as u64).unwrap();
            for (k, c) in bytes.chunks(4096).enumerate() {
                if c.iter().any(|&b| b != 0) {
                    f.write_all_at(c, k as u64 * 4096).unwrap();
                }
            }
        }
        let (m_file, i_file) = extract(Some(&plain), None, &d.join("file"));
        let (m_gz, i_gz) = extract(Some(&gz), None, &d.join("gz"));
        let (m_pipe, i_pipe) = extract(None, Some(&bytes), &d.join("pipe"));
        assert_eq!(m_file, m_gz, "{name}: manifest, file vs gzip");
        assert_eq!(m_file, m_pipe, "{name}: manifest, file vs pipe");
        assert!(i_file == i_gz && i_file == i_pipe, "{name}: images differ");
        assert!(m_file["records"]["page"].as_u64().unwrap() > 0);
        assert_eq!(m_file["complete"], true);
        let _ = std::fs::remove_dir_all(d);
    }
}
