//! Real-kernel tests. They need a userfaultfd: root, `/dev/userfaultfd`
//! access, `vm.unprivileged_userfaultfd=1`, or (any user, kernel >= 5.11)
//! user-mode-only faults, which is all these tests need. Where the kernel
//! offers none of these, each test prints why it is skipped.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::*;

const PS: usize = 4096;
const WAIT: Duration = Duration::from_secs(5);

/// A region, or `None` after printing why userfaultfd is unusable here.
fn region(pages: usize, test: &str) -> Option<Region> {
    if let Err(e) = probe() {
        eprintln!("{test}: SKIPPED: userfaultfd is unavailable here: {e}");
        return None;
    }
    assert_eq!(sys::host_page_size(), PS, "tests assume 4 KiB host pages");
    Some(Region::new(pages * PS).expect("Region::new"))
}

/// `let r = region!(pages, "test name");` or return from the test.
macro_rules! region {
    ($pages:expr, $test:expr) => {
        match region($pages, $test) {
            Some(r) => r,
            None => return,
        }
    };
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    let t = unsafe { libc::gettid() };
    t as u32
}

/// A "vCPU": reports its thread id, then reads each page in turn (blocking on
/// missing ones) and returns what it read.
fn reader(r: &Region, pages: &[usize]) -> (u32, JoinHandle<Vec<Vec<u8>>>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let r = r.clone();
    let pages = pages.to_vec();
    let h = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        pages
            .iter()
            .map(|&p| {
                let mut buf = vec![0u8; PS];
                r.read(p * PS, &mut buf).unwrap();
                buf
            })
            .collect()
    });
    (tid_rx.recv_timeout(WAIT).unwrap(), h)
}

fn next_fault(rx: &Receiver<Fault>) -> Fault {
    rx.recv_timeout(WAIT)
        .expect("the fault thread reported no fault")
}

/// Joins `h`, failing (instead of hanging) if it has not finished in time.
fn join<T>(h: JoinHandle<T>) -> T {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(
            t0.elapsed() < WAIT,
            "the reader is still blocked: lost wake-up"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    h.join().unwrap()
}

fn wait_blocked(r: &Region, n: usize) {
    let t0 = Instant::now();
    while r.blocktime().blocked_threads() < n {
        assert!(t0.elapsed() < WAIT, "threads never blocked");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn probe_reports_anonymous_missing_faults() {
    let f = match probe() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("probe_reports_anonymous_missing_faults: SKIPPED: userfaultfd is unavailable here: {e}");
            return;
        }
    };
    assert!(f.missing_anon);
    assert!(f.zeropage);
    eprintln!(
        "userfaultfd: {}",
        if f.user_mode_only {
            "user-mode-only faults (unprivileged)"
        } else {
            "all faults"
        }
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(!f.user_mode_only, "root gets full userfaultfd");
    }
    // Everything postcopy uses on this CI kernel (6.x).
    assert!(f.thread_id && f.missing_shmem, "{f:?}");
    assert!(f.raw & (1 << 8) != 0, "UFFD_FEATURE_THREAD_ID");
}

#[test]
fn fault_is_reported_and_placement_resolves_it() {
    let r = region!(8, "fault_is_reported_and_placement_resolves_it");
    assert!(r.has_thread_id());
    let (tx, rx) = mpsc::channel();
    let ft = r.spawn_fault_thread(3, Blocktime::new(1), tx).unwrap();
    let (tid, h) = reader(&r, &[2, 5]);

    let f = next_fault(&rx);
    assert_eq!(
        f,
        Fault {
            tag: 3,
            offset: 2 * PS as u64,
            thread_id: Some(tid),
            write: false,
            seen: f.seen,
        }
    );
    std::thread::sleep(Duration::from_millis(5));
    let page: Vec<u8> = (0..PS).map(|i| (i * 7) as u8).collect();
    let p = r.place_page(f.offset as usize, &page).unwrap();
    assert_eq!(
        p,
        Placed {
            filled: PS,
            already_present: 0
        }
    );

    let f = next_fault(&rx);
    assert_eq!(f.offset, 5 * PS as u64);
    r.place_zero_page(5 * PS, PS).unwrap();

    let got = join(h);
    assert_eq!(got[0], page);
    assert!(got[1].iter().all(|&b| b == 0));
    assert!(r.is_placed(2 * PS) && r.is_placed(5 * PS) && !r.is_placed(0));

    let bt = r.blocktime();
    assert_eq!(bt.blocked_threads(), 0);
    assert!(bt.per_thread()[&tid] >= Duration::from_millis(5), "{bt:?}");
    assert_eq!(bt.total(), bt.per_thread()[&tid]);
    assert_eq!(
        bt.all_vcpus_blocked(),
        bt.total(),
        "one vCPU: blocked = all blocked"
    );

    let st = ft.stop().unwrap();
    assert_eq!((st.faults, st.reported, st.duplicates), (2, 2, 0));
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_fault_fn_serves_faults_on_the_fault_thread() {
    let r = region!(8, "a_fault_fn_serves_faults_on_the_fault_thread");
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (r2, s2) = (r.clone(), served.clone());
    let ft = r
        .spawn_fault_thread(
            4,
            Blocktime::new(1),
            FaultFn(move |f: Fault| {
                // Placed from the fault thread itself: no other thread runs.
                let page = vec![f.offset as u8 ^ 0x5A; PS];
                r2.place_page(f.offset as usize, &page).unwrap();
                s2.lock().unwrap().push((f.tag, f.offset));
                true
            }),
        )
        .unwrap();
    let (_, h) = reader(&r, &[3, 1, 3]);
    let got = join(h);
    assert_eq!(got[0], vec![(3 * PS) as u8 ^ 0x5A; PS]);
    assert_eq!(got[1], vec![PS as u8 ^ 0x5A; PS]);
    assert_eq!(got[2], got[0]);
    assert_eq!(
        *served.lock().unwrap(),
        vec![(4, 3 * PS as u64), (4, PS as u64)]
    );
    let st = ft.stop().unwrap();
    assert_eq!((st.faults, st.reported, st.undelivered), (2, 2, 0));
}

#[test]
fn placing_twice_is_not_an_error_and_wakes_the_waiter() {
    let r = region!(8, "placing_twice_is_not_an_error_and_wakes_the_waiter");
    let (tx, rx) = mpsc::channel();
    let _ft = r.spawn_fault_thread(0, Blocktime::new(1), tx).unwrap();
    let (_, h) = reader(&r, &[1]);
    assert_eq!(next_fault(&rx).offset, PS as u64);

    // Populate the page *without* waking the reader: it stays asleep.
    let first = vec![0x5Au8; PS];
    let p = r.fill(PS, PS, Some(&first), false).unwrap();
    assert_eq!(p.filled, PS);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!h.is_finished(), "DONTWAKE copy woke the reader");

    // The second placement hits EEXIST: no error, old bytes kept, reader woken.
    let p = r.place_page(PS, &[0xFF; PS]).unwrap();
    assert_eq!(
        p,
        Placed {
            filled: 0,
            already_present: PS
        }
    );
    assert_eq!(join(h)[0], first);

    // EEXIST in the middle of a multi-page placement: the rest still lands.
    let p = r.place_page(0, &[1u8; 3 * PS]).unwrap();
    assert_eq!(
        p,
        Placed {
            filled: 2 * PS,
            already_present: PS
        }
    );
    let p = r.place_zero_page(0, 4 * PS).unwrap();
    assert_eq!(
        p,
        Placed {
            filled: PS,
            already_present: 3 * PS
        }
    );
    let mut buf = vec![0u8; 4 * PS];
    r.read(0, &mut buf).unwrap();
    assert!(buf[..PS].iter().all(|&b| b == 1));
    assert_eq!(buf[PS..2 * PS], first[..]);
    assert!(buf[2 * PS..3 * PS].iter().all(|&b| b == 1));
    assert!(buf[3 * PS..].iter().all(|&b| b == 0));
}

#[test]
fn concurrent_faults_on_one_page_are_reported_once() {
    let r = region!(4, "concurrent_faults_on_one_page_are_reported_once");
    let (tx, rx) = mpsc::channel();
    let ft = r.spawn_fault_thread(0, Blocktime::new(2), tx).unwrap();
    let (t1, h1) = reader(&r, &[3]);
    let (t2, h2) = reader(&r, &[3]);
    wait_blocked(&r, 2);
    let f = next_fault(&rx);
    assert_eq!(f.offset, 3 * PS as u64);
    assert!(f.thread_id == Some(t1) || f.thread_id == Some(t2));
    std::thread::sleep(Duration::from_millis(5));
    r.place_page(3 * PS, &[9; PS]).unwrap();
    assert_eq!(join(h1)[0], vec![9; PS]);
    assert_eq!(join(h2)[0], vec![9; PS]);
    let st = ft.stop().unwrap();
    assert_eq!((st.faults, st.reported, st.duplicates), (2, 1, 1));
    assert!(rx.try_recv().is_err(), "the page was asked for twice");
    let bt = r.blocktime();
    assert_eq!(bt.per_thread().len(), 2);
    assert!(bt.all_vcpus_blocked() >= Duration::from_millis(5), "{bt:?}");
}

#[test]
fn discarded_pages_fault_again() {
    let r = region!(2, "discarded_pages_fault_again");
    let (tx, rx) = mpsc::channel();
    let _ft = r.spawn_fault_thread(0, Blocktime::new(1), tx).unwrap();
    r.place_page(0, &[4; PS]).unwrap();
    let (_, h) = reader(&r, &[0]);
    assert_eq!(join(h)[0], vec![4; PS], "placed pages do not fault");
    assert!(rx.try_recv().is_err());
    r.discard(0, PS).unwrap();
    assert!(!r.is_placed(0));
    let (_, h) = reader(&r, &[0]);
    assert_eq!(next_fault(&rx).offset, 0);
    r.place_zero_page(0, PS).unwrap();
    assert_eq!(join(h)[0], vec![0; PS]);
}

#[test]
fn fault_thread_stops_cleanly_and_can_restart() {
    let r = region!(2, "fault_thread_stops_cleanly_and_can_restart");
    let (tx, _rx) = mpsc::channel();
    let ft = r
        .spawn_fault_thread(0, Blocktime::new(1), tx.clone())
        .unwrap();
    assert!(matches!(
        r.spawn_fault_thread(0, Blocktime::new(1), tx.clone()),
        Err(UffdError::FaultThreadRunning)
    ));
    let t0 = Instant::now();
    assert_eq!(ft.stop().unwrap(), FaultStats::default());
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Dropping stops it as well, and the region can get a new one.
    drop(
        r.spawn_fault_thread(0, Blocktime::new(1), tx.clone())
            .unwrap(),
    );
    let (tx2, rx2) = mpsc::channel();
    let ft = r.spawn_fault_thread(1, Blocktime::new(1), tx2).unwrap();
    let (_, h) = reader(&r, &[1]);
    assert_eq!(next_fault(&rx2).tag, 1);
    r.place_page(PS, &[1; PS]).unwrap();
    join(h);
    // The thread outlives the last Region handle until stopped.
    drop(r);
    assert_eq!(ft.stop().unwrap().reported, 1);
}

#[test]
fn ranges_are_checked() {
    let r = region!(2, "ranges_are_checked");
    let bad = |res: Result<Placed, UffdError>| {
        assert!(matches!(res, Err(UffdError::BadRange { .. })), "{res:?}")
    };
    bad(r.place_page(1, &[0; PS]));
    bad(r.place_page(0, &[0; 100]));
    bad(r.place_page(0, &[]));
    bad(r.place_page(PS, &[0; 2 * PS]));
    bad(r.place_zero_page(2 * PS, PS));
    bad(r.place_zero_page(usize::MAX - PS + 1, PS));
    assert!(matches!(r.wake(0, 3), Err(UffdError::BadRange { .. })));
    assert!(matches!(
        r.read(PS, &mut [0; PS + 1]),
        Err(UffdError::BadRange { .. })
    ));
    assert!(matches!(Region::new(0), Err(UffdError::BadRange { .. })));
    assert!(matches!(
        Region::new(PS + 1),
        Err(UffdError::BadRange { .. })
    ));
    assert!(!r.is_placed(0) && !r.is_placed(10 * PS));
}
