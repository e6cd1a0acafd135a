#!/usr/bin/env python3
"""Capture real QEMU migration streams plus oracles for qmig's test corpus.

usage: capture.py [--out DIR] [--max-size BYTES] [--keep-tmp] SCENARIO... | all | --list

Each scenario writes DIR/<name>/:
  stream | stream.gz     the main migration stream (gzip'd when larger than --max-size)
  rp                     recorded return path (relay scenarios only)
  query-migrate.json     {"source": final query-migrate, "destination": ... (if any)}
  oracle.json            machine, QEMU version, capabilities/parameters, RAM layout,
                         sha256 digests of the source's pmemsave per RAM block range,
                         expected record counts (see tests/data/README.md)

Every capture is self-checked with the independent reader scripts/qemustream.py: QEMU's
counters must match the records in the stream and every digest must match the memory
reconstructed from the stream; otherwise the capture fails.

The "arch" scenarios (ARCH_SCENARIOS: arm, aarch64, ppc, ppc64, s390x, sparc, sparc64 and
QEMU 7.2 without section footers / configuration) migrate a stopped (-S) machine whose
RAM holds `-device loader` data, digest every mapped RAM block piece by pmemsave, and have
a destination QEMU load the stream back (its memory must equal the source's). Without
the target's QEMU installed (QMIG_EXTRA_ARCHES=1 scripts/install-qemu.sh) they are
SKIPPED.

Scenarios needing host setup (q10-hugepage-postcopy: 2 MiB hugepages on a hugetlbfs at
/dev/hugepages) do it themselves, idempotently, as root; where impossible they are
reported as SKIPPED (exit status unaffected) instead of failing.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
import qemustream  # noqa: E402
from relay import Relay  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20
HOLE = (0xA0000, 0x100000)
BIOS_FILE = "/usr/share/seabios/bios-256k.bin"

PC = {"args": ["-M", "pc", "-m", "2"], "ram": 2 * MiB, "layout": [("pc.ram", 0, 2 * MiB)]}
Q35 = {"args": ["-M", "q35", "-m", "4",
                "-object", "memory-backend-ram,id=m0,size=2M",
                "-object", "memory-backend-ram,id=m1,size=2M",
                "-numa", "node,nodeid=0,memdev=m0", "-numa", "node,nodeid=1,memdev=m1"],
       "ram": 4 * MiB, "layout": [("m0", 0, 2 * MiB), ("m1", 2 * MiB, 2 * MiB)]}
HUGEPAGES = "/dev/hugepages"
# pc with two NUMA nodes: m0 (anonymous RAM, 4 KiB pages) = GPA [0, 4 MiB) with the usual
# hole, hp (hugetlbfs file, 2 MiB pages) = GPA [4 MiB, 8 MiB). Needs setup_hugepages().
PC_HUGE = {"args": ["-M", "pc", "-m", "8",
                    "-object", "memory-backend-ram,id=m0,size=4M",
                    "-numa", "node,nodeid=0,memdev=m0",
                    "-object", f"memory-backend-file,id=hp,size=4M,mem-path={HUGEPAGES},share=on",
                    "-numa", "node,nodeid=1,memdev=hp"],
           "ram": 8 * MiB, "layout": [("m0", 0, 4 * MiB), ("hp", 4 * MiB, 4 * MiB)],
           "hugepages": 16}
SHM = "/dev/shm"
# pc whose whole RAM is one shared file-backed backend m0 (GPA [0, 8 MiB), usual hole);
# "{shm}" in the args is replaced by a per-capture unique file under /dev/shm, removed
# afterwards. With x-ignore-shared QEMU sends no pages of m0 (its content is the file).
PC_SHARED = {"args": ["-M", "pc,memory-backend=m0", "-m", "8",
                      "-object", "memory-backend-file,id=m0,size=8M,mem-path={shm},share=on"],
             "ram": 8 * MiB, "layout": [("m0", 0, 8 * MiB)], "shared": ["m0"]}

# guest: dict(start, size, writes) for scripts/guest/build.sh
G_TINY = {"start": 0x100000, "size": 16 * 4096, "writes": 2}
G_SMALL = {"start": 0x100000, "size": 32 * 4096, "writes": 2}
G_XBZ = {"start": 0x100000, "size": 128 * 4096, "writes": 2}
# XBZRLE rounds are so cheap that QEMU syncs again within a millisecond: the guest must
# dirty continuously (tiny delay) and the bandwidth is lowered once XBZRLE starts
# ("slow_after"), or a sync can find nothing dirty and the migration converges early.
G_XBZ_FAST = dict(G_XBZ, delay=0x1000)

SCENARIOS = {
    "q10-stopped": dict(
        qemu="10", machine=PC, guest=G_SMALL, flow="stopped",
        about="QEMU 10, guest booted and dirtying, then `stop`, one migration to file:"),
    "q10-passes": dict(
        qemu="10", machine=PC, guest=G_SMALL, flow="passes", min_syncs=5,
        params={"max-bandwidth": 2_000_000},
        about="QEMU 10, running guest, max-bandwidth 2 MB/s, >= 5 dirty syncs, then stop"),
    "q10-xbzrle": dict(
        qemu="10", machine=PC, guest=G_XBZ_FAST, flow="passes", min_syncs=3, min_xbzrle=1100,
        caps={"xbzrle": True}, slow_after=(2, 8_000),
        params={"max-bandwidth": 2_000_000, "xbzrle-cache-size": 4 * MiB},
        about="QEMU 10, running guest, xbzrle, passes until >= 1100 XBZRLE pages, then stop"),
    "q10-zpd-none": dict(
        qemu="10", machine=PC, guest=G_SMALL, flow="stopped",
        params={"zero-page-detection": "none"},
        about="QEMU 10, stopped guest, zero-page-detection=none (zero pages sent as PAGE)"),
    "q10-postcopy": dict(
        qemu="10", machine=PC, guest=G_XBZ, flow="postcopy", min_syncs=2,
        caps={"postcopy-ram": True},
        params={"max-bandwidth": 1_000_000, "max-postcopy-bandwidth": 200_000},
        about="QEMU 10 -> QEMU 10 over the recording relay, postcopy-ram, "
              "migrate-start-postcopy after the first pass, running destination, "
              "max-postcopy-bandwidth 200 kB/s so the destination faults (page requests)"),
    "q10-ignore-shared": dict(
        qemu="10", machine=PC_SHARED, guest=G_SMALL, flow="stopped",
        caps={"x-ignore-shared": True},
        about="QEMU 10, -M pc,memory-backend=m0 with m0 a shared memory-backend-file in "
              "/dev/shm, x-ignore-shared, guest booted and dirtying, then stop, one "
              "migration to file: (m0 is not migrated)"),
    "q10-hugepage-postcopy": dict(
        qemu="10", machine=PC_HUGE,
        guest={"start": 0x3C0000, "size": 128 * 4096, "writes": 2},
        flow="postcopy", min_syncs=2, caps={"postcopy-ram": True},
        params={"max-bandwidth": 1_000_000, "max-postcopy-bandwidth": 200_000},
        about="QEMU 10 -> QEMU 10 over the recording relay, postcopy-ram, -M pc -m 8 with "
              "NUMA nodes m0 (4 MiB RAM) and hp (4 MiB hugetlbfs, 2 MiB pages); guest "
              "dirties [3.75 MiB, 4.25 MiB) across both; migrate-start-postcopy after the "
              "first pass, running destination"),
    "q10-return-path": dict(
        qemu="10", machine=PC, guest=G_TINY, flow="relay", min_syncs=3,
        caps={"return-path": True}, params={"max-bandwidth": 2_000_000},
        about="QEMU 10 -> QEMU 10 precopy over the recording relay with return-path"),
    "q35-backends": dict(
        qemu="10", machine=Q35, guest={"start": 0x1F0000, "size": 32 * 4096, "writes": 1},
        flow="passes", min_syncs=3, params={"max-bandwidth": 4_000_000},
        about="QEMU 10 -M q35, two memory-backend-ram NUMA nodes (m0, m1), guest dirties "
              "[1.9375 MiB, 2.0625 MiB) across both, passes then stop"),
    "q72-plain": dict(
        qemu="7.2", machine=PC, guest=G_SMALL, flow="passes", min_syncs=5,
        params={"max-bandwidth": 2_000_000},
        about="QEMU 7.2, running guest, max-bandwidth 2 MB/s, >= 5 dirty syncs, then stop"),
    "q72-xbzrle": dict(
        qemu="7.2", machine=PC, guest=G_XBZ_FAST, flow="passes", min_syncs=3, min_xbzrle=1100,
        caps={"xbzrle": True}, slow_after=(2, 8_000),
        params={"max-bandwidth": 2_000_000, "xbzrle-cache-size": 4 * MiB},
        about="QEMU 7.2, running guest, xbzrle, passes until >= 1100 XBZRLE pages, then stop"),
    "q72-compress": dict(
        qemu="7.2", machine=PC, guest=G_SMALL, flow="passes", min_syncs=3,
        caps={"compress": True},
        params={"max-bandwidth": 2_000_000, "compress-level": 1, "compress-threads": 2},
        about="QEMU 7.2, running guest, compress capability, compress-level 1, 2 threads"),
    "q72-compress6": dict(
        qemu="7.2", machine=PC, guest=G_SMALL, flow="stopped",
        caps={"compress": True}, params={"compress-level": 6, "compress-threads": 2},
        about="QEMU 7.2, stopped guest, compress capability, compress-level 6"),
}


# --- Stopped-VM captures of any architecture (issue 9) ---------------------------------
# No guest code: the source starts with -S, `-device loader` puts deterministic
# non-zero data into its RAM at `loads` (guest-physical address, size), and one
# migration of the stopped machine is written with `file:` or `exec:cat`. The oracle
# digests every RAM block piece the machine maps into its "memory" address space (from
# `info mtree -f`), read with pmemsave; blocks mapped nowhere get lengths only. A
# destination QEMU of the same binary and machine (without the loader) then loads the
# stream with -incoming and its pmemsave must equal the source's.
# `binary`: the QEMU 10 system emulator for the target (from bookworm-backports, see
# scripts/install-qemu.sh QMIG_EXTRA_ARCHES=1) or "7.2" for scripts/qemu72.
A_AUDIO = ["-audio", "none"]  # boards with sound hardware need an audio backend


def arch(binary, args, loads, uri, about, page_size, **kw):
    return dict(kind="arch", qemu="7.2" if binary == "7.2" else "10", binary=binary,
                args=args, loads=loads, uri=uri, about=about, page_size=page_size, **kw)


ARCH_SCENARIOS = {
    "arm-versatilepb": arch(
        "qemu-system-arm", ["-M", "versatilepb", "-m", "16"] + A_AUDIO,
        [(0x00600400, 0x2C00), (0x00A00000, 0x400)], "file", page_size=1024,
        about="QEMU 10 qemu-system-arm -M versatilepb -m 16 -S (ARM926, 1 KiB target "
              "pages, no target-page-bits), loader data in RAM, migrate file:"),
    "aarch64-virt": arch(
        "qemu-system-aarch64", ["-M", "virt", "-cpu", "cortex-a57", "-m", "16"],
        [(0x40600400, 0x2C00)], "exec", page_size=4096,
        about="QEMU 10 qemu-system-aarch64 -M virt -cpu cortex-a57 -m 16 -S (4 KiB "
              "target pages announced by target-page-bits), loader data, migrate exec:cat"),
    "arm-virt-a15": arch(
        "qemu-system-arm", ["-M", "virt", "-cpu", "cortex-a15", "-m", "16"],
        [(0x40600400, 0x2C00)], "file", page_size=4096,
        about="QEMU 10 qemu-system-arm -M virt -cpu cortex-a15 -m 16 -S (32-bit ARMv7: "
              "4 KiB target pages announced by target-page-bits), loader data, "
              "migrate file:"),
    "ppc-g3beige": arch(
        "qemu-system-ppc", ["-M", "g3beige", "-m", "16"],
        [(0x00600400, 0x2C00)], "file", page_size=4096,
        about="QEMU 10 qemu-system-ppc -M g3beige -m 16 -S, loader data, migrate file:"),
    "ppc64-pseries": arch(
        "qemu-system-ppc64", ["-M", "pseries", "-m", "256"],
        [(0x04000400, 0x2C00)], "exec", page_size=4096,
        about="QEMU 10 qemu-system-ppc64 -M pseries -m 256 -S, loader data, migrate "
              "exec:cat (iterative spapr/htab section besides ram)"),
    "s390x-ccw": arch(
        "qemu-system-s390x", ["-M", "s390-ccw-virtio", "-m", "16"],
        [(0x00600400, 0x2C00)], "file", page_size=4096,
        about="QEMU 10 qemu-system-s390x -M s390-ccw-virtio -m 16 -S, loader data, "
              "migrate file: (iterative s390-storage_attributes section besides ram)"),
    "sparc64-sun4u": arch(
        "qemu-system-sparc64", ["-M", "sun4u", "-m", "16"],
        [(0x00600400, 0x2C00)], "exec", page_size=8192,
        about="QEMU 10 qemu-system-sparc64 -M sun4u -m 16 -S (8 KiB target pages), "
              "loader data, migrate exec:cat"),
    "sparc-ss5": arch(
        "qemu-system-sparc", ["-M", "SS-5", "-m", "16", "-net", "none"],
        [(0x00600400, 0x2C00)], "file", page_size=4096,
        about="QEMU 10 qemu-system-sparc -M SS-5 -m 16 -S, loader data, migrate file:"),
    "q72-no-footer": arch(
        "7.2", ["-M", "pc-i440fx-7.2", "-m", "16",
                "-global", "migration.send-section-footer=off"],
        [(0x00600400, 0x2C00)], "exec", page_size=4096,
        about="QEMU 7.2 -M pc-i440fx-7.2 -m 16 -global migration.send-section-footer=off "
              "-S (no section footers), loader data, migrate exec:cat"),
    "q72-no-config": arch(
        "7.2", ["-M", "pc-i440fx-7.2", "-m", "16",
                "-global", "migration.send-configuration=off"],
        [(0x00600400, 0x2C00)], "exec", page_size=4096,
        about="QEMU 7.2 -M pc-i440fx-7.2 -m 16 -global migration.send-configuration=off "
              "-S (no configuration section), loader data, migrate exec:cat"),
}
SCENARIOS.update(ARCH_SCENARIOS)


def log(*a):
    print("[capture]", *a, file=sys.stderr, flush=True)


class Skip(Exception):
    """The scenario cannot run on this host (e.g. no hugepages); not a failure."""


def hugepage_free():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def setup_hugepages(want):
    """Idempotently provide `want` free 2 MiB hugepages on a hugetlbfs at HUGEPAGES.

    Raises Skip (with the reason) when that is impossible here: not root, no hugetlbfs,
    the kernel cannot allocate the pages, or the default hugepage size is not 2 MiB.
    """
    if not os.path.exists("/proc/sys/vm/nr_hugepages"):
        raise Skip("kernel without hugetlbfs support (/proc/sys/vm/nr_hugepages missing)")
    with open("/proc/meminfo") as f:
        meminfo = f.read()
    m = re.search(r"^Hugepagesize:\s+(\d+) kB", meminfo, re.M)
    if not m or int(m.group(1)) != 2048:
        raise Skip(f"default hugepage size is not 2 MiB ({m.group(0) if m else 'unknown'})")
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            total = int(f.read())
        free = hugepage_free()
        if free < want:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(f"{total + want - free}\n")
        mounted = False
        with open("/proc/mounts") as f:
            for line in f:
                fs = line.split()
                if len(fs) >= 3 and fs[1] == HUGEPAGES and fs[2] == "hugetlbfs":
                    mounted = True
        if not mounted:
            os.makedirs(HUGEPAGES, exist_ok=True)
            subprocess.run(["mount", "-t", "hugetlbfs", "none", HUGEPAGES], check=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as e:
        raise Skip(f"cannot set up hugepages (needs root): {e}")
    free = hugepage_free()
    if free < want:
        raise Skip(f"only {free} free 2 MiB hugepages after setup, need {want}")
    return {"mount": HUGEPAGES, "free_before_capture": free,
            "nr_hugepages": int(open("/proc/sys/vm/nr_hugepages").read())}


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def build_guest(g, out):
    cmd = [os.path.join(SCRIPTS, "guest", "build.sh"), "-o", out, "-s", hex(g["start"]),
           "-n", hex(g["size"]), "-w", str(g["writes"]), "-d", hex(g.get("delay", 0x100000))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def machine_args(sc, img, serial, shm=None):
    args = [a.replace("{shm}", shm) if shm else a for a in sc["machine"]["args"]]
    return (args + ["-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"])


def set_caps_params(vm, caps, params):
    if caps:
        vm.cmd("migrate-set-capabilities",
               capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    if params:
        vm.cmd("migrate-set-parameters", **params)


def wait_guest(serial, n=3, timeout=30):
    qmp.wait_file_size(serial, n, timeout)


def wait_progress(vm, sc, timeout=120):
    """Poll query-migrate until the scenario's dirty-sync / XBZRLE targets are reached."""
    deadline = time.monotonic() + timeout
    slowed = False
    while True:
        st = vm.cmd("query-migrate")
        if st.get("status") in ("failed", "cancelled"):
            raise qmp.QMPError(f"migration {st['status']}: {st}")
        syncs = st.get("ram", {}).get("dirty-sync-count", 0)
        xb = st.get("xbzrle-cache", {}).get("pages", 0)
        if not slowed and "slow_after" in sc and syncs >= sc["slow_after"][0]:
            vm.cmd("migrate-set-parameters", **{"max-bandwidth": sc["slow_after"][1]})
            slowed = True
        if syncs >= sc.get("min_syncs", 0) and xb >= sc.get("min_xbzrle", 0):
            return st
        if st.get("status") == "completed":
            raise qmp.QMPError(f"migration completed before targets were reached: {st}")
        if time.monotonic() > deadline:
            raise qmp.QMPError(f"targets not reached in {timeout}s: {st}")
        time.sleep(0.02)


def mtree_check(vm, layout):
    """Cross-check the scenario's guest-physical layout against `info mtree -f`."""
    text = vm.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
    names = {b for b, _, _ in layout}
    pat = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)(?: @([0-9a-f]+))?")
    seen = 0
    for line in text.splitlines():
        m = pat.match(line)
        if not m or m.group(3) not in names:
            continue
        lo, hi, name = int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(3)
        off = int(m.group(4), 16) if m.group(4) else 0
        for b, gpa, size in layout:
            if b == name:
                if not (gpa <= lo and hi <= gpa + size and lo - gpa == off):
                    raise RuntimeError(f"layout mismatch: {line.strip()} vs {layout}")
                seen += 1
    if not seen:
        raise RuntimeError(f"no RAM of {names} found in info mtree -f")


def ram_blocks_hmp(vm):
    text = vm.cmd("human-monitor-command", **{"command-line": "info ramblock"})
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 6:  # 7.2 prints no HVA / RO columns
            out.append({"name": f[0], "page_size": f[1] + " " + f[2], "offset": f[3],
                        "used": int(f[4], 16), "max": int(f[5], 16)})
    return out


def digests(mem, layout):
    """Digest entries for each RAM range outside the [0xA0000, 0x100000) hole."""
    out = []
    for blk, gpa, size in layout:
        cuts = [(gpa, gpa + size)]
        pieces = []
        for lo, hi in cuts:
            if lo < HOLE[0] < hi or lo < HOLE[1] < hi or (HOLE[0] <= lo and hi <= HOLE[1]):
                if lo < HOLE[0]:
                    pieces.append((lo, HOLE[0]))
                if hi > HOLE[1]:
                    pieces.append((HOLE[1], hi))
            else:
                pieces.append((lo, hi))
        for lo, hi in pieces:
            out.append({"block": blk, "offset": lo - gpa, "length": hi - lo, "gpa": lo,
                        "sha256": sha256(mem[lo:hi])})
    return out


class Capture:
    def __init__(self, name, sc, outroot, workdir, max_size):
        self.name, self.sc = name, sc
        self.out = os.path.join(outroot, name)
        self.work = os.path.join(workdir, name)
        self.max_size = max_size
        os.makedirs(self.work, exist_ok=True)
        self.binary = qmp.qemu_binary(sc["qemu"])
        self.src = self.dst = None
        # Unique backing file for scenarios with "{shm}" in their machine args.
        self.shm = None
        if any("{shm}" in a for a in sc["machine"]["args"]):
            self.shm = os.path.join(SHM, f"qmig-capture.{name}.{os.getpid()}."
                                         f"{os.urandom(4).hex()}")

    def start(self, name, extra, img):
        serial = os.path.join(self.work, f"{name}.serial")
        args = machine_args(self.sc, img, serial, self.shm) + extra
        vm = qmp.Qemu(self.binary, args, self.work, name)
        vm.serial = serial
        return vm

    def run(self):
        sc = self.sc
        self.hugepages = None
        if sc["machine"].get("hugepages"):
            self.hugepages = setup_hugepages(sc["machine"]["hugepages"])
        img = build_guest(sc["guest"], os.path.join(self.work, "guest.img"))
        stream = os.path.join(self.work, "stream")
        rp = os.path.join(self.work, "rp")
        caps, params = sc.get("caps", {}), dict(sc.get("params", {}))
        self.src = src = self.start("src", [], img)
        version = qmp.version_string(src.qmp)
        wait_guest(src.serial)
        mtree_check(src, sc["machine"]["layout"])
        ramblocks = ram_blocks_hmp(src)
        dst_final = None
        flow = sc["flow"]
        if sc["qemu"] == "10":
            uri = f"file:{stream}"
        else:
            uri = f"exec:cat > {stream}"
        relay = None
        if flow in ("relay", "postcopy"):
            dimg = os.path.join(self.work, "guest-dst.img")
            shutil.copy(img, dimg)
            dport = qmp.free_port()
            # Precopy destination: -S so it stays paused and its memory can be compared
            # (without -S a QEMU 10 destination starts the guest even though the source
            # was stopped). Postcopy destination: running, so the guest faults.
            extra = ["-incoming", f"tcp:127.0.0.1:{dport}"] + (["-S"] if flow == "relay" else [])
            self.dst = dst = self.start("dst", extra, dimg)
            set_caps_params(dst, caps, {})
            relay = Relay(0, dport, stream, rp).start()
            uri = f"tcp:127.0.0.1:{relay.port}"
        set_caps_params(src, caps, params)
        if flow != "stopped":
            # Never converge on its own: the script decides when to stop the guest.
            src.cmd("migrate-set-parameters", **{"downtime-limit": 1})

        if flow == "stopped":
            src.cmd("stop")
            src.cmd("migrate", uri=uri)
        elif flow in ("passes", "relay"):
            src.cmd("migrate", uri=uri)
            wait_progress(src, sc)
            src.cmd("stop")
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                                  "downtime-limit": 2000})
        elif flow == "postcopy":
            src.cmd("migrate", uri=uri)
            wait_progress(src, sc)
            # downtime-limit stays at 1 ms so precopy cannot complete first.
            src.cmd("migrate-start-postcopy")
        final = qmp.wait_migration(src.qmp, timeout=180)
        src_status = src.cmd("query-status")["status"]
        if self.dst:
            dst_final = qmp.wait_migration(self.dst.qmp, timeout=60)
            relay.wait(60)
            if relay.thread.is_alive():
                raise RuntimeError("relay did not finish")
        elif sc["qemu"] == "7.2":
            time.sleep(0.5)  # let `cat` flush
        ram = sc["machine"]["ram"]
        memfile = os.path.join(self.work, "src.mem")
        qmp.pmemsave(src.qmp, 0, ram, memfile)
        mem = open(memfile, "rb").read()
        dst_digests = None
        if self.dst and flow == "relay":
            dmem = os.path.join(self.work, "dst.mem")
            qmp.pmemsave(self.dst.qmp, 0, ram, dmem)
            dst_digests = digests(open(dmem, "rb").read(), sc["machine"]["layout"])
            dst_status = self.dst.cmd("query-status")["status"]
        src.quit()
        if self.dst:
            self.dst.quit()
        shared = self.shared_blocks(mem)


        data = qemustream.load(stream)
        ref = qemustream.Stream(data, decode=True)
        # Shared blocks (x-ignore-shared) are not in the stream: no digests for them.
        ents = digests(mem, [x for x in sc["machine"]["layout"] if x[0] not in shared])
        for blk in shared:
            b = ref.blocks.get(blk)
            if b is None or any(b[k] for k in ("zero", "page", "xbzrle", "compressed")):
                raise RuntimeError(f"{self.name}: shared block {blk} has records: {b}")
        for e in ents:
            got = sha256(ref.images[e["block"]][e["offset"]:e["offset"] + e["length"]])
            if got != e["sha256"]:
                raise RuntimeError(f"{self.name}: reference reader disagrees with pmemsave "
                                   f"on {e['block']}@{e['offset']:#x}+{e['length']:#x}")
        if dst_digests is not None and [d["sha256"] for d in dst_digests] != \
                [e["sha256"] for e in ents]:
            bad = [f"{d['block']}@{d['offset']:#x}" for d, e in zip(dst_digests, ents)
                   if d["sha256"] != e["sha256"]]
            raise RuntimeError(f"destination memory differs from source memory: {bad} "
                               f"(destination status {dst_status})")
        rom = []
        if "pc.bios" in ref.blocks and os.path.exists(BIOS_FILE):
            bios = open(BIOS_FILE, "rb").read()
            if len(bios) == ref.blocks["pc.bios"]["length"]:
                if bytes(ref.images["pc.bios"]) == bios:
                    rom.append({"block": "pc.bios", "offset": 0, "length": len(bios),
                                "sha256": sha256(bios), "source": BIOS_FILE})
                else:
                    log(f"{self.name}: pc.bios in stream differs from {BIOS_FILE}; no ROM digest")

        expect, notes = self.expectations(final, ref)
        rp_summary = None
        if os.path.exists(rp) and os.path.getsize(rp):
            msgs = qemustream.parse_return_path(open(rp, "rb").read())
            counts = {}
            for m, _ in msgs:
                counts[m] = counts.get(m, 0) + 1
            rp_summary = {"bytes": os.path.getsize(rp), "messages": counts}

        oracle = {
            "scenario": self.name,
            "about": sc["about"],
            "qemu_version": version,
            "qemu_binary": " ".join(self.binary),
            "machine_args": [a.replace("{shm}", f"{SHM}/<unique>") for a in
                             sc["machine"]["args"]] + ["-nodefaults", "-display", "none"],
            "guest": {"dirty_start": sc["guest"]["start"], "dirty_size": sc["guest"]["size"],
                      "writes_per_page": sc["guest"]["writes"],
                      "delay_tsc": sc["guest"].get("delay", 0x100000),
                      "build": "scripts/guest/build.sh -s START -n SIZE -w WRITES -d DELAY"},
            "flow": flow,
            "uri": uri.split(":")[0],
            "capabilities": caps,
            "parameters": params,
            "parameters_later": ({"max-bandwidth": sc["slow_after"][1],
                                  "after_dirty_sync": sc["slow_after"][0]}
                                 if "slow_after" in sc else None),
            "source_status_after": src_status,
            "ram_size": ram,
            "layout": [{"block": b, "gpa": g, "size": s} for b, g, s in sc["machine"]["layout"]],
            "hole": list(HOLE),
            "pmemsave": {"address": 0, "size": len(mem), "sha256": sha256(mem)},
            "digests": ents + rom,
            "expect": expect,
            "expect_notes": notes,
            "reference": {
                "reader": "scripts/qemustream.py",
                "blocks": [ref.blocks[n] for n in ref.block_order],
                "totals": {k: ref.totals[k] for k in
                           ("zero", "page", "xbzrle", "compressed", "eos")},
                "commands": ref.commands,
                "vmdesc": ref.vmdesc is not None,
                "stream_bytes": len(data),
            },
            "return_path": rp_summary,
            "destination_memory_matches_source": (True if dst_digests is not None else None),
            "ramblocks_hmp": ramblocks,
        }
        if self.hugepages:
            oracle["hugepages"] = self.hugepages
        if ref.ignore_shared():
            oracle["reference"]["config_capabilities"] = ref.capabilities()
            oracle["reference"]["mem_size_addrs"] = {n: ref.blocks[n]["addr"]
                                                     for n in ref.block_order}
        if shared:
            oracle["shared_blocks"] = shared
        if ref.advise is not None:
            oracle["reference"]["postcopy_advise"] = list(ref.advise)
        if ref.discards:
            per = {}
            for blk, _, ln in ref.discards:
                d = per.setdefault(blk, {"ranges": 0, "bytes": 0})
                d["ranges"] += 1
                d["bytes"] += ln
            oracle["reference"]["discards"] = per
        self.store(stream, rp, final, dst_final, oracle)
        return oracle

    def expectations(self, final, ref):
        """Counter equalities QEMU guarantees, each verified against the stream."""
        ram = final.get("ram", {})
        t = ref.totals
        expect, notes = {}, []
        pairs = [("totals.zero", "zero", "ram.duplicate", ram.get("duplicate")),
                 ("totals.page", "page", "ram.normal", ram.get("normal"))]
        if "xbzrle-cache" in final:
            pairs.append(("totals.xbzrle", "xbzrle", "xbzrle-cache.pages",
                          final["xbzrle-cache"].get("pages")))
        if "compression" in final:
            pairs.append(("totals.compressed", "compressed", "compression.pages",
                          final["compression"].get("pages")))
        for key, tk, qname, qval in pairs:
            if qval is None:
                continue
            if qval == t[tk]:
                expect[key] = qval
                notes.append(f"{key} == {qname} ({qval})")
            else:
                notes.append(f"NOT asserted: {key}={t[tk]} but {qname}={qval}")
                log(f"{self.name}: stream {key}={t[tk]} != query-migrate {qname}={qval}")
        return expect, notes

    def store(self, stream, rp, final, dst_final, oracle):
        if os.path.isdir(self.out):
            shutil.rmtree(self.out)
        os.makedirs(self.out)
        size = os.path.getsize(stream)
        if self.max_size and size > self.max_size:
            with open(stream, "rb") as f, open(os.path.join(self.out, "stream.gz"), "wb") as g:
                with gzip.GzipFile(fileobj=g, mode="wb", mtime=0, filename="") as z:
                    shutil.copyfileobj(f, z)
            oracle["stream_file"] = "stream.gz"
        else:
            shutil.copy(stream, os.path.join(self.out, "stream"))
            os.chmod(os.path.join(self.out, "stream"), 0o644)
            oracle["stream_file"] = "stream"
        if os.path.exists(rp):
            shutil.copy(rp, os.path.join(self.out, "rp"))
            os.chmod(os.path.join(self.out, "rp"), 0o644)
            oracle["rp_file"] = "rp"
        qm = {"source": final}
        if dst_final is not None:
            qm["destination"] = dst_final
        with open(os.path.join(self.out, "query-migrate.json"), "w") as f:
            json.dump(qm, f, indent=1, sort_keys=True)
            f.write("\n")
        with open(os.path.join(self.out, "oracle.json"), "w") as f:
            json.dump(oracle, f, indent=1)
            f.write("\n")

    def shared_blocks(self, mem):
        """{block: note} for the machine's shared (not migrated) blocks; removes the
        backing file after checking that it holds the source's final memory."""
        out = {}
        for blk in self.sc["machine"].get("shared", []):
            gpa, size = next((g, n) for b, g, n in self.sc["machine"]["layout"] if b == blk)
            with open(self.shm, "rb") as f:
                content = f.read()
            same = all(content[lo - gpa:hi - gpa] == mem[lo:hi]
                       for lo, hi in ((gpa, HOLE[0]), (HOLE[1], gpa + size)))
            if len(content) != size or not same:
                raise RuntimeError(f"{self.name}: {self.shm} differs from pmemsave of {blk}")
            out[blk] = {
                "migrated": False,
                "backing": f"memory-backend-file share=on, mem-path {SHM}/<unique> "
                           "(removed after the capture)",
                "note": "x-ignore-shared: the stream lists the block in MEM_SIZE but sends "
                        "no page records for it (its content lives in the shared file); "
                        "an extracted image is all zeros, so no digest is given. At capture "
                        "time the backing file equalled the source's pmemsave outside the "
                        "hole.",
            }
        self.remove_shm()
        return out

    def remove_shm(self):
        if self.shm and os.path.exists(self.shm):
            os.unlink(self.shm)

    def cleanup(self):
        for vm in (self.src, self.dst):
            if vm:
                vm.kill()
        self.remove_shm()


def loader_blob(size, seed):
    """Deterministic, incompressible bytes for `-device loader` (sha256 counter chain)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


MTREE_RAM = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom|romd|ramd)\): "
                       r"(\S+)(?: @([0-9a-f]+))?")


def memory_pieces(vm, blocks):
    """[(block, gpa, offset in block, length)] of every RAM block piece that the
    flat view of the "memory" address space maps (`info mtree -f`)."""
    text = vm.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
    out, in_memory, other = [], False, set()
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            in_memory = False
            continue
        if line.strip().startswith('AS "memory"'):
            in_memory = True
            continue
        m = MTREE_RAM.match(line)
        if not (in_memory and m):
            continue
        lo, hi, name = int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(4)
        off = int(m.group(5), 16) if m.group(5) else 0
        if name in blocks:
            if off + hi - lo > blocks[name]:
                raise RuntimeError(f"mtree piece beyond block {name}: {line.strip()}")
            out.append((name, lo, off, hi - lo))
        else:
            other.add(name)
    if other:
        log(f"mtree RAM regions that are not RAM blocks (ignored): {sorted(other)}")
    if not out:
        raise RuntimeError("no RAM block mapped in the memory address space")
    return out


def piece_digests(vm, pieces, work, tag):
    """pmemsave each piece; returns (digest entries, {gpa: bytes})."""
    ents, mem = [], {}
    for i, (blk, gpa, off, n) in enumerate(pieces):
        path = os.path.join(work, f"{tag}.{i}.mem")
        qmp.pmemsave(vm.qmp, gpa, n, path, timeout=120)
        with open(path, "rb") as f:
            b = f.read()
        os.unlink(path)
        if len(b) != n:
            raise RuntimeError(f"pmemsave of {blk}@{gpa:#x}: {len(b)} bytes, wanted {n}")
        mem[gpa] = b
        ents.append({"block": blk, "offset": off, "length": n, "gpa": gpa,
                     "sha256": sha256(b)})
    return ents, mem


def wait_stable(path, settle=0.3, timeout=30):
    """exec:cat writes after QEMU reports completion: wait until the file stops growing."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        n = os.path.getsize(path) if os.path.exists(path) else -1
        if n == last and n > 0:
            return n
        last = n
        time.sleep(settle)
    raise RuntimeError(f"{path} still growing after {timeout}s")


class ArchCapture(Capture):
    """A stopped machine of any architecture, migrated once to file: or exec:cat, then
    loaded back by a destination QEMU (see ARCH_SCENARIOS)."""

    def __init__(self, name, sc, outroot, workdir, max_size):
        self.name, self.sc = name, sc
        self.out = os.path.join(outroot, name)
        self.work = os.path.join(workdir, name)
        self.max_size = max_size
        self.src = self.dst = None
        self.shm = None
        self.binary = qmp.qemu_binary("7.2") if sc["binary"] == "7.2" else [sc["binary"]]

    def vm(self, name, extra):
        args = self.sc["args"] + ["-S", "-nodefaults", "-display", "none"] + extra
        return qmp.Qemu(self.binary, args, self.work, name)

    def run(self):
        sc = self.sc
        if sc["binary"] != "7.2" and not shutil.which(sc["binary"]):
            raise Skip(f"{sc['binary']} not installed "
                       "(QMIG_EXTRA_ARCHES=1 scripts/install-qemu.sh)")
        os.makedirs(self.work, exist_ok=True)
        stream = os.path.join(self.work, "stream")
        loader_args, blobs = [], []
        for i, (gpa, size) in enumerate(sc["loads"]):
            blob = loader_blob(size, f"{self.name}:{i}")
            path = os.path.join(self.work, f"load{i}.bin")
            with open(path, "wb") as f:
                f.write(blob)
            blobs.append((gpa, blob))
            loader_args += ["-device", f"loader,file={path},addr={gpa:#x},force-raw=on"]
        self.src = src = self.vm("src", loader_args)
        version = qmp.version_string(src.qmp)
        ramblocks = ram_blocks_hmp(src)
        lengths = {b["name"]: b["used"] for b in ramblocks}
        pieces = memory_pieces(src, lengths)
        uri = f"file:{stream}" if sc["uri"] == "file" else f"exec:cat > {stream}"
        src.cmd("migrate", uri=uri)
        final = qmp.wait_migration(src.qmp, timeout=300)
        src_status = src.cmd("query-status")["status"]
        if sc["uri"] == "exec":
            wait_stable(stream)
        ents, mem = piece_digests(src, pieces, self.work, "src")
        src.quit()
        self.src = None
        # The loader data must be where we put it (else the capture proves little).
        for gpa, blob in blobs:
            if not any(g <= gpa and gpa + len(blob) <= g + len(b) and
                       b[gpa - g:gpa - g + len(blob)] == blob for g, b in mem.items()):
                raise RuntimeError(f"loader data not found in source memory at {gpa:#x}")

        # Independent reader: page size, counters, memory.
        data = qemustream.load(stream)
        ref = qemustream.Stream(data, decode=True)
        qps = final.get("ram", {}).get("page-size")
        if ref.page_size != qps or ref.page_size != sc["page_size"]:
            raise RuntimeError(f"page size: reader {ref.page_size} ({ref.page_size_source}),"
                               f" query-migrate {qps}, scenario {sc['page_size']}")
        for e in ents:
            got = sha256(ref.images[e["block"]][e["offset"]:e["offset"] + e["length"]])
            if got != e["sha256"]:
                raise RuntimeError(f"reference reader disagrees with pmemsave on "
                                   f"{e['block']}@{e['offset']:#x}+{e['length']:#x}")
        expect, notes = self.expectations(final, ref)
        for k in ("totals.zero", "totals.page"):
            if k not in expect:
                raise RuntimeError(f"{k} does not match query-migrate: {notes}")

        # Destination: same binary and machine, no loader; must load the stream and end
        # with the source's memory.
        in_uri = f"file:{stream}" if sc["uri"] == "file" else f"exec:cat {stream}"
        if sc["binary"] == "7.2":
            in_uri = f"exec:cat {stream}"  # 7.2 has no file: transport
        self.dst = dst = self.vm("dst", ["-incoming", "defer"])
        dst.cmd("migrate-incoming", uri=in_uri)
        dst_final = qmp.wait_migration(dst.qmp, timeout=300)
        dst_status = dst.cmd("query-status")["status"]
        dents, _ = piece_digests(dst, pieces, self.work, "dst")
        dst.quit()
        self.dst = None
        bad = [f"{d['block']}@{d['offset']:#x}" for d, e in zip(dents, ents)
               if d["sha256"] != e["sha256"]]
        if bad:
            raise RuntimeError(f"destination memory differs from source: {bad}")

        mapped = {e["block"] for e in ents}
        unmapped = {n: {"length": ln, "note": "not mapped in the guest-physical address "
                                             "space (info mtree -f): no pmemsave digest; "
                                             "length only"}
                    for n, ln in lengths.items() if n not in mapped}
        vd = ref.vmdesc or {}
        oracle = {
            "scenario": self.name,
            "about": sc["about"],
            "qemu_version": version,
            "qemu_binary": " ".join(self.binary),
            "machine_args": sc["args"] + ["-S", "-nodefaults", "-display", "none"],
            "guest": None,
            "loader": [{"gpa": g, "size": len(b), "sha256": sha256(b),
                        "content": f"sha256(f'{self.name}:{i}:{{counter}}') chain"}
                       for i, (g, b) in enumerate(blobs)],
            "flow": "stopped (-S, never ran)",
            "uri": sc["uri"],
            "capabilities": {},
            "parameters": {},
            "parameters_later": None,
            "source_status_after": src_status,
            "page_size": ref.page_size,
            "lengths": lengths,
            "layout": [{"block": b, "gpa": g, "offset": o, "size": n}
                       for b, g, o, n in pieces],
            "hole": None,
            "digests": ents,
            "digest_method": "pmemsave of each RAM block piece mapped in the 'memory' "
                             "address space (info mtree -f), at its guest-physical "
                             "address; offset = the piece's offset in the block",
            "unmapped_blocks": unmapped,
            "query_migrate_ram": final.get("ram"),
            "expect": expect,
            "expect_notes": notes,
            "reference": {
                "reader": "scripts/qemustream.py",
                "blocks": [ref.blocks[n] for n in ref.block_order],
                "totals": {k: ref.totals[k] for k in
                           ("zero", "page", "xbzrle", "compressed", "eos")},
                "commands": ref.commands,
                "vmdesc": ref.vmdesc is not None,
                "stream_bytes": len(data),
                "machine": ref.machine,
                "configuration_section": ref.machine is not None,
                "config_subsections": ref.config_subsections,
                "page_size_source": ref.page_size_source,
                "vmdesc_page_size": vd.get("page_size"),
                "footers": ref.footers,
                "live_sections": [{"idstr": v[0], "section_id": k, "instance_id": v[1],
                                   "version": v[2]} for k, v in ref.section_ids.items()],
                "other_live": ref.live,
                "first_device_section": list(ref.stopped_at[1:]) if ref.stopped_at else None,
            },
            # vmdesc device entries without "fields" (legacy save_state handlers such
            # as s390-skeys) carry "size" (payload bytes) instead of a version.
            "vmdesc_devices": [{k: d[k] for k in ("name", "instance_id", "version", "size")
                                if k in d} for d in vd.get("devices", [])],
            "return_path": None,
            "destination_qemu_loaded": dst_final.get("status") == "completed",
            "destination_status_after": dst_status,
            "destination_uri": in_uri.replace(stream, "stream"),
            "destination_memory_matches_source": True,
            "ramblocks_hmp": ramblocks,
        }
        self.store(stream, os.path.join(self.work, "no-rp"), final, dst_final, oracle)
        return oracle


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data"))
    ap.add_argument("--max-size", type=int, default=2 * MiB,
                    help="gzip streams larger than this (0: never)")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--retries", type=int, default=1)
    a = ap.parse_args()
    if a.list:
        for n, sc in SCENARIOS.items():
            print(f"{n:16} {sc['about']}")
        return 0
    names = list(SCENARIOS) if a.scenarios in ([], ["all"]) else a.scenarios
    for n in names:
        if n not in SCENARIOS:
            sys.exit(f"unknown scenario {n}; use --list")
    work = tempfile.mkdtemp(prefix="qmig-capture.", dir="/tmp")
    failed, skipped = [], []
    try:
        for n in names:
            for attempt in range(a.retries + 1):
                cls = ArchCapture if SCENARIOS[n].get("kind") == "arch" else Capture
                cap = cls(n, SCENARIOS[n], a.out, os.path.join(work, f"{attempt}"),
                          a.max_size)
                t0 = time.monotonic()
                try:
                    o = cap.run()
                    r = o["reference"]
                    log(f"{n}: ok in {time.monotonic() - t0:.1f}s, {r['stream_bytes']} bytes, "
                        f"totals {r['totals']}")
                    break
                except Skip as e:
                    log(f"{n}: SKIPPED: {e}")
                    skipped.append(n)
                    break
                except Exception as e:  # noqa: BLE001
                    log(f"{n}: attempt {attempt + 1} failed: {e}")
                    for vm in (cap.src, cap.dst):
                        if vm:
                            log(f"  {vm.name} log: {vm.read_log().strip()[-500:]}")
                finally:
                    cap.cleanup()
            else:
                failed.append(n)
    finally:
        if not a.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    if skipped:
        log("SKIPPED (host cannot run them): " + " ".join(skipped))
    if failed:
        log("FAILED: " + " ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
