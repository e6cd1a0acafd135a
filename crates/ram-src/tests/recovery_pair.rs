//! The real `Source` and the real `RamDst` running postcopy against each
//! other in memory, with both sides of every recovery done by the state
//! machines themselves (RECV_BITMAP answered by `RamDst::handle_item`,
//! RESUME_ACK and the re-sent requests from `RamDst::poll_transmit`): cuts
//! before LISTEN and inside the package fail both sides cleanly; cuts during
//! the discards too; cuts after RUN pause both, a fresh connection recovers
//! and the migration resumes; a cut during the recovery pauses again. The
//! property test cuts the main stream, the return path and the preempt
//! channel at random byte positions, with faults in between, and the
//! destination always ends with the source's memory.

use proptest::prelude::*;
use qmig_ram_dst::{testing, FaultOutcome, PostcopyState, RamDst, RamDstError, VecMemory};
use qmig_ram_src::{RamSrcError, Source, SourcePhase, State};
use qmig_wire::{Decoder, Limits, Step};

mod common;
use common::{memory_pages as memory, PS};

/// One direction of one connection as the destination reads it.
struct Conn {
    wire: Vec<u8>,
    consumed: usize,
    dec: Decoder,
}

impl Conn {
    fn new(dec: Decoder) -> Self {
        Conn {
            wire: Vec::new(),
            consumed: 0,
            dec,
        }
    }
}

/// Where the next cut of each stream falls: bytes still to deliver on it
/// before it breaks (`None`: no more cuts on that stream).
#[derive(Debug, Default, Clone)]
struct Cuts {
    main: Vec<usize>,
    rp: Vec<usize>,
    preempt: Vec<usize>,
}

struct Harness<'t> {
    src: Source<'t>,
    mem: Vec<Vec<u8>>,
    dst: RamDst<VecMemory>,
    main: Conn,
    preempt: Option<Conn>,
    use_preempt: bool,
    rp: Vec<u8>,
    rp_consumed: usize,
    cuts: Cuts,
    /// Cuts that happened, and recoveries completed.
    cut_count: u64,
    recoveries: u64,
}

/// What a delivery ended with.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Up,
    Cut,
}

impl Harness<'_> {
    fn new(pages: &[usize], seeds: &[u8], use_preempt: bool) -> Self {
        Harness {
            src: common::postcopy_source(pages),
            mem: memory(pages, seeds),
            dst: common::emit_dst(),
            main: Conn::new(Decoder::new(Limits::default())),
            preempt: None,
            use_preempt,
            rp: Vec::new(),
            rp_consumed: 0,
            cuts: Cuts::default(),
            cut_count: 0,
            recoveries: 0,
        }
    }

    fn total_pages(&self) -> usize {
        self.mem.iter().map(|b| b.len() / PS).sum()
    }

    fn locate(&self, mut n: usize) -> (usize, usize) {
        n %= self.total_pages();
        for (b, blk) in self.mem.iter().enumerate() {
            let p = blk.len() / PS;
            if n < p {
                return (b, n);
            }
            n -= p;
        }
        unreachable!()
    }

    /// Delivers `bytes` on the main channel up to its next scheduled cut.
    fn send_main(&mut self, bytes: &[u8]) -> Result<Link, RamDstError> {
        let (n, link) = take_cut(&mut self.cuts.main, bytes.len());
        self.main.wire.extend_from_slice(&bytes[..n]);
        self.drive_main()?;
        Ok(link)
    }

    fn drive_main(&mut self) -> Result<(), RamDstError> {
        while common::apply_next(
            &mut self.main.dec,
            &mut self.dst,
            &self.main.wire,
            &mut self.main.consumed,
        )? {
            self.actions();
        }
        Ok(())
    }

    /// Delivers `bytes` on the preempt channel up to its next cut.
    fn send_preempt(&mut self, bytes: &[u8]) -> Link {
        let (n, link) = take_cut(&mut self.cuts.preempt, bytes.len());
        let conn = self.preempt.as_mut().expect("preempt channel open");
        conn.wire.extend_from_slice(&bytes[..n]);
        loop {
            let conn = self.preempt.as_mut().unwrap();
            let buf = &conn.wire[conn.consumed..];
            match conn
                .dec
                .decode(buf, false)
                .expect("preempt channel decodes")
            {
                Step::Item { item, len } => {
                    let at = conn.dec.position();
                    conn.dec.commit(&item, len);
                    conn.consumed += len;
                    self.dst
                        .handle_preempt_item(at, &item)
                        .expect("destination takes the preempt record");
                    self.actions();
                }
                Step::NeedMore | Step::End => return link,
                other => panic!("preempt channel: {other:?}"),
            }
        }
    }

    fn actions(&mut self) {
        while self.dst.poll_event().is_some() {}
        testing::drain_placements(&mut self.dst, testing::write_placement).expect("placed");
        self.dst.poll_transmit(&mut self.rp);
    }

    /// Return-path bytes to the source, up to the return path's next cut.
    fn carry_back(&mut self) -> Link {
        self.dst.poll_transmit(&mut self.rp);
        let avail = self.rp.len() - self.rp_consumed;
        let (n, link) = take_cut(&mut self.cuts.rp, avail);
        let end = self.rp_consumed + n;
        while self.rp_consumed < end {
            // Through `Source` (not `RamSrc`): a RESUME_ACK after EOF went
            // out takes the source back to its postcopy phase.
            match qmig_wire::decode_rp_message(
                &self.rp[self.rp_consumed..end],
                self.rp_consumed as u64,
            )
            .expect("return path decodes")
            {
                Some((msg, used)) => {
                    self.src
                        .handle_return_path(&msg)
                        .expect("source accepts the return path");
                    self.rp_consumed += used;
                }
                None => break,
            }
        }
        link
    }

    /// The connection broke (every channel of it): both sides pause.
    fn cut(&mut self) {
        self.cut_count += 1;
        self.src.handle_connection_lost().expect("source pauses");
        assert_eq!(self.src.ram().state(), State::Paused);
        let paused = self
            .dst
            .handle_connection_lost()
            .expect("destination pauses");
        assert!(paused, "cut after EOF");
        assert_eq!(self.dst.postcopy_state(), PostcopyState::Paused);
        self.rp.clear();
        self.rp_consumed = 0;
        self.preempt = None;
    }

    /// Fresh connections until one recovery completes (each try may be cut
    /// again by the schedule).
    fn recover(&mut self) {
        while self.src.ram().state() == State::Paused {
            self.dst.handle_recovery_connection().unwrap();
            assert_eq!(self.dst.postcopy_state(), PostcopyState::Recovering);
            let dec = self.main.dec.continuation().expect("cut after RUN");
            self.main = Conn::new(dec);
            let mut out = Vec::new();
            self.src.write_recovery_start(&mut out).unwrap();
            if self.send_main(&out).unwrap() == Link::Cut || self.carry_back() == Link::Cut {
                self.cut();
                continue;
            }
            assert!(self.src.ram().ready_to_resume());
            out.clear();
            self.src.write_resume(&mut out).unwrap();
            if self.send_main(&out).unwrap() == Link::Cut || self.carry_back() == Link::Cut {
                self.cut();
                continue;
            }
            assert_eq!(self.src.ram().state(), State::Postcopy);
            assert_eq!(self.dst.postcopy_state(), PostcopyState::Running);
            if self.use_preempt {
                self.open_preempt();
            }
            self.recoveries += 1;
        }
    }

    fn open_preempt(&mut self) {
        self.preempt = Some(Conn::new(self.main.dec.preempt_channel()));
        self.src.handle_preempt_connected();
    }

    /// Setup, one precopy pass of `budget` bytes, the switchover, all
    /// delivered without cuts; RUN reported sent.
    fn start(&mut self, budget: usize) {
        let mut out = Vec::new();
        self.src.write_setup(&mut out).unwrap();
        let _ = self
            .src
            .write_iteration(&self.mem, budget, &mut out)
            .unwrap();
        assert_eq!(self.send_main(&out).unwrap(), Link::Up);
        assert_eq!(self.carry_back(), Link::Up);
        out.clear();
        self.src.write_postcopy_switchover(&mut out).unwrap();
        assert_eq!(self.send_main(&out).unwrap(), Link::Up);
        self.src.handle_run_sent().unwrap();
        assert_eq!(self.dst.postcopy_state(), PostcopyState::Running);
        if self.use_preempt {
            self.open_preempt();
        }
    }

    /// A destination thread touches page `n` (any block).
    fn fault(&mut self, n: usize) {
        let (b, p) = self.locate(n);
        if self.dst.blocks()[b].received().get(p as u64) {
            return;
        }
        match self
            .dst
            .handle_page_fault(b, (p * PS) as u64)
            .expect("fault")
        {
            FaultOutcome::Requested
            | FaultOutcome::AlreadyRequested
            | FaultOutcome::PlaceLocally => {}
        }
        self.actions();
    }

    /// One round of the postcopy phase: faults, the return path, the
    /// preempt channel, one PART section; a cut anywhere pauses and
    /// recovers. Returns true once the source wrote EOF and it arrived.
    fn round(&mut self, faults: &[usize], budget: usize) -> bool {
        for &f in faults {
            self.fault(f);
        }
        if self.carry_back() == Link::Cut {
            self.cut();
            self.recover();
            return false;
        }
        if self.preempt.is_some() {
            let mut out = Vec::new();
            self.src.write_preempt(&self.mem, &mut out).unwrap();
            if self.send_preempt(&out) == Link::Cut {
                self.cut();
                self.recover();
                return false;
            }
        }
        let mut out = Vec::new();
        let last = self.src.postcopy_done();
        if last {
            self.src.write_completion(&self.mem, &mut out).unwrap();
        } else {
            let _ = self
                .src
                .write_iteration(&self.mem, budget, &mut out)
                .unwrap();
        }
        if self.send_main(&out).unwrap() == Link::Cut {
            self.cut();
            self.recover();
            return false;
        }
        last
    }

    fn finish(&mut self, faults: &[usize], budget: usize) {
        let mut fi = faults.chunks(3);
        let mut rounds = 0;
        while !self.round(fi.next().unwrap_or(&[]), budget) {
            rounds += 1;
            assert!(rounds < 10_000, "no progress");
        }
        assert_eq!(self.src.phase(), SourcePhase::Finished);
        assert_eq!(self.dst.postcopy_state(), PostcopyState::End);
        assert_eq!(self.main.consumed, self.main.wire.len());
        self.dst.handle_end_of_input().unwrap();
        self.actions();
        // A cut now (EOF in, SHUT not read) would find the destination
        // done: nothing to recover, its memory is complete.
        self.cuts = Cuts::default();
        assert_eq!(self.carry_back(), Link::Up);
        assert_eq!(self.dst.outstanding_requests(), 0);
    }

    fn assert_equal(&self) {
        let got = self.dst.memory().blocks();
        assert_eq!(got.len(), self.mem.len());
        for (i, ((_, g), w)) in got.iter().zip(&self.mem).enumerate() {
            assert!(g == w, "block {i} differs");
        }
    }
}

/// How many of `avail` bytes go through before the stream's next cut, and
/// whether it broke.
fn take_cut(cuts: &mut Vec<usize>, avail: usize) -> (usize, Link) {
    match cuts.first_mut() {
        Some(left) if *left < avail => {
            let n = *left;
            cuts.remove(0);
            (n, Link::Cut)
        }
        Some(left) => {
            *left -= avail;
            (avail, Link::Up)
        }
        None => (avail, Link::Up),
    }
}

#[test]
fn cut_before_listen_fails_both_cleanly() {
    let mut h = Harness::new(&[8, 3], &[1, 2, 5], false);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    let _ = h.src.write_iteration(&h.mem, 4 * PS, &mut out).unwrap();
    // Half of the precopy stream arrives, then the connection breaks.
    let half = out.len() / 2;
    h.main.wire.extend_from_slice(&out[..half]);
    h.drive_main().unwrap();
    let e = h.src.handle_connection_lost().unwrap_err();
    assert!(matches!(e, RamSrcError::NotPausable { .. }), "{e}");
    assert_eq!(h.src.ram().state(), State::Failed);
    let e = h.dst.handle_connection_lost().unwrap_err();
    assert!(matches!(e, RamDstError::ConnectionLost { .. }), "{e}");
    // Neither side can recover.
    assert!(h.src.write_recovery_start(&mut out).is_err());
    assert!(h.dst.handle_recovery_connection().is_err());
    assert!(h.main.dec.continuation().is_err());
}

/// The switchover's bytes are cut at `keep` (relative to the start of the
/// switchover); RUN is not reported sent.
fn cut_in_switchover(keep: impl Fn(&[u8]) -> usize) -> (RamSrcError, RamDstError, PostcopyState) {
    let mut h = Harness::new(&[8, 3], &[4, 7], false);
    let mut out = Vec::new();
    h.src.write_setup(&mut out).unwrap();
    let _ = h.src.write_iteration(&h.mem, 3 * PS, &mut out).unwrap();
    h.send_main(&out).unwrap();
    out.clear();
    h.src.write_postcopy_switchover(&mut out).unwrap();
    let n = keep(&out);
    h.main.wire.extend_from_slice(&out[..n]);
    h.drive_main().unwrap();
    let seen = h.dst.postcopy_state();
    let se = h.src.handle_connection_lost().unwrap_err();
    let de = h.dst.handle_connection_lost().unwrap_err();
    assert_eq!(h.src.ram().state(), State::Failed);
    assert!(h.dst.handle_recovery_connection().is_err());
    (se, de, seen)
}

#[test]
fn cut_during_discard_fails_both_cleanly() {
    // The first POSTCOPY_RAM_DISCARD is a command after SWITCHOVER_START:
    // keep a few bytes past the switchover start so the discard is torn.
    let (se, de, seen) = cut_in_switchover(|out| {
        let at = find_command(out, 0x0006).expect("a POSTCOPY_RAM_DISCARD");
        at + 5
    });
    assert!(matches!(se, RamSrcError::NotPausable { .. }), "{se}");
    assert!(matches!(de, RamDstError::ConnectionLost { .. }), "{de}");
    assert!(
        matches!(seen, PostcopyState::Advised | PostcopyState::Discarding),
        "{seen:?}"
    );
}

#[test]
fn cut_in_the_package_fails_both_cleanly() {
    // Everything but the package's last bytes (POSTCOPY_RUN) and PING(4).
    let (se, de, seen) = cut_in_switchover(|out| out.len() - 9 - 2);
    assert!(matches!(se, RamSrcError::NotPausable { .. }), "{se}");
    assert!(matches!(de, RamDstError::ConnectionLost { .. }), "{de}");
    assert_ne!(seen, PostcopyState::Running);
}

/// Offset of the first QEMU_VM_COMMAND (0x08) with command number `cmd`.
fn find_command(out: &[u8], cmd: u16) -> Option<usize> {
    let want = [0x08, (cmd >> 8) as u8, cmd as u8];
    out.windows(3).position(|w| w == want)
}

#[test]
fn cut_after_run_pauses_recovers_and_resumes() {
    let mut h = Harness::new(&[16, 5], &[1, 2, 4, 5, 7], false);
    h.start(4 * PS);
    // Faults, then the next PART section is cut in its middle.
    for n in [3, 17, 9] {
        h.fault(n);
    }
    assert_eq!(h.carry_back(), Link::Up);
    let mut out = Vec::new();
    let _ = h.src.write_iteration(&h.mem, 6 * PS, &mut out).unwrap();
    h.cuts.main = vec![out.len() / 2];
    assert_eq!(h.send_main(&out).unwrap(), Link::Cut);
    h.cut();
    // A fault while paused is asked for after RESUME.
    h.fault(20);
    h.recover();
    assert_eq!(h.recoveries, 1);
    assert_eq!(h.src.ram().counters().resumes, 1);
    h.finish(&[1, 2, 12], 5 * PS);
    h.assert_equal();
}

#[test]
fn cut_during_recovery_pauses_again() {
    let mut h = Harness::new(&[10, 10], &[3, 8, 11], false);
    h.start(2 * PS);
    h.fault(15);
    h.cuts.rp = vec![0];
    assert_eq!(h.carry_back(), Link::Cut);
    h.cut();
    // The first recovery breaks inside its RECV_BITMAP commands, the second
    // before the replies are all back, the third after POSTCOPY_RESUME
    // left and before RESUME_ACK arrived.
    h.cuts.main = vec![5];
    h.recover_once_expect_cut();
    h.cuts.rp = vec![10];
    h.recover_once_expect_cut();
    h.cuts.main = vec![];
    h.cuts.rp = vec![];
    // Resume written, its ack lost.
    h.dst.handle_recovery_connection().unwrap();
    h.main = Conn::new(h.main.dec.continuation().unwrap());
    let mut out = Vec::new();
    h.src.write_recovery_start(&mut out).unwrap();
    h.send_main(&out).unwrap();
    h.carry_back();
    out.clear();
    h.src.write_resume(&mut out).unwrap();
    h.send_main(&out).unwrap();
    assert_eq!(h.dst.postcopy_state(), PostcopyState::Running);
    assert_eq!(h.src.ram().state(), State::Recovering);
    h.cut();
    h.recover();
    assert_eq!(h.cut_count, 4);
    h.finish(&[0, 5, 19], 3 * PS);
    h.assert_equal();
}

impl Harness<'_> {
    fn recover_once_expect_cut(&mut self) {
        let before = self.cut_count;
        self.dst.handle_recovery_connection().unwrap();
        self.main = Conn::new(self.main.dec.continuation().unwrap());
        let mut out = Vec::new();
        self.src.write_recovery_start(&mut out).unwrap();
        if self.send_main(&out).unwrap() == Link::Cut || self.carry_back() == Link::Cut {
            self.cut();
        }
        assert_eq!(self.cut_count, before + 1, "the recovery was cut");
        assert_eq!(self.src.ram().state(), State::Paused);
        assert_eq!(self.dst.postcopy_state(), PostcopyState::Paused);
    }
}

#[test]
fn cut_between_end_and_eof_resends_end() {
    // The END section arrives, EOF does not: after the recovery the source
    // sends END (and EOF) again on the new connection, and the destination
    // takes it.
    let mut h = Harness::new(&[6], &[1, 2], false);
    h.start(6 * PS);
    while !h.src.postcopy_done() {
        let mut out = Vec::new();
        let _ = h.src.write_iteration(&h.mem, PS, &mut out).unwrap();
        assert_eq!(h.send_main(&out).unwrap(), Link::Up);
    }
    let mut out = Vec::new();
    h.src.write_completion(&h.mem, &mut out).unwrap();
    h.cuts.main = vec![out.len() - 1];
    assert_eq!(h.send_main(&out).unwrap(), Link::Cut);
    assert_eq!(h.dst.postcopy_state(), PostcopyState::Running);
    h.cut();
    h.recover();
    assert_eq!(h.src.phase(), SourcePhase::Postcopy);
    h.finish(&[], PS);
    h.assert_equal();
}

#[test]
fn preempt_channel_cut_recovers() {
    let mut h = Harness::new(&[12, 4], &[2, 5, 7, 11], true);
    h.start(PS);
    for n in [1, 6, 13] {
        h.fault(n);
    }
    assert_eq!(h.carry_back(), Link::Up);
    let mut out = Vec::new();
    let sent = h.src.write_preempt(&h.mem, &mut out).unwrap();
    assert!(sent > 0);
    h.cuts.preempt = vec![out.len() - 100];
    assert_eq!(h.send_preempt(&out), Link::Cut);
    assert!(h.dst.preempt_in_host_page() || h.dst.outstanding_requests() > 0);
    h.cut();
    h.recover();
    h.finish(&[2, 3, 15, 8], 4 * PS);
    assert!(h.src.ram().counters().preempt_pages > 0);
    h.assert_equal();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_cuts_end_equal(
        pages in prop::collection::vec(1usize..20, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..10),
        precopy_budget in 0usize..(12 * PS),
        budget in 1usize..(6 * PS),
        faults in prop::collection::vec(0usize..1000, 0..40),
        main_cuts in prop::collection::vec(0usize..(5 * PS), 0..5),
        rp_cuts in prop::collection::vec(0usize..200, 0..3),
        preempt_cuts in prop::collection::vec(0usize..(4 * PS), 0..3),
        use_preempt in any::<bool>(),
    ) {
        let mut h = Harness::new(&pages, &seeds, use_preempt);
        h.start(precopy_budget.max(1));
        h.cuts = Cuts { main: main_cuts, rp: rp_cuts, preempt: preempt_cuts };
        h.finish(&faults, budget);
        // Every cut was followed by a completed recovery (a recovery cut
        // after RESUME_ACK counts as a resume too).
        prop_assert!(h.recoveries >= h.cut_count.min(1));
        prop_assert!(h.src.ram().counters().resumes >= h.recoveries);
        prop_assert!(h.src.ram().counters().recoveries >= h.cut_count);
        h.assert_equal();
    }
}
