//! Multifd channels read from recorded bytes (wire-format §13): the packet
//! reader (one channel's header and packets, memory bounded by the largest
//! packet), the per-channel loop up to the next SYNC packet, and
//! [`OfflineChannels`], which applies a capture set's channel files with its
//! main stream: whenever the main stream reaches a multifd sync point
//! ([`SyncPoint`], QEMU's `multifd_recv_sync_main`), every channel is
//! applied up to its next SYNC packet.
//!
//! Used by `qmig extract MAIN --multifd-channel CONN...`, by `qmig recv`'s
//! socket channels (the reader and the loop) and by the Python package.
//! Errors are [`MultifdError`]s naming the channel and the byte offset in
//! that channel's connection (0 = first byte of its channel header), or in
//! the main stream for the sync-pairing rules.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::multifd::{ChannelDecoder, MultifdError, SyncPoint};
use crate::{GuestMemory, RamDst};
use qmig_wire::multifd::{
    flags, parse_packet, ChannelInit, Packet, PacketContext, INIT_LEN, MAGIC, MAX_COMPRESSED,
};
use qmig_wire::{Item, ReadItem, WireError};

/// Opens a channel file: its bytes, or a message naming the failure.
type Opener<R> = Box<dyn FnMut(&Path) -> Result<R, String> + Send>;

/// Compression bits of methods qmig does not read, with their QEMU names:
/// `multifd-compression` qpl (Intel QPL), uadk (HiSilicon UADK), qatzip
/// (Intel QAT; bit 5, past the mask the wire parser knows).
const UNSUPPORTED_METHODS: [(u32, &str); 3] = [(0x08, "qpl"), (0x10, "uadk"), (0x20, "qatzip")];

/// Reads one channel's header and packets from `R`, a packet at a time,
/// with memory bounded by the largest packet; optionally copies every byte
/// to a `--save` file.
pub struct PacketReader<R> {
    src: R,
    buf: Vec<u8>,
    start: usize,
    /// Channel offset of `buf[start]`.
    pos: u64,
    eof: bool,
    ctx: PacketContext,
    /// The channel id (the connection number given to [`PacketReader::new`]
    /// until the header is read).
    pub id: u32,
    save: Option<(PathBuf, BufWriter<File>)>,
}

impl<R: Read> PacketReader<R> {
    /// A reader over `src`, labelled `id` until its header is read.
    pub fn new(src: R, id: u32, page_size: u64, save: Option<(PathBuf, File)>) -> Self {
        PacketReader {
            src,
            buf: Vec::with_capacity(1 << 20),
            start: 0,
            pos: 0,
            eof: false,
            ctx: PacketContext::new(page_size),
            id,
            save: save.map(|(p, f)| (p, BufWriter::with_capacity(1 << 20, f))),
        }
    }

    fn wire(&self, source: WireError) -> MultifdError {
        MultifdError::Wire {
            channel: self.id,
            source,
        }
    }

    /// Reads more bytes (keeping the unread ones).
    fn fill(&mut self) -> Result<(), MultifdError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let cap = (self.ctx.max_device_state as usize).max(MAX_COMPRESSED as usize) + (1 << 20);
        if self.buf.len() >= cap {
            return Err(self.wire(WireError::TooLarge {
                offset: self.pos,
                what: "multifd packet",
                len: self.buf.len() as u64,
                cap: cap as u64,
            }));
        }
        let old = self.buf.len();
        self.buf.resize(old + (1 << 20), 0);
        let n = loop {
            match self.src.read(&mut self.buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.buf.truncate(old);
                    return Err(self.wire(WireError::Io {
                        offset: self.pos + old as u64,
                        source,
                    }));
                }
            }
        };
        self.buf.truncate(old + n);
        if let Some((path, f)) = &mut self.save {
            if let Err(e) = f.write_all(&self.buf[old..]) {
                return Err(MultifdError::Rule {
                    stream: format!("channel {}", self.id),
                    offset: self.pos + old as u64,
                    rule: "--save",
                    why: format!("{}: write: {e}", path.display()),
                });
            }
        }
        self.eof = n == 0;
        Ok(())
    }

    /// Reads the channel header: `None` if the connection closed before
    /// sending a byte.
    ///
    /// # Errors
    /// A TLS handshake instead of a header (`tls-creds`), a bad header, a
    /// connection that closes inside it.
    pub fn init(&mut self) -> Result<Option<ChannelInit>, MultifdError> {
        while self.buf.len() < INIT_LEN && !self.eof {
            self.fill()?;
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        if self.buf[0] == 0x16 && self.buf.get(1) == Some(&3) {
            return Err(MultifdError::Rule {
                stream: format!("connection {}", self.id),
                offset: 0,
                rule: "tls-creds",
                why: "the connection starts with a TLS handshake: TLS migrations are not supported"
                    .into(),
            });
        }
        let init = ChannelInit::parse(&self.buf, 0)
            .map_err(|e| self.wire(e))?
            .ok_or_else(|| {
                self.wire(WireError::Truncated {
                    offset: 0,
                    end: self.buf.len() as u64,
                    what: "multifd channel header",
                })
            })?;
        self.start = INIT_LEN;
        self.pos = INIT_LEN as u64;
        self.id = u32::from(init.id);
        Ok(Some(init))
    }

    /// The next packet and its channel offset; `None` at a clean end.
    ///
    /// # Errors
    /// An unsupported compression method (naming it), a packet the parser
    /// refuses, a connection that closes inside a packet.
    pub fn next_packet(&mut self) -> Result<Option<(u64, Packet<'_>)>, MultifdError> {
        loop {
            let rest = &self.buf[self.start..];
            if rest.len() >= 12 && u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) == MAGIC
            {
                let f = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if f & flags::DEVICE_STATE == 0 {
                    let bits = f & !(flags::SYNC | flags::DEVICE_STATE);
                    if let Some((_, name)) = UNSUPPORTED_METHODS.iter().find(|(b, _)| *b == bits) {
                        return Err(MultifdError::Rule {
                            stream: format!("channel {}", self.id),
                            offset: self.pos + 8,
                            rule: "multifd-compression",
                            why: format!("packet compressed with {name}, which qmig does not support (none, zlib and zstd are)"),
                        });
                    }
                }
            }
            match parse_packet(rest, self.pos, &self.ctx).map_err(|e| self.wire(e))? {
                Some(_) => break,
                None if self.eof => {
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    return Err(self.wire(WireError::Truncated {
                        offset: self.pos,
                        end: self.pos + rest.len() as u64,
                        what: "multifd packet",
                    }));
                }
                None => self.fill()?,
            }
        }
        let at = self.pos;
        let (p, n) = parse_packet(&self.buf[self.start..], at, &self.ctx)
            .map_err(|e| self.wire(e))?
            .ok_or_else(|| {
                self.wire(WireError::Truncated {
                    offset: at,
                    end: at,
                    what: "multifd packet",
                })
            })?;
        self.start += n;
        self.pos += n as u64;
        Ok(Some((at, p)))
    }

    /// Channel offset of the next unread byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The bytes read from channel offset `at` to [`PacketReader::position`]
    /// when they are still buffered (right after [`PacketReader::init`]
    /// with `at` 0, or after [`PacketReader::next_packet`] with the offset
    /// it returned); `None` otherwise.
    pub fn raw_since(&self, at: u64) -> Option<&[u8]> {
        let back = usize::try_from(self.pos.checked_sub(at)?).ok()?;
        self.buf.get(self.start.checked_sub(back)?..self.start)
    }

    /// Flushes the `--save` copy.
    pub fn flush_save(&mut self) -> std::io::Result<()> {
        match &mut self.save {
            Some((_, f)) => f.flush(),
            None => Ok(()),
        }
    }
}

/// What a channel did with the packets up to a sync point.
pub enum Reached {
    /// A SYNC packet (at this channel offset).
    Sync(u64),
    /// The end of the channel (at this offset).
    End(u64),
}

/// One channel: its reader and decoder.
pub struct Channel<R> {
    /// Its packets.
    pub rd: PacketReader<R>,
    /// Its decoder (pages and counters).
    pub dec: ChannelDecoder,
}

impl<R: Read> Channel<R> {
    /// Applies packets into `dst` through `apply` until the next SYNC or
    /// the end. `apply` gets the decoder's output and applies it (with
    /// whatever locking the caller needs).
    pub fn run_to_sync(
        &mut self,
        mut apply: impl FnMut(u32, &crate::multifd::Decoded<'_>) -> Result<(), MultifdError>,
    ) -> Result<Reached, MultifdError> {
        loop {
            let id = self.rd.id;
            let Some((at, p)) = self.rd.next_packet()? else {
                return Ok(Reached::End(self.rd.pos));
            };
            match p {
                Packet::DeviceState(_) => self.dec.count_device_state(),
                Packet::Ram(r) => {
                    let d = self.dec.decode(at, &r)?;
                    apply(id, &d)?;
                    if r.is_sync() {
                        return Ok(Reached::Sync(at));
                    }
                }
            }
        }
    }
}

/// Offline multifd: the recorded channel files of a capture set, applied
/// at the main stream's sync points.
///
/// Channels are identified by their header (`MultiFDInit_t` id), not by
/// the order of the files; call [`OfflineChannels::before_item`] for every
/// main-stream item before applying it to the [`RamDst`], and
/// [`OfflineChannels::finish`] after the last one.
pub struct OfflineChannels<R> {
    paths: Vec<PathBuf>,
    opener: Opener<R>,
    channels: Vec<Channel<R>>,
    point: Option<SyncPoint>,
    /// Sync points passed.
    syncs: u64,
}

impl<R: Read> OfflineChannels<R> {
    /// The channel files `paths`, opened by `open` (which returns the
    /// channel's bytes, e.g. with its container peeled off, or a message)
    /// at the first sync point, when the target page size is known. A
    /// message from `open` becomes [`MultifdError::Rule`] with rule
    /// `--multifd-channel` (the CLI option naming the files).
    pub fn new(
        paths: &[PathBuf],
        open: impl FnMut(&Path) -> Result<R, String> + Send + 'static,
    ) -> Self {
        OfflineChannels {
            paths: paths.to_vec(),
            opener: Box::new(open),
            channels: Vec::new(),
            point: None,
            syncs: 0,
        }
    }

    fn open<M: GuestMemory>(&mut self, dst: &RamDst<M>) -> Result<(), MultifdError> {
        let mut ids = std::collections::BTreeMap::new();
        let mut uuid = None;
        for (i, p) in self.paths.iter().enumerate() {
            let input = (self.opener)(p).map_err(|why| MultifdError::Rule {
                stream: format!("connection {}", i + 1),
                offset: 0,
                rule: "--multifd-channel",
                why,
            })?;
            let mut rd = PacketReader::new(input, i as u32 + 1, dst.page_size(), None);
            let init = rd.init()?.ok_or_else(|| MultifdError::Rule {
                stream: format!("connection {}", i + 1),
                offset: 0,
                rule: "multifd_recv_initial_packet",
                why: format!("{} is empty", p.display()),
            })?;
            check_init(&init, &mut ids, &mut uuid, p)?;
            let dec = ChannelDecoder::new(u32::from(init.id), dst.page_size());
            self.channels.push(Channel { rd, dec });
        }
        Ok(())
    }

    /// Called for every main-stream item before it is applied: at a sync
    /// point, every channel is applied up to its next SYNC packet.
    ///
    /// # Errors
    /// A channel error, or a channel that ends before the SYNC this sync
    /// point pairs with.
    pub fn before_item<M: GuestMemory>(
        &mut self,
        ri: &ReadItem<'_>,
        dst: &mut RamDst<M>,
    ) -> Result<(), MultifdError> {
        let Item::Ram(rec) = &ri.item else {
            return Ok(());
        };
        let point = *self
            .point
            .get_or_insert_with(|| SyncPoint::for_machine(dst.machine_version()));
        if !point.matches(&rec.body) {
            return Ok(());
        }
        if self.syncs == 0 {
            self.open(dst)?;
        }
        self.syncs += 1;
        for c in &mut self.channels {
            match c.run_to_sync(|id, d| dst.apply_multifd(id, d))? {
                Reached::Sync(_) => {}
                Reached::End(at) => {
                    return Err(MultifdError::Rule {
                        stream: format!("channel {}", c.rd.id),
                        offset: at,
                        rule: "multifd_recv_sync_main",
                        why: format!(
                            "the channel ends before its SYNC {} that pairs with the main stream's sync point at offset {}",
                            self.syncs, ri.offset
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// At the end of the main stream: no channel may hold pages past its
    /// last SYNC (no sync point of the main stream would pair with them).
    ///
    /// # Errors
    /// As [`OfflineChannels::before_item`], or pages after the last SYNC.
    pub fn finish<M: GuestMemory>(&mut self, dst: &mut RamDst<M>) -> Result<(), MultifdError> {
        if self.syncs == 0 && !self.paths.is_empty() {
            return Err(MultifdError::Rule {
                stream: "main".into(),
                offset: dst.applied_up_to(),
                rule: "multifd_recv_sync_main",
                why: "channel files were given but the main stream has no multifd sync point (MULTIFD_FLUSH)".into(),
            });
        }
        for c in &mut self.channels {
            let mut pages = 0u64;
            let r = c.run_to_sync(|_, d| {
                pages += u64::from(d.packet.normal_pages + d.packet.zero_pages);
                Ok(())
            })?;
            if pages > 0 || matches!(r, Reached::Sync(_)) {
                let at = match r {
                    Reached::Sync(a) | Reached::End(a) => a,
                };
                return Err(MultifdError::Rule {
                    stream: format!("channel {}", c.rd.id),
                    offset: at,
                    rule: "multifd_recv_sync_main",
                    why: format!(
                        "{pages} pages or a SYNC after the channel's last SYNC paired with the main stream ({} sync points)",
                        self.syncs
                    ),
                });
            }
        }
        Ok(())
    }

    /// Per-channel counters, by channel id.
    pub fn stats(&self) -> Vec<(u32, crate::multifd::ChannelStats)> {
        self.channels
            .iter()
            .map(|c| (c.dec.id(), c.dec.stats))
            .collect()
    }
}

/// Checks a channel header against the others: ids unique, one UUID.
pub fn check_init(
    init: &ChannelInit,
    ids: &mut std::collections::BTreeMap<u8, String>,
    uuid: &mut Option<[u8; 16]>,
    what: &Path,
) -> Result<(), MultifdError> {
    let rule = |why: String| MultifdError::Rule {
        stream: format!("channel {}", init.id),
        offset: 0,
        rule: "multifd_recv_new_channel",
        why,
    };
    if let Some(other) = ids.insert(init.id, what.display().to_string()) {
        return Err(rule(format!(
            "{}: channel id {} also in {other}",
            what.display(),
            init.id
        )));
    }
    match uuid {
        Some(u) if *u != init.uuid => Err(rule(format!(
            "{}: VM UUID differs from the other channels'",
            what.display()
        ))),
        _ => {
            *uuid = Some(init.uuid);
            Ok(())
        }
    }
}
