//! mapped-ram pages applied by runs (file to file with `copy_file_range`,
//! or from the items' bytes) give the same images, counters and applied
//! offset as the reference path that applies each page as a PAGE or ZERO
//! record: on QEMU 10's mapped-ram files (plain and multifd) and on sparse
//! files whose bitmaps were rewritten to make runs of every length and pages
//! with a set bit over a hole.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use qmig_ram_dst::{Config, FileMemory, GuestMemory, RamDst, Stats};
use qmig_wire::{Item, MappedRam, ReadItem, SliceReader};

/// A fresh scratch directory, removed with its contents when the returned
/// `TempDir` drops (also when the test panics).
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("qmig-mr-runs-{}-", name.replace('/', "_")))
        .tempdir()
        .unwrap()
}

/// How the pages are applied.
#[derive(Debug, Clone, Copy)]
enum Mode {
    PerPage,
    Runs,
    RunsFromFile,
}

/// Data ranges of a file, `start..end` in bytes.
type DataRanges = Vec<(u64, u64)>;

/// What an apply left: counters, applied offset, error text, images (name,
/// bytes, data ranges as `SEEK_DATA`/`SEEK_HOLE` report them).
#[derive(Debug, PartialEq)]
struct Outcome {
    stats: Stats,
    applied: u64,
    error: Option<String>,
    images: Vec<(String, Vec<u8>, DataRanges)>,
}

fn apply(file: &Path, mode: Mode, out: &Path) -> Outcome {
    let bytes = std::fs::read(file).unwrap();
    let mut d = RamDst::new(Config::default(), FileMemory::create(out).unwrap()).unwrap();
    match mode {
        Mode::PerPage => d.set_mapped_ram_per_page(true),
        Mode::Runs => {}
        Mode::RunsFromFile => d.set_mapped_ram_source(File::open(file).unwrap(), 0),
    }
    let mut rd = SliceReader::new(&bytes);
    let mut error = None;
    while let Some(r) = rd.next() {
        let (offset, item) = match r {
            Ok(x) => x,
            Err(e) => {
                error = Some(format!("wire: {e}"));
                break;
            }
        };
        let decoder = rd.decoder();
        let len = (decoder.position() - offset) as usize;
        if let Err(e) = d.handle_read_item(&ReadItem {
            offset,
            len,
            item,
            decoder,
        }) {
            error = Some(format!("dst: {e}"));
            break;
        }
    }
    d.memory_mut().flush().unwrap();
    let images = d
        .memory()
        .files()
        .into_iter()
        .map(|i| {
            let p = out.join(&i.file_name);
            let data = data_ranges(&p);
            (i.file_name, std::fs::read(&p).unwrap(), data)
        })
        .collect();
    Outcome {
        stats: *d.stats(),
        applied: d.applied_up_to(),
        error,
        images,
    }
}

/// The data ranges of `path` (`start..end`, adjacent ones merged), as
/// `lseek(SEEK_DATA)`/`lseek(SEEK_HOLE)` report them.
fn data_ranges(path: &Path) -> DataRanges {
    use std::os::unix::io::AsRawFd;
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as libc::off_t;
    let mut out: DataRanges = Vec::new();
    let mut at: libc::off_t = 0;
    while at < len {
        // SAFETY: lseek on a descriptor we own; integer arguments only.
        let start = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: no data after `at`
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_HOLE) };
        assert!(end > start, "{}: SEEK_HOLE at {start}", path.display());
        match out.last_mut() {
            Some(last) if last.1 == start as u64 => last.1 = end as u64,
            _ => out.push((start as u64, end as u64)),
        }
        at = end;
    }
    out
}

/// The three modes agree on `file`; returns the reference outcome.
fn check_same(file: &Path, dir: &Path) -> Outcome {
    let reference = apply(file, Mode::PerPage, &dir.join("per-page"));
    for mode in [Mode::Runs, Mode::RunsFromFile] {
        let o = apply(file, mode, &dir.join(format!("{mode:?}")));
        assert_eq!(o.stats, reference.stats, "{mode:?}: counters");
        assert_eq!(o.applied, reference.applied, "{mode:?}: applied offset");
        assert_eq!(o.error, reference.error, "{mode:?}: error");
        assert_eq!(o.images.len(), reference.images.len());
        for (a, b) in o.images.iter().zip(&reference.images) {
            assert_eq!(a.0, b.0, "{mode:?}: image names");
            assert!(a.1 == b.1, "{mode:?}: {} differs", a.0);
            // Pages with a clear bit stay holes in both. (Not compared by
            // allocated blocks: blocks preallocated before a write, as
            // FileMemory does, can take an extra extent-tree block.)
            assert_eq!(a.2, b.2, "{mode:?}: {} data ranges", a.0);
        }
    }
    reference
}

/// Writes `bytes` as a sparse file: 4 KiB chunks of zeros are holes.
fn write_sparse(path: &Path, bytes: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (k, c) in bytes.chunks(4096).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, k as u64 * 4096).unwrap();
        }
    }
    f.seek(SeekFrom::End(0)).unwrap();
    f.flush().unwrap();
}

/// (bitmap offset, bitmap length) of every mapped-ram block of `bytes`.
fn bitmaps(bytes: &[u8]) -> Vec<(usize, usize)> {
    let rd = SliceReader::new(bytes);
    let mut out = Vec::new();
    for r in rd {
        let (offset, item) = r.unwrap();
        if let Item::MappedRam(MappedRam::Bitmap(b)) = item {
            out.push((offset as usize, b.len()));
        }
    }
    out
}

/// A bitmap pattern: its label and whether page `i` has its bit set.
type Pattern = (&'static str, fn(u64) -> bool);

fn captures() -> Vec<(&'static str, Vec<u8>)> {
    let data = qmig_tests::data_dir();
    ["field/mapped-ram-file", "multifd/mapped-ram-multifd4"]
        .into_iter()
        .map(|n| {
            let gz = std::fs::read(data.join(n).join("stream.gz")).unwrap();
            (n, qmig_tests::gunzip(&gz))
        })
        .collect()
}

#[test]
fn runs_equal_per_page_on_qemu_files() {
    for (name, bytes) in captures() {
        let dir_tmp = scratch(&name.replace('/', "-"));
        let dir = dir_tmp.path();
        let file = dir.join("stream");
        write_sparse(&file, &bytes);
        let o = check_same(&file, dir);
        assert!(o.error.is_none(), "{name}: {:?}", o.error);
        assert!(
            o.stats.page > 0 && o.stats.zero > 0,
            "{name}: {:?}",
            o.stats
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn runs_equal_per_page_on_rewritten_bitmaps() {
    let (_, bytes) = captures().remove(0);
    let maps = bitmaps(&bytes);
    assert!(!maps.is_empty());
    // Patterns: runs of 1..=9 set pages between gaps of 1..=4 (some over
    // holes: set bits whose page is zero in the file), every bit set, none.
    let patterns: [Pattern; 3] = [
        ("mixed", |i| (i * 7 + i / 13) % 11 < 6),
        ("all", |_| true),
        ("none", |_| false),
    ];
    for (label, set) in patterns {
        let mut b = bytes.clone();
        for &(at, len) in &maps {
            for i in 0..(len as u64 * 8) {
                let byte = &mut b[at + (i / 8) as usize];
                if set(i) {
                    *byte |= 1 << (i % 8);
                } else {
                    *byte &= !(1 << (i % 8));
                }
            }
        }
        let dir_tmp = scratch(label);
        let dir = dir_tmp.path();
        let file = dir.join("stream");
        write_sparse(&file, &b);
        let o = check_same(&file, dir);
        assert!(o.error.is_none(), "{label}: {:?}", o.error);
        match label {
            "all" => assert_eq!(o.stats.zero, 0),
            "none" => {
                assert_eq!(o.stats.page, 0);
                for (n, img, data) in &o.images {
                    assert!(img.iter().all(|&x| x == 0), "{n}");
                    assert!(data.is_empty(), "{n}: not a hole: {data:?}");
                }
            }
            _ => assert!(o.stats.page > 0 && o.stats.zero > 0),
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn runs_stop_where_per_page_stops_on_a_cut_file() {
    // The file ends inside a page area: the decoder refuses the block entry
    // (its region passes the end of the input) in every mode alike.
    let (_, bytes) = captures().remove(0);
    let dir_tmp = scratch("cut");
    let dir = dir_tmp.path();
    let file = dir.join("stream");
    write_sparse(&file, &bytes[..bytes.len() * 3 / 4]);
    let o = check_same(&file, dir);
    assert!(o.error.is_some());
    let _ = std::fs::remove_dir_all(dir);
}
