#!/usr/bin/env python3
"""Soak: back-to-back live migrations into `qmig recv`, checking memory, fds and RSS.

usage: soak.py [--runs N] [--ram-mib M] [--keep]
env:   QMIG            path of the qmig binary (default target/release/qmig, then target/debug/qmig)
       QMIG_SOAK_RUNS  default for --runs (50)

Two series, each of N migrations of an M MiB (default 256) pc guest over loopback TCP:
  1. QEMU 10 -> `qmig recv`: one QEMU source runs the dirtying guest (scripts/guest)
     and is migrated N times: migrate, `completed`, pmemsave of the stopped source,
     `cont`, let the guest dirty memory, migrate again.
  2. `qmig send` -> `qmig recv`: the RAM received in series 1 is sent N times with the
     first capture as template, 2 passes with a dirtying workload (seed = run number),
     and `--final-ram`.
Every migration must complete with recv's pc.ram equal to the source memory (QEMU's
pmemsave outside the hole [0xA0000, 0x100000), or send's --final-ram). For every qmig
process, the peak RSS (getrusage of the reaped child) and the largest number of open
file descriptors seen in /proc/PID/fd (sampled every 10 ms) are recorded. The check
fails when a run fails, or when the last fifth of a series needs more than the first
fifth (run 0, the warm-up, excluded): peak RSS above 1.10x + 4 MiB, or more than 2 more descriptors. A table of
per-run numbers is printed; nothing is timed against a limit except a per-run timeout.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
import capture  # noqa: E402  (guest builder)

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20
HOLE = (0xA0000, 0x100000)


Fail = qmp.Fail


class Watched:
    """A child process whose open fds are sampled and whose rusage is kept."""

    def __init__(self, argv, errpath):
        self.err = open(errpath, "w+b")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self.err, start_new_session=True)
        self.max_fds = 0
        self.rc = None
        self.maxrss_kib = None
        self.stdout = b""
        self._stop = False
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()

    def _sample(self):
        fd_dir = f"/proc/{self.p.pid}/fd"
        while not self._stop:
            try:
                self.max_fds = max(self.max_fds, len(os.listdir(fd_dir)))
            except OSError:
                pass
            time.sleep(0.01)

    def stderr_text(self):
        return open(self.err.name, "rb").read().decode(errors="replace").strip()

    def wait(self, timeout):
        out = []
        reader = threading.Thread(target=lambda: out.append(self.p.stdout.read()), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.p.kill()
                os.wait4(self.p.pid, 0)
                self._stop = True
                raise Fail(f"{self.p.args[1]} did not exit within {timeout}s: {self.stderr_text()}")
            time.sleep(0.01)
        self._stop = True
        self._t.join()
        reader.join(5)
        self.stdout = out[0] if out else b""
        self.rc = os.waitstatus_to_exitcode(status)
        self.p.returncode = self.rc
        self.maxrss_kib = ru.ru_maxrss
        return self.rc


def start_recv(qmig, out, work, tag, extra=()):
    port = qmp.free_port()
    w = Watched([qmig, "recv", "--listen", f"tcp:127.0.0.1:{port}", "-o", out, *extra],
                os.path.join(work, f"recv-{tag}.stderr"))
    deadline = time.monotonic() + 30
    while b"listening on" not in open(w.err.name, "rb").read():
        if w.p.poll() is not None or time.monotonic() > deadline:
            raise Fail("qmig recv did not start listening: " + w.stderr_text())
        time.sleep(0.01)
    return w, port


def pc_ram(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    if not m.get("complete"):
        raise Fail(f"recv manifest not complete: {m.get('error')}")
    b = next(b for b in m["blocks"] if b["name"] == "pc.ram")
    return os.path.join(out, b["file"])


def digest_outside_hole(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HOLE[0]))
        f.seek(HOLE[1])
        left = size - HOLE[1]
        while left > 0:
            b = f.read(min(left, 8 * MiB))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def series_qemu(qmig, work, runs, ram_mib, keep_first):
    guest = {"start": 0x100000, "size": 8 * MiB, "writes": 2, "delay": 0x1000}
    img = capture.build_guest(guest, os.path.join(work, "guest.img"))
    serial = os.path.join(work, "src.serial")
    args = ["-M", "pc", "-m", str(ram_mib), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary("10"), args, work, "src")
    rows = []
    try:
        capture.wait_guest(serial)
        src.cmd("migrate-set-parameters", **{"downtime-limit": 300})
        for i in range(runs):
            out = os.path.join(work, f"q-out-{i}")
            recv, port = start_recv(qmig, out, work, f"q{i}")
            t0 = time.monotonic()
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            st = qmp.wait_migration(src.qmp, timeout=120)
            if recv.wait(60) != 0:
                raise Fail(f"run {i}: qmig recv exited {recv.rc}: {recv.stderr_text()}")
            took = time.monotonic() - t0
            if st["status"] != "completed":
                raise Fail(f"run {i}: source says {st['status']}")
            mem = qmp.pmemsave(src.qmp, 0, ram_mib * MiB, os.path.join(work, "src.mem"))
            want = digest_outside_hole(mem, ram_mib * MiB)
            got = digest_outside_hole(pc_ram(out), ram_mib * MiB)
            if got != want:
                raise Fail(f"run {i}: pc.ram differs from the source's pmemsave")
            rows.append((i, took, recv.maxrss_kib, recv.max_fds))
            print(f"  qemu->recv {i:3}: {took:6.2f}s  peak RSS {recv.maxrss_kib / 1024:7.1f} MiB"
                  f"  max fds {recv.max_fds}", flush=True)
            if i == 0 and keep_first:
                shutil.move(out, keep_first)
            else:
                shutil.rmtree(out)
            src.cmd("cont")
            time.sleep(0.2)
    finally:
        src.kill()
    return rows


def capture_template(qmig, work, ram_mib):
    """One stopped-guest migration saved with --save: the template for series 2."""
    serial = os.path.join(work, "tmpl.serial")
    img = capture.build_guest({"start": 0x100000, "size": MiB, "writes": 1},
                              os.path.join(work, "tmpl.img"))
    args = ["-M", "pc", "-m", str(ram_mib), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary("10"), args, work, "tmpl")
    try:
        capture.wait_guest(serial)
        src.cmd("stop")
        out = os.path.join(work, "tmpl-out")
        saved = os.path.join(work, "template.stream")
        recv, port = start_recv(qmig, out, work, "tmpl", ["--save", saved])
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        qmp.wait_migration(src.qmp, timeout=120)
        if recv.wait(60) != 0:
            raise Fail(f"template recv failed: {recv.stderr_text()}")
        shutil.rmtree(out)
        return saved
    finally:
        src.kill()


def series_send(qmig, work, runs, ramdir, template):
    rows = []
    for i in range(runs):
        out = os.path.join(work, f"s-out-{i}")
        final = os.path.join(work, f"s-final-{i}")
        recv, port = start_recv(qmig, out, work, f"s{i}")
        t0 = time.monotonic()
        send = Watched([qmig, "send", "--ram", ramdir, "--template", template,
                        "--to", f"tcp:127.0.0.1:{port}", "--final-ram", final, "-q",
                        "--passes", "2", "--dirty-fraction", "0.05", "--seed", str(i + 1)],
                       os.path.join(work, f"send-{i}.stderr"))
        if send.wait(120) != 0:
            raise Fail(f"run {i}: qmig send exited {send.rc}: {send.stderr_text()}")
        if recv.wait(60) != 0:
            raise Fail(f"run {i}: qmig recv exited {recv.rc}: {recv.stderr_text()}")
        took = time.monotonic() - t0
        size = os.path.getsize(pc_ram(final))
        if digest_outside_hole(pc_ram(out), size) != digest_outside_hole(pc_ram(final), size):
            raise Fail(f"run {i}: recv's pc.ram differs from send's --final-ram")
        rows.append((i, took, recv.maxrss_kib, recv.max_fds, send.maxrss_kib, send.max_fds))
        print(f"  send->recv {i:3}: {took:6.2f}s  recv peak RSS {recv.maxrss_kib / 1024:7.1f} MiB"
              f" fds {recv.max_fds}; send peak RSS {send.maxrss_kib / 1024:7.1f} MiB"
              f" fds {send.max_fds}", flush=True)
        shutil.rmtree(out)
        shutil.rmtree(final)
    return rows


def check_flat(name, rows, rss_col, fds_col):
    # Run 0 is the warm-up: in series 1 the guest has not yet dirtied its
    # working set, and recv's images (shared file mappings, counted in RSS)
    # hold fewer non-zero pages than in every later run.
    rows = rows[1:] if len(rows) > 2 else rows
    n = max(1, len(rows) // 5)
    first, last = rows[:n], rows[-n:]
    rss0 = max(r[rss_col] for r in first)
    rss1 = max(r[rss_col] for r in last)
    fd0 = max(r[fds_col] for r in first)
    fd1 = max(r[fds_col] for r in last)
    print(f"  {name}: peak RSS first {n} runs {rss0 / 1024:.1f} MiB, last {n} {rss1 / 1024:.1f} MiB;"
          f" max fds {fd0} -> {fd1}")
    problems = []
    if rss1 > rss0 * 1.10 + 4096:
        problems.append(f"{name}: peak RSS grew from {rss0} KiB to {rss1} KiB")
    if fd1 > fd0 + 2:
        problems.append(f"{name}: open fds grew from {fd0} to {fd1}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("QMIG_SOAK_RUNS", "50")))
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if a.runs < 1:
        sys.exit("soak: --runs must be >= 1")
    qmig = qmp.qmig_binary("soak")
    work = tempfile.mkdtemp(prefix="qmig-soak-")
    problems = []
    t0 = time.monotonic()
    try:
        print(f"soak: {a.runs} QEMU 10 -> qmig recv migrations of {a.ram_mib} MiB", flush=True)
        ramdir = os.path.join(work, "ram")
        q = series_qemu(qmig, work, a.runs, a.ram_mib, ramdir)
        problems += check_flat("qemu->recv: recv", q, 2, 3)
        print(f"soak: {a.runs} qmig send -> qmig recv migrations of {a.ram_mib} MiB", flush=True)
        template = capture_template(qmig, work, a.ram_mib)
        s = series_send(qmig, work, a.runs, ramdir, template)
        problems += check_flat("send->recv: recv", s, 2, 3)
        problems += check_flat("send->recv: send", s, 4, 5)
    except (Fail, qmp.QMPError, subprocess.SubprocessError, OSError) as e:
        problems.append(str(e))
    finally:
        if a.keep:
            print(f"soak: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - t0
    if problems:
        for p in problems:
            print(f"soak: FAIL: {p}")
        return 1
    print(f"soak: all {2 * a.runs} migrations completed with equal memory; "
          f"RSS and fds flat ({took:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
