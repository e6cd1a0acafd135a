//! What [`RamDst`] hands to its host, split by kind as quinn-proto does:
//! return-path bytes ([`RamDst::poll_transmit`]), memory placements
//! ([`RamDst::poll_placement`], [`Place`]) and notifications
//! ([`RamDst::poll_event`], [`Event`]). The return-path framing decisions
//! (PONG, REQ_PAGES / REQ_PAGES_ID, SHUT with its code) are all made here,
//! never by the host.

use std::collections::VecDeque;

use qmig_wire::RpMessage;

use super::{PostcopyState, RamDst};
use crate::bitmap::write_recv_bitmap_reply;
use crate::memory::GuestMemory;
use crate::RamDstError;

/// A memory operation the host must carry out, from [`RamDst::poll_placement`].
///
/// Placements of pages ([`Place::HostPage`], [`Place::ZeroPage`]) must be
/// reported back: [`RamDst::handle_placed`] on success (only then are the
/// pages' received bits set), [`RamDst::handle_place_failed`] on failure.
/// A [`Place::Discard`] needs no report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Place `data` (one whole host page) at `offset` of `block` atomically,
    /// e.g. with `UFFDIO_COPY` ([`Placement::Emit`](crate::Placement::Emit) only).
    HostPage {
        /// Block index.
        block: usize,
        /// Host-page-aligned offset in the block, bytes.
        offset: u64,
        /// The host page.
        data: Vec<u8>,
    },
    /// Place a zero host page of `len` bytes at `offset` of `block`, e.g.
    /// with `UFFDIO_ZEROPAGE` ([`Placement::Emit`](crate::Placement::Emit) only, or after
    /// [`RamDst::handle_page_fault`] on a page received as zero that precopy
    /// never had to write).
    ZeroPage {
        /// Block index.
        block: usize,
        /// Host-page-aligned offset in the block, bytes.
        offset: u64,
        /// Host page size, bytes.
        len: u64,
    },
    /// Drop `len` bytes at `offset` of `block` (POSTCOPY_RAM_DISCARD; QEMU's
    /// `ram_discard_range`, i.e. `MADV_DONTNEED` / a punched hole), so they
    /// read as zero and are missing for userfaultfd.
    /// [`Placement::Emit`](crate::Placement::Emit) only: with
    /// [`Placement::Apply`](crate::Placement::Apply) the memory is discarded
    /// directly. Emitted only where the block may hold data. Discards come
    /// before POSTCOPY_LISTEN, so the host carries them out before it
    /// registers the memory.
    Discard {
        /// Block index.
        block: usize,
        /// Offset in the block, bytes (a multiple of the block's page size).
        offset: u64,
        /// Length, bytes (a multiple of the block's page size).
        len: u64,
    },
}

/// A notification for the host, from [`RamDst::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The source opened a return path (OPEN_RETURN_PATH): from now on
    /// [`RamDst::poll_transmit`] may give bytes for it.
    OpenReturnPath,
    /// The postcopy state changed (register userfaultfd on
    /// [`PostcopyState::Listening`], start the guest on
    /// [`PostcopyState::Running`], tear down on [`PostcopyState::End`]).
    PostcopyState(PostcopyState),
    /// A ZERO record had a non-zero fill byte; it was applied as a fill
    /// (QEMU before 8.2 does the same; later versions refuse it).
    NonZeroFill {
        /// Stream offset of the record.
        offset: u64,
        /// Block index.
        block: usize,
        /// Page offset in the block, bytes.
        page_offset: u64,
        /// The fill byte.
        fill: u8,
    },
    /// MEM_SIZE resized a block.
    BlockResized {
        /// Block index.
        block: usize,
        /// New used length, bytes.
        len: u64,
    },
}

/// The three output queues and the SHUT bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Output {
    /// Return-path bytes waiting for [`RamDst::poll_transmit`].
    pub(super) transmit: Vec<u8>,
    pub(super) placements: VecDeque<Place>,
    pub(super) events: VecDeque<Event>,
    /// The SHUT code queued, once one is.
    pub(super) shut: Option<u32>,
}

impl<M: GuestMemory> RamDst<M> {
    /// Appends the return-path bytes the state machine wants sent to `out`,
    /// in order: PONG (for each PING after OPEN_RETURN_PATH), REQ_PAGES /
    /// REQ_PAGES_ID (from [`RamDst::handle_page_fault`]) and, last, SHUT
    /// (0 after [`RamDst::handle_end_of_input`], 1 after any error).
    /// Returns whether there were any. Drain it after every `handle_*` call
    /// and write the bytes to the return path as they are. Nothing is ever
    /// queued before OPEN_RETURN_PATH, and nothing after SHUT.
    ///
    /// In postcopy recovery ([`PostcopyState::Recovering`](crate::PostcopyState::Recovering))
    /// also the RECV_BITMAP replies, then RESUME_ACK(1) and the page
    /// requests sent again. Bytes queued when the connection is lost are
    /// dropped ([`RamDst::handle_connection_lost`]).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.transmit.is_empty() {
            return false;
        }
        out.append(&mut self.out.transmit);
        true
    }

    /// Gives back the `data` of a [`Place::HostPage`] once the host has
    /// placed it: the next host pages are assembled in it instead of a new
    /// allocation (a 2 MiB host page would otherwise be allocated, and its
    /// memory faulted in, for every placement). Optional; at most two
    /// buffers are kept.
    pub fn recycle_page_buffer(&mut self, mut buf: Vec<u8>) {
        if self.spare_pages.len() < 2 {
            buf.clear();
            self.spare_pages.push(buf);
        }
    }

    /// A buffer for the next host page: a recycled one, else an empty one.
    pub(super) fn page_buffer(&mut self) -> Vec<u8> {
        self.spare_pages.pop().unwrap_or_default()
    }

    /// The next memory operation for the host, if any. Drain after every
    /// `handle_*` call, in order, before the next input (see [`Place`]).
    #[must_use]
    pub fn poll_placement(&mut self) -> Option<Place> {
        self.out.placements.pop_front()
    }

    /// The next notification for the host, if any. Drain after every
    /// `handle_*` call.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.events.pop_front()
    }

    /// The SHUT code queued so far (0 success, 1 error), if any.
    pub fn shut_code(&self) -> Option<u32> {
        self.out.shut
    }

    /// The input is over and the host saw no error of its own (the decoder
    /// found the end of the stream: EOF, then the vmdesc trailer or, in
    /// postcopy, the end of the postcopy stream). Queues SHUT(0) if a return
    /// path is open, as QEMU's destination does when its load finishes.
    ///
    /// # Errors
    /// [`RamDstError::Stopped`] after an earlier error (SHUT(1) is already
    /// queued then); [`RamDstError::PostcopyOrder`] when the input ended
    /// inside a host page (SHUT(1) is queued).
    pub fn handle_end_of_input(&mut self) -> Result<(), RamDstError> {
        if self.stopped {
            self.queue_shut(1);
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        if matches!(
            self.postcopy,
            crate::PostcopyState::Paused | crate::PostcopyState::Recovering
        ) {
            let e = RamDstError::IllegalTransition {
                offset: self.applied_to,
                state: self.postcopy,
                event: "the end of the input (the migration is paused)",
            };
            self.fail();
            return Err(e);
        }
        if let Some(hp) = &self.host_page {
            let e = RamDstError::PostcopyOrder {
                offset: self.applied_to,
                block: self.blocks[hp.block].name.clone(),
                page_offset: hp.next,
                why: "the input ended inside a host page".into(),
            };
            self.fail();
            return Err(e);
        }
        self.queue_shut(0);
        Ok(())
    }

    /// The host failed on its own (a decode or I/O error, a signal, a device
    /// state it could not write, a peer that went away): the machine stops
    /// and SHUT(1) is queued if a return path is open. Idempotent.
    pub fn handle_failure(&mut self) {
        self.fail();
    }

    /// Stops the machine and queues SHUT(1).
    pub(super) fn fail(&mut self) {
        self.stopped = true;
        self.queue_shut(1);
    }

    /// Queues SHUT(`code`) once, if a return path is open.
    fn queue_shut(&mut self, code: u32) {
        if self.return_path && self.out.shut.is_none() {
            self.out.shut = Some(code);
            // Four bytes of payload: writing cannot fail.
            let _ = RpMessage::Shut(code).write(&mut self.out.transmit);
        }
    }

    /// Writes the return-path RECV_BITMAP message for block `index` (framed
    /// message, be64 size, little-endian bitmap, end marker) to `out`.
    /// Returns false for an unknown index.
    ///
    /// # Errors
    /// As for [`write_recv_bitmap_reply`](crate::write_recv_bitmap_reply).
    pub fn recv_bitmap_reply(&self, index: usize, out: &mut Vec<u8>) -> Result<bool, RamDstError> {
        match self.blocks.get(index) {
            Some(b) => {
                write_recv_bitmap_reply(&b.name, &b.received, out)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
