//! Per-page bitmaps: the received bitmap of a block, and its little-endian wire
//! form used by the return path's RECV_BITMAP message.

use crate::RamDstError;
use qmig_wire::return_path::recv_bitmap_size;
use qmig_wire::RpMessage;

/// A bitmap with one bit per target page of a block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    bits: u64,
}

impl PageBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        PageBitmap {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Bit `i` (false past the end).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets bit `i` (ignored past the end).
    #[inline]
    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears bit `i`.
    #[inline]
    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    fn for_range(&mut self, start: u64, n: u64, f: impl Fn(&mut u64, u64)) {
        let end = start.saturating_add(n).min(self.bits);
        let mut i = start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&mut self.words[w as usize], mask);
            i = (w + 1) * 64;
        }
    }

    /// Sets bits `start..start + n` (clipped to the bitmap).
    pub fn set_range(&mut self, start: u64, n: u64) {
        self.for_range(start, n, |w, m| *w |= m);
    }

    /// Clears bits `start..start + n` (clipped to the bitmap).
    pub fn clear_range(&mut self, start: u64, n: u64) {
        self.for_range(start, n, |w, m| *w &= !m);
    }

    /// Whether any bit of `start..start + n` is set.
    pub fn any_in_range(&self, start: u64, n: u64) -> bool {
        (start..start.saturating_add(n).min(self.bits)).any(|i| self.get(i))
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Changes the number of bits; new bits are clear, dropped bits are forgotten.
    pub fn resize(&mut self, bits: u64) {
        self.words.resize(bits.div_ceil(64) as usize, 0);
        self.bits = bits;
        if !bits.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
    }

    /// The wire form: `ceil(bits / 8)` bytes rounded up to a multiple of 8,
    /// bit `i` in byte `i / 8` at position `i % 8` (little-endian 64-bit words).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let size = recv_bitmap_size(self.bits) as usize;
        let mut out = Vec::with_capacity(size);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(size, 0);
        out
    }

    /// Parses the wire form of a bitmap of `bits` bits.
    ///
    /// # Errors
    /// [`RamDstError::Bitmap`] if the length is not the rounded size for `bits`,
    /// or if a bit past `bits` is set.
    pub fn from_le_bytes(bytes: &[u8], bits: u64) -> Result<Self, RamDstError> {
        let want = recv_bitmap_size(bits);
        if bytes.len() as u64 != want {
            return Err(RamDstError::Bitmap {
                offset: 0,
                why: format!("{} bytes for {bits} pages, expected {want}", bytes.len()),
            });
        }
        let mut words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        words.truncate(bits.div_ceil(64) as usize);
        let bm = PageBitmap { words, bits };
        let mut check = bm.clone();
        check.resize(bits);
        if check != bm {
            return Err(RamDstError::Bitmap {
                offset: 0,
                why: format!("bits set past the last of {bits} pages"),
            });
        }
        Ok(bm)
    }

    /// Indices of the set bits, in order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

/// Writes a return-path RECV_BITMAP message for `block`: the framed message,
/// then the be64 size, the little-endian bitmap and the end marker.
pub fn write_recv_bitmap_reply(block: &str, bitmap: &PageBitmap, out: &mut Vec<u8>) {
    let bytes = bitmap.to_le_bytes();
    RpMessage::RecvBitmap {
        block,
        bitmap: &bytes,
    }
    .write(out);
}

/// Parses a RECV_BITMAP return-path message (as written by
/// [`write_recv_bitmap_reply`]) at the start of `buf`; `pages_of` gives the
/// number of target pages of a block name, `None` for an unknown block.
/// Returns the block name, its bitmap and the message length.
///
/// # Errors
/// A wire error (bad framing, size, end marker, truncation), another message
/// type, an unknown block, or a bitmap whose size does not fit the block.
pub fn parse_recv_bitmap_reply(
    buf: &[u8],
    pages_of: impl Fn(&str) -> Option<u64>,
) -> Result<(String, PageBitmap, usize), RamDstError> {
    let Some((msg, len)) = qmig_wire::decode_rp_message(buf, 0)? else {
        return Err(RamDstError::Bitmap {
            offset: buf.len() as u64,
            why: "message truncated".into(),
        });
    };
    let RpMessage::RecvBitmap { block, bitmap } = msg else {
        return Err(RamDstError::Bitmap {
            offset: 0,
            why: format!("{} message, not RECV_BITMAP", msg.name()),
        });
    };
    let Some(pages) = pages_of(block) else {
        return Err(RamDstError::UnknownBlock {
            offset: 0,
            name: block.to_string(),
        });
    };
    let bm = PageBitmap::from_le_bytes(bitmap, pages).map_err(|e| match e {
        RamDstError::Bitmap { why, .. } => RamDstError::Bitmap {
            offset: 4 + 1 + block.len() as u64,
            why,
        },
        other => other,
    })?;
    Ok((block.to_string(), bm, len))
}
