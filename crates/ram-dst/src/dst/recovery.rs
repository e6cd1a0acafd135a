//! Postcopy recovery on the destination (wire-format §11; QEMU's
//! `postcopy_pause_incoming`, `loadvm_handle_recv_bitmap`,
//! `loadvm_postcopy_handle_resume`): pausing when the connection is lost
//! after POSTCOPY_RUN, the recovery connection, the RECV_BITMAP replies,
//! POSTCOPY_RESUME → RESUME_ACK and the pending page requests re-sent.
//! Also the postcopy-preempt channel (§12): page records only, with its
//! own host page being assembled and its own last block.

use qmig_wire::{Item, RamBody, RpMessage};

use super::{HostPage, PostcopyState, RamDst};
use crate::bitmap::write_recv_bitmap_reply;
use crate::memory::GuestMemory;
use crate::RamDstError;

/// What a channel other than the main one keeps of its own: the host page
/// it is assembling and the block its last record named (RAM_SAVE_FLAG_CONTINUE
/// is resolved per channel, as QEMU's `ram_load_postcopy` keeps one
/// `PostcopyTmpPage` per channel).
#[derive(Debug, Default)]
pub(crate) struct ChannelCtx {
    pub(super) host_page: Option<HostPage>,
    pub(super) current: Option<usize>,
}

impl<M: GuestMemory> RamDst<M> {
    /// The connection carrying the stream (main channel or return path)
    /// was lost, or the host gave it up (e.g. QEMU's `migrate-pause`).
    ///
    /// * In [`PostcopyState::Running`] or [`PostcopyState::Recovering`]
    ///   the migration pauses ([`PostcopyState::Paused`], an
    ///   [`Event::PostcopyState`](crate::Event::PostcopyState)): the host pages being assembled (on every
    ///   channel) are dropped, since their target pages were never placed and
    ///   the source sends them again; the received bitmap, the pages asked for
    ///   and the placements handed out are kept; return-path bytes not yet
    ///   polled are dropped (their connection is gone). Faults from now on are
    ///   recorded and asked for after POSTCOPY_RESUME. Returns `Ok(true)`.
    /// * After EOF ([`PostcopyState::End`]) the stream is complete: nothing
    ///   changes, `Ok(false)`.
    /// * Anywhere else QEMU fails the migration (only a failure after
    ///   POSTCOPY_RUN pauses: before it the guest has not run on the
    ///   destination and the source still holds it): the machine stops,
    ///   SHUT(1) is queued and [`RamDstError::ConnectionLost`] is returned.
    ///
    /// # Errors
    /// [`RamDstError::ConnectionLost`] as above, [`RamDstError::Stopped`]
    /// after an earlier error.
    pub fn handle_connection_lost(&mut self) -> Result<bool, RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        match self.postcopy {
            PostcopyState::Running | PostcopyState::Recovering => {
                self.host_page = None;
                self.current = None;
                self.preempt = ChannelCtx::default();
                self.out.transmit.clear();
                self.last_requested_block = None;
                self.stats.pauses += 1;
                self.set_postcopy(PostcopyState::Paused);
                Ok(true)
            }
            PostcopyState::End | PostcopyState::Paused => Ok(false),
            state => {
                self.fail();
                Err(RamDstError::ConnectionLost {
                    offset: self.applied_to,
                    state,
                })
            }
        }
    }

    /// The source opened a recovery connection (a new main channel and its
    /// return path, after `migrate ... resume=true`): [`PostcopyState::Paused`]
    /// → [`PostcopyState::Recovering`]. Feed its items with
    /// [`RamDst::handle_item`] from offset 0 (decoded with
    /// `Decoder::continuation`); its RECV_BITMAP commands are answered on
    /// [`RamDst::poll_transmit`], its POSTCOPY_RESUME with RESUME_ACK(1)
    /// followed by every pending page request.
    ///
    /// # Errors
    /// [`RamDstError::IllegalTransition`] (the machine stops) when the
    /// migration is not paused: QEMU's `migrate-recover` is refused outside
    /// `postcopy-paused`.
    pub fn handle_recovery_connection(&mut self) -> Result<(), RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        if self.postcopy != PostcopyState::Paused {
            let e = RamDstError::IllegalTransition {
                offset: self.applied_to,
                state: self.postcopy,
                event: "a recovery connection",
            };
            self.fail();
            return Err(e);
        }
        self.applied_to = 0;
        self.set_postcopy(PostcopyState::Recovering);
        Ok(())
    }

    /// RECV_BITMAP(block) in [`PostcopyState::Recovering`]: queues the reply
    /// (framed message, be64 size, the received bitmap as little-endian
    /// 64-bit words, be64 end marker; `ramblock_recv_bitmap_send`).
    pub(super) fn answer_recv_bitmap(&mut self, at: u64, block: &str) -> Result<(), RamDstError> {
        let Some(&b) = self.by_name.get(block) else {
            return Err(RamDstError::UnknownBlock {
                offset: at,
                name: block.to_string(),
            });
        };
        let blk = &self.blocks[b];
        write_recv_bitmap_reply(&blk.name, &blk.received, &mut self.out.transmit)?;
        self.stats.recv_bitmaps_sent += 1;
        Ok(())
    }

    /// POSTCOPY_RESUME in [`PostcopyState::Recovering`]: RESUME_ACK(1),
    /// then every host page asked for and not yet placed is asked for again
    /// (in block and offset order, the first as REQ_PAGES_ID), and the
    /// migration runs again.
    pub(super) fn resume(&mut self, _at: u64) -> Result<(), RamDstError> {
        RpMessage::ResumeAck(qmig_wire::recovery::RESUME_ACK_VALUE)
            .write(&mut self.out.transmit)?;
        // A host page placed since it was asked for is not asked again.
        let tps = self.page_size();
        let blocks = &self.blocks;
        self.requested.retain(|&(b, start)| {
            let n = blocks[b].page_size / tps;
            !(0..n).all(|i| blocks[b].received.get(start / tps + i))
        });
        let mut pending: Vec<(usize, u64)> = self
            .requested
            .iter()
            .copied()
            .filter(|k| !self.in_flight.contains_key(k))
            .collect();
        pending.sort_unstable();
        self.last_requested_block = None;
        for (b, start) in pending {
            let blk = &self.blocks[b];
            let len = blk.page_size as u32;
            let msg = if self.last_requested_block == Some(b) {
                RpMessage::ReqPages { start, len }
            } else {
                RpMessage::ReqPagesId {
                    start,
                    len,
                    block: &blk.name,
                }
            };
            msg.write(&mut self.out.transmit)?;
            self.last_requested_block = Some(b);
            self.stats.page_requests += 1;
            self.stats.requests_resent += 1;
        }
        self.stats.resumes += 1;
        self.set_postcopy(PostcopyState::Running);
        Ok(())
    }

    /// Handles one item of the postcopy-preempt channel (decoded with
    /// `Decoder::preempt_channel`; `offset` is the offset in that
    /// connection): ZERO and PAGE records of the pages the destination
    /// asked for, assembled into host pages with the channel's own
    /// temporary host page and last block, and EOS (QEMU 7.2 ends the
    /// channel with one). Accepted only while listening or running.
    ///
    /// # Errors
    /// [`RamDstError::IllegalTransition`] for anything else than a RAM
    /// record or outside [`PostcopyState::Listening`] /
    /// [`PostcopyState::Running`], and the errors of a postcopy record (see
    /// [`RamDst::handle_item`]); the machine stops and SHUT(1) is queued.
    pub fn handle_preempt_item(&mut self, offset: u64, item: &Item<'_>) -> Result<(), RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        let r = self.preempt_item(offset, item);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn preempt_item(&mut self, offset: u64, item: &Item<'_>) -> Result<(), RamDstError> {
        let illegal = |event| RamDstError::IllegalTransition {
            offset,
            state: self.postcopy,
            event,
        };
        let Item::Ram(rec) = item else {
            return Err(illegal("anything but a RAM record on the preempt channel"));
        };
        if matches!(rec.body, RamBody::Eos) {
            return Ok(());
        }
        if !matches!(
            self.postcopy,
            PostcopyState::Listening | PostcopyState::Running
        ) {
            return Err(illegal("a preempt channel page record"));
        }
        std::mem::swap(&mut self.host_page, &mut self.preempt.host_page);
        std::mem::swap(&mut self.current, &mut self.preempt.current);
        let r = self.apply_postcopy(offset, rec);
        std::mem::swap(&mut self.host_page, &mut self.preempt.host_page);
        std::mem::swap(&mut self.current, &mut self.preempt.current);
        if r.is_ok() {
            self.stats.preempt_records += 1;
        }
        r
    }

    /// Whether the preempt channel is inside a host page (a cut there
    /// drops it, see [`RamDst::handle_connection_lost`]).
    pub fn preempt_in_host_page(&self) -> bool {
        self.preempt.host_page.is_some()
    }
}
