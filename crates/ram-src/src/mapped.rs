//! Writing mapped-ram files (wire-format §14; QEMU 9.0+ `migrate file:`
//! with the `mapped-ram` capability): [`MappedRamWriter`].
//!
//! QEMU's `ram_save_setup` writes, for each block of the MEM_SIZE list, the
//! block entry followed by a 28-byte header ([`MappedRamHeader::plan`]), and
//! the stream then continues at `pages_offset + used_length`. Page `i` of
//! the block lives at `pages_offset + i × page_size`; a page found all zero
//! keeps its bitmap bit clear and is not written, so the file is sparse; the
//! bitmap (little-endian 64-bit words) is written at the position right
//! after the header once the pages are in place. The loader
//! (`parse_ramblock_mapped_ram`, `read_ramblock_mapped_ram`) reads the
//! header, the bitmap and the pages whose bit is set, and seeks past the
//! region; PAGE, ZERO, XBZRLE and MULTIFD_FLUSH records are invalid in such
//! a stream, and the configuration must list `mapped-ram`
//! ([`set_mapped_ram_capability`]).
//!
//! The writer takes the stream bytes around the RAM (header,
//! configuration, section headers, device state, vmdesc) through its
//! [`Write`] implementation and each block through
//! [`MappedRamWriter::block`], which seeks only forward over pages it leaves
//! out and once back to the bitmap.
//!
//! ```
//! use std::io::Cursor;
//! use qmig_ram_src::mapped::MappedRamWriter;
//! use qmig_wire::MemBlock;
//! let mut ram = vec![0u8; 4 * 4096];
//! ram[4096] = 7; // page 1 is the only non-zero page
//! let mut w = MappedRamWriter::new(Cursor::new(Vec::new()), 4096)?;
//! w.mem_size(ram.len() as u64)?;
//! let block = MemBlock { name: "pc.ram", used_length: ram.len() as u64, page_size: None, addr: None };
//! let n = w.block(&block, &mut &ram[..], &|_| true)?;
//! assert_eq!((n.written, n.zero), (1, 3));
//! # Ok::<(), qmig_ram_src::mapped::MappedRamWriteError>(())
//! ```

use std::io::{self, Seek, SeekFrom, Write};

use qmig_wire::mapped_ram::{bitmap_len, set_page, MappedRam, MappedRamHeader};
use qmig_wire::{Configuration, Item, MemBlock, RamRecord, SectionKind, WireError};

use crate::Template;

use crate::zero::is_zero;

/// Why a mapped-ram file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MappedRamWriteError {
    /// A record or header would not read back (the rule is named).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The calls do not describe a valid file: a block before MEM_SIZE,
    /// block lengths beyond the MEM_SIZE total, a block with a postcopy
    /// page-size field, source bytes of the wrong length.
    #[error("mapped-ram file offset {offset}: {why}")]
    Layout {
        /// File offset reached.
        offset: u64,
        /// The rule broken.
        why: String,
    },
    /// Reading the block's bytes or writing the file failed.
    #[error("mapped-ram file offset {offset}: {what}: {source}")]
    Io {
        /// File offset reached.
        offset: u64,
        /// What was being read or written.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Where a block's bytes come from.
pub trait BlockBytes {
    /// `len` bytes of the block from byte `offset` on.
    ///
    /// # Errors
    /// Any I/O error of the underlying memory; the writer reports it with
    /// the file offset reached.
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]>;
}

impl BlockBytes for &[u8] {
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(len)?))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at {offset:#x} of a {:#x}-byte image",
                        self.len()
                    ),
                )
            })
    }
}

/// What [`MappedRamWriter::block`] did with a block's pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Pages written (bitmap bit set): QEMU's `normal`.
    pub written: u64,
    /// Kept pages found all zero (bit clear, not written): QEMU's `duplicate`.
    pub zero: u64,
    /// Pages the caller left out (bit clear, not written).
    pub left_out: u64,
}

/// Writes a mapped-ram file to a seekable output. Stream offsets are the
/// output's positions, starting where it stood when created (the QEMU
/// stream starts at file offset 0 in a file QEMU writes). See the module
/// documentation.
#[derive(Debug)]
pub struct MappedRamWriter<W> {
    out: W,
    /// Logical stream position (where the next stream byte goes).
    pos: u64,
    /// Where the output's cursor actually is.
    cursor: u64,
    page_size: u64,
    total: Option<u64>,
    sum: u64,
    scratch: Vec<u8>,
}

/// Bytes of a block read and scanned at a time.
const CHUNK: usize = 1 << 20;

impl<W: Write + Seek> MappedRamWriter<W> {
    /// A writer at the output's current position, for target pages of
    /// `page_size` bytes.
    ///
    /// # Errors
    /// [`MappedRamWriteError::Wire`] for a page size QEMU cannot have (not
    /// a power of two in 1 KiB..=64 KiB); [`MappedRamWriteError::Io`] when
    /// the position cannot be read.
    pub fn new(mut out: W, page_size: u64) -> Result<Self, MappedRamWriteError> {
        MappedRamHeader::plan(0, 0, page_size)?;
        let pos = out
            .stream_position()
            .map_err(|source| MappedRamWriteError::Io {
                offset: 0,
                what: "output position",
                source,
            })?;
        Ok(MappedRamWriter {
            out,
            pos,
            cursor: pos,
            page_size,
            total: None,
            sum: 0,
            scratch: Vec::new(),
        })
    }

    /// The stream offset the next byte goes to.
    #[must_use]
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> MappedRamWriteError {
        let offset = self.pos;
        move |source| MappedRamWriteError::Io {
            offset,
            what,
            source,
        }
    }

    /// Writes `b` at file offset `at`, seeking only when the cursor is
    /// elsewhere.
    fn put_at(&mut self, at: u64, b: &[u8]) -> Result<(), MappedRamWriteError> {
        if self.cursor != at {
            self.out
                .seek(SeekFrom::Start(at))
                .map_err(self.io("seeking the output"))?;
            self.cursor = at;
        }
        self.out
            .write_all(b)
            .map_err(self.io("writing the output"))?;
        self.cursor += b.len() as u64;
        Ok(())
    }

    /// Writes stream bytes at the current position.
    ///
    /// # Errors
    /// [`MappedRamWriteError::Io`].
    pub fn write_stream(&mut self, b: &[u8]) -> Result<(), MappedRamWriteError> {
        self.put_at(self.pos, b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Writes the MEM_SIZE record's header word (`total`: the sum of the
    /// block lengths); the blocks follow with [`block`](Self::block).
    ///
    /// # Errors
    /// [`MappedRamWriteError::Wire`] for a total with bits below 1 KiB set;
    /// [`MappedRamWriteError::Io`].
    pub fn mem_size(&mut self, total: u64) -> Result<(), MappedRamWriteError> {
        let mut b = std::mem::take(&mut self.scratch);
        b.clear();
        Item::MappedRam(MappedRam::MemSize { total }).write(&mut b)?;
        self.write_stream(&b)?;
        self.scratch = b;
        self.total = Some(total);
        self.sum = 0;
        Ok(())
    }

    /// Writes one block: its MEM_SIZE entry with the header, the pages
    /// `keep` accepts (by page index) that are not all zero at their fixed
    /// offsets, then the bitmap; the stream continues after the block's
    /// region. `src` gives the block's `used_length` bytes.
    ///
    /// # Errors
    /// [`MappedRamWriteError::Layout`] when no MEM_SIZE came first, the
    /// block is empty, the lengths exceed its total or the entry has a
    /// page-size field (after an error the file is not usable);
    /// [`MappedRamWriteError::Wire`] for a name, length or offset the
    /// reader would refuse; [`MappedRamWriteError::Io`] when `src` or the
    /// output fails.
    pub fn block(
        &mut self,
        block: &MemBlock<'_>,
        src: &mut dyn BlockBytes,
        keep: &dyn Fn(u64) -> bool,
    ) -> Result<BlockCounts, MappedRamWriteError> {
        let layout = |offset: u64, why: String| MappedRamWriteError::Layout { offset, why };
        let Some(total) = self.total else {
            return Err(layout(
                self.pos,
                "a block before the MEM_SIZE record".into(),
            ));
        };
        if block.used_length == 0 {
            // The loader reads entries only while the lengths read stay
            // below the total: an empty block would be read as a record.
            return Err(layout(
                self.pos,
                format!("block \"{}\" has no pages", block.name),
            ));
        }
        match self.sum.checked_add(block.used_length) {
            Some(s) if s <= total => self.sum = s,
            _ => {
                return Err(layout(
                    self.pos,
                    format!(
                        "block \"{}\" takes the lengths past the MEM_SIZE total {total:#x}",
                        block.name
                    ),
                ))
            }
        }
        let ps = self.page_size;
        // The entry's length does not depend on the header's values.
        let mut entry = std::mem::take(&mut self.scratch);
        entry.clear();
        let placeholder = MappedRamHeader {
            version: 0,
            page_size: 0,
            bitmap_offset: 0,
            pages_offset: 0,
        };
        Item::MappedRam(MappedRam::Block {
            block: *block,
            header: placeholder,
        })
        .write(&mut entry)?;
        let header = MappedRamHeader::plan(self.pos + entry.len() as u64, block.used_length, ps)?;
        entry.clear();
        Item::MappedRam(MappedRam::Block {
            block: *block,
            header,
        })
        .write(&mut entry)?;
        self.write_stream(&entry)?;
        self.scratch = entry;

        let pages = block.used_length / ps;
        let mut bitmap = vec![0u8; bitmap_len(pages) as usize];
        let mut counts = BlockCounts::default();
        let page = ps as usize;
        let chunk = CHUNK.max(page);
        let mut off = 0u64;
        while off < block.used_length {
            let n = (block.used_length - off).min(chunk as u64) as usize;
            let data = src.bytes(off, n).map_err(self.io("reading the block"))?;
            if data.len() != n {
                return Err(layout(
                    self.pos,
                    format!(
                        "{} bytes given for {n} of block \"{}\"",
                        data.len(),
                        block.name
                    ),
                ));
            }
            let first = off / ps;
            // Runs of written pages become one write each.
            let mut run: Option<usize> = None;
            let mut k = 0;
            for pg in data.chunks_exact(page) {
                let p = first + k as u64;
                let write = if !keep(p) {
                    counts.left_out += 1;
                    false
                } else if is_zero(pg) {
                    counts.zero += 1;
                    false
                } else {
                    counts.written += 1;
                    set_page(&mut bitmap, p);
                    true
                };
                match (write, run) {
                    (true, None) => run = Some(k),
                    (false, Some(s)) => {
                        let at = header.pages_offset + (first + s as u64) * ps;
                        self.put_at(at, &data[s * page..k * page])?;
                        run = None;
                    }
                    _ => {}
                }
                k += 1;
            }
            if let Some(s) = run {
                let at = header.pages_offset + (first + s as u64) * ps;
                self.put_at(at, &data[s * page..k * page])?;
            }
            off += n as u64;
        }
        self.put_at(header.bitmap_offset, &bitmap)?;
        self.pos = header.pages_offset + block.used_length;
        Ok(counts)
    }

    /// Flushes the output and gives it back.
    ///
    /// # Errors
    /// [`MappedRamWriteError::Io`].
    pub fn finish(mut self) -> Result<W, MappedRamWriteError> {
        self.out.flush().map_err(self.io("flushing the output"))?;
        Ok(self.out)
    }
}

/// Sequential stream bytes (header, sections, device state...).
impl<W: Write + Seek> Write for MappedRamWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_stream(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Rewrites a stream prefix (the 8-byte header, the configuration section,
/// and whatever follows) with `mapped-ram` listed (`on`) or not in the
/// configuration's capabilities ([`Configuration::set_capability`]). A
/// prefix whose configuration already says so, or that has no
/// configuration section, comes back unchanged.
///
/// # Errors
/// [`WireError`] when the configuration does not parse or cannot be
/// written back.
pub fn set_mapped_ram_capability(prefix: &[u8], on: bool) -> Result<Vec<u8>, WireError> {
    const HEADER: usize = 8;
    if prefix.get(HEADER) != Some(&qmig_wire::header::CONFIGURATION) {
        return Ok(prefix.to_vec());
    }
    // The decoder needs the byte after the last subsection: give it one
    // that is not a subsection marker when the prefix ends there.
    let mut buf = prefix[HEADER..].to_vec();
    buf.push(0);
    let (mut c, len): (Configuration<'_>, usize) =
        qmig_wire::header::decode_configuration(&buf, HEADER as u64)?;
    if c.has_capability("mapped-ram") == on {
        return Ok(prefix.to_vec());
    }
    c.set_capability("mapped-ram", on);
    let mut out = prefix[..HEADER].to_vec();
    c.write(&mut out)?;
    out.extend_from_slice(&prefix[HEADER + len..]);
    Ok(out)
}

/// Writes a whole mapped-ram file: the container of template stream `t`
/// (header and configuration, with `mapped-ram` listed; the `ram` section's
/// id, instance, version and footers; SWITCHOVER_START if it had it; its
/// device sections, EOF and vmdesc byte for byte) around `blocks` (name,
/// final content), laid out as QEMU 10's `migrate file:` with `mapped-ram`
/// does ([`MappedRamWriter`]). A block's guest address field is the
/// template's (`x-ignore-shared`). Returns the page counts and `out`.
///
/// # Errors
/// [`MappedRamWriteError`] when the template's container or a block cannot
/// be written.
pub fn write_from_template<W: Write + Seek>(
    t: &Template<'_>,
    blocks: &[(&str, &[u8])],
    out: W,
) -> Result<(BlockCounts, W), MappedRamWriteError> {
    let mut w = MappedRamWriter::new(out, 1u64 << t.page_bits)?;
    let template = |w: &MappedRamWriter<W>, e: crate::RamSrcError| MappedRamWriteError::Layout {
        offset: w.position(),
        why: e.to_string(),
    };
    let mut buf = Vec::new();
    t.write_prefix(&mut buf);
    let mut buf = set_mapped_ram_capability(&buf, true)?;
    t.begin_section(SectionKind::Start, &mut buf)
        .map_err(|e| template(&w, e))?;
    w.write_stream(&buf)?;
    let total = blocks.iter().map(|(_, d)| d.len() as u64).sum();
    w.mem_size(total)?;
    let mut counts = BlockCounts::default();
    for (name, data) in blocks {
        let block = MemBlock {
            name,
            used_length: data.len() as u64,
            page_size: None,
            addr: t.mem_block(name).and_then(|b| b.addr),
        };
        let c = w.block(&block, &mut &data[..], &|_| true)?;
        counts.written += c.written;
        counts.zero += c.zero;
        counts.left_out += c.left_out;
    }
    buf.clear();
    RamRecord::eos().write(&mut buf)?;
    t.end_section(&mut buf);
    t.write_switchover(&mut buf).map_err(|e| template(&w, e))?;
    t.begin_section(SectionKind::End, &mut buf)
        .map_err(|e| template(&w, e))?;
    RamRecord::eos().write(&mut buf)?;
    t.end_section(&mut buf);
    t.write_tail(&mut buf);
    w.write_stream(&buf)?;
    Ok((counts, w.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use qmig_wire::{ConfigBody, ConfigSubsection, SectionHeader, SliceReader};
    use std::io::Cursor;

    /// A whole mapped-ram stream of `blocks` (name, bytes) with `keep`
    /// deciding per (block, page), plus the counts.
    fn file(
        blocks: &[(String, Vec<u8>)],
        ps: u64,
        keep: &dyn Fn(usize, u64) -> bool,
    ) -> (Vec<u8>, Vec<BlockCounts>) {
        let mut s = Vec::new();
        qmig_wire::header::write_header(&mut s);
        Configuration {
            machine: "pc-i440fx-10.0",
            subsections: vec![ConfigSubsection {
                name: "configuration/target-page-bits",
                version: 1,
                body: ConfigBody::TargetPageBits(ps.trailing_zeros()),
            }],
        }
        .write(&mut s)
        .unwrap();
        let s = set_mapped_ram_capability(&s, true).unwrap();
        let mut w = MappedRamWriter::new(Cursor::new(Vec::new()), ps).unwrap();
        w.write_stream(&s).unwrap();
        let mut b = Vec::new();
        SectionHeader::start(2, "ram", 0, 4).write(&mut b).unwrap();
        w.write_stream(&b).unwrap();
        w.mem_size(blocks.iter().map(|(_, d)| d.len() as u64).sum())
            .unwrap();
        let mut counts = Vec::new();
        for (k, (name, data)) in blocks.iter().enumerate() {
            let block = MemBlock {
                name,
                used_length: data.len() as u64,
                page_size: None,
                addr: None,
            };
            counts.push(w.block(&block, &mut &data[..], &|p| keep(k, p)).unwrap());
        }
        b.clear();
        RamRecord::eos().write(&mut b).unwrap();
        SectionHeader {
            kind: SectionKind::End,
            section_id: 2,
            ident: None,
        }
        .write(&mut b)
        .unwrap();
        RamRecord::eos().write(&mut b).unwrap();
        b.push(0); // EOF
        w.write_stream(&b).unwrap();
        (w.finish().unwrap().into_inner(), counts)
    }

    /// Reads a mapped-ram stream back: per block, the pages whose bit is
    /// set (others zero).
    fn read(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        let mut bitmap = Vec::new();
        let mut ps = 0;
        for it in SliceReader::new(stream) {
            match it.expect("the written file parses").1 {
                Item::MappedRam(MappedRam::Block { block, header }) => {
                    ps = header.page_size as usize;
                    out.push((block.name.to_string(), vec![0; block.used_length as usize]));
                }
                Item::MappedRam(MappedRam::Bitmap(b)) => bitmap = b.to_vec(),
                Item::MappedRam(MappedRam::Pages { first, data }) => {
                    let img = &mut out.last_mut().unwrap().1;
                    for (k, pg) in data.chunks(ps).enumerate() {
                        let p = first + k as u64;
                        if qmig_wire::mapped_ram::page_is_set(&bitmap, p) {
                            let o = p as usize * ps;
                            img[o..o + ps].copy_from_slice(pg);
                        }
                    }
                }
                Item::Ram(r) => assert!(
                    matches!(r.body, qmig_wire::RamBody::Eos),
                    "page record in a mapped-ram file"
                ),
                _ => {}
            }
        }
        out
    }

    /// Page bits, blocks (name, bytes), pages left out.
    type Generated = (u32, Vec<(String, Vec<u8>)>, Vec<bool>);

    fn blocks() -> impl Strategy<Value = Generated> {
        (10u32..=13).prop_flat_map(|bits| {
            let ps = 1usize << bits;
            let block = (
                "[a-z./]{1,12}",
                prop::collection::vec((0u8..3, any::<u8>()), 1..70),
            )
                .prop_map(move |(n, pages)| {
                    let mut d = vec![0u8; pages.len() * ps];
                    for (i, (kind, v)) in pages.iter().enumerate() {
                        match kind {
                            0 => {}
                            1 => d[i * ps + (*v as usize % ps)] = v | 1,
                            _ => d[i * ps..(i + 1) * ps].fill(v | 1),
                        }
                    }
                    (n, d)
                });
            (
                Just(bits),
                prop::collection::vec(block, 1..4),
                prop::collection::vec(any::<bool>(), 0..300),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn written_files_read_back((bits, mut bl, drop) in blocks()) {
            // Distinct names, as MEM_SIZE needs.
            for (i, b) in bl.iter_mut().enumerate() {
                b.0 = format!("{i}{}", b.0);
            }
            let ps = 1u64 << bits;
            let keep = |k: usize, p: u64| !drop.get(k * 100 + p as usize).copied().unwrap_or(false);
            let (f, counts) = file(&bl, ps, &keep);
            // serialize(parse(b)) == b.
            let mut again = Vec::new();
            for it in SliceReader::new(&f) {
                it.unwrap().1.write(&mut again).unwrap();
            }
            prop_assert!(again == f);
            let got = read(&f);
            prop_assert_eq!(got.len(), bl.len());
            for (k, ((n, img), (gn, gimg))) in bl.iter().zip(&got).enumerate() {
                prop_assert_eq!(n, gn);
                let mut want = img.clone();
                let mut c = BlockCounts::default();
                for (p, pg) in want.chunks_mut(ps as usize).enumerate() {
                    if !keep(k, p as u64) {
                        pg.fill(0);
                        c.left_out += 1;
                    } else if pg.iter().all(|&b| b == 0) {
                        c.zero += 1;
                    } else {
                        c.written += 1;
                    }
                }
                prop_assert!(&want == gimg, "block {} differs", n);
                prop_assert_eq!(counts[k], c);
            }
        }
    }

    #[test]
    fn calls_out_of_order_are_refused() {
        let mut w = MappedRamWriter::new(Cursor::new(Vec::new()), 4096).unwrap();
        let b = MemBlock {
            name: "pc.ram",
            used_length: 8192,
            page_size: None,
            addr: None,
        };
        let data = vec![1u8; 8192];
        let e = w.block(&b, &mut &data[..], &|_| true).unwrap_err();
        assert!(e.to_string().contains("before the MEM_SIZE"), "{e}");
        let fresh = |total| {
            let mut w = MappedRamWriter::new(Cursor::new(Vec::new()), 4096).unwrap();
            w.mem_size(total).unwrap();
            w
        };
        let e = fresh(4096)
            .block(&b, &mut &data[..], &|_| true)
            .unwrap_err();
        assert!(e.to_string().contains("past the MEM_SIZE total"), "{e}");
        let short = vec![1u8; 4096];
        let e = fresh(8192)
            .block(&b, &mut &short[..], &|_| true)
            .unwrap_err();
        assert!(matches!(e, MappedRamWriteError::Io { .. }), "{e}");
        for (blk, want) in [
            (
                MemBlock {
                    used_length: 4000,
                    ..b
                },
                "multiple of the page size",
            ),
            (
                MemBlock {
                    used_length: 0,
                    ..b
                },
                "no pages",
            ),
            (
                MemBlock {
                    page_size: Some(1 << 21),
                    used_length: 4096,
                    ..b
                },
                "page-size field",
            ),
        ] {
            let e = fresh(8192)
                .block(&blk, &mut &data[..], &|_| true)
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(MappedRamWriter::new(Cursor::new(Vec::new()), 3000).is_err());
    }

    #[test]
    fn capability_is_listed_and_unlisted() {
        let mut s = Vec::new();
        qmig_wire::header::write_header(&mut s);
        Configuration {
            machine: "pc",
            subsections: vec![ConfigSubsection {
                name: "configuration/uuid",
                version: 1,
                body: ConfigBody::Uuid([7; 16]),
            }],
        }
        .write(&mut s)
        .unwrap();
        s.extend_from_slice(&[0x04, 0, 0, 0, 2]); // a following section
        let on = set_mapped_ram_capability(&s, true).unwrap();
        let (c, n) = qmig_wire::header::decode_configuration(&on[8..], 8).unwrap();
        assert!(c.has_capability("mapped-ram"));
        // Capabilities come before the uuid, as in vmstate_configuration.
        assert!(matches!(c.subsections[0].body, ConfigBody::Capabilities(_)));
        assert_eq!(&on[8 + n..], &[0x04, 0, 0, 0, 2]);
        assert_eq!(set_mapped_ram_capability(&on, true).unwrap(), on);
        assert_eq!(set_mapped_ram_capability(&on, false).unwrap(), s);
        // No configuration section: unchanged.
        let bare = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x01];
        assert_eq!(set_mapped_ram_capability(&bare, true).unwrap(), bare);
    }
}
