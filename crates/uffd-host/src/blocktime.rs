//! Blocktime accounting: how long faulting threads (vCPUs) waited for their
//! pages. Pure bookkeeping over explicit timestamps, so it can be tested
//! without a clock; the fault thread and the placement path feed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    since: Duration,
    page: u64,
}

/// Per-thread and whole-guest blocktime, in the sense of QEMU's
/// `postcopy-blocktime` statistics.
///
/// * A thread is *blocked* from the moment its missing fault is seen
///   ([`Blocktime::fault`]) until a placement covers the page it faulted on
///   ([`Blocktime::placed`]).
/// * [`Blocktime::per_thread`] sums those intervals per thread id and
///   [`Blocktime::total`] over all threads.
/// * [`Blocktime::all_vcpus_blocked`] is the time during which *all* vCPUs
///   were blocked at once (QEMU's `postcopy_blocktime`): it runs from the
///   moment the last of the `vcpus` threads blocks until the first of them
///   is released.
///
/// By default every faulting thread counts as a vCPU; with
/// [`Blocktime::with_vcpu_threads`] only the listed thread ids are counted
/// and faults from other threads (I/O threads, the test harness) are ignored.
/// Timestamps are offsets from any fixed origin and must not go backwards.
/// Pages are keyed by any address space shared by all callers (the fault
/// thread uses virtual addresses, so one `Blocktime` can serve every region
/// of a guest: "all vCPUs blocked" must see faults in every RAM block).
///
/// This is the definition of QEMU's `postcopy_blocktime` accounting
/// (postcopy-ram.c, `mark_postcopy_blocktime_begin/end`): per vCPU the sum of
/// its blocked intervals (`postcopy-vcpu-blocktime`), and overall the time
/// during which every vCPU was blocked at once (`postcopy-blocktime`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocktime {
    vcpus: usize,
    vcpu_threads: Option<BTreeSet<u32>>,
    waiting: HashMap<u32, Waiting>,
    per_thread: BTreeMap<u32, Duration>,
    total: Duration,
    all_blocked: Duration,
    all_since: Option<Duration>,
    faults_per_thread: BTreeMap<u32, u64>,
    latency: Latency,
}

/// Number of buckets of [`Latency::dist`], as QEMU 10.1's
/// `postcopy-latency-dist` (bucket `n` counts latencies in
/// `[2^n, 2^(n+1))` microseconds; the last bucket also takes anything
/// longer, and bucket 0 anything under 2 µs).
pub const LATENCY_BUCKETS: usize = 26;

/// Fault latencies: each closed wait, from the fault being read to the
/// placement that released it (QEMU 10.1's `postcopy-latency` family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latency {
    /// Every latency, microseconds (for exact percentiles).
    samples_us: Vec<u64>,
    dist: [u64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            samples_us: Vec::new(),
            dist: [0; LATENCY_BUCKETS],
        }
    }
}

/// The bucket of a latency of `us` microseconds: `floor(log2(us))`,
/// clamped to `0..LATENCY_BUCKETS`.
pub fn latency_bucket(us: u64) -> usize {
    if us == 0 {
        0
    } else {
        (us.ilog2() as usize).min(LATENCY_BUCKETS - 1)
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.samples_us.push(us);
        self.dist[latency_bucket(us)] += 1;
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.samples_us.len() as u64
    }

    /// The `p`-quantile (0 < p <= 1, nearest rank) in microseconds; `None`
    /// when nothing was recorded.
    pub fn quantile_us(&self, p: f64) -> Option<u64> {
        if self.samples_us.is_empty() {
            return None;
        }
        let mut v = self.samples_us.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    }

    /// Largest latency, microseconds.
    pub fn max_us(&self) -> Option<u64> {
        self.samples_us.iter().copied().max()
    }

    /// The log2 histogram (see [`LATENCY_BUCKETS`]).
    pub fn dist(&self) -> &[u64; LATENCY_BUCKETS] {
        &self.dist
    }

    /// Adds `other`'s samples to these.
    pub fn merge(&mut self, other: &Latency) {
        self.samples_us.extend_from_slice(&other.samples_us);
        for (a, b) in self.dist.iter_mut().zip(other.dist.iter()) {
            *a += b;
        }
    }
}

impl Blocktime {
    /// Accounting for a guest with `vcpus` vCPUs, any faulting thread being
    /// one of them.
    pub fn new(vcpus: usize) -> Self {
        Blocktime {
            vcpus,
            ..Blocktime::default()
        }
    }

    /// Accounting for exactly these vCPU threads (their kernel thread ids);
    /// the vCPU count is the number of distinct ids.
    pub fn with_vcpu_threads(tids: &[u32]) -> Self {
        let set: BTreeSet<u32> = tids.iter().copied().collect();
        Blocktime {
            vcpus: set.len(),
            vcpu_threads: Some(set),
            ..Blocktime::default()
        }
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Thread `tid` faulted on the host page at `page` at time `now`.
    ///
    /// A thread already recorded as blocked (its earlier wait was resolved
    /// without a placement being reported, e.g. by a wake-up) has that wait
    /// closed at `now` and a new one opened. Returns whether the fault was
    /// counted (false for a thread that is not a listed vCPU).
    pub fn fault(&mut self, tid: u32, page: u64, now: Duration) -> bool {
        if let Some(set) = &self.vcpu_threads {
            if !set.contains(&tid) {
                return false;
            }
        }
        if let Some(prev) = self.waiting.remove(&tid) {
            self.release(tid, prev, now);
        }
        self.waiting.insert(tid, Waiting { since: now, page });
        if self.vcpus > 0 && self.waiting.len() >= self.vcpus && self.all_since.is_none() {
            self.all_since = Some(now);
        }
        true
    }

    /// Host pages `[start, start + len)` were placed at time `now`: every
    /// thread waiting on one of them is released. Returns how many were.
    pub fn placed(&mut self, start: u64, len: u64, now: Duration) -> usize {
        let end = start.saturating_add(len);
        let done: Vec<(u32, Waiting)> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.page >= start && w.page < end)
            .map(|(&t, &w)| (t, w))
            .collect();
        for (tid, w) in &done {
            self.waiting.remove(tid);
            self.release(*tid, *w, now);
        }
        done.len()
    }

    /// Closes one wait; `tid` has already been removed from `waiting`.
    fn release(&mut self, tid: u32, w: Waiting, now: Duration) {
        let d = now.saturating_sub(w.since);
        *self.per_thread.entry(tid).or_default() += d;
        *self.faults_per_thread.entry(tid).or_default() += 1;
        self.latency.record(d);
        self.total += d;
        if self.waiting.len() < self.vcpus {
            if let Some(since) = self.all_since.take() {
                self.all_blocked += now.saturating_sub(since);
            }
        }
    }

    /// Closed blocked time per thread id.
    pub fn per_thread(&self) -> &BTreeMap<u32, Duration> {
        &self.per_thread
    }

    /// Closed waits per thread id (faults resolved).
    pub fn faults_per_thread(&self) -> &BTreeMap<u32, u64> {
        &self.faults_per_thread
    }

    /// Latencies of the closed waits.
    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Closed blocked time summed over all threads.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// Closed time during which all vCPUs were blocked simultaneously.
    pub fn all_vcpus_blocked(&self) -> Duration {
        self.all_blocked
    }

    /// Threads blocked right now.
    pub fn blocked_threads(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_vcpu_is_all_vcpus() {
        let mut b = Blocktime::new(1);
        assert!(b.fault(7, 0x1000, ms(10)));
        assert_eq!(b.blocked_threads(), 1);
        assert_eq!(b.placed(0x2000, 0x1000, ms(12)), 0, "another page");
        assert_eq!(b.placed(0x1000, 0x1000, ms(15)), 1);
        b.fault(7, 0x3000, ms(20));
        b.placed(0, 0x10000, ms(21));
        assert_eq!(b.per_thread()[&7], ms(6));
        assert_eq!(b.total(), ms(6));
        assert_eq!(b.all_vcpus_blocked(), ms(6));
        assert_eq!(b.blocked_threads(), 0);
    }

    #[test]
    fn two_vcpus_overlapping() {
        // vCPU 1: 0..10 on page A; vCPU 2: 4..14 on page B.
        // Both blocked during 4..10.
        let mut b = Blocktime::new(2);
        b.fault(1, 0xA000, ms(0));
        b.fault(2, 0xB000, ms(4));
        b.placed(0xA000, 0x1000, ms(10));
        b.placed(0xB000, 0x1000, ms(14));
        assert_eq!(b.per_thread()[&1], ms(10));
        assert_eq!(b.per_thread()[&2], ms(10));
        assert_eq!(b.total(), ms(20));
        assert_eq!(b.all_vcpus_blocked(), ms(6));
    }

    #[test]
    fn two_vcpus_disjoint_never_all_blocked() {
        let mut b = Blocktime::new(2);
        b.fault(1, 0xA000, ms(0));
        b.placed(0xA000, 0x1000, ms(5));
        b.fault(2, 0xB000, ms(6));
        b.placed(0xB000, 0x1000, ms(9));
        assert_eq!(b.total(), ms(8));
        assert_eq!(b.all_vcpus_blocked(), ms(0));
    }

    #[test]
    fn same_page_releases_every_waiter_and_huge_placement_covers_all() {
        let mut b = Blocktime::new(2);
        b.fault(1, 0x1000, ms(0));
        b.fault(2, 0x1000, ms(3));
        // One 2 MiB placement starting below covers the 4 KiB page both wait on.
        assert_eq!(b.placed(0, 0x20_0000, ms(8)), 2);
        assert_eq!(b.per_thread()[&1], ms(8));
        assert_eq!(b.per_thread()[&2], ms(5));
        assert_eq!(b.all_vcpus_blocked(), ms(5));
    }

    #[test]
    fn three_vcpus_qemu_picture() {
        // QEMU's example: S1 S2 E1 S3 S1 E2 E3 E1 — only S1(second)..E2 has
        // all three blocked.
        let mut b = Blocktime::new(3);
        b.fault(1, 0x1000, ms(0)); // S1
        b.fault(2, 0x2000, ms(5)); // S2
        b.placed(0x1000, 0x1000, ms(10)); // E1
        b.fault(3, 0x3000, ms(15)); // S3
        b.fault(1, 0x4000, ms(20)); // S1 again: all three down
        b.placed(0x2000, 0x1000, ms(24)); // E2: all-blocked ends
        b.placed(0x3000, 0x1000, ms(30)); // E3
        b.placed(0x4000, 0x1000, ms(40)); // E1
        assert_eq!(b.all_vcpus_blocked(), ms(4));
        assert_eq!(b.per_thread()[&1], ms(10 + 20));
        assert_eq!(b.per_thread()[&2], ms(19));
        assert_eq!(b.per_thread()[&3], ms(15));
        assert_eq!(b.total(), ms(64));
        assert_eq!(b.faults_per_thread()[&1], 2);
        assert_eq!(b.latency().count(), 4);
        // 10, 20, 19, 15 ms: p50 (nearest rank) is 15 ms, p99 20 ms.
        assert_eq!(b.latency().quantile_us(0.5), Some(15_000));
        assert_eq!(b.latency().quantile_us(0.99), Some(20_000));
        // 10 ms and 15 ms fall in [8192, 16384) µs; 19 and 20 ms in the next.
        assert_eq!(b.latency().dist()[13], 2);
        assert_eq!(b.latency().dist()[14], 2);
    }

    #[test]
    fn latency_buckets_are_log2_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(3), 1);
        assert_eq!(latency_bucket(256), 8);
        assert_eq!(latency_bucket(511), 8);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let mut l = Latency::default();
        assert_eq!(l.quantile_us(0.5), None);
        l.record(Duration::from_micros(300));
        let mut m = Latency::default();
        m.record(Duration::from_micros(5));
        l.merge(&m);
        assert_eq!(l.count(), 2);
        assert_eq!(l.dist()[8], 1);
        assert_eq!(l.dist()[2], 1);
        assert_eq!(l.max_us(), Some(300));
    }

    #[test]
    fn all_blocked_intervals_accumulate() {
        let mut b = Blocktime::new(2);
        for round in 0..3u64 {
            let t = round * 100;
            b.fault(1, 0x1000, ms(t));
            b.fault(2, 0x2000, ms(t + 10));
            b.placed(0x1000, 0x1000, ms(t + 30)); // both down 10..30
            b.placed(0x2000, 0x1000, ms(t + 40));
        }
        assert_eq!(b.all_vcpus_blocked(), ms(60));
        assert_eq!(b.total(), ms(3 * (30 + 30)));
    }

    #[test]
    fn refault_without_placement_closes_the_old_wait() {
        let mut b = Blocktime::new(1);
        b.fault(1, 0x1000, ms(0));
        b.fault(1, 0x1000, ms(4)); // woken without a placement, faulted again
        assert_eq!(b.per_thread()[&1], ms(4));
        assert_eq!(b.all_vcpus_blocked(), ms(4));
        assert_eq!(b.blocked_threads(), 1);
        b.placed(0x1000, 0x1000, ms(6));
        assert_eq!(b.total(), ms(6));
        assert_eq!(b.all_vcpus_blocked(), ms(6));
    }

    #[test]
    fn listed_vcpu_threads_only() {
        let mut b = Blocktime::with_vcpu_threads(&[10, 11, 10]);
        assert_eq!(b.vcpus(), 2);
        assert!(!b.fault(99, 0x1000, ms(0)), "not a vCPU");
        b.fault(10, 0x1000, ms(1));
        b.fault(11, 0x1000, ms(2));
        b.placed(0x1000, 0x1000, ms(5));
        assert_eq!(b.all_vcpus_blocked(), ms(3));
        assert!(!b.per_thread().contains_key(&99));
    }

    #[test]
    fn zero_vcpus_never_counts_all_blocked() {
        let mut b = Blocktime::new(0);
        b.fault(1, 0, ms(0));
        b.placed(0, 4096, ms(5));
        assert_eq!(b.all_vcpus_blocked(), ms(0));
        assert_eq!(b.total(), ms(5));
    }
}
