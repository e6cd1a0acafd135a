#!/usr/bin/env python3
"""qmig.open + read_block of every RAM block beside `qmig extract` of the
same capture, alternating, same run (issue 16's benchmark).

usage: QMIG=target/release/qmig PYTHON=target/pyvenv/bin/python \
       scripts/bench_python.py STREAM [RUNS]
(run it with the venv's python, where `qmig` is installed; make a capture
with scripts/big_capture.py)."""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qmig


def py_run(path):
    t0 = time.perf_counter()
    c = qmig.open(path)
    t1 = time.perf_counter()
    n = 0
    for b in c.blocks:
        off = 0
        while off < b.length:
            k = min(16 << 20, b.length - off)
            n += len(c.read_block(b.name, off, k))
            off += k
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0, n


def extract_run(qmig_bin, path):
    out = tempfile.mkdtemp(prefix="qmig-bench-")
    try:
        t0 = time.perf_counter()
        subprocess.run([qmig_bin, "-q", "extract", path, "-o", out + "/x"], check=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out)


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    qmig_bin = os.environ.get("QMIG", "target/release/qmig")
    opens, fulls, exts = [], [], []
    for _ in range(runs):
        o, f, n = py_run(path)
        opens.append(o)
        fulls.append(f)
        exts.append(extract_run(qmig_bin, path))
    med = statistics.median
    print(f"{path}: {os.path.getsize(path)} bytes, {n} bytes of RAM, {runs} runs")
    print(f"qmig.open: best {min(opens):.3f}s median {med(opens):.3f}s (goal <= 1 s)")
    print(f"open + read_block of all RAM: best {min(fulls):.3f}s median {med(fulls):.3f}s")
    print(f"qmig extract: best {min(exts):.3f}s median {med(exts):.3f}s")
    print(f"ratio python/extract: best {min(fulls) / min(exts):.2f}x median {med(fulls) / med(exts):.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
