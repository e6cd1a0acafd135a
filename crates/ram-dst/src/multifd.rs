//! Applying multifd channels (wire-format §13) to a [`RamDst`]'s memory.
//!
//! A multifd migration carries its pages on extra connections: each opens
//! with a channel header ([`qmig_wire::multifd::ChannelInit`]) and then
//! carries packets. This module turns one channel's RAM packets into page
//! writes, in two steps so that a receiver can run the expensive one in a
//! thread per channel:
//!
//! 1. [`ChannelDecoder::decode`] (no access to the memory): checks the
//!    packet against the channel (one compression method per channel) and
//!    inflates its payload through the channel's own zlib (flate2) or zstd
//!    stream, kept across packets as QEMU's `multifd_zlib_recv` /
//!    `multifd_zstd_recv` keep theirs, to exactly `normal_pages` pages.
//! 2. [`RamDst::apply_multifd`]: checks every offset against the block
//!    before touching memory, then writes the normal pages and makes the
//!    zero pages read as zero (only where the page may hold data, as
//!    `multifd_recv_zero_page_process` writes zeros only to received pages),
//!    and sets the received bits.
//!
//! [`SyncPairing`] holds the rule that ties the channels to the main
//! stream: every SYNC packet of a channel pairs with one sync point of the
//! main stream (a MULTIFD_FLUSH record, or the RAM EOS with
//! `multifd-flush-after-each-section`), and a channel does not go past its
//! SYNC until the main stream reached that point (QEMU's
//! `multifd_recv_sync_main`). Pages of one dirty-sync round may go to any
//! channel in any order; a page sent again in a later round is behind a
//! SYNC, so applying each channel in order up to its SYNC and only then
//! letting the main stream go on gives QEMU's result.

use std::io;

use qmig_wire::multifd::{Compression, RamPacket};
use qmig_wire::WireError;

use crate::dst::PostcopyState;
use crate::memory::GuestMemory;
use crate::RamDst;

/// Everything applying a multifd channel can refuse. Every variant names
/// the channel and the byte offset in that channel's connection (0 = the
/// first byte of its channel header), or in the main stream for the sync
/// pairing rules.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MultifdError {
    /// The channel's bytes do not parse (header or packet).
    #[error("multifd channel {channel}: {source}")]
    Wire {
        /// The channel (its id, or the connection number before the header).
        channel: u32,
        /// The parser's error (with the channel offset).
        source: WireError,
    },
    /// A compressed payload that does not inflate to exactly its pages.
    #[error("multifd channel {channel}: offset {offset}: {method} payload: {why}")]
    Decompress {
        /// The channel id.
        channel: u32,
        /// Channel offset of the packet.
        offset: u64,
        /// `zlib` or `zstd`.
        method: &'static str,
        /// What went wrong.
        why: String,
    },
    /// A packet names a block the destination does not have.
    #[error("multifd channel {channel}: offset {offset}: unknown RAM block \"{name}\"")]
    UnknownBlock {
        /// The channel id.
        channel: u32,
        /// Channel offset of the packet.
        offset: u64,
        /// The name from the packet.
        name: String,
    },
    /// A page offset that is unaligned or whose page is not inside the block.
    #[error(
        "multifd channel {channel}: offset {offset}: page at {page_offset:#x} is unaligned or \
         outside RAM block \"{block}\" of {used_length:#x} bytes"
    )]
    PageOutOfBlock {
        /// The channel id.
        channel: u32,
        /// Channel offset of the packet.
        offset: u64,
        /// The block.
        block: String,
        /// The offset from the packet's offset array.
        page_offset: u64,
        /// The block's used length.
        used_length: u64,
    },
    /// A rule of the multifd protocol broken (sync pairing, compression
    /// method, postcopy, page size); `offset` is in `stream` ("main" or
    /// "channel N").
    #[error("{stream}: offset {offset}: {rule}: {why}")]
    Rule {
        /// Where: `main` or `channel N`.
        stream: String,
        /// Offset in that stream.
        offset: u64,
        /// The rule (QEMU's function or term).
        rule: &'static str,
        /// What happened.
        why: String,
    },
    /// The memory refused a write.
    #[error("multifd channel {channel}: offset {offset}: writing guest memory: {source}")]
    Memory {
        /// The channel id.
        channel: u32,
        /// Channel offset of the packet.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
}

impl MultifdError {
    /// The byte offset the error names (see the variant).
    pub fn offset(&self) -> u64 {
        match self {
            MultifdError::Wire { source, .. } => source.offset(),
            MultifdError::Decompress { offset, .. }
            | MultifdError::UnknownBlock { offset, .. }
            | MultifdError::PageOutOfBlock { offset, .. }
            | MultifdError::Rule { offset, .. }
            | MultifdError::Memory { offset, .. } => *offset,
        }
    }
}

/// The inflate state of one channel.
enum Inflater {
    None,
    Zlib(Box<flate2::Decompress>),
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

/// Counters of one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// RAM packets (SYNC ones included).
    pub packets: u64,
    /// SYNC packets.
    pub syncs: u64,
    /// Pages with data.
    pub normal_pages: u64,
    /// Pages listed as zero.
    pub zero_pages: u64,
    /// Device-state packets (counted, their data is not applied).
    pub device_state_packets: u64,
}

/// The per-channel receive state: compression method and stream, buffer,
/// counters.
pub struct ChannelDecoder {
    id: u32,
    page_size: u64,
    method: Option<Compression>,
    inflater: Inflater,
    buf: Vec<u8>,
    /// Counters so far.
    pub stats: ChannelStats,
}

impl std::fmt::Debug for ChannelDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDecoder")
            .field("id", &self.id)
            .field("page_size", &self.page_size)
            .field("method", &self.method)
            .field("stats", &self.stats)
            .finish()
    }
}

/// A packet ready to apply: its block, offsets and page data.
#[derive(Debug, Clone, Copy)]
pub struct Decoded<'a> {
    /// Channel offset of the packet.
    pub offset: u64,
    /// The packet.
    pub packet: &'a RamPacket<'a>,
    /// `normal_pages` × page size bytes of page data, in offset order.
    pub data: &'a [u8],
}

impl ChannelDecoder {
    /// A decoder for channel `id` with target page size `page_size` bytes.
    pub fn new(id: u32, page_size: u64) -> Self {
        ChannelDecoder {
            id,
            page_size,
            method: None,
            inflater: Inflater::None,
            buf: Vec::new(),
            stats: ChannelStats::default(),
        }
    }

    /// The channel id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The compression method, once a packet with pages named it.
    pub fn method(&self) -> Option<Compression> {
        self.method
    }

    fn rule(&self, offset: u64, rule: &'static str, why: String) -> MultifdError {
        MultifdError::Rule {
            stream: format!("channel {}", self.id),
            offset,
            rule,
            why,
        }
    }

    /// Counts a device-state packet (QEMU 10 sends them for VFIO devices
    /// only; their data is device state, not RAM).
    pub fn count_device_state(&mut self) {
        self.stats.device_state_packets += 1;
    }

    /// Checks RAM packet `p` (at channel offset `offset`) and inflates its
    /// payload: the result's `data` is `normal_pages` whole pages.
    ///
    /// # Errors
    /// [`MultifdError::Rule`] when the packet's compression method differs
    /// from the channel's earlier packets (QEMU sets one per migration);
    /// [`MultifdError::Decompress`] when the payload is not a continuation
    /// of the channel's stream that yields exactly `normal_pages` pages
    /// with all its bytes used. Output is never larger than 512 KiB.
    pub fn decode<'a>(
        &'a mut self,
        offset: u64,
        p: &'a RamPacket<'a>,
    ) -> Result<Decoded<'a>, MultifdError> {
        self.stats.packets += 1;
        if p.is_sync() {
            self.stats.syncs += 1;
        }
        let pages = u64::from(p.normal_pages) + u64::from(p.zero_pages);
        self.stats.normal_pages += u64::from(p.normal_pages);
        self.stats.zero_pages += u64::from(p.zero_pages);
        if pages == 0 {
            return Ok(Decoded {
                offset,
                packet: p,
                data: &[],
            });
        }
        let m = p.compression();
        match self.method {
            None => {
                self.inflater = match m {
                    Compression::None => Inflater::None,
                    Compression::Zlib => Inflater::Zlib(Box::new(flate2::Decompress::new(true))),
                    Compression::Zstd => {
                        Inflater::Zstd(Box::new(zstd::stream::raw::Decoder::new().map_err(
                            |e| MultifdError::Decompress {
                                channel: self.id,
                                offset,
                                method: "zstd",
                                why: format!("creating the stream: {e}"),
                            },
                        )?))
                    }
                };
                self.method = Some(m);
            }
            Some(was) if was != m => {
                return Err(self.rule(
                    offset + 8,
                    "multifd-compression",
                    format!(
                        "packet compressed with {}, earlier packets of this channel with {}",
                        m.name(),
                        was.name()
                    ),
                ))
            }
            Some(_) => {}
        }
        let want = p.normal_pages as usize * self.page_size as usize;
        let id = self.id;
        let fail = |method: &'static str, why: String| MultifdError::Decompress {
            channel: id,
            offset,
            method,
            why,
        };
        match &mut self.inflater {
            Inflater::None => {
                return Ok(Decoded {
                    offset,
                    packet: p,
                    data: p.payload,
                })
            }
            Inflater::Zlib(z) => {
                self.buf.resize(want, 0);
                let input = p.payload;
                let (in0, out0) = (z.total_in(), z.total_out());
                loop {
                    let i = (z.total_in() - in0) as usize;
                    let o = (z.total_out() - out0) as usize;
                    if i == input.len() && o == want {
                        break;
                    }
                    let st = z
                        .decompress(
                            &input[i..],
                            &mut self.buf[o..],
                            flate2::FlushDecompress::Sync,
                        )
                        .map_err(|e| fail("zlib", e.to_string()))?;
                    let (i2, o2) = (
                        (z.total_in() - in0) as usize,
                        (z.total_out() - out0) as usize,
                    );
                    if (i2, o2) == (i, o) || st == flate2::Status::StreamEnd {
                        if i2 != input.len() || o2 != want {
                            return Err(fail(
                                "zlib",
                                format!(
                                    "{i2} of {} payload bytes gave {o2} bytes, {} pages take {want}{}",
                                    input.len(),
                                    p.normal_pages,
                                    if st == flate2::Status::StreamEnd {
                                        " (the stream ended)"
                                    } else {
                                        ""
                                    }
                                ),
                            ));
                        }
                        break;
                    }
                }
            }
            Inflater::Zstd(d) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                self.buf.resize(want, 0);
                let mut input = InBuffer::around(p.payload);
                let mut out = OutBuffer::around(&mut self.buf[..]);
                loop {
                    let (i, o) = (input.pos(), out.pos());
                    if i == p.payload.len() && o == want {
                        break;
                    }
                    d.run(&mut input, &mut out)
                        .map_err(|e| fail("zstd", e.to_string()))?;
                    if (input.pos(), out.pos()) == (i, o) {
                        return Err(fail(
                            "zstd",
                            format!(
                                "{i} of {} payload bytes gave {o} bytes, {} pages take {want}",
                                p.payload.len(),
                                p.normal_pages
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Decoded {
            offset,
            packet: p,
            data: &self.buf[..want],
        })
    }
}

impl<M: GuestMemory> RamDst<M> {
    /// Applies a decoded multifd RAM packet of channel `channel`: checks
    /// the block name and every offset first (nothing is written if one is
    /// wrong), then writes the normal pages and zeroes the zero pages that
    /// may hold data, setting their received bits.
    ///
    /// # Errors
    /// [`MultifdError::Rule`] when the machine is stopped, in postcopy
    /// (QEMU 10.0 refuses multifd with postcopy-ram; 10.1 keeps multifd idle
    /// after switchover) or uses another target page size than the packet's
    /// data; [`MultifdError::UnknownBlock`], [`MultifdError::PageOutOfBlock`]
    /// (as `multifd_recv_unfill_packet` checks); [`MultifdError::Memory`].
    pub fn apply_multifd(&mut self, channel: u32, d: &Decoded<'_>) -> Result<(), MultifdError> {
        let p = d.packet;
        let at = d.offset;
        let rule = |rule: &'static str, why: String| MultifdError::Rule {
            stream: format!("channel {channel}"),
            offset: at,
            rule,
            why,
        };
        if p.normal_pages + p.zero_pages == 0 {
            return Ok(());
        }
        if self.is_stopped() {
            return Err(rule(
                "multifd_recv_thread",
                "the main stream already failed".into(),
            ));
        }
        if self.postcopy_state() >= PostcopyState::Listening {
            return Err(rule(
                "postcopy-ram",
                "multifd packet with pages during postcopy".into(),
            ));
        }
        let tps = self.page_size();
        if d.data.len() as u64 != u64::from(p.normal_pages) * tps {
            return Err(rule(
                "target page size",
                format!(
                    "{} bytes of data for {} pages of {tps} bytes",
                    d.data.len(),
                    p.normal_pages
                ),
            ));
        }
        let name = String::from_utf8_lossy(p.block_name());
        let Some(b) = self.block_index(&name) else {
            return Err(MultifdError::UnknownBlock {
                channel,
                offset: at + 64,
                name: name.into_owned(),
            });
        };
        let (mem, blocks) = self.multifd_parts();
        let blk = &mut blocks[b];
        let used = blk.used_length();
        let bad = |o: u64| !o.is_multiple_of(tps) || o.checked_add(tps).is_none_or(|e| e > used);
        if let Some(o) = p.normal_offsets().chain(p.zero_offsets()).find(|&o| bad(o)) {
            return Err(MultifdError::PageOutOfBlock {
                channel,
                offset: at,
                block: name.into_owned(),
                page_offset: o,
                used_length: used,
            });
        }
        let mem_err = |source| MultifdError::Memory {
            channel,
            offset: at,
            source,
        };
        for (o, page) in p.normal_offsets().zip(d.data.chunks_exact(tps as usize)) {
            mem.write(b, o, page).map_err(mem_err)?;
            blk.mark_received(o / tps, true);
        }
        for o in p.zero_offsets() {
            if blk.maybe_nonzero(o / tps) {
                mem.zero_page(b, o, tps).map_err(mem_err)?;
            }
            blk.mark_received(o / tps, false);
        }
        Ok(())
    }
}

/// Where the main stream syncs with the channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPoint {
    /// At each MULTIFD_FLUSH record (QEMU 8.1+ machine types).
    Flush,
    /// At each RAM EOS record (`multifd-flush-after-each-section`, the
    /// default of machine types up to 8.0 and of QEMU before 8.1).
    Eos,
}

impl SyncPoint {
    /// The sync point a source with machine type version `machine` uses
    /// (QEMU ≥ 8.1 sets `multifd-flush-after-each-section` off from the 8.1
    /// machine types on); `None` (unversioned machine) → [`SyncPoint::Flush`].
    pub fn for_machine(machine: Option<(u32, u32)>) -> SyncPoint {
        match machine {
            Some(v) if v < (8, 1) => SyncPoint::Eos,
            _ => SyncPoint::Flush,
        }
    }

    /// Whether the RAM record `body` is this sync point.
    pub fn matches(self, body: &qmig_wire::RamBody<'_>) -> bool {
        matches!(
            (self, body),
            (SyncPoint::Flush, qmig_wire::RamBody::MultifdFlush)
                | (SyncPoint::Eos, qmig_wire::RamBody::Eos)
        )
    }
}

/// The SYNC pairing rule, as counters: how many sync points the main
/// stream reached and how many SYNC packets each channel delivered.
/// A channel may be at most one SYNC ahead of the main stream (it waits
/// there), and the main stream may pass its sync point `k` only when
/// every channel delivered SYNC `k`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPairing {
    /// Sync points the main stream passed.
    pub released: u64,
    /// SYNC packets per channel (by connection index).
    pub synced: Vec<u64>,
}

impl SyncPairing {
    /// Whether every channel delivered the SYNC of the next sync point.
    pub fn all_synced(&self) -> bool {
        self.synced.iter().all(|&s| s > self.released)
    }

    /// Records a SYNC packet on connection `i` at channel offset `at`.
    ///
    /// # Errors
    /// [`MultifdError::Rule`] if the channel is already a SYNC ahead of
    /// the main stream (it would have to wait first).
    pub fn sync(&mut self, i: usize, id: u32, at: u64) -> Result<(), MultifdError> {
        let s = &mut self.synced[i];
        if *s > self.released {
            return Err(MultifdError::Rule {
                stream: format!("channel {id}"),
                offset: at,
                rule: "multifd_recv_sync_main",
                why: format!(
                    "SYNC {} before the main stream reached sync point {}",
                    *s + 1,
                    *s
                ),
            });
        }
        *s += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Packets built the way a QEMU 10 sender builds them (one zlib or
    //! zstd stream per channel, flushed at the end of every packet) decode
    //! and apply to the pages that went in; hostile packets are refused
    //! before memory changes.

    use super::*;
    use crate::{Config, VecMemory};
    use proptest::prelude::*;
    use qmig_wire::multifd::{flags, page_count, parse_packet, Packet, PacketContext};
    use qmig_wire::{Item, MemBlock, RamRecord};

    const PS: u64 = 4096;
    const BLOCK: u64 = 64 * PS;

    fn dst() -> RamDst<VecMemory> {
        let mut d = RamDst::new(Config::default(), VecMemory::new()).unwrap();
        let blocks = vec![MemBlock {
            name: "pc.ram",
            used_length: BLOCK,
            page_size: None,
            addr: None,
        }];
        d.handle_item(0, 1, &Item::Ram(RamRecord::mem_size(blocks)))
            .unwrap();
        d
    }

    /// A sender's channel: the compression stream kept across packets.
    enum Enc {
        None,
        Zlib(flate2::Compress),
        Zstd(zstd::stream::raw::Encoder<'static>),
    }

    impl Enc {
        fn new(m: Compression) -> Enc {
            match m {
                Compression::None => Enc::None,
                Compression::Zlib => {
                    Enc::Zlib(flate2::Compress::new(flate2::Compression::new(1), true))
                }
                Compression::Zstd => Enc::Zstd(zstd::stream::raw::Encoder::new(1).unwrap()),
            }
        }

        fn bits(&self) -> u32 {
            match self {
                Enc::None => flags::NOCOMP,
                Enc::Zlib(_) => flags::ZLIB,
                Enc::Zstd(_) => flags::ZSTD,
            }
        }

        fn packet_payload(&mut self, data: &[u8]) -> Vec<u8> {
            match self {
                Enc::None => data.to_vec(),
                Enc::Zlib(z) => {
                    let mut out = Vec::with_capacity(data.len() + 1024);
                    z.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
                        .unwrap();
                    out
                }
                Enc::Zstd(e) => {
                    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                    let mut out = vec![0u8; data.len() + 1024];
                    let mut o = OutBuffer::around(&mut out[..]);
                    let mut i = InBuffer::around(data);
                    while i.pos() < data.len() {
                        e.run(&mut i, &mut o).unwrap();
                    }
                    while e.flush(&mut o).unwrap() > 0 {}
                    let n = o.pos();
                    out.truncate(n);
                    out
                }
            }
        }
    }

    /// Serialized packet bytes for `normal` (offset, page) and `zero` offsets.
    fn packet(enc: &mut Enc, normal: &[(u64, Vec<u8>)], zero: &[u64], sync: bool) -> Vec<u8> {
        let data: Vec<u8> = normal.iter().flat_map(|(_, p)| p.clone()).collect();
        let payload = if normal.is_empty() {
            Vec::new()
        } else {
            enc.packet_payload(&data)
        };
        let mut offsets = vec![0u8; 8 * page_count(PS) as usize];
        for (i, o) in normal
            .iter()
            .map(|x| x.0)
            .chain(zero.iter().copied())
            .enumerate()
        {
            offsets[i * 8..i * 8 + 8].copy_from_slice(&o.to_be_bytes());
        }
        let mut name = [0u8; 256];
        name[..6].copy_from_slice(b"pc.ram");
        let comp = if normal.is_empty() && zero.is_empty() {
            0
        } else {
            enc.bits()
        };
        let p = Packet::Ram(RamPacket {
            flags: comp | if sync { flags::SYNC } else { 0 },
            pages_alloc: page_count(PS) as u32,
            normal_pages: normal.len() as u32,
            next_packet_size: payload.len() as u32,
            packet_num: 0,
            zero_pages: zero.len() as u32,
            reserved: &[0; 28],
            ramblock: &name,
            offsets: &offsets,
            payload: &payload,
        });
        let mut out = Vec::new();
        p.write(&mut out, PS).unwrap();
        out
    }

    fn apply(
        d: &mut RamDst<VecMemory>,
        dec: &mut ChannelDecoder,
        bytes: &[u8],
    ) -> Result<(), MultifdError> {
        let ctx = PacketContext::new(PS);
        let (p, n) = parse_packet(bytes, 64, &ctx).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        let Packet::Ram(r) = p else {
            panic!("not a RAM packet")
        };
        let id = dec.id();
        let x = dec.decode(64, &r)?;
        d.apply_multifd(id, &x)
    }

    fn method() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::None),
            Just(Compression::Zlib),
            Just(Compression::Zstd)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Rounds of packets (each page at most once per round, as between
        /// two SYNCs) through one channel's stream give the last content.
        #[test]
        fn packets_through_one_stream_give_the_pages(
            m in method(),
            rounds in prop::collection::vec(
                prop::collection::vec((0u64..64, 0u8..4, any::<u8>()), 1..24), 1..4),
        ) {
            let mut d = dst();
            let mut enc = Enc::new(m);
            let mut dec = ChannelDecoder::new(0, PS);
            let mut want = vec![0u8; BLOCK as usize];
            for round in rounds {
                let mut seen = std::collections::BTreeMap::new();
                for (page, kind, fill) in round {
                    seen.insert(page, (kind, fill));
                }
                let mut normal = Vec::new();
                let mut zero = Vec::new();
                for (&page, &(kind, fill)) in &seen {
                    let o = page * PS;
                    if kind == 0 {
                        zero.push(o);
                        want[o as usize..(o + PS) as usize].fill(0);
                    } else {
                        let content: Vec<u8> = (0..PS).map(|i| fill ^ (i as u8).wrapping_mul(kind)).collect();
                        want[o as usize..(o + PS) as usize].copy_from_slice(&content);
                        normal.push((o, content));
                    }
                }
                // Split into packets of at most 5 pages.
                for chunk in normal.chunks(5) {
                    apply(&mut d, &mut dec, &packet(&mut enc, chunk, &[], false)).unwrap();
                }
                apply(&mut d, &mut dec, &packet(&mut enc, &[], &zero, false)).unwrap();
                apply(&mut d, &mut dec, &packet(&mut enc, &[], &[], true)).unwrap();
            }
            prop_assert_eq!(d.memory().block("pc.ram").unwrap(), &want[..]);
        }
    }

    #[test]
    fn offset_outside_the_block_is_refused_before_any_write() {
        let mut d = dst();
        let mut enc = Enc::new(Compression::None);
        let mut dec = ChannelDecoder::new(3, PS);
        let b = packet(
            &mut enc,
            &[(0, vec![9; PS as usize]), (BLOCK, vec![9; PS as usize])],
            &[],
            false,
        );
        let e = apply(&mut d, &mut dec, &b).unwrap_err();
        assert!(
            matches!(e, MultifdError::PageOutOfBlock { channel: 3, page_offset, .. } if page_offset == BLOCK),
            "{e}"
        );
        assert!(d.memory().block("pc.ram").unwrap().iter().all(|&x| x == 0));
        let b = packet(&mut enc, &[(17, vec![9; PS as usize])], &[], false);
        assert!(matches!(
            apply(&mut d, &mut dec, &b).unwrap_err(),
            MultifdError::PageOutOfBlock { .. }
        ));
    }

    #[test]
    fn corrupt_or_short_compressed_payload_is_a_typed_error() {
        for m in [Compression::Zlib, Compression::Zstd] {
            let mut enc = Enc::new(m);
            let pages: Vec<(u64, Vec<u8>)> = (0..4)
                .map(|i| (i * PS, vec![i as u8 + 1; PS as usize]))
                .collect();
            let mut b = packet(&mut enc, &pages, &[], false);
            // Claim one more page than the payload holds.
            let n = u32::from_be_bytes(b[16..20].try_into().unwrap());
            b[16..20].copy_from_slice(&(n + 1).to_be_bytes());
            b[320 + 8 * 4..320 + 8 * 5].copy_from_slice(&(4 * PS).to_be_bytes());
            let mut d = dst();
            let mut dec = ChannelDecoder::new(1, PS);
            let e = apply(&mut d, &mut dec, &b).unwrap_err();
            assert!(
                matches!(
                    e,
                    MultifdError::Decompress {
                        channel: 1,
                        offset: 64,
                        ..
                    }
                ),
                "{m:?}: {e}"
            );
            // Garbage instead of the stream.
            let mut enc = Enc::new(m);
            let mut b = packet(&mut enc, &pages, &[], false);
            let fixed = 320 + 8 * page_count(PS) as usize;
            for x in &mut b[fixed..] {
                *x ^= 0x5a;
            }
            let mut dec = ChannelDecoder::new(1, PS);
            assert!(
                matches!(
                    apply(&mut d, &mut dec, &b).unwrap_err(),
                    MultifdError::Decompress { .. }
                ),
                "{m:?}"
            );
        }
    }

    #[test]
    fn compression_method_change_and_unknown_block_are_refused() {
        let mut d = dst();
        let mut dec = ChannelDecoder::new(0, PS);
        let page = vec![(0, vec![1u8; PS as usize])];
        apply(
            &mut d,
            &mut dec,
            &packet(&mut Enc::new(Compression::None), &page, &[], false),
        )
        .unwrap();
        let e = apply(
            &mut d,
            &mut dec,
            &packet(&mut Enc::new(Compression::Zlib), &page, &[], false),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                MultifdError::Rule {
                    rule: "multifd-compression",
                    ..
                }
            ),
            "{e}"
        );
        let mut b = packet(&mut Enc::new(Compression::None), &page, &[], false);
        b[64..70].copy_from_slice(b"pc.rom");
        let mut dec = ChannelDecoder::new(0, PS);
        let e = apply(&mut d, &mut dec, &b).unwrap_err();
        assert!(
            matches!(e, MultifdError::UnknownBlock { ref name, .. } if name == "pc.rom"),
            "{e}"
        );
    }

    #[test]
    fn sync_pairing_allows_one_sync_ahead_only() {
        let mut s = SyncPairing {
            released: 0,
            synced: vec![0, 0],
        };
        s.sync(0, 0, 100).unwrap();
        assert!(!s.all_synced());
        assert!(s.sync(0, 0, 200).is_err());
        s.sync(1, 1, 100).unwrap();
        assert!(s.all_synced());
        s.released += 1;
        s.sync(0, 0, 300).unwrap();
    }
}
