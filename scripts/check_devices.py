#!/usr/bin/env python3
"""Compares `qmig inspect STREAM --devices --json` with QEMU's
`scripts/analyze-migration.py -d state` on real captures.

    ANALYZE_MIGRATION=/path/to/analyze-migration.py QMIG=target/debug/qmig \
        python3 scripts/check_devices.py [STREAM...]

Without STREAM arguments it takes every tests/data/*/stream[.gz] and
../shared/field/*/stream[.gz] (relative to the repository root). gzip'd
captures are decompressed into a temporary file for the Python script.
For every stream where analyze-migration.py succeeds, both outputs are
parsed keeping key order and must be equal: same sections in the same
order, same fields, same values; and `-d desc` must print the same text as
`qmig inspect STREAM --vmdesc`. Streams where the Python script fails are
listed with its error and not compared. Exit 0 iff at least one stream was
compared and none differed. Get the script with
scripts/fetch_analyze_migration.sh (QEMU 10, Debian bookworm-backports).
"""
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ordered(text):
    return json.loads(text, object_pairs_hook=lambda pairs: ("obj", pairs))


def first_diff(a, b, path="$"):
    """Path and the two values of the first difference, or None."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        ka = [k for k, _ in a[1]]
        kb = [k for k, _ in b[1]]
        if ka != kb:
            for i, (x, y) in enumerate(zip(ka, kb)):
                if x != y:
                    return (f"{path} key #{i}", x, y)
            return (f"{path} keys", ka[len(kb):], kb[len(ka):])
        for (k, va), (_, vb) in zip(a[1], b[1]):
            d = first_diff(va, vb, f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return (f"{path} length", len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(a) is not type(b) or a != b:
        return (path, a, b)
    return None


def count_values(v):
    if isinstance(v, tuple):
        return sum(count_values(x) for _, x in v[1])
    if isinstance(v, list):
        return sum(count_values(x) for x in v)
    return 1


def main():
    script = os.environ.get("ANALYZE_MIGRATION")
    if not script or not os.path.isfile(script):
        sys.exit("check_devices: set ANALYZE_MIGRATION to QEMU 10's analyze-migration.py "
                 "(scripts/fetch_analyze_migration.sh fetches it)")
    script = os.path.abspath(script)
    qmig = os.path.abspath(os.environ.get("QMIG", os.path.join(ROOT, "target/debug/qmig")))
    streams = sys.argv[1:]
    if not streams:
        # $QMIG_FIELD_DIR overrides ../shared/field (e.g. from a git worktree).
        field = os.environ.get("QMIG_FIELD_DIR", os.path.join(ROOT, "../shared/field"))
        for pat in (os.path.join(ROOT, "tests/data/*/stream"), os.path.join(ROOT, "tests/data/*/stream.gz"),
                    os.path.join(field, "*/stream"), os.path.join(field, "*/stream.gz")):
            streams += sorted(glob.glob(pat))
    compared, differ, skipped = 0, 0, 0
    tmp = tempfile.mkdtemp(prefix="check_devices.")
    try:
        for s in streams:
            s = os.path.abspath(s)
            name = os.path.relpath(os.path.realpath(s), ROOT)
            if not os.path.isfile(s):
                print(f"DIFF {name}: no such file")
                differ += 1
                continue
            path = s
            if s.endswith(".gz"):
                path = os.path.join(tmp, "stream")
                with gzip.open(s) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            py = subprocess.run([sys.executable, script, "-d", "state", "-f", path],
                                capture_output=True, text=True, cwd=tmp)
            if py.returncode != 0:
                err = [l for l in py.stderr.strip().splitlines() if l.strip()]
                # The first exception is the cause; the script re-raises it
                # as "Full JSON dump".
                last = next((l for l in err if not l.startswith(" ") and ("Error" in l or "Exception" in l)
                             and "Full JSON" not in l and not l.startswith("Traceback")),
                            err[-1] if err else "?")
                print(f"SKIP {name}: analyze-migration.py fails: {last.strip()[:150]}")
                skipped += 1
                continue
            q = subprocess.run([qmig, "inspect", s, "--devices", "--json"],
                               capture_output=True, text=True)
            if q.returncode != 0:
                print(f"DIFF {name}: qmig exits {q.returncode}: {q.stderr.strip()[:300]}")
                differ += 1
                continue
            a, b = ordered(py.stdout), ordered(q.stdout)
            d = first_diff(a, b)
            if d:
                print(f"DIFF {name}: at {d[0]}: analyze-migration.py {d[1]!r}, qmig {d[2]!r}")
                differ += 1
                continue
            # -d desc against `inspect --vmdesc`: the same text.
            pyd = subprocess.run([sys.executable, script, "-d", "desc", "-f", path],
                                 capture_output=True, text=True, cwd=tmp)
            qd = subprocess.run([qmig, "inspect", s, "--vmdesc"], capture_output=True, text=True)
            if pyd.returncode != 0 or qd.returncode != 0 or pyd.stdout != qd.stdout:
                print(f"DIFF {name}: -d desc and inspect --vmdesc differ "
                      f"(exit {pyd.returncode}/{qd.returncode})")
                differ += 1
                continue
            print(f"SAME {name}: {len(a[1])} sections, {count_values(a)} values; vmdesc text identical")
            compared += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"check_devices: {compared} equal, {differ} different, "
          f"{skipped} not comparable (analyze-migration.py fails)")
    if differ or not compared:
        sys.exit(1)


if __name__ == "__main__":
    main()
