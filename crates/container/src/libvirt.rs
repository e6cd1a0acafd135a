//! libvirt's save image (`virsh save`, managedsave, snapshots' memory state):
//! a 92-byte header, `data_len` bytes of domain XML (and an optional save
//! cookie), then the QEMU migration stream, raw or compressed.
//!
//! The layout mirrors libvirt's `virQEMUSaveHeader` (src/qemu/qemu_saveimage.h):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | magic: `LibvirtQemudSave`, or `LibvirtQemudPart` while libvirt is still writing |
//! | 16 | 4 | `version`: 1 or 2 |
//! | 20 | 4 | `data_len`: bytes of XML, cookie and padding after the header |
//! | 24 | 4 | `was_running`: non-zero if the domain ran when it was saved |
//! | 28 | 4 | `format` (`compressed` before libvirt 10.x): see [`SaveFormat`] |
//! | 32 | 4 | `cookieOffset`: where the cookie XML starts inside the data, 0 for none |
//! | 36 | 56 | 14 unused `u32`s, written as 0 |
//!
//! Every `u32` is in the saving host's byte order; libvirt tells the order by
//! the version field (it swaps when the version is above 2), and so does
//! [`parse_header`]. The domain XML is NUL-terminated inside its
//! `cookieOffset` (or `data_len`) bytes, followed by the cookie (also
//! NUL-terminated) and NUL padding (libvirt leaves 64 KiB of room for edits).

use crate::ContainerError;

/// The magic of a complete save image.
pub const MAGIC_SAVE: &[u8; 16] = b"LibvirtQemudSave";
/// The magic libvirt writes first and replaces with [`MAGIC_SAVE`] once the
/// QEMU stream is complete: an image that still has it is incomplete.
pub const MAGIC_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
/// Size of the header in bytes.
pub const HEADER_LEN: usize = 92;
/// Number of unused `u32` fields that end the header.
pub const UNUSED_FIELDS: usize = 14;
/// The default bound on `data_len` (libvirt's XML plus 64 KiB of padding is
/// far below it): 16 MiB.
pub const DEFAULT_MAX_DATA_LEN: u32 = 16 << 20;

/// Byte order of the header's `u32` fields (the saving host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    /// Little-endian (x86, most ARM and RISC-V hosts).
    Little,
    /// Big-endian (s390x, big-endian POWER hosts).
    Big,
}

impl ByteOrder {
    /// `"little-endian"` or `"big-endian"`.
    pub fn name(self) -> &'static str {
        match self {
            ByteOrder::Little => "little-endian",
            ByteOrder::Big => "big-endian",
        }
    }

    fn get(self, b: &[u8], at: usize) -> u32 {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        match self {
            ByteOrder::Little => u32::from_le_bytes(w),
            ByteOrder::Big => u32::from_be_bytes(w),
        }
    }

    fn put(self, v: u32) -> [u8; 4] {
        match self {
            ByteOrder::Little => v.to_le_bytes(),
            ByteOrder::Big => v.to_be_bytes(),
        }
    }
}

/// How the QEMU stream after the XML is stored: libvirt's `virQEMUSaveFormat`
/// (qemu_saveimage_format.h; the numbers are on-disk ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaveFormat {
    /// 0: the stream as QEMU wrote it.
    Raw,
    /// 1: piped through `gzip -c`.
    Gzip,
    /// 2: piped through `bzip2 -c`.
    Bzip2,
    /// 3: piped through `xz -c -3` (2 was a never-released LZMA format).
    Xz,
    /// 4: piped through `lzop -c`.
    Lzop,
    /// 5: piped through `zstd -c`.
    Zstd,
    /// 6: "sparse", QEMU's `mapped-ram` file layout (RAM at fixed file offsets).
    Sparse,
}

impl SaveFormat {
    /// Every format, in on-disk number order.
    pub const ALL: [SaveFormat; 7] = [
        SaveFormat::Raw,
        SaveFormat::Gzip,
        SaveFormat::Bzip2,
        SaveFormat::Xz,
        SaveFormat::Lzop,
        SaveFormat::Zstd,
        SaveFormat::Sparse,
    ];

    /// The on-disk number.
    pub fn code(self) -> u32 {
        match self {
            SaveFormat::Raw => 0,
            SaveFormat::Gzip => 1,
            SaveFormat::Bzip2 => 2,
            SaveFormat::Xz => 3,
            SaveFormat::Lzop => 4,
            SaveFormat::Zstd => 5,
            SaveFormat::Sparse => 6,
        }
    }

    /// The format with on-disk number `code`, if there is one.
    pub fn from_code(code: u32) -> Option<SaveFormat> {
        SaveFormat::ALL.into_iter().find(|f| f.code() == code)
    }

    /// libvirt's name for it (`save_image_format` in qemu.conf).
    pub fn name(self) -> &'static str {
        match self {
            SaveFormat::Raw => "raw",
            SaveFormat::Gzip => "gzip",
            SaveFormat::Bzip2 => "bzip2",
            SaveFormat::Xz => "xz",
            SaveFormat::Lzop => "lzop",
            SaveFormat::Zstd => "zstd",
            SaveFormat::Sparse => "sparse",
        }
    }
}

/// The decoded 92-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveHeader {
    /// True when the magic is [`MAGIC_PARTIAL`]: libvirt had not finished the
    /// save (crashed, or still writing), so the QEMU stream may be cut short.
    pub partial: bool,
    /// The byte order of the `u32` fields.
    pub byte_order: ByteOrder,
    /// 1 or 2. libvirt applies `format` only to version 2 images.
    pub version: u32,
    /// Bytes of domain XML, cookie and padding after the header (at least 1).
    pub data_len: u32,
    /// Non-zero when the domain was running at save time (libvirt resumes it
    /// on restore). Kept as written.
    pub was_running: u32,
    /// How the QEMU stream is stored.
    pub format: SaveFormat,
    /// Offset of the cookie XML inside the data, 0 when there is none.
    pub cookie_offset: u32,
    /// The unused tail of the header, kept as written (libvirt writes zeros).
    pub unused: [u32; UNUSED_FIELDS],
}

/// Whether `prefix` starts with either libvirt save magic.
pub fn has_magic(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC_SAVE) || prefix.starts_with(MAGIC_PARTIAL)
}

/// Decodes the header from the first [`HEADER_LEN`] bytes of `buf`.
///
/// Mirrors the checks of libvirt's `qemuSaveImageOpen`: the magic, the
/// version (1 or 2, in either byte order), a non-zero `data_len`, plus what
/// libvirt leaves to later failures: `data_len` at most `max_data_len`, a
/// known `format`, and a `cookieOffset` inside the data.
///
/// # Errors
/// [`ContainerError::Truncated`] when `buf` is shorter than the header,
/// [`ContainerError::Libvirt`] naming the field's offset and the rule broken.
pub fn parse_header(buf: &[u8], max_data_len: u32) -> Result<SaveHeader, ContainerError> {
    if buf.len() < HEADER_LEN {
        return Err(ContainerError::Truncated {
            offset: buf.len() as u64,
            what: "libvirt save header",
            end: HEADER_LEN as u64,
        });
    }
    let partial = if buf.starts_with(MAGIC_SAVE) {
        false
    } else if buf.starts_with(MAGIC_PARTIAL) {
        true
    } else {
        return Err(ContainerError::Libvirt {
            offset: 0,
            rule: "magic is neither \"LibvirtQemudSave\" nor \"LibvirtQemudPart\"".into(),
        });
    };
    let byte_order = [ByteOrder::Little, ByteOrder::Big]
        .into_iter()
        .find(|o| matches!(o.get(buf, 16), 1 | 2))
        .ok_or_else(|| ContainerError::Libvirt {
            offset: 16,
            rule: format!(
                "version is {:#010x}: neither 1 nor 2 in either byte order",
                ByteOrder::Little.get(buf, 16)
            ),
        })?;
    let get = |at| byte_order.get(buf, at);
    let (version, data_len, was_running, fmt, cookie_offset) =
        (get(16), get(20), get(24), get(28), get(32));
    if data_len == 0 || data_len > max_data_len {
        return Err(ContainerError::Libvirt {
            offset: 20,
            rule: format!("data_len {data_len} is not in 1..={max_data_len}"),
        });
    }
    let format = SaveFormat::from_code(fmt).ok_or_else(|| ContainerError::Libvirt {
        offset: 28,
        rule: format!("unknown format {fmt} (known: 0 raw ... 6 sparse)"),
    })?;
    if cookie_offset >= data_len {
        return Err(ContainerError::Libvirt {
            offset: 32,
            rule: format!("cookieOffset {cookie_offset} is not inside data_len {data_len}"),
        });
    }
    let mut unused = [0u32; UNUSED_FIELDS];
    for (i, u) in unused.iter_mut().enumerate() {
        *u = get(36 + 4 * i);
    }
    Ok(SaveHeader {
        partial,
        byte_order,
        version,
        data_len,
        was_running,
        format,
        cookie_offset,
        unused,
    })
}

/// Encodes `h`, checking the rules [`parse_header`] enforces, so that
/// `parse_header(&encode_header(h)?, max) == Ok(h)`.
///
/// # Errors
/// [`ContainerError::Libvirt`] when a field breaks a rule (offset of the field).
pub fn encode_header(
    h: &SaveHeader,
    max_data_len: u32,
) -> Result<[u8; HEADER_LEN], ContainerError> {
    let bad = |offset: u64, rule: String| Err(ContainerError::Libvirt { offset, rule });
    if !matches!(h.version, 1 | 2) {
        return bad(16, format!("version {} is neither 1 nor 2", h.version));
    }
    if h.data_len == 0 || h.data_len > max_data_len {
        return bad(
            20,
            format!("data_len {} is not in 1..={max_data_len}", h.data_len),
        );
    }
    if h.cookie_offset >= h.data_len {
        return bad(
            32,
            format!(
                "cookieOffset {} is not inside data_len {}",
                h.cookie_offset, h.data_len
            ),
        );
    }
    let mut out = [0u8; HEADER_LEN];
    out[..16].copy_from_slice(if h.partial { MAGIC_PARTIAL } else { MAGIC_SAVE });
    let fields = [
        h.version,
        h.data_len,
        h.was_running,
        h.format.code(),
        h.cookie_offset,
    ]
    .into_iter()
    .chain(h.unused);
    for (i, v) in fields.enumerate() {
        out[16 + 4 * i..20 + 4 * i].copy_from_slice(&h.byte_order.put(v));
    }
    Ok(out)
}

/// The XML carried after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveData {
    /// The domain XML (without its NUL terminator).
    pub xml: String,
    /// The save cookie XML (CPU model and the like), when `cookieOffset` is set.
    pub cookie: Option<String>,
}

/// Decodes the `h.data_len` bytes after the header. `base` is the file
/// offset of `data` (for error offsets; [`HEADER_LEN`] for a plain image).
///
/// The domain XML takes the first `cookieOffset` bytes (all `data_len` when
/// there is no cookie) and must be NUL-terminated inside them; the cookie
/// takes the rest and must be NUL-terminated too. What follows each NUL is
/// padding and is not checked (libvirt neither).
///
/// # Errors
/// [`ContainerError::Truncated`] when `data` is shorter than `data_len`;
/// [`ContainerError::Libvirt`] for a missing NUL or text that is not UTF-8.
pub fn parse_data(h: &SaveHeader, data: &[u8], base: u64) -> Result<SaveData, ContainerError> {
    let len = h.data_len as usize;
    if data.len() < len {
        return Err(ContainerError::Truncated {
            offset: base + data.len() as u64,
            what: "libvirt domain XML (data_len)",
            end: base + len as u64,
        });
    }
    let xml_end = if h.cookie_offset != 0 {
        h.cookie_offset as usize
    } else {
        len
    };
    let text = |from: usize, to: usize, what: &str| -> Result<String, ContainerError> {
        let part = &data[from..to];
        let nul = part
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ContainerError::Libvirt {
                offset: base + to as u64,
                rule: format!(
                    "{what} is not NUL-terminated within its {} bytes",
                    to - from
                ),
            })?;
        String::from_utf8(part[..nul].to_vec()).map_err(|e| ContainerError::Libvirt {
            offset: base + (from + e.utf8_error().valid_up_to()) as u64,
            rule: format!("{what} is not UTF-8"),
        })
    };
    let xml = text(0, xml_end, "domain XML")?;
    let cookie = if h.cookie_offset != 0 {
        Some(text(xml_end, len, "save cookie")?)
    } else {
        None
    };
    Ok(SaveData { xml, cookie })
}

/// Lays out the data the way libvirt's `virQEMUSaveDataWrite` does: the XML
/// and its NUL, the cookie and its NUL, then `padding` zero bytes; sets
/// `h.data_len` and `h.cookie_offset` to match, and returns header + data.
///
/// # Errors
/// [`ContainerError::Libvirt`] when the XML or cookie contains a NUL, or the
/// result breaks a header rule (e.g. `data_len` above `max_data_len`).
pub fn encode_image_prefix(
    h: &mut SaveHeader,
    data: &SaveData,
    padding: u32,
    max_data_len: u32,
) -> Result<Vec<u8>, ContainerError> {
    let nul_free = |s: &str, what: &str, offset: u64| {
        if s.as_bytes().contains(&0) {
            Err(ContainerError::Libvirt {
                offset,
                rule: format!("{what} contains a NUL byte"),
            })
        } else {
            Ok(())
        }
    };
    nul_free(&data.xml, "domain XML", HEADER_LEN as u64)?;
    let xml_len = data.xml.len() as u64 + 1;
    let cookie_len = match &data.cookie {
        Some(c) => {
            nul_free(c, "save cookie", HEADER_LEN as u64 + xml_len)?;
            c.len() as u64 + 1
        }
        None => 0,
    };
    let total = xml_len + cookie_len + u64::from(padding);
    h.data_len = u32::try_from(total).map_err(|_| ContainerError::Libvirt {
        offset: 20,
        rule: format!("data_len {total} does not fit in 32 bits"),
    })?;
    h.cookie_offset = if data.cookie.is_some() {
        xml_len as u32
    } else {
        0
    };
    let mut out = encode_header(h, max_data_len)?.to_vec();
    out.extend_from_slice(data.xml.as_bytes());
    out.push(0);
    if let Some(c) = &data.cookie {
        out.extend_from_slice(c.as_bytes());
        out.push(0);
    }
    out.resize(out.len() + padding as usize, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = SaveHeader> {
        (
            any::<bool>(),
            any::<bool>(),
            1u32..=2,
            1u32..=DEFAULT_MAX_DATA_LEN,
            any::<u32>(),
            0usize..SaveFormat::ALL.len(),
            any::<u32>(),
            proptest::array::uniform14(any::<u32>()),
        )
            .prop_map(
                |(partial, big, version, data_len, wr, f, co, unused)| SaveHeader {
                    partial,
                    byte_order: if big {
                        ByteOrder::Big
                    } else {
                        ByteOrder::Little
                    },
                    version,
                    data_len,
                    was_running: wr,
                    format: SaveFormat::ALL[f],
                    cookie_offset: co % data_len,
                    unused,
                },
            )
    }

    proptest! {
        #[test]
        fn header_roundtrip(h in header()) {
            let b = encode_header(&h, DEFAULT_MAX_DATA_LEN).unwrap();
            prop_assert_eq!(parse_header(&b, DEFAULT_MAX_DATA_LEN).unwrap(), h);
        }

        /// Whatever parses re-encodes to the same bytes; nothing panics.
        #[test]
        fn parse_any_bytes(mut b in proptest::collection::vec(any::<u8>(), 0..120), save in any::<bool>()) {
            if b.len() >= 16 {
                b[..16].copy_from_slice(if save { MAGIC_SAVE } else { MAGIC_PARTIAL });
            }
            if let Ok(h) = parse_header(&b, DEFAULT_MAX_DATA_LEN) {
                let e = encode_header(&h, DEFAULT_MAX_DATA_LEN).unwrap();
                prop_assert_eq!(&e[..], &b[..HEADER_LEN]);
            }
        }

        #[test]
        fn data_roundtrip(h in header(), xml in "[^\u{0}]{0,200}", cookie in proptest::option::of("[^\u{0}]{0,100}"), pad in 0u32..300) {
            let mut h = h;
            let d = SaveData { xml, cookie };
            let img = encode_image_prefix(&mut h, &d, pad, DEFAULT_MAX_DATA_LEN).unwrap();
            let back = parse_header(&img, DEFAULT_MAX_DATA_LEN).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(img.len(), HEADER_LEN + h.data_len as usize);
            prop_assert_eq!(parse_data(&back, &img[HEADER_LEN..], HEADER_LEN as u64).unwrap(), d);
        }
    }

    fn sample() -> Vec<u8> {
        let mut h = SaveHeader {
            partial: false,
            byte_order: ByteOrder::Little,
            version: 2,
            data_len: 0,
            was_running: 1,
            format: SaveFormat::Raw,
            cookie_offset: 0,
            unused: [0; UNUSED_FIELDS],
        };
        let d = SaveData {
            xml: "<domain/>".into(),
            cookie: None,
        };
        encode_image_prefix(&mut h, &d, 16, DEFAULT_MAX_DATA_LEN).unwrap()
    }

    #[test]
    fn rules_name_offsets() {
        let img = sample();
        let off = |r: Result<SaveHeader, ContainerError>| r.unwrap_err().offset();
        assert_eq!(off(parse_header(&img[..91], DEFAULT_MAX_DATA_LEN)), 91);
        let mut b = img.clone();
        b[3] = b'x';
        assert_eq!(off(parse_header(&b, DEFAULT_MAX_DATA_LEN)), 0);
        let mut b = img.clone();
        b[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(off(parse_header(&b, DEFAULT_MAX_DATA_LEN)), 16);
        let mut b = img.clone();
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(off(parse_header(&b, DEFAULT_MAX_DATA_LEN)), 20);
        assert_eq!(off(parse_header(&img, 4)), 20);
        let mut b = img.clone();
        b[28..32].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(off(parse_header(&b, DEFAULT_MAX_DATA_LEN)), 28);
        let mut b = img.clone();
        b[32..36].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(off(parse_header(&b, DEFAULT_MAX_DATA_LEN)), 32);
        // Byte order from the version field.
        let mut b = img.clone();
        for at in (16..HEADER_LEN).step_by(4) {
            b[at..at + 4].reverse();
        }
        let h = parse_header(&b, DEFAULT_MAX_DATA_LEN).unwrap();
        assert_eq!(h.byte_order, ByteOrder::Big);
        assert_eq!(h.data_len, 10 + 16);
        // XML without its NUL.
        let h = parse_header(&img, DEFAULT_MAX_DATA_LEN).unwrap();
        let mut d = img[HEADER_LEN..].to_vec();
        d.iter_mut().for_each(|x| *x = b'a');
        let e = parse_data(&h, &d, HEADER_LEN as u64).unwrap_err();
        assert_eq!(e.offset(), HEADER_LEN as u64 + u64::from(h.data_len));
        let e = parse_data(&h, &d[..5], HEADER_LEN as u64).unwrap_err();
        assert_eq!(e.offset(), HEADER_LEN as u64 + 5);
    }
}
