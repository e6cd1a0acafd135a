//! Arbitrary bytes as a stream to convert (`qmig convert`): never a panic;
//! whatever converts gives a stream that parses, re-serializes to itself,
//! and leaves the same memory as the input; and so does the mapped-ram
//! file (`--format mapped-ram`) written from it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qmig_ram_dst::{RamDst, VecMemory};
use qmig_ram_src::convert::{Converter, Format, Options};
use qmig_wire::{SliceReader, StreamReader};

/// Memory cap: the fuzzer must not allocate what a hostile MEM_SIZE asks.
const LIMIT: u64 = 64 << 20;

fn replay(stream: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut dst = RamDst::new(Default::default(), VecMemory::with_limit(LIMIT)).ok()?;
    // The same reader as the conversion (a pipe: no vmdesc hint).
    let mut r = StreamReader::new(stream);
    while let Some(ri) = r.next_item().ok()? {
        dst.handle_read_item(&ri).ok()?;
    }
    Some(dst.into_memory().blocks().to_vec())
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("qmig-fuzz-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("spool dir");
    let mut conv = Converter::new(VecMemory::with_limit(LIMIT), &dir, Options::default())
        .expect("converter");
    let mut rd = StreamReader::new(data);
    loop {
        match rd.next_item() {
            Ok(Some(ri)) => {
                if conv.handle(&ri).is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset() <= data.len() as u64);
                return;
            }
        }
    }
    let mut out = Vec::new();
    if conv.finish(&mut out).is_err() {
        return;
    }
    let mut again = Vec::new();
    for it in SliceReader::new(&out) {
        let (_, item) = it.expect("converted stream parses");
        item.write(&mut again).expect("re-serializes");
    }
    assert!(again == out, "converted stream does not round-trip");
    // Both read whole (the input did, through the converter): same memory.
    let before = replay(data);
    if let (Some(a), Some(b)) = (&before, replay(&out)) {
        assert!(*a == b, "converted stream leaves other memory");
    }
    // The same input as a mapped-ram file, in memory: few blocks only, each
    // takes a 1 MiB aligned region.
    if conv.dst().blocks().len() > 8 {
        return;
    }
    let opts = Options {
        format: Format::MappedRam,
        ..Options::default()
    };
    let mut conv = Converter::new(VecMemory::with_limit(LIMIT), &dir, opts).expect("converter");
    let mut rd = StreamReader::new(data);
    while let Ok(Some(ri)) = rd.next_item() {
        if conv.handle(&ri).is_err() {
            return;
        }
    }
    let Ok((_, cur)) = conv.finish_mapped_ram(std::io::Cursor::new(Vec::new())) else {
        return;
    };
    let file = cur.into_inner();
    let mut again = Vec::new();
    for it in SliceReader::new(&file) {
        let (_, item) = it.expect("mapped-ram output parses");
        item.write(&mut again).expect("re-serializes");
    }
    assert!(again == file, "mapped-ram output does not round-trip");
    if let (Some(a), Some(b)) = (&before, replay(&file)) {
        assert!(*a == b, "mapped-ram output leaves other memory");
    }
});
