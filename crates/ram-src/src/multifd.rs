//! The source side of multifd (wire-format §13; QEMU's `multifd_send_*`,
//! `multifd_ram_*` and the nocomp, zlib and zstd `send_prepare` methods),
//! sans-IO: [`MultifdSender`] collects the pages [`crate::RamSrc`] queues,
//! cuts them into packets and appends each packet's bytes to one channel's
//! output buffer; the caller moves those bytes to the channel connections.
//!
//! What it mirrors (checked against the QEMU 10 captures in
//! `tests/data/multifd/`):
//!
//! * every channel starts with its 64-byte `MultiFDInit_t` header;
//! * pages are queued per block, up to `page_count` (512 KiB of target
//!   pages) per packet; a page of another block, or one that does not fit,
//!   first sends the queued packet (`multifd_queue_page`);
//! * packets go to the channels in turn (`multifd_send` picks the next
//!   free channel; ours are always free) and take the next `packet_num`;
//! * with `zero-page-detection=multifd`, zero pages are moved to the end of
//!   the offset array by QEMU's two-index swap
//!   (`multifd_send_zero_page_detect`), which also reorders the normal
//!   pages;
//! * zlib and zstd keep one stream per channel for the whole migration:
//!   every normal page is fed in, the last one with a sync flush
//!   (`Z_SYNC_FLUSH`, `ZSTD_e_flush`); a packet without normal pages has an
//!   empty payload but keeps its compression flag;
//! * a sync (`multifd_send_sync_main`) sends the queued packet, then one
//!   SYNC packet (flags SYNC only, all counts 0) on every channel. The
//!   caller pairs it with a MULTIFD_FLUSH record on the main channel, or
//!   with the section's EOS when `multifd-flush-after-each-section` is on.

use qmig_wire::multifd::{flags, page_count, ChannelInit, Compression, MAGIC, VERSION};

use crate::zero::is_zero;
use crate::RamSrcError;

/// QEMU's `zero-page-detection` parameter (9.0+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPageDetection {
    /// `none`: zero pages are sent with their data.
    None,
    /// `legacy`: the migration thread sends zero pages as ZERO records on
    /// the main channel; the packets carry only normal pages.
    Legacy,
    /// `multifd` (QEMU's default): zero pages are listed in the packets.
    #[default]
    Multifd,
}

impl ZeroPageDetection {
    /// QEMU's parameter value.
    pub fn name(self) -> &'static str {
        match self {
            ZeroPageDetection::None => "none",
            ZeroPageDetection::Legacy => "legacy",
            ZeroPageDetection::Multifd => "multifd",
        }
    }
}

/// Multifd settings (QEMU's migration parameters of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultifdConfig {
    /// `multifd-channels` (1..=255).
    pub channels: u8,
    /// `multifd-compression` (none, zlib or zstd).
    pub compression: Compression,
    /// `multifd-zlib-level` (0..=9, QEMU's default 1).
    pub zlib_level: u32,
    /// `multifd-zstd-level` (0..=20, QEMU's default 1).
    pub zstd_level: i32,
    /// `zero-page-detection`.
    pub zero_page_detection: ZeroPageDetection,
    /// `multifd-flush-after-each-section` (on for machine types up to 8.0):
    /// every section's EOS is a sync point and no MULTIFD_FLUSH is sent;
    /// off, a sync happens at setup, at the end of every round over RAM
    /// and at completion, each with a MULTIFD_FLUSH record.
    pub flush_after_each_section: bool,
    /// The VM UUID in the channel headers (the destination compares it
    /// with its own; zeros when neither side was given `-uuid`).
    pub uuid: [u8; 16],
}

impl Default for MultifdConfig {
    fn default() -> Self {
        MultifdConfig {
            channels: 2,
            compression: Compression::None,
            zlib_level: 1,
            zstd_level: 1,
            zero_page_detection: ZeroPageDetection::Multifd,
            flush_after_each_section: false,
            uuid: [0; 16],
        }
    }
}

/// Multifd counters (QEMU's `ram.multifd-bytes`, and the normal and zero
/// page counts its `multifd_send_zero_page_detect` adds to `ram.normal`
/// and `ram.duplicate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MultifdStats {
    /// RAM packets with pages.
    pub packets: u64,
    /// SYNC packets.
    pub sync_packets: u64,
    /// Pages sent with their data.
    pub normal_pages: u64,
    /// Pages listed as zero.
    pub zero_pages: u64,
    /// Every byte written to the channels, headers included.
    pub bytes: u64,
    /// Payload bytes after compression (equals the normal pages' bytes
    /// without compression).
    pub payload_bytes: u64,
    /// Sync points (`multifd_send_sync_main` calls).
    pub syncs: u64,
}

/// One channel's compression stream.
enum Deflater {
    None,
    Zlib(Box<flate2::Compress>),
    Zstd(Box<zstd::stream::raw::Encoder<'static>>),
}

struct ChannelOut {
    out: Vec<u8>,
    deflater: Deflater,
}

/// The multifd source: see the [module docs](self).
pub struct MultifdSender {
    cfg: MultifdConfig,
    page_size: usize,
    page_count: usize,
    channels: Vec<ChannelOut>,
    next_channel: usize,
    packet_num: u64,
    /// The queued packet: its block (index, name), page offsets and data.
    queued_block: Option<(usize, String)>,
    queued_offsets: Vec<u64>,
    queued_data: Vec<u8>,
    /// Scratch: page order after zero detection, compressed payload.
    order: Vec<usize>,
    zbuf: Vec<u8>,
    stats: MultifdStats,
}

impl std::fmt::Debug for MultifdSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultifdSender")
            .field("cfg", &self.cfg)
            .field("page_size", &self.page_size)
            .field("packet_num", &self.packet_num)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Appends one RAM packet (`MultiFDPacket_t`) with pages: header, counts,
/// name, the `page_count` offset entries (normal pages first, then zero
/// pages, the rest 0) and the payload. `pages_alloc` is `page_count`, as
/// QEMU 10 sends it.
///
/// # Errors
/// [`RamSrcError::Config`] for a page size the format cannot carry (not a
/// power of two from 1 KiB to 64 KiB), more offsets than `page_count`, a
/// block name that is empty or over 255 bytes, or an uncompressed payload
/// that is not the normal pages' bytes.
#[allow(clippy::too_many_arguments)]
pub fn write_ram_packet(
    out: &mut Vec<u8>,
    page_size: u64,
    compression: Compression,
    packet_num: u64,
    block: &str,
    normal: &[u64],
    zero: &[u64],
    payload: &[u8],
) -> Result<(), RamSrcError> {
    let bad = |why: String| RamSrcError::Config {
        why: format!("multifd packet: {why}"),
    };
    if !(1024..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(bad(format!("target page size {page_size}")));
    }
    let count = page_count(page_size) as usize;
    if normal.len() + zero.len() > count {
        return Err(bad(format!(
            "{} offsets, a packet holds {count}",
            normal.len() + zero.len()
        )));
    }
    if block.is_empty() || block.len() > 255 {
        return Err(bad(format!("block name of {} bytes", block.len())));
    }
    if compression == Compression::None && payload.len() as u64 != normal.len() as u64 * page_size {
        return Err(bad(format!(
            "{} payload bytes for {} uncompressed pages",
            payload.len(),
            normal.len()
        )));
    }
    let next_packet_size = u32::try_from(payload.len())
        .map_err(|_| bad(format!("{} payload bytes", payload.len())))?;
    out.reserve(320 + 8 * count + payload.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&compression_flag(compression).to_be_bytes());
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&(normal.len() as u32).to_be_bytes());
    out.extend_from_slice(&next_packet_size.to_be_bytes());
    out.extend_from_slice(&packet_num.to_be_bytes());
    out.extend_from_slice(&(zero.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0u8; 28]);
    let mut name = [0u8; 256];
    name[..block.len()].copy_from_slice(block.as_bytes());
    out.extend_from_slice(&name);
    for &o in normal.iter().chain(zero) {
        out.extend_from_slice(&o.to_be_bytes());
    }
    out.resize(out.len() + 8 * (count - normal.len() - zero.len()), 0);
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends one SYNC packet as QEMU 10 sends it: flags SYNC alone, all
/// counts 0, no block name, the full (zero) offset array, no payload.
pub fn write_sync_packet(out: &mut Vec<u8>, page_size: u64, packet_num: u64) {
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&flags::SYNC.to_be_bytes());
    out.extend_from_slice(&[0u8; 12]);
    out.extend_from_slice(&packet_num.to_be_bytes());
    out.resize(
        out.len() + 4 + 28 + 256 + 8 * page_count(page_size) as usize,
        0,
    );
}

fn compression_flag(c: Compression) -> u32 {
    match c {
        Compression::None => flags::NOCOMP,
        Compression::Zlib => flags::ZLIB,
        Compression::Zstd => flags::ZSTD,
    }
}

impl MultifdSender {
    /// A sender for target pages of `page_size` bytes. Every channel's
    /// output starts with its channel header.
    ///
    /// # Errors
    /// [`RamSrcError::Config`] for 0 channels, a page size the packet format
    /// cannot carry (1 KiB to 64 KiB, a power of two), a zlib level over 9
    /// or a zstd level outside 0..=20 (QEMU's parameter ranges).
    pub fn new(cfg: MultifdConfig, page_size: usize) -> Result<Self, RamSrcError> {
        let bad = |why: String| RamSrcError::Config { why };
        if cfg.channels == 0 {
            return Err(bad("multifd-channels must be 1..=255".into()));
        }
        if !(1024..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(bad(format!(
                "multifd: target page size {page_size} (packets carry 1 KiB to 64 KiB pages)"
            )));
        }
        if cfg.zlib_level > 9 {
            return Err(bad(format!(
                "multifd-zlib-level {} (0..=9)",
                cfg.zlib_level
            )));
        }
        if !(0..=20).contains(&cfg.zstd_level) {
            return Err(bad(format!(
                "multifd-zstd-level {} (0..=20)",
                cfg.zstd_level
            )));
        }
        let count = page_count(page_size as u64) as usize;
        let mut channels = Vec::with_capacity(usize::from(cfg.channels));
        for id in 0..cfg.channels {
            let deflater = match cfg.compression {
                Compression::None => Deflater::None,
                Compression::Zlib => Deflater::Zlib(Box::new(flate2::Compress::new(
                    flate2::Compression::new(cfg.zlib_level),
                    true,
                ))),
                Compression::Zstd => Deflater::Zstd(Box::new(
                    zstd::stream::raw::Encoder::new(cfg.zstd_level)
                        .map_err(|e| bad(format!("zstd: {e}")))?,
                )),
            };
            let mut out = Vec::new();
            ChannelInit {
                uuid: cfg.uuid,
                id,
                reserved: [0; 39],
            }
            .write(&mut out);
            channels.push(ChannelOut { out, deflater });
        }
        let zbuf = if cfg.compression == Compression::None {
            Vec::new()
        } else {
            // QEMU's zbuff_len: twice the pages a packet holds.
            vec![0u8; 2 * count * page_size]
        };
        let stats = MultifdStats {
            bytes: 64 * u64::from(cfg.channels),
            ..MultifdStats::default()
        };
        Ok(MultifdSender {
            cfg,
            page_size,
            page_count: count,
            channels,
            next_channel: 0,
            packet_num: 0,
            queued_block: None,
            queued_offsets: Vec::with_capacity(count),
            queued_data: Vec::with_capacity(count * page_size),
            order: Vec::with_capacity(count),
            zbuf,
            stats,
        })
    }

    /// The settings.
    pub fn config(&self) -> &MultifdConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> &MultifdStats {
        &self.stats
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Channel `ch`'s bytes not yet taken (header and packets), to be
    /// written to its connection in order.
    ///
    /// # Panics
    /// If `ch` is not below [`channels`](Self::channels).
    pub fn output(&mut self, ch: usize) -> &mut Vec<u8> {
        &mut self.channels[ch].out
    }

    /// Takes channel `ch`'s pending bytes.
    ///
    /// # Panics
    /// If `ch` is not below [`channels`](Self::channels).
    pub fn take_output(&mut self, ch: usize) -> Vec<u8> {
        std::mem::take(&mut self.channels[ch].out)
    }

    /// Bytes waiting in all channel outputs.
    pub fn pending_bytes(&self) -> usize {
        self.channels.iter().map(|c| c.out.len()).sum()
    }

    /// Queues target page `offset` (bytes into block `block`, named
    /// `name`) with its content `data` (`multifd_queue_page`): the queued
    /// packet is sent first when it belongs to another block or is full.
    ///
    /// # Errors
    /// [`RamSrcError::Config`] when `data` is not one target page;
    /// [`RamSrcError::Compress`] when the compressor fails.
    pub fn queue_page(
        &mut self,
        block: usize,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), RamSrcError> {
        if data.len() != self.page_size {
            return Err(RamSrcError::Config {
                why: format!(
                    "multifd: page of {} bytes, target pages are {}",
                    data.len(),
                    self.page_size
                ),
            });
        }
        let same = matches!(&self.queued_block, Some((b, _)) if *b == block);
        if !self.queued_offsets.is_empty()
            && (!same || self.queued_offsets.len() == self.page_count)
        {
            self.send_queued()?;
        }
        if self.queued_offsets.is_empty() && !same {
            self.queued_block = Some((block, name.to_string()));
        }
        self.queued_offsets.push(offset);
        self.queued_data.extend_from_slice(data);
        Ok(())
    }

    /// A sync point (`multifd_send_sync_main` after sending the queued
    /// packet): one SYNC packet on every channel, in channel order.
    ///
    /// # Errors
    /// As [`queue_page`](Self::queue_page).
    pub fn sync(&mut self) -> Result<(), RamSrcError> {
        self.send_queued()?;
        for c in &mut self.channels {
            let at = c.out.len();
            write_sync_packet(&mut c.out, self.page_size as u64, self.packet_num);
            self.packet_num += 1;
            self.stats.bytes += (c.out.len() - at) as u64;
        }
        self.stats.sync_packets += self.channels.len() as u64;
        self.stats.syncs += 1;
        Ok(())
    }

    /// Sends the queued pages as one packet on the next channel.
    fn send_queued(&mut self) -> Result<(), RamSrcError> {
        if self.queued_offsets.is_empty() {
            return Ok(());
        }
        let ps = self.page_size;
        let n = self.queued_offsets.len();
        // multifd_send_zero_page_detect: zero pages go to the right by
        // swapping with the last unchecked entry.
        self.order.clear();
        self.order.extend(0..n);
        let normal = if self.cfg.zero_page_detection == ZeroPageDetection::Multifd {
            let (mut i, mut j) = (0usize, n);
            while i < j {
                let p = self.order[i];
                if is_zero(&self.queued_data[p * ps..(p + 1) * ps]) {
                    self.order.swap(i, j - 1);
                    j -= 1;
                } else {
                    i += 1;
                }
            }
            i
        } else {
            n
        };
        let offsets: Vec<u64> = self.order.iter().map(|&p| self.queued_offsets[p]).collect();
        let ch = self.next_channel;
        self.next_channel = (ch + 1) % self.channels.len();
        let name = self
            .queued_block
            .as_ref()
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        let data = &self.queued_data;
        let order = &self.order[..normal];
        let comp_err = |why: String| RamSrcError::Compress {
            block: name.clone(),
            offset: offsets.first().copied().unwrap_or(0),
            why,
        };
        let c = &mut self.channels[ch];
        let at = c.out.len();
        let payload_len = match &mut c.deflater {
            Deflater::None => {
                write_header_nocomp(
                    &mut c.out,
                    ps,
                    self.page_count,
                    self.packet_num,
                    &name,
                    &offsets,
                    normal,
                )?;
                for &p in order {
                    c.out.extend_from_slice(&data[p * ps..(p + 1) * ps]);
                }
                normal * ps
            }
            Deflater::Zlib(z) => {
                let used = zlib_pages(z, data, order, ps, &mut self.zbuf).map_err(comp_err)?;
                write_ram_packet(
                    &mut c.out,
                    ps as u64,
                    Compression::Zlib,
                    self.packet_num,
                    &name,
                    &offsets[..normal],
                    &offsets[normal..],
                    &self.zbuf[..used],
                )?;
                used
            }
            Deflater::Zstd(z) => {
                let used = zstd_pages(z, data, order, ps, &mut self.zbuf).map_err(comp_err)?;
                write_ram_packet(
                    &mut c.out,
                    ps as u64,
                    Compression::Zstd,
                    self.packet_num,
                    &name,
                    &offsets[..normal],
                    &offsets[normal..],
                    &self.zbuf[..used],
                )?;
                used
            }
        };
        self.stats.bytes += (c.out.len() - at) as u64;
        self.stats.payload_bytes += payload_len as u64;
        self.stats.packets += 1;
        self.stats.normal_pages += normal as u64;
        self.stats.zero_pages += (n - normal) as u64;
        self.packet_num += 1;
        self.queued_offsets.clear();
        self.queued_data.clear();
        Ok(())
    }
}

/// The uncompressed packet's header and offset array, its pages to follow.
fn write_header_nocomp(
    out: &mut Vec<u8>,
    ps: usize,
    count: usize,
    packet_num: u64,
    name: &str,
    offsets: &[u64],
    normal: usize,
) -> Result<(), RamSrcError> {
    if name.is_empty() || name.len() > 255 || offsets.len() > count {
        return Err(RamSrcError::Config {
            why: format!(
                "multifd packet: block name of {} bytes, {} offsets",
                name.len(),
                offsets.len()
            ),
        });
    }
    let size = u32::try_from(normal * ps).map_err(|_| RamSrcError::Config {
        why: "multifd packet too large".into(),
    })?;
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&flags::NOCOMP.to_be_bytes());
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&(normal as u32).to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&packet_num.to_be_bytes());
    out.extend_from_slice(&((offsets.len() - normal) as u32).to_be_bytes());
    out.extend_from_slice(&[0u8; 28]);
    let mut nm = [0u8; 256];
    nm[..name.len()].copy_from_slice(name.as_bytes());
    out.extend_from_slice(&nm);
    for &o in offsets {
        out.extend_from_slice(&o.to_be_bytes());
    }
    out.resize(out.len() + 8 * (count - offsets.len()), 0);
    Ok(())
}

/// zlib_send_prepare: every page with `Z_NO_FLUSH`, the last with
/// `Z_SYNC_FLUSH`, on the channel's stream. Returns the bytes written to
/// `zbuf`.
fn zlib_pages(
    z: &mut flate2::Compress,
    data: &[u8],
    order: &[usize],
    ps: usize,
    zbuf: &mut [u8],
) -> Result<usize, String> {
    let mut pos = 0usize;
    for (k, &p) in order.iter().enumerate() {
        let last = k + 1 == order.len();
        let flush = if last {
            flate2::FlushCompress::Sync
        } else {
            flate2::FlushCompress::None
        };
        let mut input = &data[p * ps..(p + 1) * ps];
        loop {
            let (in0, out0) = (z.total_in(), z.total_out());
            z.compress(input, &mut zbuf[pos..], flush)
                .map_err(|e| format!("deflate: {e}"))?;
            let used_in = (z.total_in() - in0) as usize;
            let used_out = (z.total_out() - out0) as usize;
            input = &input[used_in..];
            pos += used_out;
            // Done when the input is taken and deflate left output room
            // (a sync flush is complete only then).
            if input.is_empty() && pos < zbuf.len() {
                break;
            }
            if pos == zbuf.len() {
                return Err(format!(
                    "deflate output over {} bytes for {} pages",
                    zbuf.len(),
                    order.len()
                ));
            }
        }
    }
    Ok(pos)
}

/// zstd_send_prepare: every page with `ZSTD_e_continue`, then
/// `ZSTD_e_flush`, on the channel's stream. Returns the bytes written.
fn zstd_pages(
    z: &mut zstd::stream::raw::Encoder<'static>,
    data: &[u8],
    order: &[usize],
    ps: usize,
    zbuf: &mut [u8],
) -> Result<usize, String> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    if order.is_empty() {
        return Ok(0);
    }
    let mut out = OutBuffer::around(zbuf);
    for &p in order {
        let mut input = InBuffer::around(&data[p * ps..(p + 1) * ps]);
        while input.pos() < input.src.len() {
            z.run(&mut input, &mut out)
                .map_err(|e| format!("zstd: {e}"))?;
            if out.pos() == out.capacity() {
                return Err("zstd output over the packet buffer".into());
            }
        }
    }
    loop {
        let left = z.flush(&mut out).map_err(|e| format!("zstd: {e}"))?;
        if left == 0 {
            break;
        }
        if out.pos() == out.capacity() {
            return Err("zstd output over the packet buffer".into());
        }
    }
    Ok(out.pos())
}
