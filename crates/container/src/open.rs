//! Peeling containers off an input: whole-file compression and libvirt save
//! images, possibly nested (a gzip'd libvirt image whose payload is xz).

use std::io::{self, Read};

use crate::compress::SNIFF_LEN;
use crate::libvirt::{self, SaveData, SaveFormat, SaveHeader, HEADER_LEN};
use crate::{sniff, Compression, ContainerError, Peeked};

/// Bounds on what [`open`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest libvirt `data_len` (domain XML, cookie, padding) read into
    /// memory, in bytes. Default [`libvirt::DEFAULT_MAX_DATA_LEN`] (16 MiB).
    pub max_data_len: u32,
    /// How many containers may be nested. Default 4.
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data_len: libvirt::DEFAULT_MAX_DATA_LEN,
            max_layers: 4,
        }
    }
}

/// One container around the QEMU stream, outermost first.
#[derive(Debug, Clone)]
pub enum Layer {
    /// The whole input (of this layer) is compressed.
    Compressed(Compression),
    /// A libvirt save image.
    Libvirt(Box<LibvirtImage>),
}

/// A libvirt save image's header and XML, and where its payload starts.
#[derive(Debug, Clone)]
pub struct LibvirtImage {
    /// The decoded header.
    pub header: SaveHeader,
    /// The domain XML and the save cookie.
    pub data: SaveData,
    /// Offset of the payload (the QEMU stream, raw or compressed) in this
    /// layer: [`HEADER_LEN`] + `data_len`.
    pub payload_offset: u64,
    /// How the payload is compressed (from the header's format, checked
    /// against the payload's magic; for version 1 images, from the magic).
    pub payload: Option<Compression>,
}

/// An input with its containers peeled off.
pub struct Opened {
    /// The QEMU stream's bytes.
    pub reader: Box<dyn Read + Send>,
    /// The containers found, outermost first (empty for a plain stream).
    pub layers: Vec<Layer>,
}

impl Opened {
    /// The offset of the QEMU stream in the input when it is stored there
    /// uncompressed (0 for a plain stream, the payload offset of a raw
    /// libvirt image); `None` when a compression is involved.
    pub fn raw_offset(&self) -> Option<u64> {
        match self.layers.as_slice() {
            [] => Some(0),
            [Layer::Libvirt(l)] if l.payload.is_none() => Some(l.payload_offset),
            _ => None,
        }
    }

    /// The libvirt image among the layers, if any.
    pub fn libvirt(&self) -> Option<&LibvirtImage> {
        self.layers.iter().find_map(|l| match l {
            Layer::Libvirt(i) => Some(&**i),
            Layer::Compressed(_) => None,
        })
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

fn io_at(offset: u64) -> impl FnOnce(io::Error) -> ContainerError {
    move |source| ContainerError::Io { offset, source }
}

fn compression_of(f: SaveFormat) -> Option<Compression> {
    match f {
        SaveFormat::Gzip => Some(Compression::Gzip),
        SaveFormat::Bzip2 => Some(Compression::Bzip2),
        SaveFormat::Xz => Some(Compression::Xz),
        SaveFormat::Lzop => Some(Compression::Lzop),
        SaveFormat::Zstd => Some(Compression::Zstd),
        SaveFormat::Raw | SaveFormat::Sparse => None,
    }
}

/// Recognises the containers at the start of `input` by their magic and
/// returns a reader of the QEMU stream inside. Nothing is read beyond the
/// first bytes of each layer (and a libvirt image's header and data); no
/// seeking is needed, so pipes work.
///
/// A libvirt image's payload compression comes from its header's `format`
/// (version 2; libvirt applies it only then) and must agree with the
/// payload's magic; version 1 images go by the magic.
///
/// # Errors
/// I/O errors, libvirt header and data rules ([`libvirt::parse_header`],
/// [`libvirt::parse_data`]), a truncated libvirt image, a `format` that
/// disagrees with the payload, lzop and libvirt's `sparse` (mapped-ram)
/// format ([`ContainerError::Unsupported`]), more than `limits.max_layers`
/// nested containers.
pub fn open(input: Box<dyn Read + Send>, limits: &Limits) -> Result<Opened, ContainerError> {
    let mut layers = Vec::new();
    let mut r = input;
    loop {
        let mut p = Peeked::new(r);
        p.fill(libvirt::MAGIC_SAVE.len().max(SNIFF_LEN))
            .map_err(io_at(0))?;
        let found = sniff(p.peek());
        if !libvirt::has_magic(p.peek()) && found.is_none() {
            return Ok(Opened {
                reader: Box::new(p),
                layers,
            });
        }
        if layers.len() >= limits.max_layers {
            return Err(ContainerError::Unsupported {
                offset: 0,
                what: format!("more than {} nested containers", limits.max_layers),
                hint: "decompress the outer layers first".into(),
            });
        }
        let Some(c) = found else {
            let (img, reader) = libvirt_layer(p, limits, layers.is_empty())?;
            layers.push(Layer::Libvirt(Box::new(img)));
            return Ok(Opened { reader, layers });
        };
        layers.push(Layer::Compressed(c));
        r = c.decoder(p, 0, &format!("`{} -dc FILE | qmig COMMAND -`", c.name()))?;
    }
}

/// Reads a libvirt image's header and data from `p` (at its magic) and
/// returns them with a reader of the payload.
fn libvirt_layer(
    mut p: Peeked<Box<dyn Read + Send>>,
    limits: &Limits,
    outermost: bool,
) -> Result<(LibvirtImage, Box<dyn Read + Send>), ContainerError> {
    p.fill(HEADER_LEN).map_err(io_at(0))?;
    let header = libvirt::parse_header(p.peek(), limits.max_data_len)?;
    let mut hb = [0u8; HEADER_LEN];
    p.read_exact(&mut hb).map_err(io_at(0))?;
    let data_len = header.data_len as usize;
    // Grown as bytes arrive: a data_len beyond the input allocates no more
    // than the input holds.
    let mut data = Vec::new();
    (&mut p)
        .take(data_len as u64)
        .read_to_end(&mut data)
        .map_err(io_at(HEADER_LEN as u64))?;
    let data = libvirt::parse_data(&header, &data, HEADER_LEN as u64)?;
    let payload_offset = (HEADER_LEN + data_len) as u64;
    p.fill(SNIFF_LEN).map_err(io_at(payload_offset))?;
    let found = sniff(p.peek());
    let mismatch = |declared: SaveFormat| ContainerError::Libvirt {
        offset: 28,
        rule: format!(
            "format {} ({}) disagrees with the payload at offset {payload_offset}, which {}",
            declared.code(),
            declared.name(),
            match found {
                Some(c) => format!("starts with {} magic", c.name()),
                None => "has no compression magic".into(),
            }
        ),
    };
    let payload = if header.version == 2 {
        match header.format {
            SaveFormat::Sparse => {
                return Err(ContainerError::Unsupported {
                    offset: 28,
                    what: "libvirt's \"sparse\" save format (6, QEMU mapped-ram)".into(),
                    hint: "qmig does not read mapped-ram images yet; save with another \
                           save_image_format"
                        .into(),
                })
            }
            SaveFormat::Raw if found.is_some() => return Err(mismatch(header.format)),
            f if compression_of(f) != found => return Err(mismatch(f)),
            _ => found,
        }
    } else {
        found
    };
    let reader: Box<dyn Read + Send> = match payload {
        None => Box::new(p),
        Some(c) => {
            let hint = if outermost {
                format!(
                    "`tail -c +{} FILE | {} -dc | qmig COMMAND -`",
                    payload_offset + 1,
                    c.name()
                )
            } else {
                format!(
                    "extract the payload from offset {payload_offset} and run `{} -dc`",
                    c.name()
                )
            };
            c.decoder(p, payload_offset, &hint)?
        }
    };
    Ok((
        LibvirtImage {
            header,
            data,
            payload_offset,
            payload,
        },
        reader,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::{encode_image_prefix, ByteOrder, DEFAULT_MAX_DATA_LEN};
    use std::io::{Cursor, Write};

    fn image(format: SaveFormat, payload: &[u8]) -> Vec<u8> {
        let mut h = SaveHeader {
            partial: false,
            byte_order: ByteOrder::Little,
            version: 2,
            data_len: 0,
            was_running: 0,
            format,
            cookie_offset: 0,
            unused: [0; 14],
        };
        let d = SaveData {
            xml: "<domain type='qemu'/>".into(),
            cookie: Some("<qemuDomainSaveCookie/>".into()),
        };
        let mut v = encode_image_prefix(&mut h, &d, 100, DEFAULT_MAX_DATA_LEN).unwrap();
        v.extend_from_slice(payload);
        v
    }

    fn read_all(v: Vec<u8>) -> Result<(Vec<u8>, Vec<Layer>), ContainerError> {
        let mut o = open(Box::new(Cursor::new(v)), &Limits::default())?;
        let mut s = Vec::new();
        o.reader.read_to_end(&mut s).unwrap();
        Ok((s, o.layers))
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn nested_and_mismatched() {
        let qemu = b"QEVM\0\0\0\x03rest of stream".to_vec();
        let (s, l) = read_all(image(SaveFormat::Raw, &qemu)).unwrap();
        assert_eq!(s, qemu);
        assert_eq!(l.len(), 1);
        let (s, l) = read_all(gz(&image(SaveFormat::Gzip, &gz(&qemu)))).unwrap();
        assert_eq!(s, qemu);
        assert!(matches!(
            l[..],
            [Layer::Compressed(Compression::Gzip), Layer::Libvirt(_)]
        ));
        let e = read_all(image(SaveFormat::Xz, &gz(&qemu))).unwrap_err();
        assert_eq!(e.offset(), 28, "{e}");
        let e = read_all(image(SaveFormat::Raw, &gz(&qemu))).unwrap_err();
        assert_eq!(e.offset(), 28, "{e}");
        let e = read_all(image(SaveFormat::Sparse, &qemu)).unwrap_err();
        assert!(e.to_string().contains("sparse"), "{e}");
        // Truncated inside the data.
        let img = image(SaveFormat::Raw, &qemu);
        let e = read_all(img[..150].to_vec()).unwrap_err();
        assert!(
            matches!(e, ContainerError::Truncated { offset: 150, .. }),
            "{e}"
        );
        // Too deep.
        let mut b = qemu.clone();
        for _ in 0..5 {
            b = gz(&b);
        }
        assert!(read_all(b).is_err());
    }
}
