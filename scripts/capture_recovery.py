#!/usr/bin/env python3
"""Capture recovered postcopy migrations (QEMU 10 -> QEMU 10) connection by connection.

usage: capture_recovery.py [--out DIR] [--keep-tmp] [SCENARIO...]   (default: all)

Each scenario migrates a small pc guest (scripts/guest: it dirties 1 MiB for a few
passes, then halts, so the destination's memory is the stream's) through
scripts/relay.py's MultiRelay, in postcopy, asks the destination for some pages
(HMP `xp` on it, which faults), pauses the migration with `migrate-pause` on the
source while postcopy is active, recovers it (`migrate-recover` on the destination,
`migrate ... resume=true` on the source), asks for pages again and lets it complete.

DIR/<scenario>/ then holds (gzip'd, mtime 0):
  main-1.bin.gz, main-2.bin.gz        the main channel before and after the cut
  preempt-1.bin.gz, preempt-2.bin.gz  the preempt channel (postcopy-preempt only)
  rp-1.bin.gz, rp-2.bin.gz            what the destination sent back on each main
                                      connection (return path: RECV_BITMAP replies,
                                      RESUME_ACK, page requests, SHUT)
  query-migrate.json                  final query-migrate of both sides
  oracle.json                         connections (file, role, bytes), pmemsave digests
                                      of source and destination (equal), counters
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
from capture import HOLE, digests, ram_blocks_hmp, sha256  # noqa: E402
from relay import MultiRelay  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20
RAM = 32 * MiB
GUEST = {"start": 0x100000, "size": 256 * 4096, "writes": 2, "delay": 0x1000, "passes": 3}
LAYOUT = [("pc.ram", 0, RAM)]

SCENARIOS = {
    "q10-postcopy-recover": dict(
        caps={"postcopy-ram": True},
        about="QEMU 10 -> QEMU 10, postcopy-ram, -M pc -m 32; pages requested with HMP xp "
              "on the destination; migrate-pause on the source in postcopy-active, "
              "migrate-recover on the destination, migrate resume=true; two main "
              "connections"),
    "q10-postcopy-relay-cut": dict(
        caps={"postcopy-ram": True}, cuts=["relay"],
        about="QEMU 10 -> QEMU 10, postcopy-ram, -M pc -m 32; the relay cuts both "
              "directions of the connection (shutdown, as a network failure) 20011 bytes "
              "after the page requests, inside a record, while "
              "postcopy is active, then migrate-recover and migrate resume=true; pages "
              "requested with HMP xp before the cut and after the resume"),
    "q10-preempt-recover": dict(
        caps={"postcopy-ram": True, "postcopy-preempt": True},
        about="QEMU 10 -> QEMU 10, postcopy-ram + postcopy-preempt, -M pc -m 32; pages "
              "requested with HMP xp on the destination (served on the preempt channel); "
              "migrate-pause on the source in postcopy-active, migrate-recover, migrate "
              "resume=true; two main and two preempt connections"),
}


def log(*a):
    print("[capture_recovery]", *a, file=sys.stderr, flush=True)


def build_guest(out):
    g = GUEST
    cmd = [os.path.join(SCRIPTS, "guest", "build.sh"), "-o", out, "-s", hex(g["start"]),
           "-n", hex(g["size"]), "-w", str(g["writes"]), "-d", hex(g["delay"]),
           "-p", str(g["passes"])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def vm(work, name, img, extra):
    serial = os.path.join(work, f"{name}.serial")
    args = ["-M", "pc", "-m", str(RAM // MiB), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"] + extra
    q = qmp.Qemu(qmp.qemu_binary("10"), args, work, name)
    q.serial = serial
    return q


def wait_state(q, want, timeout=60):
    return qmp.wait_migration(q.qmp, timeout=timeout, done=tuple(want))


def request_pages(dst, addrs):
    """Read guest pages on the destination through HMP (faults on pages not yet there)."""
    for a in addrs:
        dst.qmp.execute("human-monitor-command", timeout=60,
                        **{"command-line": f"xp /1xg {a:#x}"})


def role_of(first):
    if first[:4] == b"QEVM":
        return "main"
    if first[:1] == b"\x08":
        return "main"  # a recovery connection starts with a command
    return "preempt"


def run(name, sc, outroot, work):
    os.makedirs(work, exist_ok=True)
    img = build_guest(os.path.join(work, "guest.img"))
    dimg = os.path.join(work, "guest-dst.img")
    shutil.copy(img, dimg)
    caps = sc["caps"]
    src = vm(work, "src", img, [])
    dport = qmp.free_port()
    dst = vm(work, "dst", dimg, ["-incoming", "defer"])
    try:
        version = qmp.version_string(src.qmp)
        # The guest halts after its passes: memory no longer changes on either side.
        qmp.wait_file_size(src.serial, GUEST["passes"], timeout=60)
        time.sleep(0.2)
        ramblocks = ram_blocks_hmp(src)
        capl = [{"capability": k, "state": v} for k, v in caps.items()]
        src.cmd("migrate-set-capabilities", capabilities=capl)
        dst.cmd("migrate-set-capabilities", capabilities=capl)
        # (postcopy-preempt must be set before the destination listens)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{dport}")
        params = {"max-bandwidth": 4_000_000,
                  "max-postcopy-bandwidth": sc.get("max_postcopy_bandwidth", 400_000),
                  "downtime-limit": 1}
        src.cmd("migrate-set-parameters", **params)
        relay = MultiRelay(dport, os.path.join(work, "conn")).start()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        src.cmd("migrate-start-postcopy")
        wait_state(src, ("postcopy-active",), 60)
        wait_state(dst, ("postcopy-active",), 60)
        time.sleep(0.3)
        before = []
        epochs = []
        for i, how in enumerate(sc.get("cuts", ["pause"])):
            pages = [GUEST["start"] + GUEST["size"] - 4096 * (k + 24 * i) for k in (1, 9, 17)]
            request_pages(dst, pages)
            before += pages
            st = src.cmd("query-migrate")
            if st.get("status") != "postcopy-active":
                raise RuntimeError(f"postcopy ended before cut {i + 1}: {st.get('status')}")
            if how == "pause":
                src.cmd("migrate-pause")
            else:
                # An odd byte count: the cut falls inside a record.
                relay.cut_after(20011)
            wait_state(src, ("postcopy-paused",), 60)
            wait_state(dst, ("postcopy-paused",), 60)
            if not relay.wait(30):
                raise RuntimeError("relay connections did not end after the cut")
            epochs.append(len(relay.conns))
            rport = qmp.free_port()
            relay.target = rport
            dst.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{rport}")
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}", resume=True)
            # (a resumed migration is not rate limited again by itself)
            src.cmd("migrate-set-parameters",
                    **{"max-postcopy-bandwidth": params["max-postcopy-bandwidth"]})
            wait_state(src, ("postcopy-active", "completed"), 60)
            wait_state(dst, ("postcopy-active", "completed"), 60)
            time.sleep(0.3)
        first = epochs[0]
        after = [GUEST["start"] + 4096 * k for k in (3, 11)] + [0x3000000, 0x1F00000]
        request_pages(dst, after)
        final = qmp.wait_migration(src.qmp, timeout=120)
        dfinal = qmp.wait_migration(dst.qmp, timeout=60)
        if not relay.wait(30):
            raise RuntimeError("relay connections did not end after completion")
        relay.close()
        if relay.error:
            log(f"relay note: {relay.error}")
        smem = qmp.pmemsave(src.qmp, 0, RAM, os.path.join(work, "src.mem"))
        dmem = qmp.pmemsave(dst.qmp, 0, RAM, os.path.join(work, "dst.mem"))
        smem, dmem = open(smem, "rb").read(), open(dmem, "rb").read()
        sd, dd = digests(smem, LAYOUT), digests(dmem, LAYOUT)
        if [x["sha256"] for x in sd] != [x["sha256"] for x in dd]:
            raise RuntimeError("destination memory differs from the source's")
        src_status = src.cmd("query-status")["status"]
        dst_status = dst.cmd("query-status")["status"]
    finally:
        src.quit()
        dst.quit()

    out = os.path.join(outroot, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    conns, counts = [], {"main": 0, "preempt": 0}
    for i, c in enumerate(relay.conns):
        with open(c["src"], "rb") as f:
            data = f.read()
        with open(c["dst"], "rb") as f:
            back = f.read()
        role = role_of(data[:8])
        counts[role] += 1
        k = counts[role]
        files = {}
        for kind, blob in ((role, data), ("rp" if role == "main" else "preempt-back", back)):
            if kind == "preempt-back" and not blob:
                continue
            fn = f"{kind}-{k}.bin.gz"
            with open(os.path.join(out, fn), "wb") as g:
                with gzip.GzipFile(fileobj=g, mode="wb", mtime=0, filename="") as z:
                    z.write(blob)
            files[kind] = {"file": fn, "bytes": len(blob), "sha256": sha256(blob)}
        epoch = sum(1 for e in epochs if i >= e)
        conns.append({"connection": i + 1, "role": role, "epoch": epoch,
                      "target": "incoming" if i < first else "recover",
                      "files": files})
    oracle = {
        "scenario": name,
        "about": sc["about"],
        "qemu_version": version,
        "machine_args": ["-M", "pc", "-m", str(RAM // MiB), "-nodefaults", "-display", "none"],
        "guest": {"dirty_start": GUEST["start"], "dirty_size": GUEST["size"],
                  "writes_per_page": GUEST["writes"], "delay_tsc": GUEST["delay"],
                  "max_passes": GUEST["passes"],
                  "build": "scripts/guest/build.sh -s START -n SIZE -w WRITES -d DELAY -p PASSES"},
        "capabilities": caps,
        "parameters": params,
        "flow": "migrate; migrate-start-postcopy; per cut: xp on destination, then "
                "migrate-pause on the source (pause) or the relay shuts both sockets down "
                "(relay), migrate-recover (destination), migrate resume=true; xp; completed",
        "cuts": sc.get("cuts", ["pause"]),
        "requested_before_cut": before,
        "requested_after_resume": after,
        "connections": conns,
        "ram_size": RAM,
        "layout": [{"block": b, "gpa": g, "size": s} for b, g, s in LAYOUT],
        "hole": list(HOLE),
        "pmemsave": {"source_sha256": sha256(smem), "destination_sha256": sha256(dmem),
                     "size": RAM},
        "digests": dd,
        "digest_note": "sha256 of the destination's pmemsave per pc.ram range outside the "
                       "[0xA0000, 0x100000) hole; the source's are equal",
        "source_status_after": src_status,
        "destination_status_after": dst_status,
        "query_migrate_ram": final.get("ram"),
        "postcopy_requests": final.get("ram", {}).get("postcopy-requests"),
        "postcopy_blocktime": dfinal.get("postcopy-blocktime"),
        "ramblocks_hmp": ramblocks,
    }
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "query-migrate.json"), "w") as f:
        json.dump({"source": final, "destination": dfinal}, f, indent=1, sort_keys=True)
        f.write("\n")
    return oracle


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "data", "recovery"))
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args()
    names = a.scenarios or list(SCENARIOS)
    work = tempfile.mkdtemp(prefix="qmig-recovery.", dir="/tmp")
    failed = []
    try:
        for n in names:
            t0 = time.monotonic()
            try:
                o = run(n, SCENARIOS[n], a.out, os.path.join(work, n))
                log(f"{n}: ok in {time.monotonic() - t0:.1f}s: " + ", ".join(
                    f"{c['role']} {c['files'][c['role']]['bytes']} B" for c in o["connections"]))
            except Exception as e:  # noqa: BLE001
                log(f"{n}: FAILED: {e}")
                failed.append(n)
    finally:
        if a.keep_tmp:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
