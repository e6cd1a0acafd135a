//! Readers: over an in-memory slice ([`SliceReader`]), over any
//! [`std::io::Read`] with bounded memory ([`StreamReader`]), and over a
//! return-path byte stream ([`ReturnPathReader`]).

use std::io::{Read, Seek, SeekFrom};

use std::sync::Arc;

use crate::decoder::{Decoder, Item, Limits, Step};
use crate::devices::DeviceTable;
use crate::error::WireError;
use crate::return_path::{parse_rp_message, RpMessage};
use crate::target_page::PageSizeSource;

/// Iterates over the items of a stream held in memory. Items borrow from the
/// slice. After an error the iterator ends.
#[derive(Debug)]
pub struct SliceReader<'a> {
    buf: &'a [u8],
    dec: Decoder,
    failed: bool,
    pending: Option<WireError>,
}

impl<'a> SliceReader<'a> {
    /// A reader for a whole stream. The vmdesc trailer, when present, is
    /// located first so the last device section is delimited with certainty.
    pub fn new(buf: &'a [u8]) -> Self {
        Self::with_limits(buf, Limits::default())
    }

    /// Same as [`SliceReader::new`] with explicit limits.
    pub fn with_limits(buf: &'a [u8], limits: Limits) -> Self {
        let mut dec = Decoder::new(limits);
        let t = tail(buf, limits.max_vmdesc as usize);
        let base = (buf.len() - t.len()) as u64;
        let pending = install_vmdesc(&mut dec, t, base).err();
        SliceReader {
            buf,
            dec,
            failed: false,
            pending,
        }
    }

    /// A reader with a caller-built decoder (e.g. for a PACKAGED body).
    pub fn with_decoder(buf: &'a [u8], dec: Decoder) -> Self {
        SliceReader {
            buf,
            dec,
            failed: false,
            pending: None,
        }
    }

    /// The decoder (its position is the offset of the next item).
    pub fn decoder(&self) -> &Decoder {
        &self.dec
    }

    /// The decoder, to give it what the stream does not say (a target page
    /// size override, say) before the first item is read.
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.dec
    }
}

fn tail(buf: &[u8], max_json: usize) -> &[u8] {
    let n = max_json.saturating_add(6).min(buf.len());
    &buf[buf.len() - n..]
}

/// Looks for the vmdesc trailer at the end of `tail` (the last bytes of a
/// whole stream, `base` its offset) and gives the decoder the device table
/// it describes, or says there is none.
fn install_vmdesc(dec: &mut Decoder, tail: &[u8], base: u64) -> Result<(), WireError> {
    match crate::vmdesc::find_trailer(tail) {
        Some(h) => {
            let table = DeviceTable::from_vmdesc_json(&tail[h + 6..])
                .map_err(|e| e.shifted(base + h as u64 + 1))?;
            dec.set_eof_hint(base + h as u64);
            dec.set_vmdesc(Some(Arc::new(table)))
        }
        None => dec.set_vmdesc(None),
    }
}

impl<'a> Iterator for SliceReader<'a> {
    type Item = Result<(u64, Item<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some(e) = self.pending.take() {
            self.failed = true;
            return Some(Err(e));
        }
        let pos = self.dec.position();
        let rest = &self.buf[pos as usize..];
        let step = loop {
            match self.dec.decode(rest, true) {
                Ok(Step::PageSize { bits }) => {
                    self.dec.set_page_bits(bits, PageSizeSource::Inferred)
                }
                Ok(Step::NeedVmdesc) => self.dec.give_up_vmdesc(),
                other => break other,
            }
        };
        match step {
            Ok(Step::Item { item, len }) => {
                self.dec.commit(&item, len);
                Some(Ok((pos, item)))
            }
            Ok(Step::End | Step::PageSize { .. } | Step::NeedVmdesc) => None,
            Ok(Step::NeedMore) => {
                self.failed = true;
                Some(Err(WireError::Truncated {
                    offset: pos,
                    end: self.buf.len() as u64,
                    what: "item",
                }))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// An item read by [`StreamReader::next_item`], with the decoder state
/// after it (for the current section, RAM context, package depth...).
#[derive(Debug)]
pub struct ReadItem<'a> {
    /// Absolute offset of the item.
    pub offset: u64,
    /// Its length in bytes.
    pub len: usize,
    /// The item.
    pub item: Item<'a>,
    /// The decoder, already past the item.
    pub decoder: &'a Decoder,
}

/// Default read buffer size of [`StreamReader`].
pub const DEFAULT_READ_CHUNK: usize = 1 << 20;

/// Reads items from any [`Read`] with memory bounded by the largest item
/// (a device section, at most [`Limits::max_device_section`]) plus one read
/// chunk.
#[derive(Debug)]
pub struct StreamReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    dec: Decoder,
    chunk: usize,
}

impl<R: Read> StreamReader<R> {
    /// A reader over a non-seekable source (socket, pipe).
    pub fn new(inner: R) -> Self {
        Self::with_decoder(inner, Decoder::new(Limits::default()))
    }

    /// A reader with a caller-built decoder.
    pub fn with_decoder(inner: R, dec: Decoder) -> Self {
        StreamReader {
            inner,
            buf: vec![0; DEFAULT_READ_CHUNK],
            start: 0,
            end: 0,
            eof: false,
            dec,
            chunk: DEFAULT_READ_CHUNK,
        }
    }

    /// The decoder: its position is the offset of the next item.
    pub fn decoder(&self) -> &Decoder {
        &self.dec
    }

    /// The decoder, to give it what the stream does not say (a target page
    /// size override, say) before the first item is read.
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.dec
    }

    /// Returns the next item with its absolute offset, `Ok(None)` at the end.
    ///
    /// # Errors
    /// Decoding errors and I/O errors, each with the stream offset.
    #[allow(clippy::should_implement_trait)]
    pub fn next_item(&mut self) -> Result<Option<ReadItem<'_>>, WireError> {
        loop {
            match self.dec.decode(&self.buf[self.start..self.end], self.eof)? {
                Step::NeedMore => self.fill()?,
                Step::End => return Ok(None),
                Step::Item { .. } => break,
                Step::PageSize { bits } => self.dec.set_page_bits(bits, PageSizeSource::Inferred),
                Step::NeedVmdesc => self.look_ahead_for_vmdesc()?,
            }
        }
        let pos = self.dec.position();
        match self.dec.decode(&self.buf[self.start..self.end], self.eof)? {
            Step::Item { item, len } => {
                self.dec.commit(&item, len);
                self.start += len;
                Ok(Some(ReadItem {
                    offset: pos,
                    len,
                    item,
                    decoder: &self.dec,
                }))
            }
            // decode() is deterministic: the first call said Item.
            _ => Err(WireError::Structure {
                offset: pos,
                why: "decoder gave different answers for the same bytes",
            }),
        }
    }

    fn fill(&mut self) -> Result<(), WireError> {
        if self.eof {
            return Err(WireError::Truncated {
                offset: self.dec.position(),
                end: self.dec.position() + (self.end - self.start) as u64,
                what: "item",
            });
        }
        // Make room: move the pending bytes to the front, grow if full.
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < self.chunk / 2 {
            let max = self
                .dec
                .limits()
                .max_device_section
                .max(self.dec.limits().max_packaged as usize)
                + self.chunk;
            if self.buf.len() >= max {
                return Err(WireError::TooLarge {
                    offset: self.dec.position(),
                    what: "pending item",
                    len: self.end as u64,
                    cap: max as u64,
                });
            }
            let new_len = (self.buf.len() * 2).min(max);
            self.buf.resize(new_len, 0);
        }
        let at = self.dec.position() + self.end as u64;
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(WireError::Io {
                        offset: at,
                        source: e,
                    })
                }
            }
        }
    }

    /// A device section after the RAM needs the vmdesc, which comes after
    /// EOF: reads ahead (up to [`Limits::max_vmdesc_lookahead`] bytes) until
    /// the buffered bytes end with a trailer whose description reads every
    /// section up to the EOF byte before it. Nothing is consumed. When the
    /// input ends without one, the stream has no vmdesc; when the cap is
    /// reached, this one section is delimited by its footer.
    fn look_ahead_for_vmdesc(&mut self) -> Result<(), WireError> {
        const MAX_CANDIDATES: usize = 1 << 16;
        let cap = self.dec.limits().max_vmdesc_lookahead;
        let mut scanned = 0usize;
        // (position of the EOF byte, end of the trailer), relative to start.
        let mut cands: Vec<(usize, usize)> = Vec::new();
        loop {
            let avail = &self.buf[self.start..self.end];
            while scanned + 6 < avail.len() {
                let p = scanned;
                if avail[p] == crate::section::EOF
                    && avail[p + 1] == crate::section::VMDESCRIPTION
                    && avail[p + 6] == b'{'
                    && cands.len() < MAX_CANDIDATES
                {
                    let len = u32::from_be_bytes([
                        avail[p + 2],
                        avail[p + 3],
                        avail[p + 4],
                        avail[p + 5],
                    ]);
                    cands.push((p, p + 6 + len as usize));
                }
                scanned += 1;
            }
            cands.retain(|&(_, end)| end >= avail.len());
            for &(p, end) in cands.iter().filter(|c| c.1 == avail.len()) {
                let Ok(table) = DeviceTable::from_vmdesc_json(&avail[p + 6..end]) else {
                    continue;
                };
                let mut trial = self.dec.clone();
                let table = Arc::new(table);
                if trial.set_vmdesc(Some(table.clone())).is_ok() && reaches_eof(trial, &avail[..=p])
                {
                    self.dec.set_eof_hint(self.dec.position() + p as u64);
                    return self.dec.set_vmdesc(Some(table));
                }
            }
            if self.eof {
                self.dec.give_up_vmdesc();
                return Ok(());
            }
            if avail.len() >= cap {
                self.dec.scan_next_section();
                return Ok(());
            }
            self.fill()?;
        }
    }

    /// Bytes of buffer currently allocated (bounded by the largest item plus
    /// one read chunk), for monitoring memory use.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.len()
    }

    /// Consumes the reader, returning the inner source.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read + Seek> StreamReader<R> {
    /// A reader over a seekable source: looks for the vmdesc trailer at the
    /// end first (so the last device section is delimited with certainty),
    /// then rewinds to the current position.
    ///
    /// # Errors
    /// I/O errors while seeking or reading the tail.
    pub fn new_seekable(mut inner: R) -> Result<Self, WireError> {
        let limits = Limits::default();
        let io = |e| WireError::Io {
            offset: 0,
            source: e,
        };
        let origin = inner.stream_position().map_err(io)?;
        let end = inner.seek(SeekFrom::End(0)).map_err(io)?;
        let total = end - origin;
        // The vmdesc of a small VM is a few KiB; look at up to 1 MiB first,
        // then the whole allowed JSON size.
        let mut dec = Decoder::new(limits);
        for window in [1u64 << 20, limits.max_vmdesc as u64 + 6] {
            let n = window.min(total);
            inner.seek(SeekFrom::Start(end - n)).map_err(io)?;
            let mut t = vec![0; n as usize];
            inner.read_exact(&mut t).map_err(io)?;
            if crate::vmdesc::find_trailer(&t).is_some() || n == total {
                install_vmdesc(&mut dec, &t, total - n)?;
                break;
            }
        }
        inner.seek(SeekFrom::Start(origin)).map_err(io)?;
        Ok(Self::with_decoder(inner, dec))
    }
}

/// Whether `dec` reads `buf` (which starts at its position) item by item
/// to an EOF byte that is the last byte of `buf`.
fn reaches_eof(mut dec: Decoder, buf: &[u8]) -> bool {
    let base = dec.position();
    loop {
        let at = (dec.position() - base) as usize;
        match dec.decode(&buf[at..], false) {
            Ok(Step::Item { item, len }) => {
                let done = matches!(item, Item::Eof);
                dec.commit(&item, len);
                if done {
                    return at + len == buf.len();
                }
            }
            Ok(Step::PageSize { bits }) => dec.set_page_bits(bits, PageSizeSource::Inferred),
            _ => return false,
        }
    }
}

/// Iterates over the messages of a return-path byte stream held in memory.
#[derive(Debug, Clone)]
pub struct ReturnPathReader<'a> {
    buf: &'a [u8],
    pos: usize,
    max_bitmap: u64,
    failed: bool,
}

impl<'a> ReturnPathReader<'a> {
    /// A reader over a whole return-path capture.
    pub fn new(buf: &'a [u8]) -> Self {
        ReturnPathReader {
            buf,
            pos: 0,
            max_bitmap: crate::return_path::DEFAULT_MAX_BITMAP,
            failed: false,
        }
    }
}

impl<'a> Iterator for ReturnPathReader<'a> {
    type Item = Result<(u64, RpMessage<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.pos..];
        match parse_rp_message(rest, self.max_bitmap) {
            Ok((r, m)) => {
                let at = self.pos as u64;
                self.pos += rest.len() - r.len();
                Some(Ok((at, m)))
            }
            Err(nom::Err::Incomplete(_)) => {
                self.failed = true;
                Some(Err(WireError::Truncated {
                    offset: self.pos as u64,
                    end: self.buf.len() as u64,
                    what: "return-path message",
                }))
            }
            Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => {
                self.failed = true;
                let rel = (rest.len() - e.remaining.min(rest.len())) as u64;
                Some(Err(e.err.shifted(self.pos as u64 + rel)))
            }
        }
    }
}

/// Decodes one return-path message from the start of `buf`: `Ok(None)` if
/// more bytes are needed, else the message and its length. For live use.
///
/// # Errors
/// A [`WireError`] with the offset relative to `base`.
pub fn decode_rp_message(
    buf: &[u8],
    base: u64,
) -> Result<Option<(RpMessage<'_>, usize)>, WireError> {
    match crate::error::finish(
        buf,
        base,
        "return-path message",
        parse_rp_message(buf, crate::return_path::DEFAULT_MAX_BITMAP),
    ) {
        Ok(x) => Ok(Some(x)),
        Err(e) if e.is_truncation() => Ok(None),
        Err(e) => Err(e),
    }
}
