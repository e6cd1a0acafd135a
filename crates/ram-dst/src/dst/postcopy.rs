//! The postcopy state machine (QEMU's incoming `PostcopyState`): the
//! commands that move it (ADVISE, RAM_DISCARD, LISTEN, RUN, and the
//! recovery commands it refuses), end of stream, and the inputs from the
//! host once it listens: page faults ([`RamDst::handle_page_fault`]) and
//! placement reports ([`RamDst::handle_placed`], [`RamDst::handle_place_failed`]).

use qmig_wire::Command;

use super::{Event, InFlight, Place, Placement, RamDst};
use crate::memory::GuestMemory;
use crate::RamDstError;

/// The incoming postcopy state (QEMU's `PostcopyState` on the destination).
///
/// ```text
///  None ─ADVISE─► Advised ─DISCARD─► Discarding ─┐
///                    │               (DISCARD)*   │
///                    └────────LISTEN──────────────┴─► Listening ─RUN─► Running ─EOF─► End
///                                                                     │  ▲
///                                                     connection lost │  │ POSTCOPY_RESUME
///                                                                     ▼  │ (RESUME_ACK sent)
///                                           Paused ─recovery connection─► Recovering
///                                             ▲                             │
///                                             └────── connection lost ──────┘
/// ```
/// A stream that never leaves `None`/`Advised`/`Discarding` is plain precopy.
/// `Paused` and `Recovering` are QEMU's destination migration states
/// `postcopy-paused` and `postcopy-recover` (its `PostcopyState` stays
/// RUNNING through them); only `Running` and `Recovering` can pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PostcopyState {
    /// No postcopy advised.
    None,
    /// POSTCOPY_ADVISE received.
    Advised,
    /// At least one POSTCOPY_RAM_DISCARD received.
    Discarding,
    /// POSTCOPY_LISTEN received: RAM records are postcopy records.
    Listening,
    /// POSTCOPY_RUN received: the guest may run.
    Running,
    /// The connection was lost after POSTCOPY_RUN ([`RamDst::handle_connection_lost`]):
    /// waiting for the source's recovery connection. Faults are recorded
    /// and asked for after POSTCOPY_RESUME.
    Paused,
    /// A recovery connection was accepted ([`RamDst::handle_recovery_connection`]):
    /// RECV_BITMAP requests are answered until POSTCOPY_RESUME.
    Recovering,
    /// The postcopy stream ended.
    End,
}

impl PostcopyState {
    /// A lower-case name for output (`none`, `advised`, `discarding`,
    /// `listening`, `running`, `paused`, `recovering`, `end`).
    pub fn name(self) -> &'static str {
        match self {
            PostcopyState::None => "none",
            PostcopyState::Advised => "advised",
            PostcopyState::Discarding => "discarding",
            PostcopyState::Listening => "listening",
            PostcopyState::Running => "running",
            PostcopyState::Paused => "paused",
            PostcopyState::Recovering => "recovering",
            PostcopyState::End => "end",
        }
    }
}

impl std::fmt::Display for PostcopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`RamDst::handle_page_fault`] decided for a faulting host page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A REQ_PAGES / REQ_PAGES_ID for the whole host page was queued for
    /// [`RamDst::poll_transmit`].
    Requested,
    /// The host page was asked for before and has not been placed yet:
    /// nothing new is sent.
    AlreadyRequested,
    /// The host page was received (a zero page that precopy never had to
    /// write) but is not present: a [`Place::ZeroPage`] was queued.
    PlaceLocally,
}

impl<M: GuestMemory> RamDst<M> {
    /// Host page bounds of `page_offset` in block `block`, checked: the
    /// block exists and the offset is inside its used length.
    pub(super) fn fault_page(
        &self,
        block: usize,
        page_offset: u64,
    ) -> Result<(u64, u64), RamDstError> {
        let bad = |why: String| RamDstError::BadFault {
            offset: self.applied_to,
            block,
            page_offset,
            why,
        };
        let Some(blk) = self.blocks.get(block) else {
            return Err(bad(format!("no such block ({} blocks)", self.blocks.len())));
        };
        if page_offset >= blk.used_length {
            return Err(bad(format!(
                "outside \"{}\" (used length {:#x})",
                blk.name, blk.used_length
            )));
        }
        let hps = blk.page_size;
        Ok((page_offset - page_offset % hps, hps))
    }

    /// A thread faulted on `page_offset` of block `block` (a page that is
    /// not present in the host's memory, e.g. a userfaultfd missing fault
    /// after POSTCOPY_LISTEN). Decides, for the whole host page:
    ///
    /// * not received and not asked for: a REQ_PAGES_ID (first request, or
    ///   another block than the last request) or REQ_PAGES is queued for
    ///   [`RamDst::poll_transmit`] ([`FaultOutcome::Requested`]), as QEMU's
    ///   `postcopy_request_page` / `migrate_send_rp_req_pages` do;
    /// * asked for already, or its placement handed out and not yet
    ///   reported: nothing ([`FaultOutcome::AlreadyRequested`]);
    /// * received (every target page): it was received as a zero page that
    ///   never had to be written, so a [`Place::ZeroPage`] is queued
    ///   ([`FaultOutcome::PlaceLocally`]) and nothing is asked of the source,
    ///   which would not send an already-sent page again.
    ///
    /// Call order: only between items (never while a `handle_*` call runs),
    /// then drain [`RamDst::poll_placement`] and [`RamDst::poll_transmit`].
    ///
    /// # Errors
    /// [`RamDstError::BadFault`] for an unknown block (a fault before any
    /// block exists included), an offset outside the block, a fault before
    /// POSTCOPY_LISTEN, a request without a return path, or a request after
    /// the postcopy stream ended: the machine stops and SHUT(1) is queued
    /// (a fault nobody can serve would leave a thread waiting forever).
    /// [`RamDstError::Stopped`] after an earlier error.
    pub fn handle_page_fault(
        &mut self,
        block: usize,
        page_offset: u64,
    ) -> Result<FaultOutcome, RamDstError> {
        if self.stopped {
            return Err(RamDstError::Stopped {
                offset: self.applied_to,
            });
        }
        let r = self.page_fault(block, page_offset);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn page_fault(&mut self, block: usize, page_offset: u64) -> Result<FaultOutcome, RamDstError> {
        let (start, hps) = self.fault_page(block, page_offset)?;
        let bad = |why: String| RamDstError::BadFault {
            offset: self.applied_to,
            block,
            page_offset,
            why,
        };
        use PostcopyState as S;
        if !matches!(
            self.postcopy,
            S::Listening | S::Running | S::Paused | S::Recovering | S::End
        ) {
            return Err(bad(format!(
                "a fault before POSTCOPY_LISTEN (state {:?})",
                self.postcopy
            )));
        }
        if self.requested.contains(&(block, start)) || self.in_flight.contains_key(&(block, start))
        {
            self.stats.faults_already_requested += 1;
            return Ok(FaultOutcome::AlreadyRequested);
        }
        let tps = self.page_size();
        let blk = &self.blocks[block];
        let (p, n) = (start / tps, hps / tps);
        if (p..p + n).all(|i| blk.received.get(i)) {
            self.stats.faults_resolved_locally += 1;
            self.in_flight.insert((block, start), InFlight::Local);
            self.out.placements.push_back(Place::ZeroPage {
                block,
                offset: start,
                len: hps,
            });
            return Ok(FaultOutcome::PlaceLocally);
        }
        if self.postcopy == S::End {
            return Err(bad(
                "the postcopy stream ended without this page: nobody left to ask".into(),
            ));
        }
        if !self.return_path {
            return Err(bad(
                "postcopy needs a return path to ask for pages (no OPEN_RETURN_PATH)".into(),
            ));
        }
        let len = u32::try_from(hps).map_err(|_| bad(format!("host page {hps:#x} too large")))?;
        if matches!(self.postcopy, S::Paused | S::Recovering) {
            // No return path to the source (or one that must carry only the
            // recovery handshake): asked for after POSTCOPY_RESUME, as
            // QEMU's migrate_send_rp_req_pages_pending does.
            self.requested.insert((block, start));
            return Ok(FaultOutcome::Requested);
        }
        let msg = if self.last_requested_block == Some(block) {
            qmig_wire::RpMessage::ReqPages { start, len }
        } else {
            qmig_wire::RpMessage::ReqPagesId {
                start,
                len,
                block: &blk.name,
            }
        };
        msg.write(&mut self.out.transmit)?;
        self.last_requested_block = Some(block);
        self.requested.insert((block, start));
        self.stats.page_requests += 1;
        Ok(FaultOutcome::Requested)
    }

    /// Checks that `len` bytes at `offset` of `block` are whole host pages
    /// inside the block, each handed out as a [`Place`] and not yet reported.
    fn check_placement(&self, block: usize, offset: u64, len: u64) -> Result<u64, RamDstError> {
        let (start, hps) = self.fault_page(block, offset)?;
        let blk = &self.blocks[block];
        let bad = |why: String| RamDstError::BadFault {
            offset: self.applied_to,
            block,
            page_offset: offset,
            why,
        };
        if start != offset
            || len == 0
            || !len.is_multiple_of(hps)
            || offset.checked_add(len).is_none_or(|e| e > blk.used_length)
        {
            return Err(bad(format!(
                "placement of {len:#x} bytes is not whole host pages of the block"
            )));
        }
        if let Some(at) = (0..len / hps)
            .map(|k| offset + k * hps)
            .find(|&at| !self.in_flight.contains_key(&(block, at)))
        {
            return Err(bad(format!(
                "host page {at:#x} was not handed out for placement (or was reported already)"
            )));
        }
        Ok(hps)
    }

    /// The host carried out a [`Place::HostPage`] or [`Place::ZeroPage`] of
    /// `len` bytes at `offset` of block `block` (EEXIST on a locally decided
    /// zero page counts as success: the page is there): only now are the
    /// target pages' received bits set, and the host pages are no longer
    /// outstanding. Call it before feeding the next item.
    ///
    /// # Errors
    /// [`RamDstError::BadFault`] for an unknown block, a range that is not
    /// whole host pages inside the block, or a host page that was not handed
    /// out for placement (or was reported already): the machine stops and
    /// SHUT(1) is queued.
    pub fn handle_placed(
        &mut self,
        block: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), RamDstError> {
        let hps = match self.check_placement(block, offset, len) {
            Ok(h) => h,
            Err(e) => {
                self.fail();
                return Err(e);
            }
        };
        let tps = self.page_size();
        self.blocks[block]
            .received
            .set_range(offset / tps, len / tps);
        let mut at = offset;
        while at < offset + len {
            self.requested.remove(&(block, at));
            match self.in_flight.remove(&(block, at)) {
                Some(InFlight::Data) => self.stats.placed_host_pages += 1,
                Some(InFlight::Zero) => self.stats.placed_zero_pages += 1,
                Some(InFlight::Local) | None => {}
            }
            at += hps;
        }
        Ok(())
    }

    /// The host could not carry out a [`Place::HostPage`] or
    /// [`Place::ZeroPage`] (`why`: e.g. the OS error of `UFFDIO_COPY`, or
    /// EEXIST for a page of the stream, whose content would be lost, as in
    /// QEMU's `postcopy_place_page`). The received bits stay clear; the
    /// machine stops and SHUT(1) is queued. Returns the error to report:
    /// [`RamDstError::PlacementFailed`], or [`RamDstError::BadFault`] when
    /// the range was not handed out for placement.
    pub fn handle_place_failed(
        &mut self,
        block: usize,
        offset: u64,
        len: u64,
        why: impl Into<String>,
    ) -> RamDstError {
        let e = match self.check_placement(block, offset, len) {
            Ok(_) => RamDstError::PlacementFailed {
                offset: self.applied_to,
                block: self.blocks[block].name.clone(),
                page_offset: offset,
                len,
                why: why.into(),
            },
            Err(e) => e,
        };
        self.fail();
        e
    }

    /// Host pages asked for and not yet placed.
    pub fn outstanding_requests(&self) -> usize {
        self.requested.len()
    }

    pub(super) fn set_postcopy(&mut self, s: PostcopyState) {
        if self.postcopy != s {
            self.postcopy = s;
            self.out.events.push_back(Event::PostcopyState(s));
        }
    }

    pub(super) fn handle_command(&mut self, at: u64, cmd: &Command<'_>) -> Result<(), RamDstError> {
        use PostcopyState as S;
        let state = self.postcopy;
        let illegal = |event: &'static str| RamDstError::IllegalTransition {
            offset: at,
            state,
            event,
        };
        match cmd {
            Command::OpenReturnPath => {
                self.return_path = true;
                self.out.events.push_back(Event::OpenReturnPath)
            }
            Command::Ping(v) => {
                if !self.return_path {
                    return Err(RamDstError::QemuRule {
                        offset: at,
                        function: "loadvm_process_command",
                        why: format!("PING {v:#x} with no return path open"),
                    });
                }
                qmig_wire::RpMessage::Pong(*v).write(&mut self.out.transmit)?;
            }
            Command::PostcopyAdvise(advise) => {
                if state != S::None {
                    return Err(illegal("POSTCOPY_ADVISE"));
                }
                if let Some(a) = advise {
                    if a.target_page_size != self.page_size() {
                        return Err(RamDstError::PageSizeMismatch {
                            offset: at,
                            name: "target page size (POSTCOPY_ADVISE)".into(),
                            local: self.page_size(),
                            remote: a.target_page_size,
                        });
                    }
                    if !self.adopt {
                        let local = self.blocks.iter().fold(0, |s, b| s | b.page_size);
                        if a.page_size_summary != local {
                            return Err(RamDstError::PageSizeMismatch {
                                offset: at,
                                name: "page size summary (POSTCOPY_ADVISE)".into(),
                                local,
                                remote: a.page_size_summary,
                            });
                        }
                    }
                }
                self.set_postcopy(S::Advised);
            }
            Command::RamDiscard(d) => {
                if !matches!(state, S::Advised | S::Discarding) {
                    return Err(illegal("POSTCOPY_RAM_DISCARD"));
                }
                self.discard(at, d)?;
                self.set_postcopy(S::Discarding);
            }
            Command::PostcopyListen => {
                if !matches!(state, S::Advised | S::Discarding) {
                    return Err(illegal("POSTCOPY_LISTEN"));
                }
                self.set_postcopy(S::Listening);
            }
            Command::PostcopyRun => {
                if state != S::Listening {
                    return Err(illegal("POSTCOPY_RUN"));
                }
                self.set_postcopy(S::Running);
            }
            // Postcopy recovery (dst/recovery.rs): only on a recovery
            // connection, before POSTCOPY_RESUME.
            Command::PostcopyResume => {
                // QEMU's loadvm_postcopy_handle_resume refuses a resume
                // outside postcopy-recover (and sends no RESUME_ACK).
                if state != S::Recovering {
                    return Err(illegal("POSTCOPY_RESUME"));
                }
                self.resume(at)?;
            }
            Command::RecvBitmap { block } => {
                // QEMU's loadvm_handle_recv_bitmap fails the load outside
                // postcopy-recover; answering would let a few bytes of input
                // ask for gigabytes of bitmap on the return path.
                if state != S::Recovering {
                    return Err(RamDstError::QemuRule {
                        offset: at,
                        function: "loadvm_handle_recv_bitmap",
                        why: format!(
                            "RECV_BITMAP for \"{block}\" outside postcopy recovery (state {state:?})"
                        ),
                    });
                }
                self.answer_recv_bitmap(at, block)?;
            }
            Command::Packaged { .. } | Command::SwitchoverStart => {}
            Command::EnableColo => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: "COLO".into(),
                })
            }
            Command::Unknown { cmd, .. } => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: format!("command {cmd}"),
                });
            }
            // Command is non-exhaustive in spirit: anything new is refused.
            #[allow(unreachable_patterns)]
            _ => {
                return Err(RamDstError::Unsupported {
                    offset: at,
                    what: format!("command {}", cmd.name()),
                })
            }
        }
        Ok(())
    }

    /// POSTCOPY_RAM_DISCARD: every range is checked (aligned to the block's
    /// page size, inside its used length) before any is applied.
    ///
    /// Range count: QEMU's source sends at most 12 ranges per command, but its
    /// loader (`loadvm_postcopy_ram_handle_discard`) takes as many as the be16
    /// command length holds (about 4000), and so does qmig. What keeps a
    /// command cheap is the cost per range: the bitmaps are cleared a word at
    /// a time over their non-zero words only, and memory is discarded only
    /// where a page may hold data, so a range's cost does not grow with its length.
    pub(super) fn discard(
        &mut self,
        at: u64,
        d: &qmig_wire::Discard<'_>,
    ) -> Result<(), RamDstError> {
        let Some(&b) = self.by_name.get(d.block) else {
            return Err(RamDstError::UnknownBlock {
                offset: at,
                name: d.block.to_string(),
            });
        };
        let tps = self.page_size();
        let blk = &self.blocks[b];
        for r in &d.ranges {
            let err = |why| RamDstError::Discard {
                offset: at,
                block: blk.name.clone(),
                start: r.start,
                len: r.len,
                why,
            };
            if !r.start.is_multiple_of(blk.page_size) || !r.len.is_multiple_of(blk.page_size) {
                return Err(err("not aligned to the block's page size"));
            }
            if r.start
                .checked_add(r.len)
                .is_none_or(|e| e > blk.used_length)
            {
                return Err(err("outside the block"));
            }
        }
        for r in &d.ranges {
            let (p, n) = (r.start / tps, r.len / tps);
            let blk = &mut self.blocks[b];
            // Word-at-a-time over the non-zero words only: a range's cost does
            // not grow with its length (see PageBitmap).
            if blk.nonzero.clear_range(p, n) {
                match self.placement {
                    Placement::Apply => self
                        .memory
                        .discard(b, r.start, r.len)
                        .map_err(|source| RamDstError::Memory { offset: at, source })?,
                    Placement::Emit => self.out.placements.push_back(Place::Discard {
                        block: b,
                        offset: r.start,
                        len: r.len,
                    }),
                }
            }
            blk.received.clear_range(p, n);
            self.stats.discarded_pages = self.stats.discarded_pages.saturating_add(n);
        }
        Ok(())
    }

    pub(super) fn handle_eof(&mut self, at: u64) -> Result<(), RamDstError> {
        if let Some(hp) = &self.host_page {
            return Err(RamDstError::PostcopyOrder {
                offset: at,
                block: self.blocks[hp.block].name.clone(),
                page_offset: hp.next,
                why: "the stream ended inside a host page".into(),
            });
        }
        match self.postcopy {
            PostcopyState::Listening | PostcopyState::Running => {
                self.set_postcopy(PostcopyState::End)
            }
            // The source sends RAM sections only after POSTCOPY_RESUME.
            PostcopyState::Recovering => {
                return Err(RamDstError::IllegalTransition {
                    offset: at,
                    state: self.postcopy,
                    event: "EOF before POSTCOPY_RESUME",
                })
            }
            _ => {}
        }
        Ok(())
    }
}
