//! Guest-physical placement of QEMU RAM blocks.
//!
//! A migration stream names RAM blocks (`pc.ram`, `mach-virt.ram`, a
//! `memory-backend-*` id...) and gives their lengths in bytes, but not where
//! the guest sees them. This crate rebuilds that from the machine type (the
//! stream's configuration section) and the machine options the stream does
//! not carry (`max-ram-below-4g`), following the rules of QEMU's board code
//! (`pc_init1` in `hw/i386/pc_piix.c`, `pc_q35_init` in `hw/i386/pc_q35.c`,
//! `microvm_memory_init` in `hw/i386/microvm.c`, the `VIRT_MEM` region of
//! `hw/arm/virt.c`), checked against `info mtree -f` of QEMU 10.0.
//!
//! The machine's RAM is the concatenation of its RAM blocks (one `pc.ram`, or
//! one block per memory backend in node order); that "RAM offset" space is
//! split into a part below 4 GiB and a part from 4 GiB on, and x86 layouts
//! leave out the legacy hole where VGA and BIOS shadow RAM.
//!
//! ```
//! use qmig_phys::{map, Options};
//! let m = map(Some("pc-q35-10.0"), &[("pc.ram", 4 << 30), ("pc.bios", 256 << 10)], &Options::default())?;
//! assert_eq!(m.below_4g, 2 << 30);
//! assert_eq!(m.translate(0x1_0000_0000), Some(("pc.ram", 2 << 30, 2 << 30)));
//! # Ok::<(), qmig_phys::PhysError>(())
//! ```

use std::fmt;
use std::str::FromStr;

pub mod image;

/// 1 GiB in bytes.
pub const GIB: u64 = 1 << 30;
/// The 4 GiB boundary: RAM that does not fit below it continues here.
pub const FOUR_GIB: u64 = 4 * GIB;
/// Where aarch64/arm `virt` RAM starts (QEMU's `VIRT_MEM` base).
pub const VIRT_RAM_BASE: u64 = 0x4000_0000;
/// The x86 legacy hole on `pc` and `q35`: VGA window and BIOS/option ROM
/// shadow (`0xa0000..0x100000`, half-open).
pub const LEGACY_HOLE: (u64, u64) = (0xa_0000, 0x10_0000);
/// The part of low RAM the BIOS is mapped over on `microvm`.
pub const MICROVM_HOLE: (u64, u64) = (0xe_0000, 0x10_0000);

/// Why a physical map could not be built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PhysError {
    /// The machine type is not one whose layout is known and none was given.
    #[error("machine type {machine:?} has no known guest-physical layout; give one (--machine-layout pc|pc-legacy|q35|microvm|virt|flat)")]
    UnknownMachine {
        /// The machine type from the stream (`None`: the stream has no
        /// configuration section).
        machine: Option<String>,
    },
    /// A layout name that is not one of the known ones.
    #[error("unknown machine layout {0:?} (expected pc, pc-legacy, q35, microvm, virt or flat)")]
    UnknownLayout(String),
    /// No RAM block could be identified as the machine's RAM.
    #[error("no RAM block is the machine's RAM (no pc.ram/microvm.ram/mach-virt.ram and no memory-backend block); name them explicitly")]
    NoRamBlock,
    /// Two RAM blocks with one name (QEMU's block names are unique).
    #[error("RAM block {0:?} is listed twice")]
    DuplicateBlock(String),
    /// A RAM block named explicitly is not in the stream.
    #[error("RAM block {0:?} is not in the stream")]
    MissingBlock(String),
    /// `max-ram-below-4g` outside what QEMU accepts or given for a machine
    /// that has no such option.
    #[error("max-ram-below-4g {value:#x}: {rule}")]
    BadMaxRamBelow4g {
        /// The value given, in bytes.
        value: u64,
        /// The rule broken.
        rule: &'static str,
    },
    /// The RAM does not fit in a 64-bit guest-physical address space.
    #[error(
        "RAM of {ram_size:#x} bytes does not fit the guest-physical address space from {base:#x}"
    )]
    TooLarge {
        /// Total RAM, in bytes.
        ram_size: u64,
        /// Where it would start.
        base: u64,
    },
}

/// How a machine places its RAM in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineLayout {
    /// i440FX `pc` from machine version 2.0 on: 3.5 GiB below 4 GiB by
    /// default, lowered to 3 GiB when RAM does not fit (gigabyte alignment).
    Pc,
    /// i440FX `pc` up to machine version 1.7: no gigabyte alignment.
    PcLegacy,
    /// `q35`: 2 GiB below 4 GiB when RAM ≥ 2.75 GiB, else all of it.
    Q35,
    /// x86 `microvm`: up to 3 GiB below 4 GiB.
    Microvm,
    /// arm/aarch64 `virt`: contiguous from 1 GiB.
    Virt,
    /// Contiguous from guest-physical 0, no hole.
    Flat,
}

impl MachineLayout {
    /// The layout's name (as accepted by [`FromStr`]).
    pub fn name(self) -> &'static str {
        match self {
            MachineLayout::Pc => "pc",
            MachineLayout::PcLegacy => "pc-legacy",
            MachineLayout::Q35 => "q35",
            MachineLayout::Microvm => "microvm",
            MachineLayout::Virt => "virt",
            MachineLayout::Flat => "flat",
        }
    }

    /// The layout of a QEMU machine type name as the configuration section
    /// carries it (`pc-i440fx-10.0`, `pc-q35-9.2`, `microvm`, `virt-10.0`);
    /// `None` for machine types this crate does not know.
    pub fn for_machine(machine: &str) -> Option<MachineLayout> {
        let m = machine.trim();
        if m == "pc" {
            return Some(MachineLayout::Pc);
        }
        if let Some(v) = m.strip_prefix("pc-i440fx-") {
            return Some(if old_pc_version(v) {
                MachineLayout::PcLegacy
            } else {
                MachineLayout::Pc
            });
        }
        if m.starts_with("pc-0.") || m.starts_with("pc-1.") {
            return Some(MachineLayout::PcLegacy);
        }
        if m == "q35" || m.starts_with("pc-q35-") {
            return Some(MachineLayout::Q35);
        }
        if m == "microvm" {
            return Some(MachineLayout::Microvm);
        }
        if m == "virt" || m.starts_with("virt-") {
            return Some(MachineLayout::Virt);
        }
        None
    }

    /// The legacy hole this layout leaves out of RAM (half-open, bytes).
    pub fn hole(self) -> Option<(u64, u64)> {
        match self {
            MachineLayout::Pc | MachineLayout::PcLegacy | MachineLayout::Q35 => Some(LEGACY_HOLE),
            MachineLayout::Microvm => Some(MICROVM_HOLE),
            MachineLayout::Virt | MachineLayout::Flat => None,
        }
    }
}

/// `pc-i440fx-X.Y` with X.Y ≤ 1.7 (no gigabyte alignment).
fn old_pc_version(v: &str) -> bool {
    let mut it = v.split('.');
    let major = it.next().and_then(|s| s.parse::<u32>().ok());
    matches!(major, Some(0 | 1))
}

impl FromStr for MachineLayout {
    type Err = PhysError;
    fn from_str(s: &str) -> Result<Self, PhysError> {
        Ok(match s {
            "pc" | "i440fx" => MachineLayout::Pc,
            "pc-legacy" => MachineLayout::PcLegacy,
            "q35" => MachineLayout::Q35,
            "microvm" => MachineLayout::Microvm,
            "virt" => MachineLayout::Virt,
            "flat" => MachineLayout::Flat,
            other => return Err(PhysError::UnknownLayout(other.to_string())),
        })
    }
}

impl fmt::Display for MachineLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the stream does not say about the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The layout, instead of the one of the stream's machine type.
    pub layout: Option<MachineLayout>,
    /// The machine's `max-ram-below-4g` property, in bytes (x86 `pc`/`q35`
    /// only; 0 or `None` is QEMU's default).
    pub max_ram_below_4g: Option<u64>,
    /// The machine's RAM blocks in address order (memory backends in NUMA
    /// node order), instead of the ones found by name.
    pub ram_blocks: Option<Vec<String>>,
}

/// A run of guest-physical memory backed by one RAM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// The RAM block.
    pub block: String,
    /// Offset in the block of `gpa`, in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl PhysRange {
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.length
    }
}

/// Where the machine's RAM blocks sit in guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysMap {
    /// The layout used.
    pub layout: MachineLayout,
    /// Total machine RAM (sum of its RAM blocks), in bytes.
    pub ram_size: u64,
    /// Bytes of RAM below 4 GiB (x86), or all of it.
    pub below_4g: u64,
    /// Bytes of RAM from 4 GiB on (x86), else 0.
    pub above_4g: u64,
    /// The RAM blocks making up machine RAM, in address order.
    pub ram_blocks: Vec<String>,
    /// The ranges, sorted by `gpa`, not overlapping.
    pub ranges: Vec<PhysRange>,
    /// The legacy hole left out (half-open), when the layout has one and
    /// RAM reaches it.
    pub hole: Option<(u64, u64)>,
}

impl PhysMap {
    /// The block, block offset and bytes left in that range for
    /// guest-physical address `gpa`; `None` when `gpa` is not RAM.
    pub fn translate(&self, gpa: u64) -> Option<(&str, u64, u64)> {
        let i = self.ranges.partition_point(|r| r.end() <= gpa);
        let r = self.ranges.get(i)?;
        if gpa < r.gpa {
            return None;
        }
        let d = gpa - r.gpa;
        Some((r.block.as_str(), r.offset + d, r.length - d))
    }

    /// One past the highest RAM address (0 when there is no RAM).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, PhysRange::end)
    }

    /// The ranges of block `name`, in address order.
    pub fn ranges_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a PhysRange> + 'a {
        self.ranges.iter().filter(move |r| r.block == name)
    }
}

/// Block names that are firmware, never machine RAM (without a `/`, so they
/// look like memory-backend ids).
const FIRMWARE: &[&str] = &[
    "pc.bios",
    "pc.rom",
    "isa-bios",
    "virt.flash0",
    "virt.flash1",
    "microvm.bios",
    "x86.bios",
];

/// The main RAM block names of the boards this crate knows.
const MAIN_RAM: &[&str] = &["pc.ram", "microvm.ram", "mach-virt.ram"];

fn is_firmware(name: &str) -> bool {
    FIRMWARE.contains(&name)
        || name.contains('/')
        || name.ends_with(".rom")
        || name.ends_with(".bios")
        || name.contains(".flash")
}

/// Picks the machine RAM blocks: the board's own RAM block by name, else
/// every block that looks like a memory backend (no `/`, not firmware), in
/// stream order.
fn pick_ram<'a>(blocks: &[(&'a str, u64)], layout: MachineLayout) -> Vec<(&'a str, u64)> {
    if let Some(b) = blocks.iter().find(|(n, _)| MAIN_RAM.contains(n)) {
        return vec![*b];
    }
    if layout == MachineLayout::Flat {
        if let Some(b) = blocks.iter().find(|(n, _)| n.ends_with(".ram")) {
            return vec![*b];
        }
    }
    blocks
        .iter()
        .filter(|(n, _)| !is_firmware(n))
        .copied()
        .collect()
}

/// Bytes below 4 GiB for `ram_size` bytes of RAM under `layout`.
///
/// # Errors
/// [`PhysError::BadMaxRamBelow4g`] for a value above 4 GiB, or one given
/// for a layout without that property.
pub fn below_4g(
    layout: MachineLayout,
    ram_size: u64,
    max_ram_below_4g: Option<u64>,
) -> Result<u64, PhysError> {
    let mrb = max_ram_below_4g.filter(|&v| v != 0);
    if let Some(v) = mrb {
        if v > FOUR_GIB {
            return Err(PhysError::BadMaxRamBelow4g {
                value: v,
                rule: "QEMU refuses a value above 4 GiB",
            });
        }
        if !matches!(
            layout,
            MachineLayout::Pc | MachineLayout::PcLegacy | MachineLayout::Q35
        ) {
            return Err(PhysError::BadMaxRamBelow4g {
                value: v,
                rule: "only the pc and q35 machines have this property",
            });
        }
    }
    let lowmem = match layout {
        MachineLayout::Pc | MachineLayout::PcLegacy => {
            // Default split 3.5 GiB; when RAM does not fit below it, newer
            // machine types move it down to 3 GiB (never up).
            let mrb = mrb.unwrap_or(0xe000_0000);
            if layout == MachineLayout::Pc && ram_size >= mrb && mrb > 0xc000_0000 {
                0xc000_0000
            } else {
                mrb
            }
        }
        MachineLayout::Q35 => {
            let base = if ram_size >= 0xb000_0000 {
                0x8000_0000
            } else {
                0xb000_0000
            };
            base.min(mrb.unwrap_or(FOUR_GIB))
        }
        MachineLayout::Microvm => 0xc000_0000,
        MachineLayout::Virt | MachineLayout::Flat => return Ok(ram_size),
    };
    Ok(if ram_size >= lowmem { lowmem } else { ram_size })
}

/// Builds the guest-physical map of a machine.
///
/// `machine` is the machine type of the stream's configuration section (if
/// any); `blocks` are the stream's RAM blocks (name, used length in bytes) in
/// stream order.
///
/// # Errors
/// See [`PhysError`]: no layout for the machine, no RAM block, a bad
/// `max-ram-below-4g`, a named block missing, RAM too large.
pub fn map(
    machine: Option<&str>,
    blocks: &[(&str, u64)],
    opts: &Options,
) -> Result<PhysMap, PhysError> {
    let layout = match opts.layout {
        Some(l) => l,
        None => machine
            .and_then(MachineLayout::for_machine)
            .ok_or_else(|| PhysError::UnknownMachine {
                machine: machine.map(str::to_string),
            })?,
    };
    for (i, (n, _)) in blocks.iter().enumerate() {
        if blocks[..i].iter().any(|(m, _)| m == n) {
            return Err(PhysError::DuplicateBlock(n.to_string()));
        }
    }
    if let Some(names) = &opts.ram_blocks {
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(PhysError::DuplicateBlock(n.clone()));
            }
        }
    }
    let ram: Vec<(&str, u64)> = match &opts.ram_blocks {
        Some(names) => names
            .iter()
            .map(|n| {
                blocks
                    .iter()
                    .find(|(b, _)| b == n)
                    .copied()
                    .ok_or_else(|| PhysError::MissingBlock(n.clone()))
            })
            .collect::<Result<_, _>>()?,
        None => pick_ram(blocks, layout),
    };
    if ram.is_empty() {
        return Err(PhysError::NoRamBlock);
    }
    let ram_size = ram
        .iter()
        .try_fold(0u64, |a, (_, l)| a.checked_add(*l))
        .ok_or(PhysError::TooLarge {
            ram_size: u64::MAX,
            base: 0,
        })?;
    let below = below_4g(layout, ram_size, opts.max_ram_below_4g)?;
    let above = ram_size - below;
    let base = if layout == MachineLayout::Virt {
        VIRT_RAM_BASE
    } else {
        0
    };
    let too_large = PhysError::TooLarge { ram_size, base };
    // RAM offset -> gpa, as (ram_offset, gpa, length) pieces.
    let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
    if below > 0 {
        base.checked_add(below).ok_or(too_large.clone())?;
        pieces.push((0, base, below));
    }
    if above > 0 {
        FOUR_GIB.checked_add(above).ok_or(too_large)?;
        pieces.push((below, FOUR_GIB, above));
    }
    let hole = layout
        .hole()
        .filter(|&(lo, _)| below > lo && base == 0)
        .map(|(lo, hi)| (lo, hi.min(below)));
    if let Some((lo, hi)) = hole {
        let (ro, g, l) = pieces[0];
        let mut cut = vec![(ro, g, lo)];
        if l > hi {
            cut.push((ro + hi, g + hi, l - hi));
        }
        pieces.splice(0..1, cut);
    }
    // Cut the pieces at block boundaries.
    let mut starts = Vec::with_capacity(ram.len());
    let mut at = 0u64;
    for (name, len) in &ram {
        starts.push((at, *name, *len));
        at += len;
    }
    let mut ranges = Vec::new();
    for (ro, g, l) in pieces {
        let mut o = ro;
        while o < ro + l {
            let bi = starts.partition_point(|(s, _, _)| *s <= o) - 1;
            let (bs, name, blen) = starts[bi];
            let n = (bs + blen).min(ro + l) - o;
            if n == 0 {
                // Cannot happen (the last block starting at or before `o`
                // holds it); stop rather than spin.
                break;
            }
            ranges.push(PhysRange {
                gpa: g + (o - ro),
                block: name.to_string(),
                offset: o - bs,
                length: n,
            });
            o += n;
        }
    }
    Ok(PhysMap {
        layout,
        ram_size,
        below_4g: below,
        above_4g: above,
        ram_blocks: ram.iter().map(|(n, _)| n.to_string()).collect(),
        ranges,
        hole,
    })
}

/// Parses a `--machine-layout` value: `LAYOUT` or `LAYOUT:BLOCK,BLOCK...`
/// (the machine's RAM blocks in address order).
///
/// # Errors
/// [`PhysError::UnknownLayout`].
pub fn parse_layout_arg(s: &str) -> Result<(MachineLayout, Option<Vec<String>>), PhysError> {
    match s.split_once(':') {
        Some((l, blocks)) => Ok((
            l.parse()?,
            Some(
                blocks
                    .split(',')
                    .filter(|b| !b.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
        )),
        None => Ok((s.parse()?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: u64 = 1 << 20;

    fn split(machine: &str, ram: u64, mrb: Option<u64>) -> (u64, u64) {
        let name = if machine == "microvm" {
            "microvm.ram"
        } else {
            "pc.ram"
        };
        let m = map(
            Some(machine),
            &[(name, ram), ("pc.bios", 256 << 10)],
            &Options {
                max_ram_below_4g: mrb,
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(m.ram_blocks, vec![name]);
        (m.below_4g, m.above_4g)
    }

    /// Each case was read from `info mtree -f` of QEMU 10.0.
    #[test]
    fn x86_splits_match_qemu_10() {
        assert_eq!(split("pc-i440fx-10.0", 4 * GIB, None), (3 * GIB, GIB));
        assert_eq!(split("pc-i440fx-10.0", 3200 * M, None), (3200 * M, 0));
        assert_eq!(split("pc-i440fx-10.0", 3584 * M, None), (3 * GIB, 512 * M));
        assert_eq!(split("pc-q35-10.0", 4 * GIB, None), (2 * GIB, 2 * GIB));
        assert_eq!(split("pc-q35-10.0", 2816 * M, None), (2 * GIB, 768 * M));
        assert_eq!(split("pc-q35-10.0", 2815 * M, None), (2815 * M, 0));
        assert_eq!(split("microvm", 4 * GIB, None), (3 * GIB, GIB));
        assert_eq!(split("microvm", 3 * GIB, None), (3 * GIB, 0));
        assert_eq!(split("pc-i440fx-10.0", 2 * GIB, Some(GIB)), (GIB, GIB));
        assert_eq!(split("pc-q35-10.0", 1536 * M, Some(GIB)), (GIB, 512 * M));
        assert_eq!(
            split("pc-i440fx-10.0", 4 * GIB, Some(2560 * M)),
            (2560 * M, 1536 * M)
        );
        // pc-1.7 and older keep 3.5 GiB (no gigabyte alignment).
        assert_eq!(split("pc-i440fx-1.7", 4 * GIB, None), (3584 * M, 512 * M));
        // Raising the split on pc: all of 3968 MiB below 4 GiB.
        assert_eq!(
            split("pc-i440fx-10.0", 3968 * M, Some(4 * GIB)),
            (3968 * M, 0)
        );
    }

    #[test]
    fn pc_ranges_leave_out_the_legacy_hole_and_continue_at_4g() {
        let m = map(
            Some("pc-i440fx-10.0"),
            &[("pc.ram", 4 * GIB), ("pc.bios", 256 << 10)],
            &Options::default(),
        )
        .unwrap();
        let r: Vec<_> = m
            .ranges
            .iter()
            .map(|r| (r.gpa, r.offset, r.length))
            .collect();
        assert_eq!(
            r,
            vec![
                (0, 0, 0xa0000),
                (0x10_0000, 0x10_0000, 3 * GIB - 0x10_0000),
                (FOUR_GIB, 3 * GIB, GIB)
            ]
        );
        assert_eq!(m.translate(0xa0000), None);
        assert_eq!(m.translate(0x9_ffff), Some(("pc.ram", 0x9_ffff, 1)));
        assert_eq!(m.translate(3 * GIB), None);
        assert_eq!(m.end(), FOUR_GIB + GIB);
    }

    #[test]
    fn numa_backends_are_concatenated_in_stream_order() {
        let blocks = [
            ("m0", 2 * M),
            ("m1", 2 * M),
            ("/rom@etc/acpi/tables", 128 << 10),
            ("pc.bios", 256 << 10),
            ("pc.rom", 128 << 10),
        ];
        let m = map(Some("pc-q35-10.0"), &blocks, &Options::default()).unwrap();
        assert_eq!(m.ram_blocks, vec!["m0", "m1"]);
        assert_eq!(m.ram_size, 4 * M);
        assert_eq!(m.translate(2 * M), Some(("m1", 0, 2 * M)));
        assert_eq!(m.translate(2 * M - 1), Some(("m0", 2 * M - 1, 1)));
        let swapped = map(
            Some("pc-q35-10.0"),
            &blocks,
            &Options {
                ram_blocks: Some(vec!["m1".into(), "m0".into()]),
                ..Options::default()
            },
        )
        .unwrap();
        assert_eq!(swapped.translate(0), Some(("m1", 0, 0xa0000)));
    }

    #[test]
    fn virt_ram_is_at_1g() {
        let m = map(
            Some("virt-10.0"),
            &[
                ("mach-virt.ram", 16 * M),
                ("virt.flash0", 64 * M),
                ("virt.flash1", 64 * M),
            ],
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            m.ranges,
            vec![PhysRange {
                gpa: VIRT_RAM_BASE,
                block: "mach-virt.ram".into(),
                offset: 0,
                length: 16 * M
            }]
        );
        assert_eq!(m.hole, None);
    }

    #[test]
    fn errors_are_typed() {
        assert!(matches!(
            map(Some("sun4u"), &[("sun4u.ram", M)], &Options::default()),
            Err(PhysError::UnknownMachine { .. })
        ));
        assert!(matches!(
            map(
                None,
                &[("pc.bios", M)],
                &Options {
                    layout: Some(MachineLayout::Pc),
                    ..Options::default()
                }
            ),
            Err(PhysError::NoRamBlock)
        ));
        assert!(matches!(
            below_4g(MachineLayout::Microvm, GIB, Some(GIB)),
            Err(PhysError::BadMaxRamBelow4g { .. })
        ));
        assert!(matches!(
            below_4g(MachineLayout::Pc, GIB, Some(5 * GIB)),
            Err(PhysError::BadMaxRamBelow4g { .. })
        ));
        assert!(matches!(
            map(
                Some("virt"),
                &[("mach-virt.ram", u64::MAX - 4)],
                &Options::default()
            ),
            Err(PhysError::TooLarge { .. })
        ));
        assert_eq!(
            parse_layout_arg("q35:m1,m0").unwrap(),
            (MachineLayout::Q35, Some(vec!["m1".into(), "m0".into()]))
        );
        assert!(parse_layout_arg("nope").is_err());
        // Found by the phys_map fuzz target: one name, two lengths.
        assert_eq!(
            map(
                Some("pc-i440fx-11"),
                &[("pc.rim", 42949), ("pc.rim", 4294967296)],
                &Options::default()
            ),
            Err(PhysError::DuplicateBlock("pc.rim".into()))
        );
        assert!(matches!(
            map(
                Some("pc"),
                &[("m0", M)],
                &Options {
                    ram_blocks: Some(vec!["m0".into(), "m0".into()]),
                    ..Options::default()
                }
            ),
            Err(PhysError::DuplicateBlock(_))
        ));
    }

    proptest! {
        /// Every RAM byte appears exactly once, in order, and ranges never
        /// overlap or enter the hole.
        #[test]
        fn ranges_cover_ram_once(
            sizes in proptest::collection::vec(0u64..(6 * GIB), 1..4),
            layout in prop_oneof![
                Just(MachineLayout::Pc), Just(MachineLayout::PcLegacy), Just(MachineLayout::Q35),
                Just(MachineLayout::Microvm), Just(MachineLayout::Virt), Just(MachineLayout::Flat)],
            mrb in proptest::option::of(0u64..=FOUR_GIB),
        ) {
            let names: Vec<String> = (0..sizes.len()).map(|i| format!("m{i}")).collect();
            let blocks: Vec<(&str, u64)> = names.iter().map(String::as_str).zip(sizes.iter().copied()).collect();
            let mrb = mrb.filter(|_| matches!(layout, MachineLayout::Pc | MachineLayout::PcLegacy | MachineLayout::Q35));
            let m = map(None, &blocks, &Options { layout: Some(layout), max_ram_below_4g: mrb, ram_blocks: None }).unwrap();
            let hole_len = m.hole.map_or(0, |(a, b)| b - a);
            let total: u64 = m.ranges.iter().map(|r| r.length).sum();
            prop_assert_eq!(total + hole_len, m.ram_size);
            for w in m.ranges.windows(2) {
                prop_assert!(w[0].end() <= w[1].gpa);
            }
            for r in &m.ranges {
                prop_assert!(r.length > 0);
                let blen = blocks.iter().find(|(n, _)| *n == r.block).unwrap().1;
                prop_assert!(r.offset + r.length <= blen);
                if let Some((a, b)) = m.hole {
                    prop_assert!(r.end() <= a || r.gpa >= b);
                }
                if layout != MachineLayout::Virt && layout != MachineLayout::Flat {
                    prop_assert!(r.end() <= FOUR_GIB || r.gpa >= FOUR_GIB);
                }
            }
        }
    }
}
