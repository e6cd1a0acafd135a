//! Readers: over an in-memory slice ([`SliceReader`]), over any
//! [`std::io::Read`] with bounded memory ([`StreamReader`]), and over a
//! return-path byte stream ([`ReturnPathReader`]).

use std::io::{Read, Seek, SeekFrom};

use polonius_the_crab::prelude::*;

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
    /// `Decoder::decode` calls so far (tests check one per item).
    #[cfg(test)]
    decodes: usize,
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
            #[cfg(test)]
            decodes: 0,
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
        // One decode per item: the item is returned from the attempt that found it.
        // An attempt that needs the buffer refilled (or the decoder told something)
        // leaves that as `pending`, done at the start of the next attempt, before
        // anything borrows the buffer. Returning a borrow from one branch while
        // another branch goes on to mutate the reader is sound but beyond today's
        // borrow checker; `polonius_loop!` runs each attempt as its own call.
        enum Pending {
            None,
            Fill,
            PageBits(u32),
            Vmdesc,
        }
        let mut pending = Pending::None;
        let mut this = self;
        polonius_loop!(|this| -> Result<Option<ReadItem<'polonius>>, WireError> {
            let done = match std::mem::replace(&mut pending, Pending::None) {
                Pending::None => Ok(()),
                Pending::Fill => this.fill(),
                Pending::PageBits(bits) => {
                    this.dec.set_page_bits(bits, PageSizeSource::Inferred);
                    Ok(())
                }
                Pending::Vmdesc => this.look_ahead_for_vmdesc(),
            };
            if let Err(e) = done {
                polonius_return!(Err(e));
            }
            let pos = this.dec.position();
            #[cfg(test)]
            {
                this.decodes += 1;
            }
            match this.dec.decode(&this.buf[this.start..this.end], this.eof) {
                Err(e) => polonius_return!(Err(e)),
                Ok(Step::End) => polonius_return!(Ok(None)),
                Ok(Step::Item { item, len }) => {
                    this.dec.commit(&item, len);
                    this.start += len;
                    polonius_return!(Ok(Some(ReadItem {
                        offset: pos,
                        len,
                        item,
                        decoder: &this.dec,
                    })))
                }
                Ok(Step::NeedMore) => pending = Pending::Fill,
                Ok(Step::PageSize { bits }) => pending = Pending::PageBits(bits),
                Ok(Step::NeedVmdesc) => pending = Pending::Vmdesc,
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a committed capture with `StreamReader`, `chunk` bytes per `read`, and
    /// checks every item (offset, length, bytes) against `SliceReader` over the whole
    /// stream, and that the decoder ran once per item: one call per item, one per
    /// refill (the attempt that ran short), a few decoder requests and the final `End`.
    fn one_decode_per_item(capture: &str, chunk: usize) {
        let path = format!(
            "{}/../../tests/data/{capture}/stream",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).expect("committed capture");
        struct Chunked<'a>(&'a [u8], usize, usize);
        impl Read for Chunked<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = out.len().min(self.1).min(self.0.len() - self.2);
                out[..n].copy_from_slice(&self.0[self.2..self.2 + n]);
                self.2 += n;
                self.1 = self.1.max(1);
                Ok(n)
            }
        }
        let mut want = SliceReader::new(&bytes);
        let mut r = StreamReader::new(Chunked(&bytes, chunk, 0));
        let mut items = 0usize;
        while let Some(got) = r.next_item().unwrap() {
            let (offset, item) = want.next().expect("same item count").unwrap();
            assert_eq!((got.offset, &got.item), (offset, &item), "{capture}");
            items += 1;
        }
        assert!(want.next().is_none(), "{capture}: same item count");
        assert!(items > 100, "{capture}: {items} items");
        // Every other decode is a short attempt followed by a refill (at most one per
        // chunk read), or one that asked for the vmdesc look-ahead or applied an
        // inferred page size (a few per stream).
        let reads = bytes.len().div_ceil(chunk) + 1;
        assert!(
            r.decodes <= items + 1 + reads + 4,
            "{capture}: {} decodes for {items} items and {reads} reads (was 2 per item)",
            r.decodes
        );
    }

    #[test]
    fn one_decode_per_item_plain_and_postcopy() {
        for capture in ["q72-plain", "q10-passes", "q10-postcopy", "q10-xbzrle"] {
            one_decode_per_item(capture, 1 << 20);
            one_decode_per_item(capture, 4096);
        }
    }
}
