//! Physical-address memory images of a [`PhysMap`]: a flat raw file, an ELF
//! core file, a LiME file. These are the formats Volatility3's built-in
//! layers (`FileLayer`, `Elf64Layer`, `LimeLayer`) and most memory-forensics
//! tools read.
//!
//! - **raw**: byte `gpa` of the file is guest-physical address `gpa`; what
//!   is not RAM (holes, the gap below 4 GiB) is left sparse and reads as zero.
//! - **ELF**: an `ET_CORE` ELF64 little-endian file with one `PT_LOAD`
//!   program header per range, `p_paddr` = guest-physical address,
//!   `p_vaddr` = 0, `p_filesz` = `p_memsz` = length; segment data aligned to
//!   4 KiB in the file.
//! - **LiME**: per range a 32-byte header (magic `0x4C694D45`, version 1,
//!   start, end *inclusive*, 8 reserved bytes; little-endian) followed by the
//!   range's bytes, as LiME's `lime` format writes it.

use std::io::{self, Seek, SeekFrom, Write};

use crate::{MachineLayout, PhysMap};

/// The physical image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Flat sparse file at guest-physical offsets.
    Raw,
    /// ELF64 core file, one `PT_LOAD` per range.
    Elf,
    /// LiME, one range header per range.
    Lime,
}

impl ImageFormat {
    /// The usual file extension (`raw`, `elf`, `lime`).
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Elf => "elf",
            ImageFormat::Lime => "lime",
        }
    }
}

/// LiME range header magic (`"EMiL"` little-endian).
pub const LIME_MAGIC: u32 = 0x4C69_4D45;
/// LiME format version written.
pub const LIME_VERSION: u32 = 1;
/// Size of a LiME range header, in bytes.
pub const LIME_HEADER_LEN: usize = 32;
/// ELF64 file header size, in bytes.
pub const ELF_EHDR_LEN: u64 = 64;
/// ELF64 program header size, in bytes.
pub const ELF_PHDR_LEN: u64 = 56;
/// Alignment of segment data in the ELF file, in bytes.
pub const ELF_DATA_ALIGN: u64 = 4096;
/// The most ranges an ELF file can carry (`e_phnum` is 16 bits; `0xffff`
/// is the escape to a section header, which is not written).
pub const ELF_MAX_RANGES: usize = 0xfffe;

/// The ELF `e_machine` for a layout: `EM_X86_64` (62) on x86 layouts,
/// `EM_AARCH64` (183) on `virt`, `EM_NONE` (0) otherwise.
pub fn elf_machine(layout: MachineLayout) -> u16 {
    match layout {
        MachineLayout::Pc
        | MachineLayout::PcLegacy
        | MachineLayout::Q35
        | MachineLayout::Microvm => 62,
        MachineLayout::Virt => 183,
        MachineLayout::Flat => 0,
    }
}

/// Bytes copied per read.
const CHUNK: usize = 1 << 20;

/// Writes `map` as a physical image to `out`, reading RAM through
/// `read(block, offset, buf)` (fill `buf` from `offset` of `block`).
/// Returns the bytes of the image (the raw file's length, holes included).
///
/// # Errors
/// A write or seek error of `out`, an error of `read`, or (ELF) more than
/// [`ELF_MAX_RANGES`] ranges (`InvalidInput`).
pub fn write_image<W, R>(
    format: ImageFormat,
    map: &PhysMap,
    out: &mut W,
    mut read: R,
) -> io::Result<u64>
where
    W: Write + Seek,
    R: FnMut(&str, u64, &mut [u8]) -> io::Result<()>,
{
    let mut buf = vec![0u8; CHUNK];
    let mut copy =
        |out: &mut W, block: &str, offset: u64, len: u64, sparse: bool| -> io::Result<()> {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                read(block, offset + done, &mut buf[..n])?;
                if sparse && buf[..n].iter().all(|&b| b == 0) {
                    out.seek(SeekFrom::Current(n as i64))?;
                } else {
                    out.write_all(&buf[..n])?;
                }
                done += n as u64;
            }
            Ok(())
        };
    match format {
        ImageFormat::Raw => {
            let end = map.end();
            for r in &map.ranges {
                out.seek(SeekFrom::Start(r.gpa))?;
                copy(out, &r.block, r.offset, r.length, true)?;
            }
            // Give the file its full length even when it ends in zeros.
            if end > 0 {
                out.seek(SeekFrom::Start(end - 1))?;
                let mut last = [0u8; 1];
                if let Some((b, o, _)) = map.translate(end - 1) {
                    read(b, o, &mut last)?;
                }
                out.write_all(&last)?;
            }
            Ok(end)
        }
        ImageFormat::Elf => {
            let n = map.ranges.len();
            if n > ELF_MAX_RANGES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{n} ranges: more than an ELF program header table holds ({ELF_MAX_RANGES})"),
                ));
            }
            let headers = ELF_EHDR_LEN + ELF_PHDR_LEN * n as u64;
            let mut off = headers.div_ceil(ELF_DATA_ALIGN) * ELF_DATA_ALIGN;
            let mut h = Vec::with_capacity(headers as usize);
            h.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
            h.extend_from_slice(&[0; 8]);
            h.extend_from_slice(&4u16.to_le_bytes()); // e_type ET_CORE
            h.extend_from_slice(&elf_machine(map.layout).to_le_bytes());
            h.extend_from_slice(&1u32.to_le_bytes()); // e_version
            h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
            h.extend_from_slice(&ELF_EHDR_LEN.to_le_bytes()); // e_phoff
            h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
            h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
            h.extend_from_slice(&(ELF_EHDR_LEN as u16).to_le_bytes());
            h.extend_from_slice(&(ELF_PHDR_LEN as u16).to_le_bytes());
            h.extend_from_slice(&(n as u16).to_le_bytes());
            h.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
            for r in &map.ranges {
                h.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
                h.extend_from_slice(&7u32.to_le_bytes()); // PF_R|PF_W|PF_X
                h.extend_from_slice(&off.to_le_bytes());
                h.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr
                h.extend_from_slice(&r.gpa.to_le_bytes()); // p_paddr
                h.extend_from_slice(&r.length.to_le_bytes());
                h.extend_from_slice(&r.length.to_le_bytes());
                h.extend_from_slice(&ELF_DATA_ALIGN.to_le_bytes());
                off = (off + r.length).div_ceil(ELF_DATA_ALIGN) * ELF_DATA_ALIGN;
            }
            out.seek(SeekFrom::Start(0))?;
            out.write_all(&h)?;
            let mut at = headers.div_ceil(ELF_DATA_ALIGN) * ELF_DATA_ALIGN;
            for r in &map.ranges {
                out.seek(SeekFrom::Start(at))?;
                copy(out, &r.block, r.offset, r.length, false)?;
                at = (at + r.length).div_ceil(ELF_DATA_ALIGN) * ELF_DATA_ALIGN;
            }
            let end = map
                .ranges
                .last()
                .map_or(headers, |_| out.stream_position().unwrap_or(at));
            Ok(end)
        }
        ImageFormat::Lime => {
            out.seek(SeekFrom::Start(0))?;
            let mut total = 0u64;
            for r in &map.ranges {
                let mut h = [0u8; LIME_HEADER_LEN];
                h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
                h[4..8].copy_from_slice(&LIME_VERSION.to_le_bytes());
                h[8..16].copy_from_slice(&r.gpa.to_le_bytes());
                h[16..24].copy_from_slice(&(r.end() - 1).to_le_bytes());
                out.write_all(&h)?;
                copy(out, &r.block, r.offset, r.length, false)?;
                total += LIME_HEADER_LEN as u64 + r.length;
            }
            Ok(total)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{map, Options};
    use std::io::Cursor;

    fn sample() -> (PhysMap, Vec<u8>) {
        let ram: Vec<u8> = (0..0x20_0000u32).map(|i| (i % 251) as u8 + 1).collect();
        let m = map(
            Some("pc-i440fx-10.0"),
            &[("pc.ram", ram.len() as u64)],
            &Options::default(),
        )
        .unwrap();
        (m, ram)
    }

    fn reader(ram: &[u8]) -> impl FnMut(&str, u64, &mut [u8]) -> io::Result<()> + '_ {
        move |b, o, buf| {
            assert_eq!(b, "pc.ram");
            buf.copy_from_slice(&ram[o as usize..o as usize + buf.len()]);
            Ok(())
        }
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn raw_is_ram_at_gpa_with_the_hole_zero() {
        let (m, ram) = sample();
        let mut out = Cursor::new(Vec::new());
        let n = write_image(ImageFormat::Raw, &m, &mut out, reader(&ram)).unwrap();
        let f = out.into_inner();
        assert_eq!(n, ram.len() as u64);
        assert_eq!(f.len(), ram.len());
        assert_eq!(&f[..0xa0000], &ram[..0xa0000]);
        assert!(f[0xa0000..0x10_0000].iter().all(|&b| b == 0));
        assert_eq!(&f[0x10_0000..], &ram[0x10_0000..]);
    }

    #[test]
    fn elf_parses_back_to_the_ranges() {
        let (m, ram) = sample();
        let mut out = Cursor::new(Vec::new());
        write_image(ImageFormat::Elf, &m, &mut out, reader(&ram)).unwrap();
        let f = out.into_inner();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([f[16], f[17]]), 4);
        assert_eq!(u16::from_le_bytes([f[18], f[19]]), 62);
        let phnum = u16::from_le_bytes([f[56], f[57]]) as usize;
        assert_eq!(phnum, m.ranges.len());
        for (i, r) in m.ranges.iter().enumerate() {
            let p = 64 + 56 * i;
            assert_eq!(u32::from_le_bytes(f[p..p + 4].try_into().unwrap()), 1);
            let off = u64_at(&f, p + 8) as usize;
            assert_eq!(u64_at(&f, p + 24), r.gpa);
            let len = u64_at(&f, p + 32) as usize;
            assert_eq!(len as u64, r.length);
            assert_eq!(off % 4096, 0);
            assert_eq!(
                &f[off..off + len],
                &ram[r.offset as usize..r.offset as usize + len]
            );
        }
    }

    #[test]
    fn lime_parses_back_to_the_ranges() {
        let (m, ram) = sample();
        let mut out = Cursor::new(Vec::new());
        let n = write_image(ImageFormat::Lime, &m, &mut out, reader(&ram)).unwrap();
        let f = out.into_inner();
        assert_eq!(n as usize, f.len());
        let mut at = 0;
        let mut seen = Vec::new();
        while at < f.len() {
            assert_eq!(
                u32::from_le_bytes(f[at..at + 4].try_into().unwrap()),
                LIME_MAGIC
            );
            assert_eq!(u32::from_le_bytes(f[at + 4..at + 8].try_into().unwrap()), 1);
            let s = u64_at(&f, at + 8);
            let e = u64_at(&f, at + 16);
            let len = (e - s + 1) as usize;
            let d = at + 32;
            assert_eq!(&f[d..d + len], &ram[s as usize..s as usize + len]);
            seen.push((s, e));
            at = d + len;
        }
        let want: Vec<_> = m.ranges.iter().map(|r| (r.gpa, r.end() - 1)).collect();
        assert_eq!(seen, want);
    }
}
