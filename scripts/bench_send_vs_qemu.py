#!/usr/bin/env python3
"""QEMU 10 half of scripts/bench_send_vs_qemu.sh: migrate a stopped VM to file: N times.

usage: bench_send_vs_qemu.py CAPTURE WORKDIR OUT [--runs N] [--qmig QMIG]

Starts QEMU 10 with the capture's machine options (machine type and pc.ram size from
`qmig inspect --json`, `-nodefaults -display none`, a blank 1 MiB IDE disk and a null
serial port standing in for big_capture.py's boot disk and serial file, whose device
state is in the stream) plus `-S -incoming defer`, loads CAPTURE with
`migrate-incoming file:CAPTURE` (waits for `completed`), keeps the VM stopped, sets
max-bandwidth to 1 TiB/s (as big_capture.py does; QEMU's default is 128 MiB/s) and the
`events` capability, then `migrate file:OUT` N times. Each run deletes OUT first, issues
`migrate`, waits for the MIGRATION `completed` event and reads `query-migrate`.
QEMU is restarted and the capture reloaded before every run: QEMU 10 refuses a second
`migrate` from a VM left in `postmigrate` ("Can't migrate the vm that was paused due to
previous migration") unless it is `cont`inued first, which would let the guest run.
Prints one JSON object per run on stdout: total_ms (QEMU's `total-time`), wall_ms (from
issuing `migrate` to receiving the `completed` event), setup_ms, downtime_ms, normal,
duplicate, bytes (file size); then {"load_ms": [...]} with each load's wall time.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402

MiB = 1 << 20


def start(capture, work, machine, ram_mib, disk):
    args = ["-M", machine, "-m", str(ram_mib), "-nodefaults", "-display", "none",
            "-drive", f"file={disk},format=raw,if=ide", "-serial", "null",
            "-S", "-incoming", "defer"]
    vm = qmp.Qemu(qmp.qemu_binary("10"), args, work, "bench-dst", qmp_timeout=60)
    t0 = time.perf_counter()
    vm.cmd("migrate-incoming", uri=f"file:{capture}")
    qmp.wait_migration(vm.qmp, timeout=600)
    load_ms = (time.perf_counter() - t0) * 1000
    st = vm.cmd("query-status")["status"]
    if st == "running":
        raise RuntimeError("loaded VM is running; expected it stopped")
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    return vm, load_ms, st


def one_migration(vm, out):
    if os.path.exists(out):
        os.unlink(out)
    vm.qmp.events.clear()
    t0 = time.perf_counter()
    vm.cmd("migrate", uri=f"file:{out}")
    vm.qmp.wait_event("MIGRATION", timeout=600,
                      pred=lambda e: e["data"]["status"] in ("completed", "failed", "cancelled"))
    wall_ms = (time.perf_counter() - t0) * 1000
    info = qmp.wait_migration(vm.qmp, timeout=60)
    ram = info.get("ram", {})
    return {"total_ms": info.get("total-time"), "wall_ms": round(wall_ms, 1),
            "setup_ms": info.get("setup-time"), "downtime_ms": info.get("downtime"),
            "normal": ram.get("normal"), "duplicate": ram.get("duplicate"),
            "ram_transferred": ram.get("transferred"), "bytes": os.path.getsize(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture")
    ap.add_argument("work")
    ap.add_argument("out")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qmig", default=os.environ.get("QMIG", "qmig"))
    a = ap.parse_args()
    capture = os.path.abspath(a.capture)
    info = json.loads(subprocess.run([a.qmig, "inspect", "--json", capture], check=True,
                                     capture_output=True).stdout)
    pc = next(b for b in info["blocks"] if b["name"] == "pc.ram")
    ram_mib = pc["length"] // MiB
    machine = info["machine"]
    disk = os.path.join(a.work, "blank.img")
    with open(disk, "wb") as f:
        f.truncate(MiB)
    print(json.dumps({"machine": machine, "ram_mib": ram_mib}), flush=True)
    loads = []
    vm = None
    try:
        for i in range(a.runs):
            if True:  # a fresh QEMU per run (see the docstring)
                if vm is not None:
                    vm.quit()
                vm, load_ms, st = start(capture, a.work, machine, ram_mib, disk)
                loads.append(round(load_ms, 1))
                if i == 0:
                    print(json.dumps({"qemu": qmp.version_string(vm.qmp), "status": st}),
                          flush=True)
            r = one_migration(vm, a.out)
            r["run"] = i + 1
            print(json.dumps(r), flush=True)
    finally:
        if vm is not None:
            vm.quit()
    print(json.dumps({"load_ms": loads}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
