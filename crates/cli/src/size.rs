//! Sizes as QEMU users write them (`64M`, `1.5G`, `4096`): a number and an
//! optional suffix B, K, M, G, T, P or E (case-insensitive, powers of 1024),
//! the rule of QEMU's `qemu_strtosz` (util/cutils.c). A fraction is allowed
//! with a suffix; the result must be a whole number of bytes that fits u64.

/// Parses a size in bytes.
///
/// # Errors
/// A message naming what is wrong (for clap's `value_parser`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        _ => {
            return Err(format!(
                "\"{s}\": unknown size suffix \"{suffix}\" (use B, K, M, G, T, P or E)"
            ))
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(format!(
            "\"{s}\": not a size (expected e.g. 4096, 64M, 1.5G)"
        ));
    }
    let too_big = || format!("\"{s}\": too large");
    let whole: u128 = if int.is_empty() {
        0
    } else {
        int.parse::<u128>().map_err(|_| too_big())?
    };
    let mut bytes = whole.checked_shl(shift).ok_or_else(too_big)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(format!("\"{s}\": too many decimals"));
        }
        let f: u128 = frac.parse().map_err(|_| too_big())?;
        let scale = 10u128.pow(frac.len() as u32);
        let part = (f << shift) / scale;
        if part * scale != f << shift {
            return Err(format!("\"{s}\": not a whole number of bytes"));
        }
        bytes += part;
    }
    u64::try_from(bytes).map_err(|_| too_big())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "M",
            "1X",
            "-1",
            "1..5M",
            "1.5",
            "16E",
            "99999999999999999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("1X").unwrap_err().contains("\"X\""));
    }

    proptest! {
        #[test]
        fn suffix_is_a_shift(n in 0u64..(1 << 20), i in 0usize..5) {
            let (suf, shift) = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)][i];
            prop_assert_eq!(parse_size(&format!("{n}{suf}")), Ok(n << shift));
        }

        #[test]
        fn never_panics(s in "[0-9.a-zA-Z]{0,24}") {
            let _ = parse_size(&s);
        }
    }
}
