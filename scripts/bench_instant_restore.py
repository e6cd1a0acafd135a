#!/usr/bin/env python3
"""Bench "instant restore": time until a restored guest runs, qmig postcopy vs QEMU file:.

usage: bench_instant_restore.py [--ram-mib N] [--runs R] [--keep] [--qmig QMIG]

Builds a RAM image of N MiB (default 1024) and a matching template: QEMU 10 (`-M pc -m N
-nodefaults -display none`, running SeaBIOS with nothing to boot) saves its VM to a file, `qmig extract` turns
that into a RAM directory, and pc.ram above 1 MiB is filled with non-zero pseudo-random
pages (one in eight left zero), so neither side gets to skip it. Then, R times each:

  * QEMU `-incoming file:`: `qmig send --to file:STREAM` writes the same RAM as one
    precopy stream (not timed); a fresh QEMU 10 started with `-incoming defer` and no
    `-S` gets `migrate-incoming file:STREAM`; timed from that command until
    `query-status` says `running` (QEMU loads every page before it starts the guest).
  * qmig postcopy: a fresh QEMU 10 with `postcopy-ram` and `migrate-incoming tcp:`;
    timed from spawning `qmig send --postcopy --postcopy-after 0` (which first reads the
    images) until `query-status` says `running`; the migration is then waited for
    (`completed`, qmig exit 0) and its total time reported too.

query-status is polled every 2 ms. The page cache holds the stream and the images (each
is read once before timing). Prints one JSON object per run and a summary with the median
of each and the ratio postcopy/file (goal: <= 0.1).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def machine_args(ram_mib):
    return ["-M", "pc", "-m", str(ram_mib), "-nodefaults", "-display", "none"]


def make_template(work, ram_mib):
    # A running VM: the stream's globalstate says "running", so a destination
    # without -S starts the guest once loaded (a stopped VM's would stay paused).
    vm = qmp.Qemu(qmp.qemu_binary("10"), machine_args(ram_mib), work, "tpl")
    try:
        time.sleep(0.5)
        tpl = os.path.join(work, "template.stream")
        vm.cmd("migrate", uri=f"file:{tpl}")
        qmp.wait_migration(vm.qmp, timeout=300)
    finally:
        vm.quit()
    return tpl


def fill_ram(ramdir):
    man = json.load(open(os.path.join(ramdir, "manifest.json")))
    blk = next(b for b in man["blocks"] if b["name"] == "pc.ram")
    path = os.path.join(ramdir, blk["file"])
    size = blk["length"]
    seed = os.urandom(1 << 16)
    with open(path, "r+b") as f:
        f.truncate(size)
        f.seek(MiB)
        page = 0
        chunk = bytearray()
        for off in range(MiB, size, 4096):
            if page % 8 != 7:
                k = (page * 4099) % (len(seed) - 4096)
                chunk += seed[k:k + 4088] + page.to_bytes(8, "little")
            else:
                chunk += bytes(4096)
            page += 1
            if len(chunk) >= 16 * MiB:
                f.write(chunk)
                chunk = bytearray()
        f.write(chunk)


def until_running(vm, t0, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.cmd("query-status")["status"] == "running":
            return (time.perf_counter() - t0) * 1000
        time.sleep(0.002)
    raise RuntimeError("guest never ran")


def run_file(work, ram_mib, stream):
    vm = qmp.Qemu(qmp.qemu_binary("10"), machine_args(ram_mib) + ["-incoming", "defer"],
                  work, "file-dst", qmp_timeout=60)
    try:
        t0 = time.perf_counter()
        vm.cmd("migrate-incoming", uri=f"file:{stream}")
        ms = until_running(vm, t0)
        mig = qmp.wait_migration(vm.qmp, timeout=300)
        return {"mode": "qemu-file", "until_running_ms": ms, "status": mig["status"]}
    finally:
        vm.quit()


def run_postcopy(work, ram_mib, qmig, ramdir, tpl):
    port = qmp.free_port()
    vm = qmp.Qemu(qmp.qemu_binary("10"), machine_args(ram_mib) + ["-incoming", "defer"],
                  work, "pc-dst", qmp_timeout=60)
    try:
        vm.cmd("migrate-set-capabilities",
               capabilities=[{"capability": "postcopy-ram", "state": True}])
        vm.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        t0 = time.perf_counter()
        send = subprocess.Popen([qmig, "send", "--ram", ramdir, "--template", tpl,
                                 "--to", f"tcp:127.0.0.1:{port}", "--postcopy",
                                 "--postcopy-after", "0", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ms = until_running(vm, t0)
            out, err = send.communicate(timeout=600)
        finally:
            if send.poll() is None:
                send.kill()
        total = (time.perf_counter() - t0) * 1000
        if send.returncode != 0:
            raise RuntimeError(f"qmig send exited {send.returncode}: {err.strip()}")
        mig = qmp.wait_migration(vm.qmp, timeout=60)
        st = json.loads(out)
        return {"mode": "qmig-postcopy", "until_running_ms": ms, "total_ms": total,
                "status": mig["status"], "switchover_s": st["postcopy"]["switchover_seconds"],
                "requests": st["postcopy"]["requests"],
                "requested_pages": st["postcopy"]["requested_pages"]}
    finally:
        vm.quit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--qmig")
    a = ap.parse_args()
    qmig = qmp.qmig_binary("bench_instant_restore", a.qmig)
    work = tempfile.mkdtemp(prefix="qmig-instant-")
    try:
        tpl = make_template(work, a.ram_mib)
        ramdir = os.path.join(work, "ram")
        subprocess.run([qmig, "extract", tpl, "-o", ramdir], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fill_ram(ramdir)
        stream = os.path.join(work, "full.stream")
        subprocess.run([qmig, "send", "--ram", ramdir, "--template", tpl,
                        "--to", f"file:{stream}"], check=True, stderr=subprocess.DEVNULL)
        for p in [stream] + [os.path.join(ramdir, f) for f in os.listdir(ramdir)]:
            with open(p, "rb") as f:  # warm the page cache
                while f.read(16 * MiB):
                    pass
        res = {"qemu-file": [], "qmig-postcopy": []}
        for _ in range(a.runs):
            for r in (run_file(work, a.ram_mib, stream),
                      run_postcopy(work, a.ram_mib, qmig, ramdir, tpl)):
                print(json.dumps(r), flush=True)
                res[r["mode"]].append(r["until_running_ms"])
        f = statistics.median(res["qemu-file"])
        p = statistics.median(res["qmig-postcopy"])
        print(json.dumps({"summary": True, "ram_mib": a.ram_mib,
                          "stream_bytes": os.path.getsize(stream),
                          "qemu_file_until_running_ms": round(f, 1),
                          "qmig_postcopy_until_running_ms": round(p, 1),
                          "ratio": round(p / f, 3), "goal": 0.1}))
    finally:
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
