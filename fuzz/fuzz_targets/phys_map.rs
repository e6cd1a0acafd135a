//! qmig-phys: `--machine-layout` text, a machine type and RAM blocks of any
//! names and lengths, any `max-ram-below-4g`. Never a panic; every map's
//! ranges are sorted, disjoint, inside their blocks; small maps are written
//! as raw, ELF and LiME images (to a sink).
#![no_main]

use std::io::{self, Seek, SeekFrom, Write};

use libfuzzer_sys::fuzz_target;
use qmig_phys::image::{write_image, ImageFormat};

/// Discards what is written; tracks the position.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Sink {
    fn seek(&mut self, p: SeekFrom) -> io::Result<u64> {
        self.0 = match p {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self.0.checked_add_signed(d).ok_or(io::ErrorKind::InvalidInput)?,
            SeekFrom::End(_) => return Err(io::ErrorKind::Unsupported.into()),
        };
        Ok(self.0)
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('|');
    let machine = parts.next().map(str::to_string);
    let layout = parts.next().and_then(|l| qmig_phys::parse_layout_arg(l).ok());
    let mrb = parts.next().and_then(|m| m.parse::<u64>().ok());
    let mut blocks = Vec::new();
    for p in parts.take(8) {
        if let Some((n, l)) = p.split_once('=') {
            if let Ok(l) = l.parse::<u64>() {
                blocks.push((n.to_string(), l));
            }
        }
    }
    let b: Vec<(&str, u64)> = blocks.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    let opts = qmig_phys::Options {
        layout: layout.as_ref().map(|l| l.0),
        max_ram_below_4g: mrb,
        ram_blocks: layout.and_then(|l| l.1),
    };
    let Ok(m) = qmig_phys::map(machine.as_deref(), &b, &opts) else {
        return;
    };
    for w in m.ranges.windows(2) {
        assert!(w[0].end() <= w[1].gpa);
    }
    for r in &m.ranges {
        let len = b.iter().find(|(n, _)| *n == r.block).unwrap().1;
        assert!(r.length > 0 && r.offset + r.length <= len);
    }
    if m.end() <= 4 << 20 {
        for f in [ImageFormat::Raw, ImageFormat::Elf, ImageFormat::Lime] {
            let _ = write_image(f, &m, &mut Sink(0), |_, _, buf| {
                buf.fill(1);
                Ok(())
            });
        }
    }
});
