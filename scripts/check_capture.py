#!/usr/bin/env python3
"""Check the qmig CLI against captured QEMU streams and their oracles.

usage: check_capture.py [--qmig PATH | --reference] [--keep] PATH...

PATH is a capture directory (holding oracle.json, written by capture.py) or a directory
of capture directories (e.g. tests/data). For every capture:

  roundtrip  `$QMIG roundtrip STREAM` exits 0
  inspect    `$QMIG inspect STREAM --json` (plus `--return-path RP` when the capture has
             a return path) prints one JSON object; `totals` has zero/page/xbzrle/
             compressed/eos and `blocks` [{name,length,zero,page,xbzrle,compressed}].
             Totals and per-block counts (and `addr`, the MEM_SIZE guest address, for
             x-ignore-shared streams) must equal those of the independent reader
             (oracle.json "reference"), and the QEMU counters listed in "expect"
             (e.g. totals.zero == ram.duplicate) must hold.
  extract    `$QMIG extract STREAM -o DIR` writes DIR/manifest.json
             {"blocks":[{"name","file","length"}]}; every digest in oracle.json
             ("block","offset","length","sha256") must match the image bytes.

gzip'd streams (stream.gz) are decompressed to a temporary file first.
--reference runs the same checks with scripts/qemustream.py instead of qmig (to validate
the corpus itself). Exit status 1 if any check fails; a summary table is printed.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemustream  # noqa: E402

COUNT_KEYS = ("zero", "page", "xbzrle", "compressed")
TOTAL_KEYS = COUNT_KEYS + ("eos",)
TIMEOUT = 600


def default_qmig():
    env = os.environ.get("QMIG")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in ("target/release/qmig", "target/debug/qmig"):
        if os.path.exists(os.path.join(repo, p)):
            return os.path.join(repo, p)
    return os.path.join(repo, "target/release/qmig")


def find_captures(paths):
    out = []
    for p in paths:
        if os.path.exists(os.path.join(p, "oracle.json")):
            out.append(p)
        elif os.path.isdir(p):
            for n in sorted(os.listdir(p)):
                if os.path.exists(os.path.join(p, n, "oracle.json")):
                    out.append(os.path.join(p, n))
        else:
            raise SystemExit(f"check_capture: {p}: no oracle.json here or below")
    return out


class Failure(Exception):
    pass


def run(cmd, what):
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise Failure(f"{what}: timed out after {TIMEOUT}s: {' '.join(cmd)}")
    except OSError as e:
        raise Failure(f"{what}: cannot run {cmd[0]}: {e}")
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()[-800:]
        raise Failure(f"{what}: exit {p.returncode}: {' '.join(cmd)}\n      {err}")
    return p.stdout


def get(d, dotted):
    for k in dotted.split("."):
        d = d[k]
    return d


class Checker:
    def __init__(self, cap, qmig, reference, tmp):
        self.cap = cap
        self.name = os.path.basename(os.path.normpath(cap))
        self.qmig = qmig
        self.reference = reference
        self.tmp = tmp
        with open(os.path.join(cap, "oracle.json")) as f:
            self.oracle = json.load(f)
        self.results = {}
        self.notes = []

    def stream_path(self):
        sf = self.oracle.get("stream_file", "stream")
        path = os.path.join(self.cap, sf)
        if not os.path.exists(path):
            for alt in ("stream", "stream.gz"):
                if os.path.exists(os.path.join(self.cap, alt)):
                    path = os.path.join(self.cap, alt)
        if path.endswith(".gz"):
            out = os.path.join(self.tmp, "stream")
            with gzip.open(path, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return out
        return path

    def rp_path(self):
        p = os.path.join(self.cap, self.oracle.get("rp_file") or "rp")
        return p if os.path.exists(p) and os.path.getsize(p) > 0 else None

    def step(self, key, fn):
        try:
            fn()
            self.results[key] = "ok"
        except Failure as e:
            self.results[key] = "FAIL"
            self.notes.append(f"{key}: {e}")
        except Exception as e:  # noqa: BLE001 - report anything as a failure
            self.results[key] = "FAIL"
            self.notes.append(f"{key}: {type(e).__name__}: {e}")

    def check(self):
        self.stream = self.stream_path()
        self.rp = self.rp_path()
        if self.reference:
            self.results["roundtrip"] = "-"
        else:
            self.step("roundtrip", lambda: run([self.qmig, "roundtrip", self.stream],
                                               "roundtrip"))
        self.step("inspect", self.check_inspect)
        self.step("extract", self.check_extract)
        return all(v in ("ok", "-") for v in self.results.values())

    # -- inspect ------------------------------------------------------------------
    def inspect_json(self):
        if self.reference:
            s = qemustream.Stream(qemustream.load(self.stream), decode=False)
            return {"totals": dict(s.totals), "blocks": [s.blocks[n] for n in s.block_order],
                    "target_page_size": s.page_size}
        cmd = [self.qmig, "inspect", self.stream, "--json"]
        out = run(cmd, "inspect")
        j = self.parse_json(out, "inspect --json")
        if self.rp:
            out2 = run([self.qmig, "inspect", self.stream, "--return-path", self.rp, "--json"],
                       "inspect --return-path")
            self.parse_json(out2, "inspect --return-path --json")
        return j

    @staticmethod
    def parse_json(out, what):
        text = out.decode(errors="replace").strip()
        try:
            j = json.loads(text)
        except ValueError as e:
            raise Failure(f"{what}: stdout is not one JSON object ({e}): {text[:200]!r}")
        if not isinstance(j, dict):
            raise Failure(f"{what}: stdout is not a JSON object")
        return j

    def check_inspect(self):
        j = self.inspect_json()
        errs = []
        totals = j.get("totals")
        if not isinstance(totals, dict):
            raise Failure("inspect: no `totals` object")
        ref = self.oracle["reference"]
        for k in TOTAL_KEYS:
            if k not in totals:
                errs.append(f"totals.{k} missing")
            elif totals[k] != ref["totals"][k]:
                errs.append(f"totals.{k}={totals[k]}, stream has {ref['totals'][k]} "
                            f"(reference reader)")
        for key, want in self.oracle.get("expect", {}).items():
            try:
                got = get(j, key)
            except (KeyError, TypeError):
                errs.append(f"{key} missing")
                continue
            if got != want:
                errs.append(f"{key}={got}, QEMU's query-migrate says {want}")
        # Target page size (captures of other architectures record it): checked when
        # the inspect output reports one at top level.
        if "page_size" in self.oracle and "target_page_size" in j:
            if j["target_page_size"] != self.oracle["page_size"]:
                errs.append(f"target_page_size={j['target_page_size']}, QEMU's is "
                            f"{self.oracle['page_size']}")
        blocks = j.get("blocks")
        if not isinstance(blocks, list):
            errs.append("no `blocks` array")
        else:
            got_b = {b.get("name"): b for b in blocks if isinstance(b, dict)}
            for rb in ref["blocks"]:
                b = got_b.get(rb["name"])
                if b is None:
                    errs.append(f"block {rb['name']!r} missing")
                    continue
                # addr: MEM_SIZE guest address, present with x-ignore-shared only.
                keys = ("length",) + COUNT_KEYS + (("addr",) if "addr" in rb else ())
                for k in keys:
                    if b.get(k) != rb[k]:
                        errs.append(f"block {rb['name']}.{k}={b.get(k)}, expected {rb[k]}")
            extra = set(got_b) - {rb["name"] for rb in ref["blocks"]}
            if extra:
                errs.append(f"unexpected blocks {sorted(extra)}")
        if errs:
            raise Failure("; ".join(errs[:12]))

    # -- extract ------------------------------------------------------------------
    def check_extract(self):
        out = os.path.join(self.tmp, "extract")
        if os.path.isdir(out):
            shutil.rmtree(out)
        if self.reference:
            s = qemustream.Stream(qemustream.load(self.stream), decode=True)
            os.makedirs(out)
            man = []
            for n in s.block_order:
                fn = f"{len(man)}.img"
                with open(os.path.join(out, fn), "wb") as f:
                    f.write(s.images[n])
                man.append({"name": n, "file": fn, "length": s.blocks[n]["length"]})
            with open(os.path.join(out, "manifest.json"), "w") as f:
                json.dump({"blocks": man}, f)
        else:
            run([self.qmig, "extract", self.stream, "-o", out], "extract")
        try:
            with open(os.path.join(out, "manifest.json")) as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise Failure(f"extract: bad manifest.json: {e}")
        files = {}
        errs = []
        for b in man.get("blocks", []):
            files[b["name"]] = b
        ref_len = {b["name"]: b["length"] for b in self.oracle["reference"]["blocks"]}
        for name, length in ref_len.items():
            if name not in files:
                errs.append(f"block {name!r} not in manifest")
            elif files[name].get("length") != length:
                errs.append(f"{name}: manifest length {files[name].get('length')} != {length}")
        images = {}
        for d in self.oracle["digests"]:
            b = files.get(d["block"])
            if b is None:
                errs.append(f"no image for {d['block']}")
                continue
            if d["block"] not in images:
                path = os.path.join(out, b["file"])
                try:
                    with open(path, "rb") as f:
                        images[d["block"]] = f.read()
                except OSError as e:
                    errs.append(f"{d['block']}: {e}")
                    continue
            img = images[d["block"]]
            lo, n = d["offset"], d["length"]
            if len(img) < lo + n:
                errs.append(f"{d['block']}: image is {len(img)} bytes, need {lo + n}")
                continue
            if hashlib.sha256(img[lo:lo + n]).hexdigest() != d["sha256"]:
                errs.append(f"{d['block']}[{lo:#x}..{lo + n:#x}) differs from "
                            f"{d.get('source', 'source pmemsave')}")
        if errs:
            raise Failure("; ".join(errs[:12]))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--qmig", default=None, help="qmig binary (default $QMIG or target/*/qmig)")
    ap.add_argument("--reference", action="store_true",
                    help="use scripts/qemustream.py instead of qmig")
    ap.add_argument("--keep", action="store_true", help="keep temporary files")
    a = ap.parse_args()
    qmig = a.qmig or default_qmig()
    if not a.reference and not os.path.exists(qmig):
        print(f"check_capture: qmig binary {qmig} not found (set QMIG)", file=sys.stderr)
        return 2
    caps = find_captures(a.paths)
    rows, failed = [], 0
    for cap in caps:
        tmp = tempfile.mkdtemp(prefix="qmig-check.", dir="/tmp")
        try:
            c = Checker(cap, qmig, a.reference, tmp)
            ok = c.check()
        finally:
            if not a.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        failed += not ok
        t = c.oracle["reference"]["totals"]
        rows.append((c.name, c.results, ok, t))
        for n in c.notes:
            print(f"FAIL {c.name}: {n}", file=sys.stderr)
    who = "reference reader" if a.reference else qmig
    w = max([18] + [len(r[0]) for r in rows])
    print(f"\n{'capture':{w}} {'roundtrip':9} {'inspect':7} {'extract':7}  "
          f"{'zero':>5} {'page':>5} {'xbzrle':>6} {'compr':>5} {'eos':>4}  result")
    for name, r, ok, t in rows:
        print(f"{name:{w}} {r.get('roundtrip', '?'):9} {r.get('inspect', '?'):7} "
              f"{r.get('extract', '?'):7}  {t['zero']:5} {t['page']:5} {t['xbzrle']:6} "
              f"{t['compressed']:5} {t['eos']:4}  {'PASS' if ok else 'FAIL'}")
    print(f"\n{len(rows) - failed}/{len(rows)} captures pass ({who})")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
