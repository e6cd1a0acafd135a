#!/usr/bin/env python3
"""Benchmark: `qmig recv` vs a QEMU 10 destination, both with multifd, same source memory.

usage: bench_multifd_recv.py [--mib 256] [--channels 4] [--compression none] [--runs 3]
env:   QMIG   path of the qmig binary (default target/release/qmig)

The source is QEMU 10 `-M pc -m MIB -S` whose RAM from 1 MiB on is filled, before the
guest ever runs, by `-device loader` with a deterministic blob: 1/4 zero pages, 1/4
pages of one repeated byte, 1/2 pseudo-random pages (so the stream carries real page
data, and zero-page detection has work). The VM stays stopped; `multifd` on with
`multifd-channels` and `multifd-compression` as given, max-bandwidth 1 TiB/s. Each run
starts a fresh source and migrates it over loopback TCP into either
  * `qmig recv --listen tcp:... -o DIR` (DIR under /dev/shm when it exists), or
  * QEMU 10 `-M pc -m MIB -S -incoming tcp:...` with the same multifd settings,
and reads the source's `total-time` from query-migrate at `completed`; qmig's pc.ram
image is checked against the blob. Runs alternate
between the two destinations. Prints one JSON line per run and a summary line with the
medians and the ratio qmig / QEMU.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20


def make_blob(path, size):
    rnd = random.Random(20261130)
    page = 4096
    with open(path, "wb") as f:
        for i in range(size // page):
            k = i % 4
            if k == 0:
                f.write(bytes(page))
            elif k == 1:
                f.write(bytes([i & 0xFF or 1]) * page)
            else:
                f.write(rnd.randbytes(page))


def source(work, blob, a):
    args = ["-M", "pc", "-m", str(a.mib), "-nodefaults", "-display", "none", "-S",
            "-device", f"loader,file={blob},addr=0x100000,force-raw=on"]
    vm = qmp.Qemu(qmp.qemu_binary("10"), args, work, "bench-src", qmp_timeout=60)
    set_multifd(vm, a)
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    return vm


def set_multifd(vm, a):
    vm.cmd("migrate-set-capabilities",
           capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": a.channels,
                                         "multifd-compression": a.compression})


def run_qemu(work, blob, a):
    port = qmp.free_port()
    dst = qmp.Qemu(qmp.qemu_binary("10"),
                   ["-M", "pc", "-m", str(a.mib), "-nodefaults", "-display", "none", "-S",
                    "-incoming", "defer"], work, "bench-dst", qmp_timeout=60)
    src = None
    try:
        set_multifd(dst, a)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src = source(work, blob, a)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        final = qmp.wait_migration(src.qmp, timeout=600)
        qmp.wait_migration(dst.qmp, timeout=120)
        return final
    finally:
        if src:
            src.kill()
        dst.kill()


def run_qmig(work, blob, a, qmig):
    port = qmp.free_port()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else work
    out = tempfile.mkdtemp(prefix="qmig-bench-mfd-", dir=base)
    errp = os.path.join(work, "recv.stderr")
    err = open(errp, "w+b")
    p = subprocess.Popen([qmig, "recv", "--listen", f"tcp:127.0.0.1:{port}", "-o", out],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    src = None
    try:
        deadline = time.monotonic() + 30
        while b"listening" not in open(errp, "rb").read():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qmig recv did not start: " + open(errp).read())
            time.sleep(0.02)
        src = source(work, blob, a)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        final = qmp.wait_migration(src.qmp, timeout=600)
        if p.wait(120) != 0:
            raise RuntimeError("qmig recv failed: " + open(errp).read())
        if f"{a.channels} multifd channel connections" not in open(errp).read():
            raise RuntimeError("qmig recv did not use the channels: " + open(errp).read())
        # The received memory is the source's: the blob from 1 MiB on.
        m = json.load(open(os.path.join(out, "manifest.json")))
        f = next(b["file"] for b in m["blocks"] if b["name"] == "pc.ram")
        with open(os.path.join(out, f), "rb") as img, open(blob, "rb") as want:
            img.seek(MiB)
            if img.read(os.path.getsize(blob)) != want.read():
                raise RuntimeError("qmig recv's pc.ram differs from the loaded blob")
        return final
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if src:
            src.kill()
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    qmig = os.environ.get("QMIG") or os.path.join(REPO, "target/release/qmig")
    work = tempfile.mkdtemp(prefix="qmig-bench-multifd-")
    try:
        blob = os.path.join(work, "blob.bin")
        make_blob(blob, (a.mib - 1) * MiB)
        times = {"qmig": [], "qemu": []}
        for i in range(a.runs):
            for who in ("qemu", "qmig"):
                f = run_qmig(work, blob, a, qmig) if who == "qmig" else run_qemu(work, blob, a)
                r = f.get("ram", {})
                row = {"run": i, "destination": who, "total_ms": f.get("total-time"),
                       "setup_ms": f.get("setup-time"), "downtime_ms": f.get("downtime"),
                       "normal": r.get("normal"), "duplicate": r.get("duplicate"),
                       "multifd_bytes": r.get("multifd-bytes")}
                print(json.dumps(row), flush=True)
                times[who].append(f.get("total-time"))
        mq, mm = statistics.median(times["qemu"]), statistics.median(times["qmig"])
        print(json.dumps({"summary": True, "mib": a.mib, "channels": a.channels,
                          "compression": a.compression, "qemu_median_ms": mq,
                          "qmig_median_ms": mm, "ratio": round(mm / mq, 3) if mq else None}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
