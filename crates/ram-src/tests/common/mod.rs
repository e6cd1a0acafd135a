//! Helpers shared by the ram-src integration tests (each file says `mod
//! common;` and uses the part it needs): seeded guest memory, the block
//! layout `blk0, blk1, ...`, a postcopy-capable `Source` over the tiny
//! template, a destination that emits its placements, and the decoding loop
//! that hands a destination each whole item of a stream.

#![allow(dead_code)]

use qmig_ram_dst::{RamDst, RamDstError, VecMemory};
use qmig_ram_src::{template::tests_support, Config, RamSrc, Source, SrcBlock, Template};
use qmig_wire::{Decoder, Item, Step};

/// Target page size of every test layout (bytes).
pub const PS: usize = 4096;

/// Guest memory: one buffer of each of `lengths` bytes, filled page by page
/// from `seeds` in turn. A seed that is a multiple of 3 leaves its page zero;
/// any other seed `s` fills byte `i` with `i * s` (`(i * s) ^ s` when `mix`).
fn seeded(lengths: impl IntoIterator<Item = usize>, seeds: &[u8], mix: bool) -> Vec<Vec<u8>> {
    let mut k = 0;
    lengths
        .into_iter()
        .map(|l| {
            let mut v = vec![0u8; l];
            for page in v.chunks_mut(PS) {
                let s = seeds[k % seeds.len()];
                k += 1;
                if !s.is_multiple_of(3) {
                    let x = if mix { s } else { 0 };
                    page.iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = (i as u8).wrapping_mul(s) ^ x);
                }
            }
            v
        })
        .collect()
}

/// Seeded memory of blocks `lengths` bytes long (`i * s` pages).
pub fn memory(lengths: &[u64], seeds: &[u8]) -> Vec<Vec<u8>> {
    seeded(lengths.iter().map(|&l| l as usize), seeds, false)
}

/// Seeded memory of blocks `pages` target pages long (`(i * s) ^ s` pages).
pub fn memory_pages(pages: &[usize], seeds: &[u8]) -> Vec<Vec<u8>> {
    seeded(pages.iter().map(|&p| p * PS), seeds, true)
}

/// Blocks `blk0, blk1, ...` of `lengths` bytes, one after the other.
pub fn blocks(lengths: impl IntoIterator<Item = u64>) -> Vec<SrcBlock> {
    let lengths: Vec<u64> = lengths.into_iter().collect();
    let names: Vec<String> = (0..lengths.len()).map(|i| format!("blk{i}")).collect();
    SrcBlock::sequential(names.iter().map(String::as_str).zip(lengths))
}

/// Blocks `blk0, blk1, ...` of `pages` target pages each.
pub fn page_blocks(pages: &[usize]) -> Vec<SrcBlock> {
    blocks(pages.iter().map(|&p| (p * PS) as u64))
}

/// The tiny template (`tests_support`), parsed; leaked so that a
/// [`Source`] over it may live as long as the test.
pub fn template() -> Template<'static> {
    let bytes = Box::leak(tests_support::tiny_template().into_boxed_slice());
    Template::parse(bytes).unwrap()
}

/// A postcopy-capable source over the tiny template with blocks of `pages`.
pub fn postcopy_source(pages: &[usize]) -> Source<'static> {
    let ram = RamSrc::new(page_blocks(pages), Config::default()).unwrap();
    Source::new(template(), ram, true)
}

/// A destination that emits its placements (`Placement::Emit`) for the
/// harness to perform, as the postcopy host does.
pub fn emit_dst() -> RamDst<VecMemory> {
    let cfg = qmig_ram_dst::Config {
        placement: qmig_ram_dst::Placement::Emit,
        ..qmig_ram_dst::Config::default()
    };
    RamDst::new(cfg, VecMemory::new()).unwrap()
}

/// The next whole item of `buf` (the stream from the decoder's position)
/// and its length, or `None` when more bytes are needed or the stream has
/// ended. The vmdesc is given up (it comes last) and a page size the
/// records declare is taken. The caller applies the item, then commits it.
pub fn next_item<'a>(dec: &mut Decoder, buf: &'a [u8]) -> Option<(Item<'a>, usize)> {
    loop {
        match dec.decode(buf, false).expect("stream decodes") {
            Step::Item { item, len } => return Some((item, len)),
            Step::NeedVmdesc => dec.give_up_vmdesc(),
            Step::PageSize { bits } => {
                dec.set_page_bits(bits, qmig_wire::target_page::PageSizeSource::Inferred)
            }
            Step::NeedMore | Step::End => return None,
        }
    }
}

/// Hands `dst` the next whole item of `wire` (from byte `*consumed`, where
/// `dec` stands) and commits it. `Ok(false)` when more bytes are needed or
/// the stream has ended.
///
/// # Errors
/// The destination's refusal of the item (not committed).
pub fn apply_next(
    dec: &mut Decoder,
    dst: &mut RamDst<VecMemory>,
    wire: &[u8],
    consumed: &mut usize,
) -> Result<bool, RamDstError> {
    let Some((item, len)) = next_item(dec, &wire[*consumed..]) else {
        return Ok(false);
    };
    dst.handle_item(dec.position(), len, &item)?;
    dec.commit(&item, len);
    *consumed += len;
    Ok(true)
}
