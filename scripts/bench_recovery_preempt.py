#!/usr/bin/env python3
"""Postcopy-preempt and recovery benchmarks, QEMU 10 source -> `qmig recv` on loopback.

usage: bench_recovery_preempt.py [--runs N] [--baseline QMIG_BIN] [--skip-latency] [--skip-recovery]
env:   QMIG   qmig binary (default target/release/qmig)
--baseline: another qmig binary (an older build) run in the same runs, interleaved, for 1.

1. Page-request round trip (fault -> REQ_PAGES -> page placed: the manifest's
   `request_latency_us`) with and without `postcopy-preempt`, in the same run, runs
   alternating, each split by the channel whose record answered it (the manifest's
   `request_latency_main_us` / `request_latency_preempt_us`): the q10-postcopy scenario of recv_interop.py (128 MiB guest, 96 MiB
   dirtied, postcopy after ~1 s, `recv --touch 2`) with max-bandwidth and
   max-postcopy-bandwidth unlimited, so the background stream saturates the main channel.
   Goal: preempt p99 <= 1 ms.
2. Recovery: a 1 GiB guest (-m 1024) in postcopy, one relay cut, `migrate ... resume=true`;
   the manifest's `recoveries[]`: from accepting the recovery connection to RESUME_ACK
   written (includes QEMU's own work between the RECV_BITMAP replies and POSTCOPY_RESUME),
   and the time qmig spent on the RECV_BITMAP commands. Goal <= 50 ms.
The load average is printed with the results: the machine is shared.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import recv_interop as ri  # noqa: E402
import recovery_interop as rc  # noqa: E402

MiB = 1 << 20
UNLIMITED = {"max-bandwidth": 1 << 40, "max-postcopy-bandwidth": 0}


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def latency(qmigs, root, runs):
    rows = {}
    for r in range(runs):
        for (label, qmig), pre in ((q, p) for q in qmigs for p in (False, True)):
            name = ("preempt" if pre else "no-preempt") + label
            rows.setdefault(name, [])
            sc = dict(ri.SCENARIOS["q10-postcopy"])
            sc["params"] = UNLIMITED
            sc["caps"] = {"postcopy-ram": True}
            if pre:
                sc["caps"]["postcopy-preempt"] = True
            slug = "".join(c if c.isalnum() or c == "-" else "_" for c in name)
            work = os.path.join(root, f"lat-{slug}-{r}")
            load = os.getloadavg()[0]
            try:
                ri.run_postcopy(name, sc, qmig, work)
            except (ri.Fail, OSError) as e:
                print(f"{name} run {r}: FAILED: {e}", flush=True)
                continue
            pc = json.load(open(os.path.join(work, "out", "manifest.json")))["postcopy"]
            rl = pc["request_latency_us"]
            # Which channel answered: a page the source had already queued on the main
            # channel is not sent again on the preempt channel.
            by = {c: pc.get(f"request_latency_{c}_us", {}) for c in ("main", "preempt")}
            rows[name].append((rl["count"], rl["p50"], rl["p99"], pc.get("preempt_records", 0),
                               load, by))
            print(f"{name} run {r}: round trip p50 {rl['p50']} us p99 {rl['p99']} us "
                  f"(n={rl['count']}); answered on the main channel: n={by['main'].get('count')} "
                  f"p50 {by['main'].get('p50')} p99 {by['main'].get('p99')} us, on the preempt "
                  f"channel: n={by['preempt'].get('count')} p50 {by['preempt'].get('p50')} "
                  f"p99 {by['preempt'].get('p99')} us; preempt records "
                  f"{pc.get('preempt_records', 0)}, load {load:.1f}", flush=True)
    print("\nvariant                  runs  requests  p50_us(median of runs)  p99_us(median of runs)  load"
          "  on_main  main_p50(median)  preempt_p99(median)")
    for name, rs in rows.items():
        if not rs:
            continue
        print(f"{name:23} {len(rs):5} {sum(x[0] for x in rs):9} "
              f"{pct([x[1] for x in rs], 0.5)!s:>23} {pct([x[2] for x in rs], 0.5)!s:>23} "
              f"{sum(x[4] for x in rs) / len(rs):5.1f} "
              f"{sum(x[5]['main'].get('count') or 0 for x in rs):8} "
              f"{pct([x[5]['main'].get('p50') for x in rs], 0.5)!s:>17} "
              f"{pct([x[5]['preempt'].get('p99') for x in rs], 0.5)!s:>20}")


def recovery(qmig, root, runs):
    rc.RAM_MIB = 1024
    rc.GUEST = {"start": 0x100000, "size": 48 * MiB, "writes": 2, "delay": 0x1000}
    res = []
    for r in range(runs):
        work = os.path.join(root, f"rec-{r}")
        load = os.getloadavg()[0]
        try:
            rc.run("bench", dict(cuts=["relay"]), qmig, work)
        except (rc.Fail, OSError) as e:
            print(f"recovery run {r}: FAILED: {e}", flush=True)
            continue
        m = json.load(open(os.path.join(work, "out", "manifest.json")))
        for t in m["postcopy"].get("recoveries", []):
            res.append((t["accept_to_resume_ack_us"], t["recv_bitmap_us"],
                        t["recv_bitmap_bytes"], load))
            print(f"recovery run {r}: accept -> RESUME_ACK {t['accept_to_resume_ack_us']} us, "
                  f"RECV_BITMAP handling {t['recv_bitmap_us']} us for "
                  f"{t['recv_bitmap_bytes']} bytes of replies, load {load:.1f}", flush=True)
    if res:
        print(f"\n1 GiB guest recovery ({len(res)} runs): accept -> RESUME_ACK median "
              f"{pct([x[0] for x in res], 0.5)} us, max {max(x[0] for x in res)} us; "
              f"qmig's RECV_BITMAP part median {pct([x[1] for x in res], 0.5)} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="QMIG_BIN",
                    help="also run this qmig binary, interleaved (latency only)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-recovery", action="store_true")
    a = ap.parse_args()
    qmig = ri.qmp.qmig_binary("bench_recovery_preempt")
    root = tempfile.mkdtemp(prefix="qmig-bench-recovery.", dir="/tmp")
    print(f"{time.strftime('%Y-%m-%d %H:%M')} nproc {os.cpu_count()} load "
          f"{os.getloadavg()}", flush=True)
    try:
        if not a.skip_latency:
            qmigs = [("", qmig)] + ([(" (baseline)", a.baseline)] if a.baseline else [])
            latency(qmigs, root, a.runs)
        if not a.skip_recovery:
            recovery(qmig, root, a.runs)
    finally:
        subprocess.run(["rm", "-rf", root])
    return 0


if __name__ == "__main__":
    sys.exit(main())
