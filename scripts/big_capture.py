#!/usr/bin/env python3
"""Make one big (>= 100 MiB) real QEMU 10 migration stream for qmig's benchmarks.

usage: big_capture.py OUT [--mib 200] [--keep-tmp]

A `pc` guest with RAM a bit over the requested size runs the boot-sector guest
(scripts/guest) which dirties [1 MiB, 1 MiB + MIB) exactly once (MAX_PASSES=1, then halts),
so every page of that range is non-zero and the stream is mostly PAGE records. The VM is
then stopped and migrated once to `file:OUT` (no multifd, no mapped-ram: a plain stream).
The record counts are deterministic (the section boundaries depend on timing). Output goes
to OUT only; never commit it. Prints a one-line JSON summary on stdout.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
DIRTY_START = 0x100000


def log(*a):
    print("[big_capture]", *a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--mib", type=int, default=200, help="MiB of guest RAM to dirty")
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args()
    if a.mib < 1:
        sys.exit("--mib must be >= 1")
    # RAM: dirty range + the first MiB + >= 32 MiB headroom, rounded up to 64 MiB.
    ram_mib = (a.mib + 1 + 32 + 63) // 64 * 64
    out = os.path.abspath(a.out)
    work = tempfile.mkdtemp(prefix="qmig-bigcap.", dir="/tmp")
    t0 = time.monotonic()
    vm = None
    try:
        img = os.path.join(work, "guest.img")
        subprocess.run([os.path.join(SCRIPTS, "guest", "build.sh"), "-o", img,
                        "-s", hex(DIRTY_START), "-n", hex(a.mib * MiB), "-w", "2",
                        "-d", "0x1000", "-p", "1"], check=True, stdout=subprocess.DEVNULL)
        serial = os.path.join(work, "serial")
        args = ["-M", "pc", "-m", str(ram_mib), "-nodefaults", "-display", "none",
                "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
        vm = qmp.Qemu(qmp.qemu_binary("10"), args, work, "src")
        version = qmp.version_string(vm.qmp)
        # One character on COM1 = the single pass is done (the guest then halts).
        qmp.wait_file_size(serial, 1, timeout=90)
        vm.cmd("stop")
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        if os.path.exists(out):
            os.unlink(out)
        vm.cmd("migrate", uri=f"file:{out}")
        final = qmp.wait_migration(vm.qmp, timeout=90)
        vm.quit()
        vm = None
        ram = final.get("ram", {})
        size = os.path.getsize(out)
        summary = {"out": out, "bytes": size, "qemu": version, "ram_mib": ram_mib,
                   "dirty_mib": a.mib, "normal": ram.get("normal"),
                   "duplicate": ram.get("duplicate"), "seconds": round(time.monotonic() - t0, 1)}
        if ram.get("normal", 0) < a.mib * MiB // 4096:
            raise RuntimeError(f"only {ram.get('normal')} normal pages; expected >= "
                               f"{a.mib * MiB // 4096}")
        log(f"{out}: {size} bytes ({size / MiB:.1f} MiB) in {summary['seconds']} s")
        print(json.dumps(summary))
        return 0
    finally:
        if vm is not None:
            log("QEMU log:", vm.read_log().strip()[-500:])
            vm.kill()
        if a.keep_tmp:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
