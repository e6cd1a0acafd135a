#!/usr/bin/env python3
"""QEMU 10 load time of a multi-pass stream vs its `qmig convert` outputs.

usage: bench_convert_load.py STREAM [--runs N] [--template CAPTURE]
env:   QMIG  qmig binary (default target/release/qmig)

STREAM is a stream made with `qmig send --template tests/data/CAPTURE/stream`
(default CAPTURE q10-stopped), e.g. scripts/bench_convert.sh's
multipass.stream. It is converted to a stream, to a stream without ZERO records (`--zero-pages skip`)
and to a mapped-ram file; then,
N times each, interleaved, a fresh QEMU 10 started like the template's source
(its oracle machine_args with -m set to the stream's pc.ram size, the IDE disk
and serial port it had) loads the original, the converted stream and the
mapped-ram file with `-incoming defer`, the `events` capability (and
`mapped-ram` for the file) and `migrate-incoming file:`; the load time is
between the MIGRATION events `active` and `completed` (QMP timestamps). The
page cache is warm for all three (each is read once first). Prints best and
median per input and the ratios against the original, with the compaction
ratio (input bytes / output bytes) to compare them with.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_interop as ci  # noqa: E402
import qmp  # noqa: E402


def load_time(oracle, machine, work, path, mapped):
    dst = qmp.Qemu(qmp.qemu_binary("10"), ci.dst_args(oracle, machine, work, path, "defer"),
                   work, "dst")
    try:
        caps = [{"capability": "events", "state": True}]
        if mapped:
            caps.append({"capability": "mapped-ram", "state": True})
        dst.cmd("migrate-set-capabilities", capabilities=caps)
        dst.cmd("migrate-incoming", uri=f"file:{path}")

        def ts(ev):
            return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
        active = dst.qmp.wait_event("MIGRATION", timeout=120,
                                    pred=lambda e: e["data"]["status"] == "active")
        done = dst.qmp.wait_event("MIGRATION", timeout=300,
                                  pred=lambda e: e["data"]["status"] in ("completed", "failed"))
        if done["data"]["status"] != "completed":
            raise RuntimeError(f"QEMU failed to load {path}: {dst.read_log()}")
        return ts(done) - ts(active)
    finally:
        dst.quit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stream")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--template", default="q10-stopped")
    a = ap.parse_args()
    qmig = os.environ.get("QMIG") or os.path.join(ci.REPO, "target/release/qmig")
    oracle = json.load(open(os.path.join(ci.DATA, a.template, "oracle.json")))
    info = ci.inspect(qmig, a.stream)
    ram = next(b["length"] for b in info["blocks"] if b["name"] == "pc.ram")
    args = list(oracle["machine_args"])
    args[args.index("-m") + 1] = str(ram >> 20)
    oracle["machine_args"] = args
    machine = info["machine"]
    work = tempfile.mkdtemp(prefix="qmig-bench-load-")
    conv = os.path.join(work, "converted.stream")
    mapped = os.path.join(work, "converted.mapped")
    subprocess.run([qmig, "convert", a.stream, conv], check=True, capture_output=True)
    subprocess.run([qmig, "convert", a.stream, mapped, "--format", "mapped-ram"], check=True,
                   capture_output=True)
    # No ZERO records: valid here, as a fresh QEMU's RAM starts zeroed.
    skip = os.path.join(work, "converted-skip.stream")
    subprocess.run([qmig, "convert", a.stream, skip, "--zero-pages", "skip"], check=True,
                   capture_output=True)
    inputs = [("original", a.stream, False), ("converted stream", conv, False),
              ("converted, zero skip", skip, False), ("converted mapped-ram", mapped, True)]
    for _, p, _ in inputs:
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass
    times = {n: [] for n, _, _ in inputs}
    for _ in range(a.runs):
        for n, p, m in inputs:
            times[n].append(load_time(oracle, machine, work, p, m))
    size = {n: os.path.getsize(p) for n, p, _ in inputs}
    alloc = {n: os.stat(p).st_blocks * 512 for n, p, _ in inputs}
    base = times["original"]
    print(f"QEMU 10 load (MIGRATION active -> completed), {a.runs} runs each, -M {machine}, "
          f"pc.ram {ram >> 20} MiB")
    for n, _, _ in inputs:
        t = times[n]
        print(f"  {n:22} {size[n]:>11} B ({alloc[n]:>11} allocated)  best {min(t):.3f} s  "
              f"median {statistics.median(t):.3f} s  runs {' '.join(f'{x:.3f}' for x in t)}")
        if n != "original":
            print(f"  {'':22} load time vs original: best {min(t) / min(base):.2f}x, median "
                  f"{statistics.median(t) / statistics.median(base):.2f}x; compaction ratio "
                  f"{size['original'] / size[n]:.2f} (allocated {alloc['original'] / alloc[n]:.2f})")
    # What the load time is made of: a least-squares line through the record
    # streams' best times against their sizes gives a fixed part (start-up,
    # device state, the `completed` bookkeeping) and a per-byte part.
    pts = [(size[n], min(times[n])) for n, _, m in inputs if not m]
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx > 0:
        k = sum((x - mx) * (y - my) for x, y in pts) / sxx
        fixed = my - k * mx
        print(f"  fit over the record streams (best times): fixed {fixed:.3f} s + "
              f"{k * (1 << 30):.3f} s/GiB")
        if fixed > 0 and k > 0:
            o, c = size["original"], size["converted stream"]
            print(f"  with that fixed part, the load time ratio at this compaction is at best "
                  f"{(fixed + k * c) / (fixed + k * o):.2f}x (the per-byte part alone: "
                  f"{c / o:.2f}x)")
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
