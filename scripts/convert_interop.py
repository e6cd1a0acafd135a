#!/usr/bin/env python3
"""Live interop: `qmig convert` output restored by a real QEMU 10 (`-incoming file:`).

usage: convert_interop.py [--list] [--keep] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Each scenario takes a committed real capture (tests/data/NAME: QEMU 7.2 with
`compress`, QEMU 7.2 / 10 XBZRLE over several passes, QEMU 10 postcopy), runs
`qmig convert IN OUT --report --json`, then starts QEMU 10 with the capture's
machine options (oracle.json `machine_args`, `-M` replaced by the canonical
machine type the stream's configuration section names, e.g. pc-i440fx-7.2),
the IDE disk and serial port the capture's source had, `-S` and
`-incoming file:OUT`. It checks:
  * the converted stream holds no XBZRLE or COMPRESS_PAGE record and each page
    once (`qmig inspect --json` totals), the device state byte count unchanged,
    and RAM costing no more than the non-zero pages plus record headers and
    framing (it prints output / (non-zero pages + container));
  * QEMU 10's query-migrate says `completed` and query-status `paused`
    (loaded, not running);
  * QEMU 10's pmemsave equals the capture source's own digests (oracle.json
    `digests`: pc.ram outside the hole, and pc.bios at 4 GiB - its length);
  * for COMPRESS_PAGE captures, QEMU 10 refuses the original stream (the
    reason to convert), reported as a note if it does not.
Capture sets of several connections (tests/data/multifd/q10-zstd: a main
stream and two multifd channels; tests/data/recovery/q10-preempt-recover: two
main and two preempt connections of a recovered postcopy migration) are
converted as one (`qmig convert MAIN... [--multifd-channel F]...
[--preempt-channel F]... OUT`); the output must hold no MULTIFD_FLUSH and no
command but SWITCHOVER_START, and QEMU 10 loads it with default capabilities.
It prints the compaction ratio (input stream bytes / output bytes).
Exits non-zero naming the failed scenarios.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
DATA = os.path.join(REPO, "tests", "data")

SCENARIOS = {
    "q72-compress": dict(capture="q72-compress", refused_as_is=True,
                         about="QEMU 7.2 compress (level 1) -> convert -> QEMU 10 -M pc-i440fx-7.2"),
    "q72-compress6": dict(capture="q72-compress6", refused_as_is=True,
                          about="QEMU 7.2 compress (level 6) -> convert -> QEMU 10 -M pc-i440fx-7.2"),
    "q72-compress-zstd": dict(capture="q72-compress", convert_args=["--compress-output", "zstd"],
                              incoming="exec:zstd -dc {out}",
                              about="QEMU 7.2 compress -> convert --compress-output zstd -> "
                                    "QEMU 10 -incoming 'exec:zstd -dc OUT'"),
    "q72-xbzrle": dict(capture="q72-xbzrle",
                       about="QEMU 7.2 XBZRLE, several passes -> convert -> QEMU 10 -M pc-i440fx-7.2"),
    "q10-xbzrle": dict(capture="q10-xbzrle",
                       about="QEMU 10 XBZRLE, several passes -> convert -> QEMU 10"),
    "q10-postcopy": dict(capture="q10-postcopy",
                         about="QEMU 10 postcopy (PACKAGED, discards) -> convert -> QEMU 10 precopy file"),
    # mapped-ram <-> stream, both ways (issue 12; issue 11 item 5).
    "q10-xbzrle-to-mapped-ram": dict(
        capture="q10-xbzrle", convert_args=["--format", "mapped-ram"], mapped_ram=True,
        about="QEMU 10 XBZRLE stream -> convert --format mapped-ram -> QEMU 10 "
              "(mapped-ram on, migrate-incoming file:)"),
    "q72-compress-to-mapped-ram": dict(
        capture="q72-compress", convert_args=["--format", "mapped-ram"], mapped_ram=True,
        about="QEMU 7.2 compress stream -> convert --format mapped-ram -> QEMU 10 -M pc-i440fx-7.2 "
              "(mapped-ram on)"),
    "send-mapped-ram": dict(
        capture="q10-xbzrle", send_mapped_ram=True, mapped_ram=True,
        about="qmig extract (QEMU 10 XBZRLE capture) -> qmig send --mapped-ram --to file: -> "
              "QEMU 10 (mapped-ram on)"),
    "mapped-ram-to-stream": dict(
        capture="field/mapped-ram-file", machine_args=["-M", "pc", "-m", "64", "-nodefaults",
                                                       "-display", "none"],
        about="QEMU 10 mapped-ram file -> convert -> stream -> QEMU 10 -incoming file:"),
    "mapped-ram-multifd-to-stream": dict(
        capture="multifd/mapped-ram-multifd4", machine_args=["-M", "pc", "-m", "64", "-nodefaults",
                                                             "-display", "none"],
        about="QEMU 10 mapped-ram file written with 4 multifd channels -> convert -> stream -> "
              "QEMU 10 -incoming file:"),
    "mapped-ram-to-mapped-ram": dict(
        capture="field/mapped-ram-file", convert_args=["--format", "mapped-ram"], mapped_ram=True,
        machine_args=["-M", "pc", "-m", "64", "-nodefaults", "-display", "none"],
        about="QEMU 10 mapped-ram file -> convert --format mapped-ram -> QEMU 10 (mapped-ram on)"),
    # Capture sets of several connections -> one plain precopy stream (issue 12).
    "multifd-set-to-stream": dict(
        capture="multifd/q10-zstd", capture_set=True,
        machine_args=["-M", "pc", "-m", "64", "-nodefaults", "-display", "none"],
        about="QEMU 10 multifd capture set (main + 2 zstd channels) -> convert MAIN "
              "--multifd-channel C1 --multifd-channel C2 OUT -> QEMU 10 -incoming file: "
              "(default capabilities)"),
    "preempt-recover-set-to-stream": dict(
        capture="recovery/q10-preempt-recover", capture_set=True,
        about="QEMU 10 recovered postcopy + preempt capture set (2 main, 2 preempt connections) "
              "-> convert main-1 main-2 --preempt-channel P1 --preempt-channel P2 OUT -> "
              "QEMU 10 -incoming file:"),
}


def capture_stream(capture):
    d = os.path.join(DATA, capture)
    for n in ("stream", "stream.gz"):
        if os.path.exists(os.path.join(d, n)):
            return os.path.join(d, n)
    raise RuntimeError(f"no stream in {d}")


def capture_set(capture):
    """The files of a capture set as `qmig convert` arguments: main connections
    in order (main-N.bin.gz, or conn-0.bin.gz of a multifd set), then
    `--preempt-channel preempt-N.bin.gz` / `--multifd-channel conn-N.bin.gz`."""
    d = os.path.join(DATA, capture)

    def num(n):
        return int(n.split(".")[0].rsplit("-", 1)[1])

    names = sorted(os.listdir(d))
    mains = sorted((n for n in names if n.startswith("main-") and n.endswith(".bin.gz")), key=num)
    opts = []
    for n in sorted((n for n in names if n.startswith("preempt-") and n.endswith(".bin.gz")),
                    key=num):
        opts += ["--preempt-channel", os.path.join(d, n)]
    if "conn-0.bin.gz" in names:
        mains = ["conn-0.bin.gz"]
        for n in sorted((n for n in names if n.startswith("conn-") and n != "conn-0.bin.gz"),
                        key=num):
            opts += ["--multifd-channel", os.path.join(d, n)]
    if not mains:
        raise RuntimeError(f"no main connection in {d}")
    return [os.path.join(d, n) for n in mains] + opts


def inspect(qmig, path):
    p = subprocess.run([qmig, "inspect", "--json", path], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"qmig inspect {path} exited {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def dst_args(oracle, machine, work, stream, incoming="file:{out}"):
    """The capture's machine options with -M set to `machine`, plus the boot
    disk and serial port its source had (scripts/capture.py). A field input
    (no `machine_args` in its oracle) gets the scenario's options only."""
    field = "machine_args" not in oracle
    args = list(oracle.get("machine_args") or oracle["scenario_machine_args"])
    if "-M" in args:
        args[args.index("-M") + 1] = machine
    else:
        args = ["-M", machine] + args
    if field:
        return args + ["-S", "-incoming", incoming.format(out=stream)]
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    return args + ["-drive", f"file={disk},format=raw,if=ide", "-serial", "null",
                   "-S", "-incoming", incoming.format(out=stream)]


def wait_loaded(dst, timeout=60.0):
    """query-migrate until completed/failed, or the process exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if dst.proc.poll() is not None:
            return {"status": "exited", "log": dst.read_log()}
        try:
            last = dst.cmd("query-migrate")
        except qmp.QMPError as e:
            return {"status": "exited", "log": f"{e}: {dst.read_log()}"}
        if last.get("status") in ("completed", "failed", "cancelled"):
            return last
        time.sleep(0.05)
    return {"status": "timeout", "last": last}


def oracle_digests(oracle):
    """The capture's `digests`, or a field input's `ranges` (pc.ram offsets are
    guest addresses below the PCI hole in these 64 MiB pc guests)."""
    if "digests" in oracle:
        return oracle["digests"]
    return [dict(r, gpa=r["offset"]) for r in oracle["ranges"] if r["block"] == "pc.ram"]


def check_digests(dst, oracle, work):
    """Compares QEMU's memory with the source's digests; returns (n, problems)."""
    problems = []
    n = 0
    for d in oracle_digests(oracle):
        gpa = d.get("gpa")
        if gpa is None:
            if d["block"] != "pc.bios":
                continue
            gpa = (1 << 32) - d["length"] - d["offset"]
        path = qmp.pmemsave(dst.qmp, gpa, d["length"], os.path.join(work, f"pmem-{n}"))
        got = hashlib.sha256(open(path, "rb").read()).hexdigest()
        n += 1
        if got != d["sha256"]:
            problems.append(f"{d['block']}+{d['offset']:#x} ({d['length']} bytes at gpa "
                            f"{gpa:#x}): sha256 {got[:16]}..., source {d['sha256'][:16]}...")
    return n, problems


def run_scenario(name, sc, work, qmig):
    oracle = json.load(open(os.path.join(DATA, sc["capture"], "oracle.json")))
    oracle["scenario_machine_args"] = sc.get("machine_args")
    mapped = sc.get("mapped_ram", False)
    out = os.path.join(work, "converted.stream")
    if sc.get("capture_set"):
        # Several connections: what `convert` reads is the whole set; the
        # main connection alone (cut, or missing the channels' pages) is
        # inspected for its device state only when it reads to its end.
        inputs = capture_set(sc["capture"])
        src = inputs[0]
        try:
            before = inspect(qmig, src)
        except RuntimeError:
            before = None
        if before is not None and (before.get("error") or not before.get("eof")):
            before = None
    else:
        src = capture_stream(sc["capture"])
        inputs = [src]
        before = inspect(qmig, src)
    t0 = time.monotonic()
    if sc.get("send_mapped_ram"):
        # qmig send --mapped-ram: the capture's final RAM in its own container.
        ram = os.path.join(work, "ram")
        subprocess.run([qmig, "extract", src, "-o", ram], check=True, capture_output=True,
                       timeout=120)
        p = subprocess.run([qmig, "send", "--ram", ram, "--template", src, "--to", f"file:{out}",
                            "--mapped-ram", "--json"], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"qmig send --mapped-ram exited {p.returncode}: {p.stderr.strip()}")
        sent = json.loads(p.stdout)
        rep = {"input_stream_bytes": before["length"], "output_stream_bytes": sent["bytes"],
               "pages_before": before["totals"],
               "pages_after": {"page": sent["normal"], "zero": sent["duplicate"],
                               "total": sent["normal"] + sent["duplicate"]}}
    else:
        p = subprocess.run([qmig, "convert"] + inputs + [out, "--report", "--json"]
                           + sc.get("convert_args", []),
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"qmig convert exited {p.returncode}: {p.stderr.strip()}")
        rep = json.loads(p.stdout)
    took = time.monotonic() - t0
    after = inspect(qmig, out)  # reads compressed output too
    machine = (before or after)["machine"]
    t = after["totals"]
    if sc.get("capture_set"):
        # A plain precopy stream: no multifd sync point, no recovery, preempt
        # or postcopy command (QEMU 10 loads it with default capabilities).
        left = sorted(set(after.get("command_counts") or {}) - {"SWITCHOVER_START"})
        if t["multifd_flush"] or left:
            raise RuntimeError(f"converted set still has MULTIFD_FLUSH {t['multifd_flush']} / "
                               f"commands {left}")
    if t["xbzrle"] or t["compressed"]:
        raise RuntimeError(f"converted stream still has xbzrle {t['xbzrle']} / "
                           f"compressed {t['compressed']} records")
    pages = sum(b["length"] for b in after["blocks"]) // after["target_page_size"]
    if t["zero"] + t["page"] > pages:
        raise RuntimeError(f"{t['zero'] + t['page']} page records for {pages} pages")
    caps = after.get("capabilities") or []
    if mapped != ("mapped-ram" in caps):
        raise RuntimeError(f"output capabilities {caps} (mapped-ram output: {mapped})")
    if mapped:
        # The pages sit at fixed offsets: RAM bytes are the file layout, bounded
        # by the blocks' lengths plus 1 MiB alignment and a bitmap per block.
        bound = sum(b["length"] + (1 << 20) + b["length"] // after["target_page_size"] // 8 + 4096
                    for b in after["blocks"])
        if after["ram_bytes"] > bound:
            raise RuntimeError(f"mapped-ram RAM part {after['ram_bytes']} bytes > {bound}")
    # Size: the device state is kept byte for byte, and the RAM costs the
    # non-zero pages plus record headers (8 bytes a page, 9 a ZERO record,
    # block names once) and section framing: nothing else.
    if before is not None and after["device_bytes"] != before["device_bytes"]:
        raise RuntimeError(f"device bytes {before['device_bytes']} -> {after['device_bytes']}")
    ps = after["target_page_size"]
    names = sum(1 + len(b["name"]) for b in after["blocks"])
    bound = t["page"] * (ps + 8) + t["zero"] * 9 + 2 * names + 4096
    if not mapped and after["ram_bytes"] > bound:
        raise RuntimeError(f"RAM part {after['ram_bytes']} bytes > {bound} "
                           f"({t['page']} pages + headers + framing)")
    payload = t["page"] * ps + after["length"] - after["ram_bytes"]
    rep["vs_payload"] = after["length"] / payload
    if rep["pages_after"]["total"] != t["zero"] + t["page"]:
        raise RuntimeError(f"report says {rep['pages_after']['total']} records, "
                           f"inspect counts {t['zero'] + t['page']}")

    note = ""
    if sc.get("refused_as_is"):
        # The reason to convert: QEMU 10 cannot load the original.
        plain = src
        if src.endswith(".gz"):
            plain = os.path.join(work, "original.stream")
            subprocess.run(["sh", "-c", f"gzip -dc '{src}' > '{plain}'"], check=True)
        log = os.path.join(work, "orig.log")
        try:
            orig = qmp.Qemu(qmp.qemu_binary("10"), dst_args(oracle, machine, work, plain),
                            work, "orig")
            try:
                r = wait_loaded(orig)
            finally:
                orig.quit()
        except (qmp.QMPError, OSError) as e:
            # QEMU exits as soon as the incoming load fails, maybe before QMP answers.
            r = {"status": f"exited ({e.__class__.__name__})"}
        why = ""
        if os.path.exists(log):
            lines = [x for x in open(log, errors="replace").read().splitlines() if x.strip()]
            why = f": {lines[-1].strip()}" if lines else ""
        if r["status"] == "completed":
            note = "; NOTE: QEMU 10 also loaded the original stream"
        else:
            note = f"; QEMU 10 refuses the original ({r['status']}{why})"

    incoming = sc.get("incoming", "file:{out}")
    dst = qmp.Qemu(qmp.qemu_binary("10"),
                   dst_args(oracle, machine, work, out, "defer" if mapped else incoming),
                   work, "dst")
    try:
        if mapped:
            # A mapped-ram file loads only with the capability on (QEMU checks
            # the configuration's list against it) and from file:.
            dst.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "mapped-ram", "state": True}])
            dst.cmd("migrate-incoming", uri=incoming.format(out=out))
            incoming = "defer; mapped-ram on; migrate-incoming " + incoming
        r = wait_loaded(dst)
        if r["status"] != "completed":
            raise RuntimeError(f"QEMU 10 did not load the converted stream: {r}\n"
                               f"log: {dst.read_log()}")
        status = dst.cmd("query-status")["status"]
        if status not in ("paused", "prelaunch", "postmigrate"):
            raise RuntimeError(f"QEMU 10 run state after load: {status}")
        version = qmp.version_string(dst.qmp)
        n, problems = check_digests(dst, oracle, work)
        if problems:
            raise RuntimeError(f"{len(problems)} of {n} ranges differ: " + "; ".join(problems))
        if n == 0:
            raise RuntimeError("the oracle has no digests to compare")
    finally:
        dst.quit()
    alloc = os.stat(out).st_blocks * 512
    sparse = f" ({alloc} allocated: a sparse mapped-ram file)" if mapped else ""
    print(f"  ok: -incoming {incoming.format(out='OUT')}: convert {took:.2f}s, {rep['input_stream_bytes']} -> "
          f"{rep['output_stream_bytes']} bytes{sparse} (ratio "
          f"{rep['input_stream_bytes'] / rep['output_stream_bytes']:.2f}); pages before "
          f"{rep['pages_before']} after {rep['pages_after']}; output / (non-zero pages + "
          f"container) = {rep['vs_payload']:.4f}; QEMU {version} -M {machine}: "
          f"completed/{status}, {n} digests equal the source's{note}", flush=True)


def main():
    return qmp.run_scenarios("convert_interop", SCENARIOS,
                             lambda n, sc, qmig, work: run_scenario(n, sc, work, qmig))


if __name__ == "__main__":
    sys.exit(main())
