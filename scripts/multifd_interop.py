#!/usr/bin/env python3
"""Live interop: a QEMU 10 multifd source migrates over loopback TCP into `qmig recv`.

usage: multifd_interop.py [--list] [--keep] [--jobs N] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Each scenario boots the dirtying guest (scripts/guest, 64 MiB) on a QEMU 10 source with
`multifd` on (`multifd-channels`, `multifd-compression` as named), starts
`qmig recv --listen tcp:127.0.0.1:PORT -o DIR --save DIR/capture` (a directory: one
file per connection), migrates with a bandwidth cap until >= 3 dirty syncs, stops the
guest, lifts the cap and checks:
  * QEMU's query-migrate says `completed`; `qmig recv` exits 0 with a complete manifest;
  * the received pc.ram equals the stopped source's pmemsave outside the hole
    [0xA0000, 0x100000);
  * the --save capture set (conn-0.bin main, conn-1.bin.. channels) replays with
    `qmig extract conn-0.bin --multifd-channel ...` to the same pc.ram;
  * the channel count qmig reports equals multifd-channels.
Also zero-page-detection legacy (ZERO records on main) and none (mfd2-*-zpd-*).
(QEMU 10.0 itself refuses multifd with postcopy-ram; qpl/uadk/qatzip need hardware
builds: those refusals are tested on crafted channels in crates/cli/tests/multifd_cli.rs.)
Scenarios run in parallel (--jobs, default 3). Exits non-zero naming the failed scenarios.
"""

import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
import capture  # noqa: E402  (guest builder)

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20
HOLE = (0xA0000, 0x100000)
RAM_MIB = 64
# 4 MiB of the guest dirtied continuously: each pass resends it.
GUEST = {"start": 0x100000, "size": 4 * MiB, "writes": 2, "delay": 0x10000}

SCENARIOS = {}
for n in (2, 4):
    for comp in ("none", "zlib", "zstd"):
        SCENARIOS[f"mfd{n}-{comp}"] = dict(channels=n, comp=comp, rp=(comp == "zlib"))
SCENARIOS["mfd8-zstd-rp"] = dict(channels=8, comp="zstd", rp=True)
SCENARIOS["mfd4-none-rp"] = dict(channels=4, comp="none", rp=True)
# zero-page-detection legacy (zero pages as ZERO records on the main channel) and none.
SCENARIOS["mfd2-zstd-zpd-legacy"] = dict(channels=2, comp="zstd", rp=False, zpd="legacy")
SCENARIOS["mfd2-none-zpd-none"] = dict(channels=2, comp="none", rp=False, zpd="none")
# The guest's pages compress ~20x: a lower cap keeps compressed migrations iterating.
BANDWIDTH = {"none": 8 * MiB, "zlib": 256 << 10, "zstd": 256 << 10}


def log(*a):
    print("[multifd-interop]", *a, file=sys.stderr, flush=True)


Fail = qmp.Fail
check = qmp.check


def pc_ram(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    for b in m["blocks"]:
        if b["name"] == "pc.ram":
            return m, open(os.path.join(out, b["file"]), "rb").read()
    raise Fail(f"no pc.ram in {out}")


def run(name, sc, qmig, work):
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    save = os.path.join(work, "capture")
    os.makedirs(save)
    img = capture.build_guest(GUEST, os.path.join(work, "guest.img"))
    serial = os.path.join(work, "src.serial")
    args = ["-M", "pc", "-m", str(RAM_MIB), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary("10"), args, work, "src")
    recv = None
    try:
        capture.wait_guest(serial)
        port = qmp.free_port()
        errlog = open(os.path.join(work, "recv.stderr"), "w+b")
        recv = subprocess.Popen([qmig, "recv", "--listen", f"tcp:127.0.0.1:{port}", "-o", out,
                                 "--save", save, "--idle-timeout", "30"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errlog, start_new_session=True)
        deadline = time.monotonic() + 30
        while b"listening" not in open(errlog.name, "rb").read():
            check(recv.poll() is None, "qmig recv exited before listening")
            check(time.monotonic() < deadline, "qmig recv never listened")
            time.sleep(0.05)
        caps = {"multifd": True, "return-path": sc["rp"]}
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        src.cmd("migrate-set-parameters", **{"multifd-channels": sc["channels"],
                                             "multifd-compression": sc["comp"],
                                             "max-bandwidth": BANDWIDTH[sc["comp"]],
                                             "downtime-limit": 1})
        if sc.get("zpd"):
            src.cmd("migrate-set-parameters", **{"zero-page-detection": sc["zpd"]})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        capture.wait_progress(src, {"min_syncs": 3})
        src.cmd("stop")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 2000})
        final = qmp.wait_migration(src.qmp, timeout=180)
        try:
            rc = recv.wait(60)
        except subprocess.TimeoutExpired:
            raise Fail("qmig recv did not exit within 60 s after completed")
        err = open(errlog.name, "rb").read().decode(errors="replace")
        check(rc == 0, f"qmig recv exited {rc}: {err}")
        m, ram = pc_ram(out)
        check(m["complete"], f"manifest not complete: {m['error']}")
        check(f"{sc['channels']} multifd channel connections" in err,
              f"qmig recv did not report {sc['channels']} channels: {err}")
        mem = open(qmp.pmemsave(src.qmp, 0, RAM_MIB * MiB, os.path.join(work, "src.mem")),
                   "rb").read()
        qmp.compare_ram(ram, mem, HOLE)
        check(m["return_path"] == sc["rp"], f"return path {m['return_path']}")
        conns = sorted(glob.glob(os.path.join(save, "conn-*.bin")))
        check(len(conns) == sc["channels"] + 1, f"--save wrote {len(conns)} files")
        ex = os.path.join(work, "replay")
        cmd = [qmig, "extract", os.path.join(save, "conn-0.bin"), "-o", ex]
        for c in conns[1:]:
            cmd += ["--multifd-channel", c]
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        check(r.returncode == 0, f"extract of the capture set failed: {r.stderr.decode()}")
        _, rram = pc_ram(ex)
        check(rram == ram, "replay of the --save capture set differs")
        q = final.get("ram", {})
        return (f"completed after {q.get('dirty-sync-count')} syncs, total-time "
                f"{final.get('total-time')} ms, multifd-bytes {q.get('multifd-bytes')}")
    finally:
        if recv and recv.poll() is None:
            recv.kill()
            recv.wait()
        src.kill()


def main():
    if not qmp.have(qmp.QEMU10):
        sys.exit("multifd_interop: QEMU 10 not installed")
    return qmp.run_scenarios("multifd_interop", SCENARIOS, run, jobs=3, retries=1)


if __name__ == "__main__":
    sys.exit(main())
