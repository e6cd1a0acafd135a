//! Return-path messages (destination → source): `be16 type, be16 len,
//! payload`, and the received-bitmap trailer that follows `RECV_BITMAP`.

use crate::error::{fail, PResult};
use crate::names::{check_name, put_counted};
use nom::bytes::streaming::take;
use nom::number::streaming::{be_u16, be_u64};

/// Message types.
pub mod msg {
    /// Destination is done (payload non-zero = error).
    pub const SHUT: u16 = 1;
    /// Answer to PING.
    pub const PONG: u16 = 2;
    /// Page request naming the block.
    pub const REQ_PAGES_ID: u16 = 3;
    /// Page request in the same block as the previous one.
    pub const REQ_PAGES: u16 = 4;
    /// A block's received bitmap (trailer follows).
    pub const RECV_BITMAP: u16 = 5;
    /// Answer to POSTCOPY_RESUME.
    pub const RESUME_ACK: u16 = 6;
    /// Destination agrees to switch over.
    pub const SWITCHOVER_ACK: u16 = 7;
}

/// End marker after a received bitmap.
pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;
/// Default cap on a received bitmap (covers 64 TiB of 4 KiB pages).
pub const DEFAULT_MAX_BITMAP: u64 = 2 << 30;

/// Name of a message type.
pub fn message_name(t: u16) -> &'static str {
    match t {
        msg::SHUT => "SHUT",
        msg::PONG => "PONG",
        msg::REQ_PAGES_ID => "REQ_PAGES_ID",
        msg::REQ_PAGES => "REQ_PAGES",
        msg::RECV_BITMAP => "RECV_BITMAP",
        msg::RESUME_ACK => "RESUME_ACK",
        msg::SWITCHOVER_ACK => "SWITCHOVER_ACK",
        _ => "UNKNOWN",
    }
}

/// A return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage<'a> {
    /// SHUT with its status (0 = success).
    Shut(u32),
    /// PONG echoing a PING value.
    Pong(u32),
    /// Request `len` bytes at `start` of `block`.
    ReqPagesId {
        /// Byte offset in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
        /// Block name.
        block: &'a str,
    },
    /// Request `len` bytes at `start` of the previously named block.
    ReqPages {
        /// Byte offset in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A block's received bitmap.
    RecvBitmap {
        /// Block name.
        block: &'a str,
        /// Little-endian bitmap bytes, one bit per target page (length a multiple of 8).
        bitmap: &'a [u8],
    },
    /// RESUME_ACK with its value (QEMU sends 1).
    ResumeAck(u32),
    /// SWITCHOVER_ACK.
    SwitchoverAck,
    /// Unknown message type, kept verbatim.
    Unknown {
        /// Type number.
        msg_type: u16,
        /// Raw payload.
        payload: &'a [u8],
    },
}

impl RpMessage<'_> {
    /// The message type number.
    pub fn msg_type(&self) -> u16 {
        match self {
            RpMessage::Shut(_) => msg::SHUT,
            RpMessage::Pong(_) => msg::PONG,
            RpMessage::ReqPagesId { .. } => msg::REQ_PAGES_ID,
            RpMessage::ReqPages { .. } => msg::REQ_PAGES,
            RpMessage::RecvBitmap { .. } => msg::RECV_BITMAP,
            RpMessage::ResumeAck(_) => msg::RESUME_ACK,
            RpMessage::SwitchoverAck => msg::SWITCHOVER_ACK,
            RpMessage::Unknown { msg_type, .. } => *msg_type,
        }
    }

    /// The message's name.
    pub fn name(&self) -> &'static str {
        message_name(self.msg_type())
    }

    /// Serializes the message (and, for RECV_BITMAP, its trailer).
    ///
    /// # Errors
    /// [`crate::WireError::Unwritable`] (nothing is written) for a payload over
    /// 512 bytes (QEMU's source refuses longer messages), a block name a
    /// reader would refuse, a bitmap whose length is not a multiple of 8, or
    /// an `Unknown` message whose type is a known one.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), crate::WireError> {
        let out_at = out.len();
        let bad = |why: String| crate::names::unwritable(out_at, "return-path message", why);
        let mut p = Vec::new();
        match self {
            RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
                p.extend_from_slice(&v.to_be_bytes())
            }
            RpMessage::ReqPagesId { start, len, block } => {
                p.extend_from_slice(&start.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
                put_counted(&mut p, block, "REQ_PAGES_ID block name", out_at)?;
            }
            RpMessage::ReqPages { start, len } => {
                p.extend_from_slice(&start.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
            }
            RpMessage::RecvBitmap { block, bitmap } => {
                if !bitmap.len().is_multiple_of(8) {
                    return Err(bad(format!(
                        "received bitmap of {} bytes (a multiple of 8 is required)",
                        bitmap.len()
                    )));
                }
                put_counted(&mut p, block, "RECV_BITMAP block name", out_at)?
            }
            RpMessage::SwitchoverAck => {}
            RpMessage::Unknown { msg_type, payload } => {
                if message_name(*msg_type) != "UNKNOWN" {
                    return Err(bad(format!(
                        "an unknown message of type {msg_type} would be read back as {}",
                        message_name(*msg_type)
                    )));
                }
                p.extend_from_slice(payload)
            }
        }
        if p.len() > MAX_RP_PAYLOAD {
            return Err(bad(format!(
                "{} payload of {} bytes (QEMU's source refuses more than {MAX_RP_PAYLOAD})",
                self.name(),
                p.len()
            )));
        }
        out.extend_from_slice(&self.msg_type().to_be_bytes());
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(&p);
        if let RpMessage::RecvBitmap { bitmap, .. } = self {
            write_recv_bitmap_trailer(out, bitmap)?;
        }
        Ok(())
    }
}

/// Largest return-path payload QEMU's source accepts (`source_return_path_thread`).
pub const MAX_RP_PAYLOAD: usize = 512;

/// Writes the received-bitmap trailer: be64 size, the bitmap, be64 end marker.
///
/// # Errors
/// [`crate::WireError::Unwritable`] (nothing is written) when the bitmap's
/// length is not a multiple of 8.
pub fn write_recv_bitmap_trailer(out: &mut Vec<u8>, bitmap: &[u8]) -> Result<(), crate::WireError> {
    if !bitmap.len().is_multiple_of(8) {
        return Err(crate::names::unwritable(
            out.len(),
            "received bitmap",
            format!("{} bytes (a multiple of 8 is required)", bitmap.len()),
        ));
    }
    out.extend_from_slice(&(bitmap.len() as u64).to_be_bytes());
    out.extend_from_slice(bitmap);
    out.extend_from_slice(&RECV_BITMAP_ENDING.to_be_bytes());
    Ok(())
}

/// Size in bytes of the received bitmap for `pages` target pages:
/// `ceil(pages / 8)` rounded up to a multiple of 8.
pub fn recv_bitmap_size(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// Parses one return-path message (with its trailer for RECV_BITMAP).
pub(crate) fn parse_rp_message(i: &[u8], max_bitmap: u64) -> PResult<'_, RpMessage<'_>> {
    let at = i;
    let (i, t) = be_u16(i)?;
    let (i, len) = be_u16(i)?;
    let expect = |ok: bool, expected: &'static str| -> Result<(), nom::Err<crate::error::PErr>> {
        if ok {
            Ok(())
        } else {
            fail!(
                at,
                ReturnPathLength {
                    msg_type: t,
                    name: message_name(t),
                    len: len,
                    expected: expected
                }
            )
        }
    };
    // QEMU's source (source_return_path_thread) refuses longer messages,
    // whatever their type; the writer refuses them too.
    expect(len as usize <= MAX_RP_PAYLOAD, "at most 512")?;
    match t {
        msg::SHUT | msg::PONG | msg::RESUME_ACK => expect(len == 4, "4")?,
        msg::REQ_PAGES => expect(len == 12, "12")?,
        msg::REQ_PAGES_ID => expect(len >= 14, "13 + block name length")?,
        msg::RECV_BITMAP => expect(len >= 2, "1 + block name length")?,
        msg::SWITCHOVER_ACK => expect(len == 0, "0")?,
        _ => {}
    }
    let (rest, p) = take(len as usize)(i)?;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let be64 = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_be_bytes(a)
    };
    let name_at = |off: usize, what: &'static str| -> Result<&[u8], nom::Err<crate::error::PErr>> {
        let n = p[off] as usize;
        if n == 0 {
            fail!(
                &i[off..],
                BadName {
                    what: what,
                    why: "length is 0"
                }
            );
        }
        if p.len() != off + 1 + n {
            fail!(
                at,
                ReturnPathLength {
                    msg_type: t,
                    name: message_name(t),
                    len: len,
                    expected: "exactly the fixed fields + the counted block name"
                }
            );
        }
        Ok(&p[off + 1..])
    };
    let m = match t {
        msg::SHUT => RpMessage::Shut(be32(p)),
        msg::PONG => RpMessage::Pong(be32(p)),
        msg::RESUME_ACK => RpMessage::ResumeAck(be32(p)),
        msg::REQ_PAGES => RpMessage::ReqPages {
            start: be64(p),
            len: be32(&p[8..]),
        },
        msg::REQ_PAGES_ID => {
            let nb = name_at(12, "REQ_PAGES_ID block name")?;
            let block = match check_name(nb) {
                Ok(b) => b,
                Err(why) => fail!(
                    &i[12..],
                    BadName {
                        what: "REQ_PAGES_ID block name",
                        why: why
                    }
                ),
            };
            RpMessage::ReqPagesId {
                start: be64(p),
                len: be32(&p[8..]),
                block,
            }
        }
        msg::SWITCHOVER_ACK => RpMessage::SwitchoverAck,
        msg::RECV_BITMAP => {
            let nb = name_at(0, "RECV_BITMAP block name")?;
            let block = match check_name(nb) {
                Ok(b) => b,
                Err(why) => fail!(
                    i,
                    BadName {
                        what: "RECV_BITMAP block name",
                        why: why
                    }
                ),
            };
            let size_at = rest;
            let (r, size) = be_u64(rest)?;
            if size > max_bitmap {
                fail!(
                    size_at,
                    TooLarge {
                        what: "received bitmap",
                        len: size,
                        cap: max_bitmap
                    }
                );
            }
            if !size.is_multiple_of(8) {
                fail!(size_at, BitmapSize { size: size });
            }
            let (r, bitmap) = take(size as usize)(r)?;
            let end_at = r;
            let (r, end) = be_u64(r)?;
            if end != RECV_BITMAP_ENDING {
                fail!(end_at, BitmapEndMarker { found: end });
            }
            return Ok((r, RpMessage::RecvBitmap { block, bitmap }));
        }
        _ => RpMessage::Unknown {
            msg_type: t,
            payload: p,
        },
    };
    Ok((rest, m))
}
