//! Postcopy recovery messages, validated against the migration's RAM
//! layout (wire-format §11).
//!
//! When a postcopy migration's connection breaks after POSTCOPY_RUN, QEMU
//! pauses it. The source then opens a new main connection that carries no
//! QEVM header: it sends one RECV_BITMAP command (a counted block name) per
//! RAM block, the destination answers each on the return path with a
//! RECV_BITMAP message followed, outside its framing, by `be64 size`, the
//! received bitmap as little-endian 64-bit words, and `be64
//! 0x0123456789ABCDEF`; then the source sends POSTCOPY_RESUME, the
//! destination answers RESUME_ACK (be32 1), and RAM sections follow.
//!
//! The framing of each message is parsed in [`crate::command`] and
//! [`crate::return_path`]; this module adds what only the layout can say
//! (the block exists, the bitmap has its size), the RESUME_ACK value, and
//! the order of a recovery connection ([`RecoveryChannel`]).

use crate::bitmap::PageBitmap;
use crate::command::{self, Command};
use crate::decoder::Item;
use crate::error::WireError;
use crate::return_path::{self, recv_bitmap_size, RpMessage};

/// The only RESUME_ACK value QEMU sends and accepts
/// (`migrate_send_rp_resume_ack`, `migrate_handle_rp_resume_ack`).
pub const RESUME_ACK_VALUE: u32 = 1;

/// A destination's answer to RECV_BITMAP: the block's received bitmap, one
/// bit per target page of its used length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvBitmapReply<'a> {
    /// The RAM block.
    pub block: &'a str,
    /// The pages the destination has placed.
    pub bitmap: PageBitmap,
}

impl RecvBitmapReply<'_> {
    /// Serializes the reply: the framed RECV_BITMAP message, then `be64
    /// size`, the bitmap's little-endian words and the end marker.
    ///
    /// # Errors
    /// [`WireError::Unwritable`] (nothing written) for a block name a
    /// reader would refuse.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let bytes = self.bitmap.to_le_bytes();
        RpMessage::RecvBitmap {
            block: self.block,
            bitmap: &bytes,
        }
        .write(out)
    }
}

/// Parses a RECV_BITMAP reply at the start of `buf` (which starts at stream
/// offset `base`) and checks it against the layout: `pages(name)` gives the
/// block's used length in target pages, `None` for a block the migration
/// does not have. Returns the reply and the bytes it took.
///
/// # Errors
/// [`WireError::Truncated`] when `buf` ends inside the reply;
/// [`WireError::Structure`] when the message is another type;
/// [`WireError::UnknownBlock`], [`WireError::RecvBitmapSize`] (the size
/// differs from `round_up(ceil(pages / 8), 8)`),
/// [`WireError::BitmapEndMarker`], [`WireError::Bitmap`] (a bit set past
/// the block's last page), and the framing errors of
/// [`crate::return_path`]; each with its absolute offset.
pub fn parse_recv_bitmap_reply<'a>(
    buf: &'a [u8],
    base: u64,
    pages: impl Fn(&str) -> Option<u64>,
) -> Result<(RecvBitmapReply<'a>, usize), WireError> {
    let (m, len) = crate::error::finish(
        buf,
        base,
        "RECV_BITMAP reply",
        return_path::parse_rp_message(buf, return_path::DEFAULT_MAX_BITMAP),
    )?;
    let RpMessage::RecvBitmap { block, bitmap } = m else {
        return Err(WireError::Structure {
            offset: base,
            why: "expected a RECV_BITMAP reply on the return path",
        });
    };
    let reply = check_reply(block, bitmap, base, &pages)?;
    Ok((reply, len))
}

/// Checks the bitmap of a RECV_BITMAP message (starting at `base`) against
/// the block's page count.
fn check_reply<'a>(
    block: &'a str,
    bitmap: &[u8],
    base: u64,
    pages: &impl Fn(&str) -> Option<u64>,
) -> Result<RecvBitmapReply<'a>, WireError> {
    let Some(n) = pages(block) else {
        return Err(WireError::UnknownBlock {
            offset: base,
            what: "RECV_BITMAP reply",
            name: block.to_string(),
        });
    };
    // be16 type, be16 len, counted name; then the be64 size.
    let size_at = base + 4 + 1 + block.len() as u64;
    let expected = recv_bitmap_size(n);
    if bitmap.len() as u64 != expected {
        return Err(WireError::RecvBitmapSize {
            offset: size_at,
            block: block.to_string(),
            size: bitmap.len() as u64,
            pages: n,
            expected,
        });
    }
    let bitmap = PageBitmap::from_le_bytes(bitmap, n).map_err(|e| e.shifted(size_at + 8))?;
    Ok(RecvBitmapReply { block, bitmap })
}

/// Checks a return-path message read elsewhere (e.g. by
/// [`crate::ReturnPathReader`], at offset `offset`) as a recovery message:
/// a RECV_BITMAP reply against the layout (see [`parse_recv_bitmap_reply`]),
/// a RESUME_ACK's value. Other messages pass.
///
/// # Errors
/// As [`parse_recv_bitmap_reply`], and [`WireError::ResumeAck`].
pub fn check_rp_message(
    m: &RpMessage<'_>,
    offset: u64,
    pages: impl Fn(&str) -> Option<u64>,
) -> Result<(), WireError> {
    match m {
        RpMessage::RecvBitmap { block, bitmap } => {
            check_reply(block, bitmap, offset, &pages).map(|_| ())
        }
        RpMessage::ResumeAck(v) if *v != RESUME_ACK_VALUE => {
            Err(WireError::ResumeAck { offset, value: *v })
        }
        _ => Ok(()),
    }
}

/// Parses a RESUME_ACK at the start of `buf` (stream offset `base`).
///
/// # Errors
/// [`WireError::Truncated`], [`WireError::Structure`] for another message
/// type, [`WireError::ReturnPathLength`] for a length other than 4, and
/// [`WireError::ResumeAck`] for a value other than 1.
pub fn parse_resume_ack(buf: &[u8], base: u64) -> Result<usize, WireError> {
    let (m, len) = crate::error::finish(
        buf,
        base,
        "RESUME_ACK",
        return_path::parse_rp_message(buf, return_path::DEFAULT_MAX_BITMAP),
    )?;
    match m {
        RpMessage::ResumeAck(RESUME_ACK_VALUE) => Ok(len),
        RpMessage::ResumeAck(value) => Err(WireError::ResumeAck {
            offset: base,
            value,
        }),
        _ => Err(WireError::Structure {
            offset: base,
            why: "expected RESUME_ACK on the return path",
        }),
    }
}

/// Writes RESUME_ACK(1).
pub fn write_resume_ack(out: &mut Vec<u8>) {
    out.extend_from_slice(&return_path::msg::RESUME_ACK.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&RESUME_ACK_VALUE.to_be_bytes());
}

/// Parses a RECV_BITMAP command (type byte 0x08 included) at the start of
/// `buf` (stream offset `base`) and checks that the block exists
/// (`pages(name)` is `Some`).
///
/// # Errors
/// The command's framing errors ([`command::decode_command`]),
/// [`WireError::Structure`] for another command, [`WireError::UnknownBlock`].
pub fn parse_recv_bitmap_command(
    buf: &[u8],
    base: u64,
    pages: impl Fn(&str) -> Option<u64>,
) -> Result<(&str, usize), WireError> {
    let (c, len) = command::decode_command(buf, base, command::DEFAULT_MAX_PACKAGED)?;
    match c {
        Command::RecvBitmap { block } => {
            if pages(block).is_none() {
                return Err(WireError::UnknownBlock {
                    offset: base,
                    what: "RECV_BITMAP command",
                    name: block.to_string(),
                });
            }
            Ok((block, len))
        }
        _ => Err(WireError::Structure {
            offset: base,
            why: "expected a RECV_BITMAP command",
        }),
    }
}

/// Where a recovery connection is ([`RecoveryChannel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryStage {
    /// Before POSTCOPY_RESUME: only RECV_BITMAP commands.
    Bitmaps,
    /// After POSTCOPY_RESUME: the postcopy stream goes on.
    Resumed,
}

/// The order of a postcopy recovery connection as QEMU 10's source writes
/// it (wire-format §11; `ram_dirty_bitmap_sync_all`, then
/// `postcopy_resume_handshake`): RECV_BITMAP commands for known blocks, one
/// POSTCOPY_RESUME, then the usual postcopy items (RAM sections, EOF). A
/// sans-IO checker fed every item of the connection in order.
#[derive(Debug, Clone)]
pub struct RecoveryChannel {
    stage: RecoveryStage,
    requested: u64,
}

impl Default for RecoveryChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl RecoveryChannel {
    /// A checker at the start of a recovery connection.
    pub fn new() -> Self {
        RecoveryChannel {
            stage: RecoveryStage::Bitmaps,
            requested: 0,
        }
    }

    /// Where the connection is.
    pub fn stage(&self) -> RecoveryStage {
        self.stage
    }

    /// RECV_BITMAP commands seen so far.
    pub fn bitmaps_requested(&self) -> u64 {
        self.requested
    }

    /// Checks the next item (at stream offset `offset`); `pages(name)` is
    /// the block's length in target pages, `None` for an unknown block.
    ///
    /// # Errors
    /// [`WireError::UnknownBlock`] for RECV_BITMAP of an unknown block;
    /// [`WireError::Recovery`] for RECV_BITMAP after POSTCOPY_RESUME, a
    /// second POSTCOPY_RESUME, POSTCOPY_RESUME before any RECV_BITMAP, or
    /// anything else before POSTCOPY_RESUME.
    pub fn check(
        &mut self,
        offset: u64,
        item: &Item<'_>,
        pages: impl Fn(&str) -> Option<u64>,
    ) -> Result<(), WireError> {
        let err = |why| Err(WireError::Recovery { offset, why });
        match (self.stage, item) {
            (RecoveryStage::Bitmaps, Item::Command(Command::RecvBitmap { block })) => {
                if pages(block).is_none() {
                    return Err(WireError::UnknownBlock {
                        offset,
                        what: "RECV_BITMAP command",
                        name: block.to_string(),
                    });
                }
                self.requested += 1;
                Ok(())
            }
            (RecoveryStage::Bitmaps, Item::Command(Command::PostcopyResume)) => {
                if self.requested == 0 {
                    return err("POSTCOPY_RESUME before any RECV_BITMAP (the source reloads every block's bitmap first)");
                }
                self.stage = RecoveryStage::Resumed;
                Ok(())
            }
            (RecoveryStage::Bitmaps, _) => err(
                "a recovery connection starts with RECV_BITMAP commands and POSTCOPY_RESUME; this item comes before POSTCOPY_RESUME",
            ),
            (RecoveryStage::Resumed, Item::Command(Command::RecvBitmap { .. })) => {
                err("RECV_BITMAP after POSTCOPY_RESUME")
            }
            (RecoveryStage::Resumed, Item::Command(Command::PostcopyResume)) => {
                err("a second POSTCOPY_RESUME on one connection")
            }
            (RecoveryStage::Resumed, _) => Ok(()),
        }
    }
}
