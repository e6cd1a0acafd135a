#!/usr/bin/env python3
"""Live interop: postcopy recovery and postcopy-preempt, a real QEMU 10 source (7.2 for
q72-preempt) -> a relay the test can cut -> `qmig recv --touch 2`.

usage: recovery_interop.py [--list] [--keep] [-j N] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Each scenario boots the dirtying guest (scripts/guest, 64 MiB, 48 MiB dirtied
continuously) on a QEMU 10 source, starts `qmig recv --touch 2 --save DIR/saved.stream`,
and migrates through scripts/relay.py's MultiRelay; postcopy is started after ~1 s.
  * cut: the relay shuts every connection down (both directions) while postcopy is
    active, or the source is told `migrate-pause`; the source must go `postcopy-paused`;
    then `migrate URI resume=true` through a fresh relay connection to the same
    address must recover (qmig recv keeps listening there);
  * preempt: `postcopy-preempt` on the source (qmig is the destination): requested
    pages come on the preempt channel (the manifest's round trips split by channel add
    up, some answered on the preempt channel); QEMU 7.2 opens it at connect;
  * every scenario but `killed`: the source reaches `completed`, qmig recv exits 0,
    pc.ram equals the source's pmemsave (outside the [0xA0000, 0x100000) hole), the
    pauses qmig reports equal the cuts, and the --save capture set (main connections,
    preempt channels) extracts (`qmig extract MAIN1 MAIN2... --preempt-channel P...`)
    to the same pc.ram;
  * killed: the source is killed while postcopy is active; recv (--recover-timeout 5)
    must exit non-zero with a message naming --recover-timeout within the timeout plus
    a margin, touch threads released.
Scenarios are independent (own ports and directories): -j N runs N at once.
"""

import argparse
import glob
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
from relay import MultiRelay  # noqa: E402

MiB = 1 << 20
HOLE = (0xA0000, 0x100000)
RAM_MIB = 64
GUEST = {"start": 0x100000, "size": 48 * MiB, "writes": 2, "delay": 0x1000}
PARAMS = {"max-bandwidth": 32 * MiB, "max-postcopy-bandwidth": 6 * MiB}

SCENARIOS = {
    "q10-recover-cut": dict(cuts=["relay"], about="one relay cut (both directions) in "
                            "postcopy, migrate resume=true recovers"),
    "q10-recover-pause": dict(cuts=["pause"], about="migrate-pause on the source in postcopy, "
                              "migrate resume=true recovers"),
    "q10-recover-three": dict(cuts=["relay", "pause", "relay"],
                              about="three cuts in one migration (relay, pause, relay)"),
    "q10-preempt": dict(cuts=[], preempt=True,
                        about="postcopy-preempt on the source: requested pages on the "
                              "preempt channel"),
    "q10-preempt-cut": dict(cuts=["relay"], preempt=True,
                            about="postcopy-preempt, one relay cut, recovers (new main and "
                                  "preempt connections)"),
    "q72-preempt": dict(cuts=[], preempt=True, qemu="7.2",
                        about="QEMU 7.2 source with postcopy-preempt (it opens the preempt "
                              "channel at connect, right after the main one)"),
    "q10-recover-killed": dict(cuts=[], kill=True,
                               about="source killed in postcopy: recv fails within "
                                     "--recover-timeout 5 with a clear error"),
}

LOCK = threading.Lock()


def log(*a):
    with LOCK:
        print("[recovery-interop]", *a, file=sys.stderr, flush=True)


Fail = qmp.Fail
check = qmp.check


def wait_state(q, want, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        st = q.cmd("query-migrate").get("status")
        if st in want:
            return st
        if st in ("failed", "cancelled") or time.monotonic() > deadline:
            raise Fail(f"source state {st}, waiting for {want}")
        time.sleep(0.05)


def read_err(path):
    return open(path, "rb").read().decode(errors="replace").strip()


def image_of(out, manifest, name):
    for b in manifest["blocks"]:
        if b["name"] == name:
            return open(os.path.join(out, b["file"]), "rb").read()
    raise Fail(f"no block {name} in manifest")


def run(name, sc, qmig, work):
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    img = capture.build_guest(GUEST, os.path.join(work, "guest.img"))
    serial = os.path.join(work, "src.serial")
    args = ["-M", "pc", "-m", str(RAM_MIB), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary(sc.get("qemu", "10")), args, work, "src")
    recv = relay = None
    errpath = os.path.join(work, "recv.stderr")
    try:
        capture.wait_guest(serial)
        port = qmp.free_port()
        save = os.path.join(out, "saved.stream")
        os.makedirs(out, exist_ok=True)
        timeout = 5 if sc.get("kill") else 60
        recv = subprocess.Popen(
            [qmig, "recv", "--listen", f"tcp:127.0.0.1:{port}", "-o", out, "--save", save,
             "--touch", "2", "--recover-timeout", str(timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(errpath, "wb"), start_new_session=True)
        deadline = time.monotonic() + 30
        while b"listening on" not in open(errpath, "rb").read():
            check(recv.poll() is None and time.monotonic() < deadline,
                  "qmig recv did not start: " + read_err(errpath))
            time.sleep(0.02)
        caps = {"postcopy-ram": True}
        if sc.get("preempt"):
            caps["postcopy-preempt"] = True
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        src.cmd("migrate-set-parameters", **PARAMS, **{"downtime-limit": 1})
        relay = MultiRelay(port, os.path.join(work, "conn")).start()
        uri = f"tcp:127.0.0.1:{relay.port}"
        t_start = time.monotonic()
        src.cmd("migrate", uri=uri)
        time.sleep(1.0)
        check(src.cmd("query-migrate").get("status") == "active", "not in precopy after 1 s")
        src.cmd("migrate-start-postcopy")
        wait_state(src, ("postcopy-active",))
        if sc.get("kill"):
            time.sleep(0.5)
            src.kill()
            t0 = time.monotonic()
            try:
                recv.wait(timeout + 30)
            except subprocess.TimeoutExpired:
                raise Fail(f"qmig recv still running {timeout + 30} s after the kill "
                           f"(--recover-timeout {timeout})")
            took = time.monotonic() - t0
            err = read_err(errpath)
            check(recv.returncode != 0, "qmig recv exited 0 after the source was killed")
            check("--recover-timeout" in err, f"error does not name --recover-timeout: {err}")
            m = json.load(open(os.path.join(out, "manifest.json")))
            check(not m["complete"] and m["error"], f"manifest must record the failure: {m}")
            pc = m["postcopy"]
            check(pc["touch_threads_unfinished"] == 0, "touch threads still blocked at exit")
            check(m["postcopy_state"] == "paused", f"state {m['postcopy_state']}")
            # Images are consistent: the saved stream applied up to applied_up_to gives
            # the same pc.ram (every page old or new content, none torn).
            saved = open(save, "rb").read()
            prefix = os.path.join(work, "prefix.stream")
            open(prefix, "wb").write(saved[:m["applied_up_to"]])
            ex = os.path.join(work, "prefix")
            subprocess.run([qmig, "extract", prefix, "-o", ex], stderr=subprocess.DEVNULL)
            mx = json.load(open(os.path.join(ex, "manifest.json")))
            check(mx["applied_up_to"] == m["applied_up_to"], "prefix replay stops elsewhere")
            check(image_of(ex, mx, "pc.ram") == image_of(out, m, "pc.ram"),
                  "pc.ram differs from the stream applied up to applied_up_to")
            return f"recv failed {took:.1f}s after the kill: {err.splitlines()[-1]}"
        for i, how in enumerate(sc["cuts"]):
            time.sleep(0.7)
            check(src.cmd("query-migrate").get("status") == "postcopy-active",
                  f"postcopy ended before cut {i + 1}")
            if how == "pause":
                src.cmd("migrate-pause")
            else:
                relay.cut()
            wait_state(src, ("postcopy-paused",), 30)
            check(relay.wait(30), "relay connections did not end after the cut")
            # qmig recv must notice and pause before the resume (it keeps listening).
            deadline = time.monotonic() + 10
            while read_err(errpath).count("postcopy paused") < i + 1:
                check(time.monotonic() < deadline and recv.poll() is None,
                      "qmig recv did not pause: " + read_err(errpath))
                time.sleep(0.05)
            src.cmd("migrate", uri=uri, resume=True)
            src.cmd("migrate-set-parameters",
                    **{"max-postcopy-bandwidth": PARAMS["max-postcopy-bandwidth"]})
            wait_state(src, ("postcopy-active", "completed"), 30)
        # The rest at full speed.
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 1 << 40})
        final = qmp.wait_migration(src.qmp, timeout=120)
        took = time.monotonic() - t_start
        try:
            recv.wait(60)
        except subprocess.TimeoutExpired:
            raise Fail("qmig recv did not exit after completed: " + read_err(errpath))
        err = read_err(errpath)
        check(recv.returncode == 0, f"qmig recv exited {recv.returncode}: {err}")
        m = json.load(open(os.path.join(out, "manifest.json")))
        check(m["complete"], f"manifest not complete: {m['error']}")
        pc = m["postcopy"]
        check(pc["mode"] == "userfaultfd", f"postcopy mode {pc['mode']}")
        check(pc["touch_threads_unfinished"] == 0, "touch threads unfinished")
        check(pc.get("pauses", 0) == len(sc["cuts"]),
              f"qmig reports {pc.get('pauses')} pauses for {len(sc['cuts'])} cuts")
        by = {c: pc[f"request_latency_{c}_us"]["count"] for c in ("main", "preempt")}
        check(by["main"] + by["preempt"] == pc["request_latency_us"]["count"],
              f"round trips by channel {by} do not add up to {pc['request_latency_us']}")
        if sc.get("preempt"):
            check(pc.get("preempt_records", 0) > 0 and by["preempt"] > 0,
                  f"no page came on the preempt channel: {pc}")
        else:
            check(by["preempt"] == 0, f"answers on a preempt channel without one: {by}")
        qmp.wait_status(src.qmp, "postmigrate")
        mem = open(qmp.pmemsave(src.qmp, 0, RAM_MIB * MiB, os.path.join(work, "src.mem")),
                   "rb").read()
        ram = image_of(out, m, "pc.ram")
        qmp.compare_ram(ram, mem, HOLE)
        # The capture set extracts to the same pc.ram.
        mains = [save] + sorted(glob.glob(save + ".main-*.bin"),
                                key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
        pre = sorted(glob.glob(save + ".preempt-*.bin"),
                     key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
        check(len(mains) == len(sc["cuts"]) + 1, f"{len(mains)} main connections saved")
        ex = os.path.join(work, "replay")
        cmd = [qmig, "extract", *mains]
        for p in pre:
            cmd += ["--preempt-channel", p]
        r = subprocess.run(cmd + ["-o", ex], capture_output=True, text=True)
        check(r.returncode == 0, f"extract of the capture set failed: {r.stderr.strip()}")
        mx = json.load(open(os.path.join(ex, "manifest.json")))
        check(image_of(ex, mx, "pc.ram") == ram, "the capture set extracts to another pc.ram")
        q = final.get("ram", {})
        lat = pc["request_latency_us"]
        return (f"completed in {took:.1f}s; {len(sc['cuts'])} cuts, {pc.get('pauses')} pauses; "
                f"ram.postcopy-requests {q.get('postcopy-requests')}, qmig requests "
                f"{pc['page_requests']} ({pc.get('requests_resent', 0)} re-sent); preempt "
                f"records {pc.get('preempt_records', 0)}; request p50 {lat['p50']} us p99 "
                f"{lat['p99']} us ({by['preempt']} answered on the preempt channel); capture set of {len(mains)} main + {len(pre)} preempt "
                f"connections extracts equal")
    finally:
        if recv and recv.poll() is None:
            recv.kill()
            recv.wait()
        src.kill()
        if relay:
            relay.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-j", type=int, default=1, help="scenarios run at once")
    ap.add_argument("--retries", type=int, default=1)
    a = ap.parse_args()
    if a.list:
        for n, sc in SCENARIOS.items():
            print(f"{n:22} {sc['about']}")
        return 0
    names = a.scenarios or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            sys.exit(f"unknown scenario {n}; use --list")
    qmig = qmp.qmig_binary("recovery_interop")
    root = tempfile.mkdtemp(prefix="qmig-recovery-interop.", dir="/tmp")
    failed = []

    def one(n):
        for attempt in range(a.retries + 1):
            t0 = time.monotonic()
            try:
                msg = run(n, SCENARIOS[n], qmig, os.path.join(root, f"{n}.{attempt}"))
                log(f"{n}: ok in {time.monotonic() - t0:.1f}s: {msg}")
                return
            except Exception as e:  # noqa: BLE001 (a KeyError must fail the scenario too)
                log(f"{n}: attempt {attempt + 1} failed: {type(e).__name__}: {e}")
        with LOCK:
            failed.append(n)

    try:
        pending = list(names)
        running = []
        while pending or running:
            running = [t for t in running if t.is_alive()]
            while pending and len(running) < max(1, a.j):
                t = threading.Thread(target=one, args=(pending.pop(0),))
                t.start()
                running.append(t)
            time.sleep(0.1)
    finally:
        if a.keep:
            log(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        log("FAILED: " + " ".join(failed))
        return 1
    log("all scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
