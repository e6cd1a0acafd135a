//! The whole outgoing stream, sans IO: [`Source`] wraps a [`RamSrc`] in the
//! container a [`Template`] supplies and writes every byte QEMU's
//! `qemu_savevm_state_*` functions would, for precopy and for postcopy.

use qmig_wire::{Command, RpMessage, SectionKind};

use crate::{GuestRam, Progress, RamSrc, RamSrcError, State, Template};

/// The PING values QEMU 10's postcopy switchover sends (savevm.c,
/// `postcopy_start`): before the package, inside it after the device
/// state, and after it.
pub mod ping {
    /// After OPEN_RETURN_PATH at setup.
    pub const SETUP: u32 = 1;
    /// After the discards.
    pub const AFTER_DISCARD: u32 = 2;
    /// Inside the package, after the device sections.
    pub const IN_PACKAGE: u32 = 3;
    /// After the package.
    pub const AFTER_PACKAGE: u32 = 4;
}

/// Where a [`Source`] is. Calls allowed in each:
///
/// ```text
///            write_setup            write_completion
///  Start ───────────────► Precopy ───────────────────────────────► Finished
///                          │  ▲ write_iteration,                       ▲
///                          └──┘ handle_return_path                     │
///                          │                                           │
///                          └─write_postcopy_switchover─► Postcopy ─────┘
///                                 (postcopy only)         │  ▲ write_iteration
///                                                         └──┘ (requests first),
///                                                        handle_return_path
///                                                   then write_completion
/// ```
///
/// `ram_mut().handle_dirty` / `handle_sync` report guest writes in
/// `Precopy`. Postcopy recovery keeps the phase (`Postcopy`, or `Finished`
/// when the cut came after EOF and before SHUT, which goes back to
/// `Postcopy` at RESUME_ACK): after
/// [`handle_run_sent`](Source::handle_run_sent),
/// [`handle_connection_lost`](Source::handle_connection_lost) pauses,
/// then on each new connection
/// [`write_recovery_start`](Source::write_recovery_start), the replies,
/// [`write_resume`](Source::write_resume), RESUME_ACK (see [`State`] for
/// the RAM machine's states). After `Finished` with postcopy, the caller waits for the
/// destination's SHUT on the return path ([`RamSrc::shut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Nothing written yet.
    Start,
    /// Header, configuration and the `ram` START section are out.
    Precopy,
    /// The switchover is out: the guest runs on the destination.
    Postcopy,
    /// EOF is out (and vmdesc, in precopy).
    Finished,
}

/// A migration source that writes a whole stream: the template's header
/// and configuration, `[OPEN_RETURN_PATH, PING(1), POSTCOPY_ADVISE]` with
/// postcopy, the `ram` START section, PART sections, and then either
///
/// * precopy: `[SWITCHOVER_START]`, the `ram` END section (the final pass),
///   the template's device state, EOF, vmdesc; or
/// * postcopy (QEMU 10.0's `postcopy_start` order): `[SWITCHOVER_START]`,
///   POSTCOPY_RAM_DISCARD commands, PING(2), PACKAGED{POSTCOPY_LISTEN, the
///   template's device state, PING(3), POSTCOPY_RUN}, PING(4), PART sections
///   serving page requests before the background scan, the `ram` END
///   section, EOF (no vmdesc).
///
/// It never touches a socket or a clock: each call appends bytes to the
/// caller's buffer, and return-path messages the caller read go to
/// [`handle_return_path`](Self::handle_return_path). The call order is in
/// [`SourcePhase`].
///
/// ```
/// use qmig_ram_src::{Config, Progress, RamSrc, Source, SrcBlock, Template};
/// use qmig_wire::RpMessage;
/// # let template_bytes = qmig_ram_src::template::tests_support::tiny_template();
/// let t = Template::parse(&template_bytes)?;
/// let mem = vec![vec![1u8; 4096 * 4]];
/// let ram = RamSrc::new(SrcBlock::sequential([("pc.ram", 4096 * 4)]), Config::default())?;
/// let mut src = Source::new(t, ram, true);
/// let mut out = Vec::new();
/// src.write_setup(&mut out)?;
/// src.write_postcopy_switchover(&mut out)?;
/// // The destination faults on page 2.
/// src.handle_return_path(&RpMessage::ReqPagesId { start: 8192, len: 4096, block: "pc.ram" })?;
/// while src.write_iteration(&mem, 4096, &mut out)? == Progress::Budget {}
/// src.write_completion(&mem, &mut out)?;
/// assert_eq!(src.ram().counters().requested_pages, 1);
/// assert!(qmig_wire::SliceReader::new(&out).all(|i| i.is_ok()));
/// # Ok::<(), qmig_ram_src::RamSrcError>(())
/// ```
#[derive(Debug)]
pub struct Source<'a> {
    template: Template<'a>,
    ram: RamSrc,
    postcopy: bool,
    phase: SourcePhase,
}

impl<'a> Source<'a> {
    /// A source writing `ram`'s records in `template`'s container; with
    /// `postcopy`, the stream advises postcopy at setup (the destination
    /// must have the `postcopy-ram` capability) and may switch over.
    #[must_use]
    pub fn new(template: Template<'a>, ram: RamSrc, postcopy: bool) -> Self {
        Source {
            template,
            ram,
            postcopy,
            phase: SourcePhase::Start,
        }
    }

    /// The RAM state machine (counters, SHUT, pending requests).
    #[must_use]
    pub fn ram(&self) -> &RamSrc {
        &self.ram
    }

    /// The RAM state machine, to report dirty pages in precopy.
    pub fn ram_mut(&mut self) -> &mut RamSrc {
        &mut self.ram
    }

    /// The template.
    #[must_use]
    pub fn template(&self) -> &Template<'a> {
        &self.template
    }

    /// Where the source is.
    #[must_use]
    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// Whether the stream advises postcopy.
    #[must_use]
    pub fn postcopy(&self) -> bool {
        self.postcopy
    }

    fn expect(&self, call: &'static str, ok: bool) -> Result<(), RamSrcError> {
        if ok {
            Ok(())
        } else {
            Err(RamSrcError::Phase {
                call,
                phase: self.phase,
            })
        }
    }

    /// Header, configuration, `[OPEN_RETURN_PATH, PING(1),
    /// POSTCOPY_ADVISE]`, and the `ram` START section (QEMU's
    /// `qemu_savevm_state_header` and `qemu_savevm_state_setup`).
    ///
    /// # Errors
    /// [`RamSrcError::Phase`] unless in [`SourcePhase::Start`]; errors of
    /// [`RamSrc::poll_setup`].
    pub fn write_setup(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect("write_setup", self.phase == SourcePhase::Start)?;
        self.template.write_prefix(out);
        if self.postcopy {
            Command::OpenReturnPath.write(out)?;
            Command::Ping(ping::SETUP).write(out)?;
            Command::PostcopyAdvise(Some(self.ram.postcopy_advise())).write(out)?;
        }
        self.template.begin_section(SectionKind::Start, out)?;
        self.ram.poll_setup(out)?;
        self.template.end_section(out);
        self.phase = SourcePhase::Precopy;
        Ok(())
    }

    /// One `ram` PART section: in postcopy the requested pages first (not
    /// counted in `budget`), then background pages while fewer than
    /// `budget` bytes were written (QEMU's `qemu_savevm_state_iterate`).
    ///
    /// # Errors
    /// [`RamSrcError::Phase`] unless in `Precopy` or `Postcopy`; errors of
    /// [`RamSrc::poll_iterate`].
    pub fn write_iteration<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> Result<Progress, RamSrcError> {
        self.expect(
            "write_iteration",
            matches!(self.phase, SourcePhase::Precopy | SourcePhase::Postcopy),
        )?;
        self.template.begin_section(SectionKind::Part, out)?;
        let p = self.ram.poll_iterate(mem, budget, out)?;
        self.template.end_section(out);
        Ok(p)
    }

    /// The postcopy switchover as QEMU 10.0 orders it (`postcopy_start`):
    /// `[SWITCHOVER_START]`, POSTCOPY_RAM_DISCARD commands
    /// ([`RamSrc::postcopy_switchover`]), PING(2), PACKAGED{POSTCOPY_LISTEN,
    /// device state, PING(3), POSTCOPY_RUN}, PING(4).
    ///
    /// # Errors
    /// [`RamSrcError::Phase`] unless in `Precopy` of a postcopy source;
    /// [`RamSrcError::Template`] for a device state over 4 GiB; errors of
    /// [`RamSrc::postcopy_switchover`].
    pub fn write_postcopy_switchover(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.expect(
            "write_postcopy_switchover",
            self.postcopy && self.phase == SourcePhase::Precopy,
        )?;
        self.template.write_switchover(out)?;
        self.ram.postcopy_switchover(out)?;
        Command::Ping(ping::AFTER_DISCARD).write(out)?;
        let mut pkg = Vec::new();
        Command::PostcopyListen.write(&mut pkg)?;
        pkg.extend_from_slice(self.template.device_state());
        Command::Ping(ping::IN_PACKAGE).write(&mut pkg)?;
        Command::PostcopyRun.write(&mut pkg)?;
        let len = u32::try_from(pkg.len()).map_err(|_| RamSrcError::Template {
            why: format!("device state of {} bytes does not fit a package", pkg.len()),
        })?;
        Command::Packaged { len }.write(out)?;
        out.extend_from_slice(&pkg);
        Command::Ping(ping::AFTER_PACKAGE).write(out)?;
        self.phase = SourcePhase::Postcopy;
        Ok(())
    }

    /// The end of the stream. Precopy: `[SWITCHOVER_START]`, the `ram` END
    /// section (a sync, then every dirty page), the template's device
    /// state, EOF and vmdesc. Postcopy: the `ram` END section (requested
    /// pages, then every page not sent yet), EOF.
    ///
    /// # Errors
    /// [`RamSrcError::Phase`] unless in `Precopy` or `Postcopy`; errors of
    /// [`RamSrc::poll_complete`].
    pub fn write_completion<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<(), RamSrcError> {
        let post = match self.phase {
            SourcePhase::Precopy => false,
            SourcePhase::Postcopy => true,
            _ => return self.expect("write_completion", false),
        };
        if !post {
            self.template.write_switchover(out)?;
        }
        self.template.begin_section(SectionKind::End, out)?;
        self.ram.poll_complete(mem, out)?;
        self.template.end_section(out);
        if post {
            out.push(qmig_wire::section::EOF);
        } else {
            out.extend_from_slice(self.template.device_state());
            out.extend_from_slice(self.template.trailer());
        }
        self.phase = SourcePhase::Finished;
        Ok(())
    }

    /// A return-path message (see [`RamSrc::handle_return_path`]).
    ///
    /// # Errors
    /// As [`RamSrc::handle_return_path`]; the migration must then fail.
    pub fn handle_return_path(&mut self, msg: &RpMessage<'_>) -> Result<(), RamSrcError> {
        self.ram.handle_return_path(msg)?;
        // A recovery after the END section went out resumes the postcopy
        // phase: what the destination lost is sent again, then END and EOF.
        if self.phase == SourcePhase::Finished && self.ram.state() == State::Postcopy {
            self.phase = SourcePhase::Postcopy;
        }
        Ok(())
    }

    /// The caller handed the switchover (the package with POSTCOPY_RUN) to
    /// the connection: a lost connection now pauses
    /// ([`RamSrc::handle_run_sent`]).
    ///
    /// # Errors
    /// As [`RamSrc::handle_run_sent`].
    pub fn handle_run_sent(&mut self) -> Result<(), RamSrcError> {
        self.ram.handle_run_sent()
    }

    /// The connection broke: pause after POSTCOPY_RUN, fail before
    /// ([`RamSrc::handle_connection_lost`]).
    ///
    /// # Errors
    /// [`RamSrcError::NotPausable`] before POSTCOPY_RUN.
    pub fn handle_connection_lost(&mut self) -> Result<(), RamSrcError> {
        self.ram.handle_connection_lost()
    }

    /// The opening of a recovery connection: one RECV_BITMAP command per
    /// block, no header (QEMU 10's `ram_dirty_bitmap_sync_all`). Feed the
    /// replies to [`handle_return_path`](Self::handle_return_path), then
    /// call [`write_resume`](Self::write_resume).
    ///
    /// # Errors
    /// As [`RamSrc::poll_recovery_start`].
    pub fn write_recovery_start(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.ram.poll_recovery_start(out)
    }

    /// POSTCOPY_RESUME, once every RECV_BITMAP reply is in; RAM PART
    /// sections follow RESUME_ACK.
    ///
    /// # Errors
    /// As [`RamSrc::poll_resume`].
    pub fn write_resume(&mut self, out: &mut Vec<u8>) -> Result<(), RamSrcError> {
        self.ram.poll_resume(out)
    }

    /// The preempt channel was (re)opened ([`RamSrc::handle_preempt_connected`]).
    pub fn handle_preempt_connected(&mut self) {
        self.ram.handle_preempt_connected();
    }

    /// Requested pages for the preempt channel ([`RamSrc::poll_preempt`]).
    ///
    /// # Errors
    /// As [`RamSrc::poll_preempt`].
    pub fn write_preempt<M: GuestRam + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut Vec<u8>,
    ) -> Result<u64, RamSrcError> {
        self.ram.poll_preempt(mem, out)
    }

    /// Whether the postcopy phase has nothing left to send: no dirty page and
    /// no request waiting (time for [`write_completion`](Self::write_completion)).
    #[must_use]
    pub fn postcopy_done(&self) -> bool {
        self.ram.state() == State::Postcopy
            && self.ram.remaining_pages() == 0
            && self.ram.pending_requests().next().is_none()
    }
}
