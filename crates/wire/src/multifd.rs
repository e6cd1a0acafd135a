//! Multifd channels (QEMU 4.0+ `multifd` capability): each extra connection
//! starts with a 64-byte channel header, then carries packets.
//!
//! Layout as QEMU 10 sends it (checked on captures, see
//! `tests/data/multifd/`), all integers big-endian, structures packed:
//!
//! * channel header (`MultiFDInit_t`, 64 bytes): be32 magic `0x11223344`,
//!   be32 version 1, 16-byte VM UUID, u8 channel id, 39 reserved bytes.
//! * packet header (`MultiFDPacketHdr_t`, 12 bytes): be32 magic, be32
//!   version 1, be32 flags (bit 0 SYNC, bits 1-4 the compression method,
//!   bit 6 DEVICE_STATE).
//! * RAM packet (`MultiFDPacket_t`): the header, be32 `pages_alloc`, be32
//!   `normal_pages`, be32 `next_packet_size`, be64 `packet_num`, be32
//!   `zero_pages`, 28 reserved bytes, a 256-byte NUL-padded block name, then
//!   the offset array — always `page_count = 512 KiB / target page size`
//!   be64 entries whatever the counts say (normal page offsets first, zero
//!   page offsets next, the rest zero) — 320 + 8 × `page_count` bytes in all.
//!   The payload follows: `normal_pages` raw pages without compression, else
//!   `next_packet_size` bytes of zlib or zstd output. Each channel keeps one
//!   compression stream for the whole migration, flushed (not ended) at the
//!   end of every packet: a packet's payload continues the stream of the
//!   channel's earlier packets and inflates to `normal_pages` pages. A
//!   packet with no normal pages has an empty payload (its compression bits
//!   still set). SYNC packets (QEMU 10: the flag alone, no compression bits)
//!   have all counts 0 but the full-size offset array.
//! * device-state packet (`MultiFDPacketDeviceState_t`, 276 bytes): the
//!   header with DEVICE_STATE, a 256-byte NUL-padded idstr, be32 instance id,
//!   be32 `next_packet_size`, then that many bytes of device state.
//!
//! Parsers borrow from the input and allocate nothing; every count and
//! length is checked against the page size and caps before the bytes it
//! announces are taken. Serializers write back the same bytes
//! (`write(parse(b)) == b`), reserved bytes and stale name bytes included.

use crate::error::WireError;

/// Magic of channel headers and packets.
pub const MAGIC: u32 = 0x1122_3344;
/// The only version QEMU sends and accepts.
pub const VERSION: u32 = 1;
/// Length of the channel header.
pub const INIT_LEN: usize = 64;
/// Length of a packet header.
pub const PACKET_HEADER_LEN: usize = 12;
/// RAM packet bytes before the offset array.
pub const RAM_PACKET_FIXED_LEN: usize = 320;
/// Length of a device-state packet (without its data).
pub const DEVICE_STATE_LEN: usize = 276;
/// Bytes of guest pages one RAM packet covers (`MULTIFD_PACKET_SIZE`).
pub const PACKET_SIZE: u64 = 512 << 10;
/// Largest compressed payload accepted (twice the pages it can hold; zlib
/// and zstd bounds for 512 KiB are well under).
pub const MAX_COMPRESSED: u32 = 2 * PACKET_SIZE as u32;
/// Default cap on one device-state packet's data.
pub const DEFAULT_MAX_DEVICE_STATE: u32 = 64 << 20;

/// Packet flag bits.
pub mod flags {
    /// Synchronisation point (pairs with the main stream's MULTIFD_FLUSH).
    pub const SYNC: u32 = 1;
    /// The compression method bits.
    pub const COMPRESSION_MASK: u32 = 0xf << 1;
    /// No compression.
    pub const NOCOMP: u32 = 0;
    /// zlib.
    pub const ZLIB: u32 = 1 << 1;
    /// zstd.
    pub const ZSTD: u32 = 2 << 1;
    /// Intel QPL.
    pub const QPL: u32 = 4 << 1;
    /// UADK.
    pub const UADK: u32 = 8 << 1;
    /// A device-state packet (QEMU 10+, VFIO).
    pub const DEVICE_STATE: u32 = 1 << 6;
    /// Every bit QEMU defines.
    pub const KNOWN: u32 = SYNC | COMPRESSION_MASK | DEVICE_STATE;
}

/// The compression method a packet's flags name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `none`.
    None,
    /// `zlib`.
    Zlib,
    /// `zstd`.
    Zstd,
}

impl Compression {
    /// QEMU's parameter value (`multifd-compression`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// Offset entries per RAM packet for a target page size (`page_count`).
pub fn page_count(page_size: u64) -> u64 {
    PACKET_SIZE / page_size.max(1)
}

/// Length of a RAM packet (header, counts, name, offset array) for a
/// target page size.
pub fn ram_packet_len(page_size: u64) -> usize {
    RAM_PACKET_FIXED_LEN + 8 * page_count(page_size) as usize
}

fn err(offset: u64, why: impl Into<String>) -> WireError {
    WireError::Multifd {
        offset,
        why: why.into(),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The 64-byte header that opens every multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInit {
    /// The source VM's UUID (zeros when none was set).
    pub uuid: [u8; 16],
    /// The channel's id (0 .. multifd-channels - 1).
    pub id: u8,
    /// The reserved bytes (zero from QEMU), kept for byte-exact output.
    pub reserved: [u8; 39],
}

impl ChannelInit {
    /// Parses a channel header at the start of `buf` (absolute offset
    /// `base`): `Ok(None)` if fewer than 64 bytes are there.
    ///
    /// # Errors
    /// [`WireError::Multifd`] for a bad magic or version (QEMU's
    /// `multifd_recv_initial_packet`).
    pub fn parse(buf: &[u8], base: u64) -> Result<Option<ChannelInit>, WireError> {
        if buf.len() < INIT_LEN {
            return Ok(None);
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(err(
                base,
                format!("channel header magic {magic:#010x}, expected {MAGIC:#010x}"),
            ));
        }
        let version = be32(buf, 4);
        if version != VERSION {
            return Err(err(
                base + 4,
                format!("channel header version {version}, only {VERSION} exists"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[8..24]);
        let mut reserved = [0u8; 39];
        reserved.copy_from_slice(&buf[25..64]);
        Ok(Some(ChannelInit {
            uuid,
            id: buf[24],
            reserved,
        }))
    }

    /// Appends the 64 header bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.uuid);
        out.push(self.id);
        out.extend_from_slice(&self.reserved);
    }
}

/// A RAM packet, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPacket<'a> {
    /// The flags (SYNC and the compression bits).
    pub flags: u32,
    /// `pages_alloc`: the sender's offset-array size (0 in SYNC packets).
    pub pages_alloc: u32,
    /// Pages whose content follows.
    pub normal_pages: u32,
    /// Bytes of payload (the pages, or the compressed stream).
    pub next_packet_size: u32,
    /// Sequence number across all channels.
    pub packet_num: u64,
    /// Pages that are zero (offsets only).
    pub zero_pages: u32,
    /// `unused32` and `unused64[3]` (28 bytes).
    pub reserved: &'a [u8],
    /// The 256-byte block name field (NUL-padded; bytes after the NUL kept).
    pub ramblock: &'a [u8],
    /// The whole offset array (`page_count` be64 entries).
    pub offsets: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

impl RamPacket<'_> {
    /// Whether SYNC is set.
    pub fn is_sync(&self) -> bool {
        self.flags & flags::SYNC != 0
    }

    /// The compression method (checked when parsed).
    pub fn compression(&self) -> Compression {
        match self.flags & flags::COMPRESSION_MASK {
            flags::ZLIB => Compression::Zlib,
            flags::ZSTD => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// The block name: the bytes before the first NUL (QEMU reads at most 255).
    pub fn block_name(&self) -> &[u8] {
        let f = &self.ramblock[..self.ramblock.len().min(255)];
        let n = f.iter().position(|&b| b == 0).unwrap_or(f.len());
        &f[..n]
    }

    /// Offset entry `i` of the array (bytes into the block).
    pub fn offset(&self, i: usize) -> u64 {
        be64(self.offsets, i * 8)
    }

    /// Offsets of the normal pages, in payload order.
    pub fn normal_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.normal_pages as usize).map(|i| self.offset(i))
    }

    /// Offsets of the zero pages.
    pub fn zero_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let n = self.normal_pages as usize;
        (n..n + self.zero_pages as usize).map(|i| self.offset(i))
    }
}

/// A device-state packet (QEMU 10 multifd device state, used by VFIO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatePacket<'a> {
    /// The flags (DEVICE_STATE, maybe SYNC).
    pub flags: u32,
    /// The 256-byte idstr field (NUL-padded).
    pub idstr: &'a [u8],
    /// The device's instance id.
    pub instance_id: u32,
    /// The device state bytes (`next_packet_size` of them).
    pub data: &'a [u8],
}

impl DeviceStatePacket<'_> {
    /// The idstr: the bytes before the first NUL (at most 255).
    pub fn name(&self) -> &[u8] {
        let f = &self.idstr[..self.idstr.len().min(255)];
        let n = f.iter().position(|&b| b == 0).unwrap_or(f.len());
        &f[..n]
    }
}

/// One packet of a multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// RAM pages (or a SYNC).
    Ram(RamPacket<'a>),
    /// Device state.
    DeviceState(DeviceStatePacket<'a>),
}

/// What a packet parser needs to know about the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketContext {
    /// The target page size (bytes; a power of two from 1 KiB to 64 KiB).
    pub page_size: u64,
    /// Largest device-state data accepted (bytes).
    pub max_device_state: u32,
}

impl PacketContext {
    /// A context for `page_size` with the default caps.
    pub fn new(page_size: u64) -> Self {
        PacketContext {
            page_size,
            max_device_state: DEFAULT_MAX_DEVICE_STATE,
        }
    }
}

/// Parses one packet at the start of `buf` (absolute offset `base`):
/// `Ok(None)` when `buf` does not hold all of it yet, else the packet and
/// its length.
///
/// # Errors
/// [`WireError::Multifd`] for a bad magic, version or flag bits, an
/// unsupported compression method (QPL, UADK) or a combination QEMU never
/// sends, counts over `page_count` (as `multifd_recv_unfill_packet`
/// checks), a payload length that disagrees with the counts, or a block
/// name that is not printable; [`WireError::TooLarge`] for a compressed or
/// device-state payload over its cap; [`WireError::PageSize`] for a page
/// size QEMU cannot have. All before the payload is taken.
pub fn parse_packet<'a>(
    buf: &'a [u8],
    base: u64,
    ctx: &PacketContext,
) -> Result<Option<(Packet<'a>, usize)>, WireError> {
    let ps = ctx.page_size;
    if !(1024..=65536).contains(&ps) || !ps.is_power_of_two() {
        return Err(WireError::PageSize {
            offset: base,
            why: format!("{ps} is not a power of two from 1 KiB to 64 KiB"),
        });
    }
    if buf.len() < PACKET_HEADER_LEN {
        return Ok(None);
    }
    let magic = be32(buf, 0);
    if magic != MAGIC {
        return Err(err(
            base,
            format!("packet magic {magic:#010x}, expected {MAGIC:#010x}"),
        ));
    }
    let version = be32(buf, 4);
    if version != VERSION {
        return Err(err(
            base + 4,
            format!("packet version {version}, only {VERSION} exists"),
        ));
    }
    let f = be32(buf, 8);
    if f & !flags::KNOWN != 0 {
        return Err(err(
            base + 8,
            format!("unknown flag bits {:#x}", f & !flags::KNOWN),
        ));
    }
    match f & flags::COMPRESSION_MASK {
        flags::NOCOMP | flags::ZLIB | flags::ZSTD => {}
        flags::QPL | flags::UADK => {
            return Err(err(
                base + 8,
                "QPL or UADK compression (hardware methods qmig does not read)",
            ))
        }
        c => {
            return Err(err(
                base + 8,
                format!("unknown compression method bits {c:#x}"),
            ))
        }
    }
    if f & flags::DEVICE_STATE != 0 {
        if f & flags::COMPRESSION_MASK != 0 {
            return Err(err(base + 8, "device-state packet with compression bits"));
        }
        if buf.len() < DEVICE_STATE_LEN {
            return Ok(None);
        }
        let idstr = &buf[12..268];
        let instance_id = be32(buf, 268);
        let n = be32(buf, 272);
        if n > ctx.max_device_state {
            return Err(WireError::TooLarge {
                offset: base + 272,
                what: "multifd device-state packet",
                len: u64::from(n),
                cap: u64::from(ctx.max_device_state),
            });
        }
        let p = DeviceStatePacket {
            flags: f,
            idstr,
            instance_id,
            data: &[],
        };
        check_name(p.name(), base + 12, "device-state idstr", true)?;
        let total = DEVICE_STATE_LEN + n as usize;
        if buf.len() < total {
            return Ok(None);
        }
        return Ok(Some((
            Packet::DeviceState(DeviceStatePacket {
                data: &buf[DEVICE_STATE_LEN..total],
                ..p
            }),
            total,
        )));
    }
    let fixed = ram_packet_len(ps);
    if buf.len() < fixed {
        return Ok(None);
    }
    let count = page_count(ps);
    let pages_alloc = be32(buf, 12);
    let normal_pages = be32(buf, 16);
    let next_packet_size = be32(buf, 20);
    let packet_num = be64(buf, 24);
    let zero_pages = be32(buf, 32);
    if u64::from(pages_alloc) > count {
        return Err(err(
            base + 12,
            format!("pages_alloc {pages_alloc} over the {count} offsets a packet holds with {ps}-byte pages"),
        ));
    }
    if normal_pages > pages_alloc {
        return Err(err(
            base + 16,
            format!("normal_pages {normal_pages} over pages_alloc {pages_alloc}"),
        ));
    }
    if zero_pages > pages_alloc - normal_pages {
        return Err(err(
            base + 32,
            format!(
                "zero_pages {zero_pages} over pages_alloc {pages_alloc} - normal_pages {normal_pages}"
            ),
        ));
    }
    let comp = f & flags::COMPRESSION_MASK;
    let payload_len = if comp == flags::NOCOMP {
        let want = u64::from(normal_pages) * ps;
        if u64::from(next_packet_size) != want {
            return Err(err(
                base + 20,
                format!("next_packet_size {next_packet_size}, but {normal_pages} uncompressed pages take {want}"),
            ));
        }
        want as usize
    } else {
        if next_packet_size > MAX_COMPRESSED {
            return Err(WireError::TooLarge {
                offset: base + 20,
                what: "multifd compressed payload",
                len: u64::from(next_packet_size),
                cap: u64::from(MAX_COMPRESSED),
            });
        }
        if (normal_pages == 0) != (next_packet_size == 0) {
            return Err(err(
                base + 20,
                format!("next_packet_size {next_packet_size} with {normal_pages} normal pages"),
            ));
        }
        next_packet_size as usize
    };
    let p = RamPacket {
        flags: f,
        pages_alloc,
        normal_pages,
        next_packet_size,
        packet_num,
        zero_pages,
        reserved: &buf[36..64],
        ramblock: &buf[64..320],
        offsets: &buf[320..fixed],
        payload: &[],
    };
    check_name(
        p.block_name(),
        base + 64,
        "RAM block name",
        normal_pages + zero_pages > 0,
    )?;
    let total = fixed + payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Packet::Ram(RamPacket {
            payload: &buf[fixed..total],
            ..p
        }),
        total,
    )))
}

/// A name QEMU looks up must be printable; it must be there when `needed`.
fn check_name(name: &[u8], at: u64, what: &str, needed: bool) -> Result<(), WireError> {
    if name.is_empty() {
        return if needed {
            Err(err(at, format!("empty {what}")))
        } else {
            Ok(())
        };
    }
    if crate::names::check_name(name).is_err() {
        return Err(err(at, format!("{what} is not printable ASCII")));
    }
    Ok(())
}

impl Packet<'_> {
    /// Serializes the packet with the checks of [`parse_packet`] for the
    /// target page size `page_size`.
    ///
    /// # Errors
    /// [`WireError::Unwritable`] (nothing written) for fields a reader
    /// would refuse or that do not fit the layout: a name field other than
    /// 256 bytes, an offset array other than `page_count` entries, reserved
    /// bytes other than 28, a payload that disagrees with the counts.
    pub fn write(&self, out: &mut Vec<u8>, page_size: u64) -> Result<(), WireError> {
        let start = out.len();
        let bad = |why: String| crate::names::unwritable(start, "multifd packet", why);
        let mut tmp = Vec::new();
        match self {
            Packet::Ram(p) => {
                if p.ramblock.len() != 256 || p.reserved.len() != 28 {
                    return Err(bad("name field must be 256 bytes, reserved 28".into()));
                }
                if p.offsets.len() != 8 * page_count(page_size) as usize {
                    return Err(bad(format!(
                        "{} offset bytes, the array holds {} entries",
                        p.offsets.len(),
                        page_count(page_size)
                    )));
                }
                tmp.extend_from_slice(&MAGIC.to_be_bytes());
                tmp.extend_from_slice(&VERSION.to_be_bytes());
                tmp.extend_from_slice(&p.flags.to_be_bytes());
                tmp.extend_from_slice(&p.pages_alloc.to_be_bytes());
                tmp.extend_from_slice(&p.normal_pages.to_be_bytes());
                tmp.extend_from_slice(&p.next_packet_size.to_be_bytes());
                tmp.extend_from_slice(&p.packet_num.to_be_bytes());
                tmp.extend_from_slice(&p.zero_pages.to_be_bytes());
                tmp.extend_from_slice(p.reserved);
                tmp.extend_from_slice(p.ramblock);
                tmp.extend_from_slice(p.offsets);
                tmp.extend_from_slice(p.payload);
            }
            Packet::DeviceState(p) => {
                if p.idstr.len() != 256 {
                    return Err(bad("idstr field must be 256 bytes".into()));
                }
                let n = u32::try_from(p.data.len())
                    .map_err(|_| bad(format!("{} bytes of device state", p.data.len())))?;
                tmp.extend_from_slice(&MAGIC.to_be_bytes());
                tmp.extend_from_slice(&VERSION.to_be_bytes());
                tmp.extend_from_slice(&p.flags.to_be_bytes());
                tmp.extend_from_slice(p.idstr);
                tmp.extend_from_slice(&p.instance_id.to_be_bytes());
                tmp.extend_from_slice(&n.to_be_bytes());
                tmp.extend_from_slice(p.data);
            }
        }
        // The reader must take back exactly these bytes.
        let ctx = PacketContext {
            page_size,
            max_device_state: u32::MAX,
        };
        match parse_packet(&tmp, 0, &ctx) {
            Ok(Some((_, n))) if n == tmp.len() => {}
            Ok(_) => return Err(bad("the fields do not describe the payload given".into())),
            Err(e) => return Err(bad(format!("a reader would refuse it: {e}"))),
        }
        out.extend_from_slice(&tmp);
        Ok(())
    }
}

/// One item of a multifd channel capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelItem<'a> {
    /// The channel header.
    Init(ChannelInit),
    /// A packet.
    Packet(Packet<'a>),
}

/// Iterates over a whole multifd channel held in memory: the channel
/// header, then packets to the end. After an error it ends.
#[derive(Debug, Clone)]
pub struct ChannelReader<'a> {
    buf: &'a [u8],
    pos: usize,
    ctx: PacketContext,
    failed: bool,
}

impl<'a> ChannelReader<'a> {
    /// A reader for a channel captured whole, with its target page size.
    pub fn new(buf: &'a [u8], ctx: PacketContext) -> Self {
        ChannelReader {
            buf,
            pos: 0,
            ctx,
            failed: false,
        }
    }
}

impl<'a> Iterator for ChannelReader<'a> {
    type Item = Result<(u64, ChannelItem<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.buf.len() {
            return None;
        }
        let at = self.pos as u64;
        let rest = &self.buf[self.pos..];
        let r = if self.pos == 0 {
            ChannelInit::parse(rest, 0).map(|o| o.map(|i| (ChannelItem::Init(i), INIT_LEN)))
        } else {
            parse_packet(rest, at, &self.ctx).map(|o| o.map(|(p, n)| (ChannelItem::Packet(p), n)))
        };
        match r {
            Ok(Some((item, n))) => {
                self.pos += n;
                Some(Ok((at, item)))
            }
            Ok(None) => {
                self.failed = true;
                Some(Err(WireError::Truncated {
                    offset: at,
                    end: self.buf.len() as u64,
                    what: if at == 0 {
                        "multifd channel header"
                    } else {
                        "multifd packet"
                    },
                }))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl ChannelItem<'_> {
    /// Serializes the item (see [`Packet::write`]).
    ///
    /// # Errors
    /// As [`Packet::write`].
    pub fn write(&self, out: &mut Vec<u8>, page_size: u64) -> Result<(), WireError> {
        match self {
            ChannelItem::Init(i) => {
                i.write(out);
                Ok(())
            }
            ChannelItem::Packet(p) => p.write(out, page_size),
        }
    }
}
