#!/usr/bin/env python3
"""Live interop: `qmig send --postcopy` recovery and postcopy-preempt into QEMU 10.

usage: send_recover_interop.py [--list] [--keep] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Same shape as send_interop.py: the committed capture tests/data/q10-stopped is the
template, its RAM (`qmig extract`) is sent, the QEMU 10 destination is started with the
capture's machine options, `-S -incoming defer`, postcopy-ram (and postcopy-preempt).
qmig sends through scripts/relay.py's MultiRelay, which the scenario can cut (both
directions shut down, as a noticed network failure), rate-limited (`--max-bandwidth`)
so that postcopy lasts a few seconds.

  q10-recover          cut twice after POSTCOPY_RUN: the destination goes postcopy-paused,
                       `migrate-recover` on a new port, qmig reconnects (through the relay,
                       its `--to`) and resumes; completed, pmemsave equal to the RAM sent.
  q10-preempt          --postcopy-preempt, no cut; a pmemsave during postcopy makes the
                       destination request pages, served on the preempt channel; equal.
  q10-preempt-recover  --postcopy-preempt and one cut: recovers (new main and preempt
                       connections); equal.
  q10-killed           the destination is killed in postcopy: qmig send exits non-zero with
                       a clear error within --recover-timeout (3 s) plus a margin.
  qmig-recover         qmig to qmig: `qmig send --postcopy` -> relay -> `qmig recv --touch 2`,
                       two cuts after POSTCOPY_RUN (recv keeps listening, send reconnects
                       through the relay); both exit 0, recv's pc.ram equals the RAM sent.
  qmig-preempt-recover qmig to qmig with --postcopy-preempt and one cut; the same checks.

Each scenario uses its own ports and directory, takes well under a minute, and can run in
parallel with the others. Exits non-zero naming the failed scenarios.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
from relay import MultiRelay  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
DATA = os.path.join(REPO, "tests", "data")
HOLE = (0xA0000, 0x100000)
CAPTURE = "q10-stopped"

SCENARIOS = {
    "q10-recover": dict(preempt=False, cuts=2,
                        about="QEMU 10 destination (-S): two relay cuts after RUN, "
                              "migrate-recover, qmig reconnects and resumes"),
    "q10-preempt": dict(preempt=True, cuts=0,
                        about="QEMU 10 destination (-S, postcopy-preempt): requested pages on "
                              "the preempt channel"),
    "q10-preempt-recover": dict(preempt=True, cuts=1,
                                about="QEMU 10 destination (-S, postcopy-preempt): a relay cut "
                                      "after RUN recovers"),
    "q10-killed": dict(preempt=False, cuts=0, kill=True,
                       about="QEMU 10 destination killed in postcopy: qmig send fails "
                             "clearly within --recover-timeout"),
    "qmig-recover": dict(preempt=False, cuts=2, qmig_dst=True,
                         about="qmig send --postcopy -> qmig recv --touch 2: two relay cuts "
                               "after RUN, both recover, equal"),
    "qmig-preempt-recover": dict(preempt=True, cuts=1, qmig_dst=True,
                                 about="qmig send --postcopy --postcopy-preempt -> qmig recv "
                                       "--touch 2: one relay cut after RUN, equal"),
}

# PING(4), which qmig send writes right after the package holding POSTCOPY_RUN.
PING_AFTER_PACKAGE = bytes([0x08, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x04])
POSTCOPY_RESUME = bytes([0x08, 0x00, 0x09, 0x00, 0x00])



def stream_path(work):
    d = os.path.join(DATA, CAPTURE)
    plain = os.path.join(d, "stream")
    if os.path.exists(plain):
        return plain
    out = os.path.join(work, CAPTURE + ".stream")
    with gzip.open(plain + ".gz", "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def check_same_ram(final, got):
    man = json.load(open(os.path.join(final, "manifest.json")))
    blk = next(b for b in man["blocks"] if b["name"] == "pc.ram")
    want = open(os.path.join(final, blk["file"]), "rb").read()
    bad = []
    for off in range(0, min(len(got), len(want)), 4096):
        if HOLE[0] <= off < HOLE[1]:
            continue
        if got[off:off + 4096] != want[off:off + 4096]:
            bad.append(off)
    if bad:
        raise RuntimeError(f"{len(bad)} pages of pc.ram differ, first at {bad[0]:#x}")


def wait_status(q, want, timeout):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = q.execute("query-migrate").get("status")
        if st in want:
            return st
        if st == "failed":
            break
        time.sleep(0.02)
    raise RuntimeError(f"destination migration status {st}, wanted {want}")


def read_err(path):
    try:
        return open(path, "rb").read().decode(errors="replace").strip()
    except OSError:
        return ""


def run_qmig_dst(name, sc, work, qmig):
    """qmig send -> relay -> qmig recv, with cuts after POSTCOPY_RUN. Bounded: every
    wait has a deadline and the whole scenario is cut off at 30 s."""
    t_end = time.monotonic() + 30

    def left():
        r = t_end - time.monotonic()
        if r <= 0:
            raise RuntimeError("scenario took over 30 s")
        return r

    template = stream_path(work)
    ramdir = os.path.join(work, "ram")
    final = os.path.join(work, "final")
    out = os.path.join(work, "out")
    subprocess.run([qmig, "extract", template, "-o", ramdir], check=True,
                   stdout=subprocess.DEVNULL)
    rport = qmp.free_port()
    errpath = os.path.join(work, "recv.stderr")
    recv = send = relay = None
    try:
        recv = subprocess.Popen(
            [qmig, "recv", "--listen", f"tcp:127.0.0.1:{rport}", "-o", out, "--touch", "2",
             "--recover-timeout", "20", "--idle-timeout", "20"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(errpath, "wb"), start_new_session=True)
        while "listening on" not in read_err(errpath):
            if recv.poll() is not None:
                raise RuntimeError("qmig recv did not start: " + read_err(errpath))
            left()
            time.sleep(0.02)
        relay = MultiRelay(rport, os.path.join(work, "conn")).start()
        argv = [qmig, "send", "--ram", ramdir, "--template", template,
                "--to", f"tcp:127.0.0.1:{relay.port}", "--final-ram", final, "--json",
                "--idle-timeout", "20", "--postcopy", "--postcopy-after", "0",
                "--max-bandwidth", "250000", "--recover-timeout", "20"]
        if sc["preempt"]:
            argv.append("--postcopy-preempt")
        # Cut 1: 2001 bytes after PING(4), which follows the package holding
        # POSTCOPY_RUN (so the cut pauses, not fails); cut 2: 101 bytes after the
        # recovery's POSTCOPY_RESUME (inside the first record sent again). The
        # relay cuts as the bytes pass: qmig to qmig finishes in well under a
        # second, too fast to cut from here.
        plan = [(PING_AFTER_PACKAGE, 2001), (POSTCOPY_RESUME, 101)]
        for pat, n in plan[:sc["cuts"]]:
            relay.cut_after_pattern(pat, n)
        t0 = time.monotonic()
        send = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            sout, serr = send.communicate(timeout=left())
        except subprocess.TimeoutExpired:
            raise RuntimeError("qmig send did not finish within 30 s")
        took = time.monotonic() - t0
        if send.returncode != 0:
            raise RuntimeError(f"qmig send exited {send.returncode}: {serr.strip()} "
                               f"{sout.strip()}\nrecv: {read_err(errpath)}")
        try:
            recv.wait(timeout=left())
        except subprocess.TimeoutExpired:
            raise RuntimeError("qmig recv did not exit: " + read_err(errpath))
        if recv.returncode != 0:
            raise RuntimeError(f"qmig recv exited {recv.returncode}: {read_err(errpath)}")
        stats = json.loads(sout)
        pc = stats["postcopy"]
        if pc["recoveries"] != sc["cuts"]:
            raise RuntimeError(f"qmig send: {pc['recoveries']} recoveries, {sc['cuts']} cuts")
        m = json.load(open(os.path.join(out, "manifest.json")))
        if not m["complete"]:
            raise RuntimeError(f"recv manifest not complete: {m.get('error')}")
        rpc = m["postcopy"]
        if rpc.get("pauses", 0) != sc["cuts"]:
            raise RuntimeError(f"qmig recv: {rpc.get('pauses')} pauses, {sc['cuts']} cuts")
        if rpc.get("touch_threads_unfinished", 0) != 0:
            raise RuntimeError("qmig recv: touch threads unfinished")
        blk = next(b for b in m["blocks"] if b["name"] == "pc.ram")
        check_same_ram(final, open(os.path.join(out, blk["file"]), "rb").read())
        print(f"  ok: {stats['bytes']} bytes in {took:.2f}s; {pc['recoveries']} recoveries, "
              f"{pc['requests']} requests, {pc['preempt_pages']} pages on the preempt "
              f"channel; recv {rpc.get('pauses')} pauses, "
              f"{rpc.get('preempt_records', 0)} preempt records; {len(relay.conns)} relay "
              f"connections; recv's pc.ram equals the RAM sent")
    finally:
        for p in (send, recv):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if relay is not None:
            relay.cut()
            relay.close()


def run(name, sc, work, qmig):
    if sc.get("qmig_dst"):
        return run_qmig_dst(name, sc, work, qmig)
    oracle = json.load(open(os.path.join(DATA, CAPTURE, "oracle.json")))
    size = oracle["ram_size"]
    template = stream_path(work)
    ramdir = os.path.join(work, "ram")
    final = os.path.join(work, "final")
    subprocess.run([qmig, "extract", template, "-o", ramdir], check=True,
                   stdout=subprocess.DEVNULL)
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    args = oracle["machine_args"] + ["-drive", f"file={disk},format=raw,if=ide",
                                     "-serial", "null", "-S", "-incoming", "defer"]
    dst = qmp.Qemu(qmp.qemu_binary("10"), args, work, "dst")
    relay = None
    send = None
    try:
        caps = {"postcopy-ram": True}
        if sc["preempt"]:
            caps["postcopy-preempt"] = True
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        dport = qmp.free_port()
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{dport}")
        relay = MultiRelay(dport, os.path.join(work, "conn")).start()
        recover_timeout = "3" if sc.get("kill") else "30"
        argv = [qmig, "send", "--ram", ramdir, "--template", template,
                "--to", f"tcp:127.0.0.1:{relay.port}", "--final-ram", final, "--json",
                "--idle-timeout", "20", "--postcopy", "--postcopy-after", "0",
                "--max-bandwidth", "250000", "--recover-timeout", recover_timeout]
        if sc["preempt"]:
            argv.append("--postcopy-preempt")
        t0 = time.monotonic()
        send = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_status(dst.qmp, ("postcopy-active",), 30)
        notes = []
        if sc.get("kill"):
            time.sleep(0.3)
            dst.kill()
            t_kill = time.monotonic()
            try:
                out, err = send.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                raise RuntimeError("qmig send still running 20 s after the destination died")
            took = time.monotonic() - t_kill
            if send.returncode == 0:
                raise RuntimeError("qmig send exited 0 although the destination was killed")
            # With --json the error is the JSON on stdout.
            text = (out.strip() + "\n" + err.strip()).strip()
            msg = text.splitlines()[-1] if text else ""
            if "recover" not in msg:
                raise RuntimeError(f"unclear error (exit {send.returncode}): {text}")
            print(f"  ok: qmig send exited {send.returncode} {took:.2f}s after the kill: {msg}")
            return
        pmem = {}
        if sc["preempt"] and sc["cuts"] == 0:
            # The destination's own thread faults on pages not there yet.
            pmem["during"] = qmp.pmemsave(dst.qmp, 0, size, os.path.join(work, "during.pmem"))
        for i in range(sc["cuts"]):
            time.sleep(0.5)
            st = dst.cmd("query-migrate")["status"]
            if st != "postcopy-active":
                raise RuntimeError(f"postcopy ended before cut {i + 1}: {st}")
            # New connections go to a port nothing listens on until migrate-recover
            # (QEMU keeps its -incoming listener, which would take them at once).
            rport = qmp.free_port()
            relay.target = rport
            # Cut once 30011 more bytes (an odd count: inside a record) of the main
            # connection went through (with preempt, the newest is the preempt one).
            with relay.lock:
                c = relay.conns[-2 if sc["preempt"] else -1]
                c["limit"] = c["bytes"]["src"] + 30011
            wait_status(dst.qmp, ("postcopy-paused",), 20)
            dst.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{rport}")
            wait_status(dst.qmp, ("postcopy-active", "completed"), 30)
            notes.append(f"cut {i + 1} recovered")
        out, err = send.communicate(timeout=60)
        took = time.monotonic() - t0
        if send.returncode != 0:
            raise RuntimeError(f"qmig send exited {send.returncode}: {err.strip()}\n"
                               f"destination log: {dst.read_log()}")
        stats = json.loads(out)
        mig = qmp.wait_migration(dst.qmp, timeout=30)
        dump = qmp.pmemsave(dst.qmp, 0, size, os.path.join(work, "dst.pmem"))
        check_same_ram(final, open(dump, "rb").read())
        if "during" in pmem:
            check_same_ram(final, open(pmem["during"], "rb").read())
        pc = stats["postcopy"]
        if pc["recoveries"] != sc["cuts"]:
            raise RuntimeError(f"{pc['recoveries']} recoveries, {sc['cuts']} cuts")
        if sc["preempt"] and sc["cuts"] == 0 and pc["preempt_pages"] == 0:
            raise RuntimeError("no page went on the preempt channel")
        print(f"  ok: {stats['bytes']} bytes in {took:.2f}s, dst {mig['status']}; "
              f"{'; '.join(notes) or 'no cut'}; {pc['recoveries']} recoveries, "
              f"{pc['requests']} requests, {pc['preempt_pages']} pages on the preempt "
              f"channel, {len(relay.conns)} relay connections; memory equals the RAM sent")
    finally:
        if send is not None and send.poll() is None:
            send.kill()
            send.wait()
        if send is not None and os.environ.get("QMIG_DEBUG"):
            print(send.stderr.read() if not send.stderr.closed else "", file=sys.stderr)
        if relay is not None:
            relay.cut()
            relay.close()
        dst.quit()


def main():
    return qmp.run_scenarios("send_recover_interop", SCENARIOS,
                             lambda n, sc, qmig, work: run(n, sc, work, qmig))


if __name__ == "__main__":
    sys.exit(main())
