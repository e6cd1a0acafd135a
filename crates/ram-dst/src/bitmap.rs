//! The return path's RECV_BITMAP reply on top of the shared
//! [`PageBitmap`](qmig_wire::bitmap::PageBitmap).

use crate::RamDstError;
use qmig_wire::bitmap::PageBitmap;
use qmig_wire::{RpMessage, WireError};

/// Writes a return-path RECV_BITMAP message for `block`: the framed message,
/// then the be64 size, the little-endian bitmap and the end marker.
///
/// # Errors
/// [`RamDstError::Wire`] when the block name cannot be written (see
/// [`RpMessage::write`]); nothing is written then.
pub fn write_recv_bitmap_reply(
    block: &str,
    bitmap: &PageBitmap,
    out: &mut Vec<u8>,
) -> Result<(), RamDstError> {
    let bytes = bitmap.to_le_bytes();
    RpMessage::RecvBitmap {
        block,
        bitmap: &bytes,
    }
    .write(out)?;
    Ok(())
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
        WireError::Bitmap { why, .. } => RamDstError::Bitmap {
            offset: 4 + 1 + block.len() as u64,
            why,
        },
        other => RamDstError::Wire(other),
    })?;
    Ok((block.to_string(), bm, len))
}
