//! `Source` (postcopy) feeding `RamDst` in memory, with the return path
//! carried back: the destination faults on random pages after LISTEN, its
//! REQ_PAGES / REQ_PAGES_ID go to the source, which serves them before the
//! background scan; whatever the memory, precopy passes, dirty pages,
//! faults and budgets, the destination ends with the source's memory.

use proptest::prelude::*;
use qmig_ram_dst::{testing, FaultOutcome, PostcopyState, RamDst, VecMemory};
use qmig_ram_src::{Progress, Source};
use qmig_wire::{Decoder, Limits, ReturnPathReader};

mod common;
use common::{memory_pages as memory, PS};

struct Harness<'t> {
    src: Source<'t>,
    mem: Vec<Vec<u8>>,
    dst: RamDst<VecMemory>,
    dec: Decoder,
    wire: Vec<u8>,
    consumed: usize,
    rp: Vec<u8>,
    rp_consumed: usize,
    faults: u64,
}

impl Harness<'_> {
    /// Feeds every byte written so far to the destination, placing what it
    /// asks to place.
    fn drive(&mut self) {
        while common::apply_next(&mut self.dec, &mut self.dst, &self.wire, &mut self.consumed)
            .expect("destination accepts")
        {
            self.actions();
        }
    }

    fn actions(&mut self) {
        while self.dst.poll_event().is_some() {}
        testing::drain_placements(&mut self.dst, testing::write_placement).expect("placed");
        self.dst.poll_transmit(&mut self.rp);
    }

    /// Hands the return-path bytes to the source.
    fn carry_back(&mut self) {
        let fresh = &self.rp[self.rp_consumed..];
        for m in ReturnPathReader::new(fresh) {
            let (_, msg) = m.expect("return path decodes");
            self.src
                .handle_return_path(&msg)
                .expect("source accepts the request");
        }
        self.rp_consumed = self.rp.len();
    }

    /// A destination thread touches page `page` of block `block`: if it is
    /// not there yet, the destination asks for it.
    fn fault(&mut self, block: usize, page: usize) {
        let received = self.dst.blocks()[block].received().get(page as u64);
        if received {
            return;
        }
        match self
            .dst
            .handle_page_fault(block, (page * PS) as u64)
            .expect("fault")
        {
            FaultOutcome::Requested => self.faults += 1,
            FaultOutcome::AlreadyRequested | FaultOutcome::PlaceLocally => {}
        }
        self.actions();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_faults_through_switchover_end_equal(
        pages in prop::collection::vec(1usize..24, 1..4),
        seeds in prop::collection::vec(any::<u8>(), 1..12),
        precopy_passes in 0usize..3,
        dirty in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..30),
        faults in prop::collection::vec((any::<prop::sample::Index>(), 0usize..3), 0..60),
        budget in 1usize..20000,
    ) {
        let total: usize = pages.iter().sum();
        let locate = |i: &prop::sample::Index| {
            let mut n = i.index(total);
            for (b, &p) in pages.iter().enumerate() {
                if n < p { return (b, n); }
                n -= p;
            }
            unreachable!()
        };
        let mut h = Harness {
            src: common::postcopy_source(&pages),
            mem: memory(&pages, &seeds),
            dst: common::emit_dst(),
            dec: Decoder::new(Limits::default()),
            wire: Vec::new(),
            consumed: 0,
            rp: Vec::new(),
            rp_consumed: 0,
            faults: 0,
        };
        h.src.write_setup(&mut h.wire).unwrap();
        h.drive();
        for pass in 0..precopy_passes {
            while h.src.write_iteration(&h.mem, budget, &mut h.wire).unwrap() == Progress::Budget {
                h.drive();
            }
            h.drive();
            // The guest writes between passes (and before the switchover).
            for (i, salt) in &dirty {
                let (b, p) = locate(i);
                h.mem[b][p * PS + (*salt as usize % PS)] ^= salt | 1;
                h.src.ram_mut().handle_dirty_page(b, p as u64).unwrap();
            }
            if pass + 1 < precopy_passes {
                h.src.ram_mut().handle_sync().unwrap();
            }
        }
        h.carry_back();
        h.src.write_postcopy_switchover(&mut h.wire).unwrap();
        h.drive();
        prop_assert_eq!(h.dst.postcopy_state(), PostcopyState::Running);
        // Faults arrive in bursts between the source's PART sections.
        let mut fi = faults.iter();
        loop {
            for (i, _) in fi.by_ref().take(3) {
                let (b, p) = locate(i);
                h.fault(b, p);
            }
            h.carry_back();
            if h.src.postcopy_done() {
                break;
            }
            let _ = h.src.write_iteration(&h.mem, budget, &mut h.wire).unwrap();
            h.drive();
        }
        h.src.write_completion(&h.mem, &mut h.wire).unwrap();
        h.drive();
        prop_assert_eq!(h.consumed, h.wire.len());
        let c = h.src.ram().counters();
        if precopy_passes == 0 && !faults.is_empty() {
            // Nothing was sent before the switchover: the first fault is
            // always a request, served ahead of the scan.
            prop_assert!(h.faults > 0 && c.requested_pages > 0);
        }
        prop_assert_eq!(c.postcopy_requests, h.faults);
        prop_assert!(c.requested_pages <= c.postcopy_requests);
        prop_assert_eq!(h.dst.outstanding_requests(), 0);
        let got = h.dst.memory().blocks();
        for (i, ((_, g), w)) in got.iter().zip(&h.mem).enumerate() {
            prop_assert!(g == w, "block {} differs", i);
        }
    }
}
