//! The target page size: which one a stream uses, and how qmig knows.
//!
//! RAM record headers carry their flags in the bits below the target page
//! size (wire-format §7), so a reader must know it before the first record.
//! QEMU announces it in the configuration subsection
//! `configuration/target-page-bits` only when it is larger than the
//! target's legacy minimum (`TARGET_PAGE_BITS_MIN`, QEMU's
//! `vmstate_target_page_bits` `needed` hook); without the subsection it is
//! that minimum, which differs by architecture (1 KiB on 32-bit ARM boards,
//! 8 KiB on sparc64). The vmdesc trailer gives it too (`"page_size"`).
//!
//! qmig takes it from, in order: an explicit override, the
//! configuration's `target-page-bits`, the vmdesc `page_size`, the machine
//! type (a table of QEMU's per-target minimums), and last the stream itself
//! ([`PageSizeSource::Inferred`]: the one candidate under which the first
//! RAM records all parse). Every source found must agree with the others.

/// Smallest target page size QEMU has (`TARGET_PAGE_BITS_MIN` of 32-bit ARM
/// and AVR: 2^10 bytes).
pub const MIN_PAGE_BITS: u32 = 10;
/// Largest target page size QEMU has (2^16 bytes: 64 KiB).
pub const MAX_PAGE_BITS: u32 = 16;

/// Where the target page size in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizeSource {
    /// Set by the caller (`--target-page-size`).
    Override,
    /// The configuration subsection `configuration/target-page-bits`.
    Configuration,
    /// The vmdesc trailer's `"page_size"`.
    Vmdesc,
    /// The machine type's target minimum (a configuration section without
    /// the subsection).
    MachineType,
    /// Worked out from the stream: the only candidate under which the first
    /// RAM records parse.
    Inferred,
}

impl PageSizeSource {
    /// A lower-case name for listings and JSON (`"configuration"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            PageSizeSource::Override => "override",
            PageSizeSource::Configuration => "configuration",
            PageSizeSource::Vmdesc => "vmdesc",
            PageSizeSource::MachineType => "machine-type",
            PageSizeSource::Inferred => "inferred",
        }
    }
}

/// Whether `bits` is a target page size QEMU can have (1 KiB to 64 KiB).
pub fn valid_page_bits(bits: u32) -> bool {
    (MIN_PAGE_BITS..=MAX_PAGE_BITS).contains(&bits)
}

/// log2 of `size` if it is a power of two within QEMU's range.
pub fn page_bits_of(size: u64) -> Option<u32> {
    (size.is_power_of_two() && valid_page_bits(size.trailing_zeros()))
        .then(|| size.trailing_zeros())
}

/// The target page bits a machine type implies when the configuration
/// carries no `target-page-bits` subsection: its target's legacy minimum.
///
/// Facts from QEMU's targets (`TARGET_PAGE_BITS` / `TARGET_PAGE_BITS_MIN`
/// in each `target/*/cpu-param.h`): x86, ppc, s390x, 32-bit sparc, mips,
/// m68k, hppa: 4 KiB; 32-bit ARM and aarch64 boards: 1 KiB (machines
/// that raise it, such as `virt`, announce the subsection); sparc64 and
/// alpha: 8 KiB. Names shared by several targets (`virt`, `none`) and
/// unknown names give `None`.
pub fn machine_page_bits(machine: &str) -> Option<u32> {
    // Canonical names carry a version suffix (`pc-i440fx-10.0`): compare the
    // family before the first digit-led component where needed.
    const X86: &[&str] = &["pc", "q35", "isapc", "microvm", "xenfv", "xenpv"];
    const ARM: &[&str] = &[
        "versatilepb",
        "versatileab",
        "vexpress-a9",
        "vexpress-a15",
        "realview-eb",
        "realview-eb-mpcore",
        "realview-pb-a8",
        "realview-pbx-a9",
        "integratorcp",
        "musicpal",
        "akita",
        "borzoi",
        "spitz",
        "terrier",
        "tosa",
        "cubieboard",
        "highbank",
        "midway",
        "sabrelite",
        "mcimx6ul-evk",
        "mcimx7d-sabre",
        "kzm",
        "imx25-pdk",
        "raspi0",
        "raspi1ap",
        "raspi2b",
        "raspi3ap",
        "raspi3b",
        "raspi4b",
        "smdkc210",
        "nuri",
        "collie",
        "cheetah",
        "sx1",
        "sx1-v1",
        "z2",
        "mainstone",
        "connex",
        "verdex",
        "emcraft-sf2",
        "netduino2",
        "netduinoplus2",
        "olimex-stm32-h405",
        "stm32vldiscovery",
        "microbit",
        "lm3s6965evb",
        "lm3s811evb",
        "canon-a1100",
        "orangepi-pc",
        "npcm750-evb",
        "quanta-gsj",
        "xilinx-zynq-a9",
        "mps2-an385",
        "mps2-an386",
        "mps2-an500",
        "mps2-an505",
        "mps2-an511",
        "mps2-an521",
        "mps3-an524",
        "mps3-an547",
        "musca-a",
        "musca-b1",
    ];
    const SPARC64: &[&str] = &["sun4u", "sun4v", "niagara"];
    const SPARC32: &[&str] = &[
        "SS-5",
        "SS-10",
        "SS-600MP",
        "SS-20",
        "SS-4",
        "SPARCClassic",
        "SPARCbook",
        "LX",
        "Voyager",
        "leon3_generic",
    ];
    const PPC: &[&str] = &[
        "pseries",
        "powernv",
        "powernv8",
        "powernv9",
        "powernv10",
        "mac99",
        "g3beige",
        "ppce500",
        "mpc8544ds",
        "bamboo",
        "ref405ep",
        "sam460ex",
        "40p",
        "pegasos2",
        "virtex-ml507",
    ];
    let family = machine_family(machine);
    if X86.contains(&family) || machine.starts_with("pc-") {
        return Some(12);
    }
    if ARM.contains(&machine) || machine.starts_with("ast") && machine.ends_with("-bmc") {
        return Some(10);
    }
    if SPARC64.contains(&machine) {
        return Some(13);
    }
    if SPARC32.contains(&machine) || PPC.contains(&family) || family == "s390-ccw-virtio" {
        return Some(12);
    }
    None
}

/// The machine-type family: the name without a trailing `-X.Y` version
/// (`pc-q35-10.0` → `pc-q35`, `pseries-9.2` → `pseries`,
/// `s390-ccw-virtio-7.2` → `s390-ccw-virtio`).
fn machine_family(machine: &str) -> &str {
    match machine.rfind('-') {
        Some(k)
            if machine[k + 1..]
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            &machine[..k]
        }
        _ => machine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_table() {
        assert_eq!(machine_page_bits("pc-i440fx-10.0"), Some(12));
        assert_eq!(machine_page_bits("pc-q35-7.2"), Some(12));
        assert_eq!(machine_page_bits("versatilepb"), Some(10));
        assert_eq!(machine_page_bits("sun4u"), Some(13));
        assert_eq!(machine_page_bits("SS-5"), Some(12));
        assert_eq!(machine_page_bits("pseries-9.2"), Some(12));
        assert_eq!(machine_page_bits("s390-ccw-virtio-10.0"), Some(12));
        assert_eq!(machine_page_bits("virt"), None);
        assert_eq!(machine_page_bits("virt-10.0"), None);
        assert_eq!(machine_page_bits("nonsense"), None);
    }

    #[test]
    fn bits_of_sizes() {
        assert_eq!(page_bits_of(1024), Some(10));
        assert_eq!(page_bits_of(65536), Some(16));
        assert_eq!(page_bits_of(512), None);
        assert_eq!(page_bits_of(1 << 17), None);
        assert_eq!(page_bits_of(3000), None);
    }
}
