//! The fault thread: reads missing-fault events from a region's
//! userfaultfd, reports each newly needed host page, accounts blocktime.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use userfaultfd::{Event, EventBuffer, ReadWrite};

use crate::region::{BlocktimeHandle, Region, Shared};
use crate::sys;
use crate::UffdError;

/// A missing fault on a host page not yet placed nor already reported:
/// the caller should ask the source for it (REQ_PAGES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The tag given to [`Region::spawn_fault_thread`] (e.g. the RAM block
    /// index), so several regions can share one channel.
    pub tag: usize,
    /// Host-page-aligned offset of the faulting page within the region.
    pub offset: u64,
    /// Kernel thread id of the faulting thread, when the kernel reports it.
    pub thread_id: Option<u32>,
    /// Whether the access was a write.
    pub write: bool,
    /// When the fault thread read the fault (the start of its round trip:
    /// fault → request → placed).
    pub seen: std::time::Instant,
}

/// Where a fault thread reports the faults the caller must serve: a
/// channel (`Sender<Fault>`, read by another thread) or a function run on
/// the fault thread itself ([`FaultFn`]), which saves a thread hop on every
/// fault (the request can go out before any other thread is woken).
pub trait FaultSink: Send + 'static {
    /// Takes one fault; `false` when nobody can take it any more (counted
    /// as [`FaultStats::undelivered`]).
    fn report(&mut self, fault: Fault) -> bool;
}

impl FaultSink for Sender<Fault> {
    fn report(&mut self, fault: Fault) -> bool {
        self.send(fault).is_ok()
    }
}

/// A function as a [`FaultSink`]: it runs on the fault thread, so it must
/// not wait for that thread (e.g. must not stop it), and the faults of the
/// region wait while it runs.
pub struct FaultFn<F>(pub F);

impl<F: FnMut(Fault) -> bool + Send + 'static> FaultSink for FaultFn<F> {
    fn report(&mut self, fault: Fault) -> bool {
        (self.0)(fault)
    }
}

/// Counters kept by the fault thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Missing-fault events read.
    pub faults: u64,
    /// Faults reported over the channel (first fault on a page).
    pub reported: u64,
    /// Faults on a page already reported and not yet placed (not reported again).
    pub duplicates: u64,
    /// Faults on a page already placed (the waiter is woken, nothing reported).
    pub already_placed: u64,
    /// Reports that could not be sent because the receiver was gone.
    pub undelivered: u64,
}

/// A running fault thread. Stop it with [`FaultThread::stop`]; dropping it
/// stops it too, discarding the result.
#[derive(Debug)]
pub struct FaultThread {
    stop: OwnedFd,
    handle: Option<JoinHandle<Result<FaultStats, UffdError>>>,
    shared: Arc<Shared>,
}

impl Region {
    /// Starts the fault thread of this region. Each missing fault on a host
    /// page that is neither placed nor already reported is given to `tx` (a
    /// channel or a [`FaultFn`]) as a [`Fault`] tagged `tag`; faults on placed pages just wake their thread.
    /// `blocktime` says how many vCPUs (or which threads) to account for; a
    /// [`BlocktimeHandle`] may be shared by the fault threads of every
    /// region of a guest (waits are keyed by virtual address). It replaces
    /// the region's accounting, readable with [`Region::blocktime`].
    ///
    /// # Errors
    /// [`UffdError::FaultThreadRunning`] if this region already has one;
    /// [`UffdError::Syscall`] when the stop eventfd or the thread cannot be
    /// created.
    pub fn spawn_fault_thread(
        &self,
        tag: usize,
        blocktime: impl Into<BlocktimeHandle>,
        tx: impl FaultSink,
    ) -> Result<FaultThread, UffdError> {
        self.claim_fault_thread()?;
        let mut tx = tx;
        let started = (move || {
            let stop = sys::eventfd()?;
            let stop_dup = stop
                .try_clone()
                .map_err(|source| UffdError::Syscall { op: "dup", source })?;
            self.shared.lock().blocktime = Some(blocktime.into());
            let shared = Arc::clone(&self.shared);
            let handle = std::thread::Builder::new()
                .name("uffd-fault".into())
                .spawn(move || run(&shared, &stop_dup, tag, &mut tx))
                .map_err(|source| UffdError::Syscall {
                    op: "spawn",
                    source,
                })?;
            Ok(FaultThread {
                stop,
                handle: Some(handle),
                shared: Arc::clone(&self.shared),
            })
        })();
        if started.is_err() {
            self.shared.fault_thread.store(false, Ordering::Release);
        }
        started
    }
}

impl FaultThread {
    /// Tells the thread to stop, waits for it and returns its counters.
    /// Threads still blocked on unplaced pages stay blocked.
    ///
    /// # Errors
    /// The error that ended the thread early, if any (e.g. a failed read of
    /// the userfaultfd); [`UffdError::FaultThreadPanicked`] if it panicked.
    pub fn stop(mut self) -> Result<FaultStats, UffdError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<FaultStats, UffdError> {
        let Some(h) = self.handle.take() else {
            return Ok(FaultStats::default());
        };
        let one: u64 = 1;
        let p: *const u64 = &one;
        // SAFETY: writes the 8 bytes of `one` to our eventfd.
        let r = unsafe { libc::write(self.stop.as_raw_fd(), p.cast(), 8) };
        if r != 8 {
            // The thread cannot be told to stop; do not block on it.
            return Err(UffdError::Syscall {
                op: "write(eventfd)",
                source: io::Error::last_os_error(),
            });
        }
        let res = h.join().unwrap_or(Err(UffdError::FaultThreadPanicked));
        self.shared.fault_thread.store(false, Ordering::Release);
        res
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The thread body: poll the userfaultfd and the stop eventfd, read fault
/// events in batches (the crate's `read_events`), handle each.
fn run(
    shared: &Shared,
    stop: &OwnedFd,
    tag: usize,
    tx: &mut dyn FaultSink,
) -> Result<FaultStats, UffdError> {
    let mut stats = FaultStats::default();
    let mut buf = EventBuffer::new(16);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: shared.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let fds_ptr = fds.as_mut_ptr();
        // SAFETY: `fds_ptr` points to 2 initialised pollfds owned by this
        // frame. (Raw poll(2): the crate has no way to wait on two fds.)
        let r = unsafe { libc::poll(fds_ptr, 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(UffdError::Syscall {
                op: "poll",
                source: e,
            });
        }
        if fds[1].revents != 0 {
            return Ok(stats);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(UffdError::Syscall {
                op: "poll(userfaultfd)",
                source: io::Error::other("userfaultfd reported an error condition"),
            });
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // Non-blocking: EAGAIN (another reader took it) reads as no event.
        let events = match shared.uffd.read_events(&mut buf) {
            Ok(ev) => ev,
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EINTR => continue,
            Err(e) => {
                return Err(UffdError::Syscall {
                    op: "read(userfaultfd)",
                    source: io::Error::other(e.to_string()),
                })
            }
        };
        for ev in events {
            // Events other than page faults are not asked for; an event the
            // crate does not know is skipped.
            if let Ok(Event::Pagefault {
                addr,
                rw,
                thread_id,
                ..
            }) = ev
            {
                let tid = if shared.features.thread_id {
                    u32::try_from(thread_id.as_raw()).ok().filter(|&t| t != 0)
                } else {
                    None
                };
                handle_fault(
                    shared,
                    addr as usize,
                    tid,
                    rw == ReadWrite::Write,
                    tag,
                    tx,
                    &mut stats,
                )?;
            }
        }
    }
}

fn handle_fault(
    shared: &Shared,
    address: usize,
    thread_id: Option<u32>,
    write: bool,
    tag: usize,
    tx: &mut dyn FaultSink,
    stats: &mut FaultStats,
) -> Result<(), UffdError> {
    stats.faults += 1;
    let ps = shared.page_size;
    let Some(off) = address
        .checked_sub(shared.map.addr)
        .filter(|&o| o < shared.map.len)
    else {
        // Not ours (cannot happen with one region per fd); ignore.
        return Ok(());
    };
    let page = off / ps;
    let offset = (page * ps) as u64;
    let t_now = crate::region::now();
    let t = shared.lock();
    if t.received.get(page as u64) {
        drop(t);
        // Placed between the fault and now: the copy woke the thread, but a
        // spare wake-up is cheap and covers an EEXIST placement.
        stats.already_placed += 1;
        return shared.wake(page * ps, ps);
    }
    let mut t = t;
    if let (Some(tid), Some(b)) = (thread_id, &t.blocktime) {
        b.lock()
            .fault(tid, (shared.map.addr + page * ps) as u64, t_now);
    }
    if t.requested.get(page as u64) {
        stats.duplicates += 1;
        return Ok(());
    }
    t.requested.set(page as u64);
    drop(t);
    stats.reported += 1;
    let f = Fault {
        tag,
        offset,
        thread_id,
        write,
        seen: std::time::Instant::now(),
    };
    if !tx.report(f) {
        stats.undelivered += 1;
    }
    Ok(())
}
