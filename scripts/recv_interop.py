#!/usr/bin/env python3
"""Live interop: a real QEMU source migrates over loopback TCP into `qmig recv`.

usage: recv_interop.py [--list] [--keep] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Each scenario boots the dirtying guest (scripts/guest) on a QEMU source, starts
`qmig recv --listen tcp:127.0.0.1:PORT -o DIR --save DIR/saved.stream`, migrates, and checks:
  * QEMU's query-migrate says `completed` and `qmig recv` exits 0 with a complete manifest;
  * the received pc.ram equals the stopped source's pmemsave outside the hole
    [0xA0000, 0x100000) (pc.ram offset X = guest physical X);
  * record counts equal QEMU's counters (QEMU 10: ram.normal, ram.duplicate,
    xbzrle-cache.pages), the return path was (or was not) used as configured;
  * the --save capture replays (`qmig extract`) to the same pc.ram.
Scenarios `q10-postcopy` and `q72-postcopy` (128 MiB guest, postcopy started after ~1 s, `recv --touch 2`)
checks instead that pc.ram equals the source's pmemsave after `completed`, and that the
source's ram.postcopy-requests is > 0 and equal to the page requests qmig reports;
`q10-postcopy-hugepage` does the same with the source's RAM in a hugetlbfs
memory-backend-file (share=on, 2 MiB pages; the script raises vm.nr_hugepages when it must):
qmig must ask for and place 2 MiB pages in hugetlbfs memory.
`q10-postcopy-killed` kills the source mid-postcopy (recv must fail cleanly, no hang).
Scenario `killed-source` kills the source mid-stream: recv must exit non-zero with the
error offset in manifest.json and images consistent with `applied_up_to`.
Exits non-zero with a message naming the failed scenarios.
"""

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402
import capture  # noqa: E402  (guest builder and progress helper)

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
MiB = 1 << 20
HOLE = (0xA0000, 0x100000)
RAM_MIB = 16

G_PLAIN = {"start": 0x100000, "size": 256 * 4096, "writes": 2}
G_XBZ = {"start": 0x100000, "size": 128 * 4096, "writes": 2, "delay": 0x1000}
# Postcopy: 96 MiB of the 128 MiB guest dirtied continuously, so precopy at 32 MiB/s is
# still running after 1 s and never converges by itself.
G_POSTCOPY = {"start": 0x100000, "size": 96 * MiB, "writes": 2, "delay": 0x1000}

# The hugetlbfs guest: 24 of its 32 MiB dirtied continuously.
G_POSTCOPY_HP = {"start": 0x100000, "size": 24 * MiB, "writes": 2, "delay": 0x1000}
HUGE_PAGE = 2 * MiB


def reserve_hugepages(n):
    """Make sure `n` more 2 MiB pages are free (as root: raises vm.nr_hugepages). Returns
    the previous vm.nr_hugepages when it was raised (to restore), else None."""
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    total = int(info["HugePages_Total"].split()[0])
    free = int(info["HugePages_Free"].split()[0])
    if free >= n:
        return None
    want = total + (n - free)
    try:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(want))
    except OSError as e:
        raise Fail(f"need {n} free 2 MiB pages, have {free}; could not raise "
                   f"vm.nr_hugepages to {want}: {e}")
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    free = int(info["HugePages_Free"].split()[0])
    check(free >= n, f"need {n} free 2 MiB pages, the kernel gave {free}")
    return total


SCENARIOS = {
    "q10-plain": dict(qemu="10", guest=G_PLAIN, min_syncs=4,
                      params={"max-bandwidth": 4_000_000},
                      about="QEMU 10, plain precopy over >= 4 dirty syncs, no return path"),
    "q10-xbzrle": dict(qemu="10", guest=G_XBZ, min_syncs=3, min_xbzrle=500,
                       caps={"xbzrle": True}, slow_after=(2, 8_000),
                       params={"max-bandwidth": 2_000_000, "xbzrle-cache-size": 4 * MiB},
                       about="QEMU 10, xbzrle, passes until >= 500 XBZRLE pages"),
    "q10-return-path": dict(qemu="10", guest=G_PLAIN, min_syncs=3,
                            caps={"return-path": True}, params={"max-bandwidth": 4_000_000},
                            about="QEMU 10, return-path capability (PING/PONG, SHUT)"),
    "q10-xbzrle-return-path": dict(qemu="10", guest=G_XBZ, min_syncs=3, min_xbzrle=200,
                                   caps={"xbzrle": True, "return-path": True},
                                   slow_after=(2, 8_000),
                                   params={"max-bandwidth": 2_000_000,
                                           "xbzrle-cache-size": 4 * MiB},
                                   about="QEMU 10, xbzrle + return-path"),
    # 7.2 with compress often converges on its own after the second sync (the compressed
    # pass is fast and 7.2 loses some TCG dirty tracking); accept that.
    "q72-compress": dict(qemu="7.2", guest=G_PLAIN, min_syncs=2, may_converge=True,
                         caps={"compress": True},
                         params={"max-bandwidth": 4_000_000, "compress-level": 1,
                                 "compress-threads": 2},
                         about="QEMU 7.2, compress capability (COMPRESS_PAGE records)"),
    "q10-postcopy": dict(qemu="10", guest=G_POSTCOPY, postcopy=True, ram_mib=128, touch=2,
                         caps={"postcopy-ram": True},
                         params={"max-bandwidth": 32 * MiB, "max-postcopy-bandwidth": 32 * MiB},
                         about="QEMU 10, -m 128, postcopy-ram, migrate-start-postcopy after ~1 s, "
                               "qmig recv --touch 2 demand-pages over userfaultfd"),
    "q10-postcopy-hugepage": dict(qemu="10", guest=G_POSTCOPY_HP, postcopy=True, ram_mib=32,
                                  touch=2, hugepage=True, caps={"postcopy-ram": True},
                                  params={"max-bandwidth": 8 * MiB,
                                          "max-postcopy-bandwidth": 8 * MiB},
                                  about="QEMU 10, -m 32 in a hugetlbfs memory-backend-file "
                                        "(share=on), postcopy: recv --touch 2 asks for and "
                                        "places 2 MiB pages in hugetlbfs memory"),
    "q10-postcopy-killed": dict(qemu="10", guest=G_POSTCOPY, postcopy=True, ram_mib=128, touch=2,
                                kill=True, caps={"postcopy-ram": True},
                                params={"max-bandwidth": 32 * MiB,
                                        "max-postcopy-bandwidth": 4 * MiB},
                                about="QEMU 10 source killed mid-postcopy: recv fails cleanly, "
                                      "no hang"),
    "q72-postcopy": dict(qemu="7.2", guest=G_POSTCOPY, postcopy=True, ram_mib=128, touch=2,
                         caps={"postcopy-ram": True},
                         params={"max-bandwidth": 32 * MiB, "max-postcopy-bandwidth": 32 * MiB},
                         about="QEMU 7.2, -m 128, postcopy-ram, migrate-start-postcopy after ~1 s, "
                               "qmig recv --touch 2 demand-pages over userfaultfd"),
    "killed-source": dict(qemu="10", guest=G_PLAIN, kill=True,
                          params={"max-bandwidth": 1_000_000},
                          about="QEMU 10 source killed mid-stream: recv fails cleanly"),
}


def log(*a):
    print("[recv-interop]", *a, file=sys.stderr, flush=True)


Fail = qmp.Fail
check = qmp.check


def start_recv(qmig, out, work, extra=()):
    port = qmp.free_port()
    errlog = open(os.path.join(work, "recv.stderr"), "w+b")
    p = subprocess.Popen([qmig, "recv", "--listen", f"tcp:127.0.0.1:{port}", "-o", out,
                          "--save", os.path.join(out, "saved.stream"), *extra],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog,
                         start_new_session=True)
    p.errlog = errlog
    deadline = time.monotonic() + 30
    while b"listening on" not in open(errlog.name, "rb").read():
        if p.poll() is not None or time.monotonic() > deadline:
            raise Fail("qmig recv did not start listening: " + read_err(p))
        time.sleep(0.02)
    return p, port


def read_err(p):
    return open(p.errlog.name, "rb").read().decode(errors="replace").strip()


def wait_recv(p, timeout=60):
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise Fail(f"qmig recv did not exit within {timeout}s: " + read_err(p))
    return p.returncode


def image_of(out, manifest, name):
    for b in manifest["blocks"]:
        if b["name"] == name:
            return open(os.path.join(out, b["file"]), "rb").read()
    raise Fail(f"no block {name} in manifest")


def run_scenario(name, sc, qmig, work):
    if sc.get("postcopy"):
        return run_postcopy(name, sc, qmig, work)
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    img = capture.build_guest(sc["guest"], os.path.join(work, "guest.img"))
    serial = os.path.join(work, "src.serial")
    args = ["-M", "pc", "-m", str(RAM_MIB), "-nodefaults", "-display", "none",
            "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary(sc["qemu"]), args, work, "src")
    recv = None
    try:
        capture.wait_guest(serial)
        recv, port = start_recv(qmig, out, work)
        caps = sc.get("caps", {})
        if caps:
            src.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        src.cmd("migrate-set-parameters", **sc.get("params", {}))
        src.cmd("migrate-set-parameters", **{"downtime-limit": 1})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        if sc.get("kill"):
            return killed(src, recv, out, qmig, work)
        try:
            capture.wait_progress(src, sc)
        except qmp.QMPError as e:
            if not (sc.get("may_converge") and "completed before targets" in str(e)):
                raise
        src.cmd("stop")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 2000})
        final = qmp.wait_migration(src.qmp, timeout=180)
        rc = wait_recv(recv)
        err = read_err(recv)
        check(rc == 0, f"qmig recv exited {rc}: {err}")
        m = json.load(open(os.path.join(out, "manifest.json")))
        check(m["complete"], f"manifest not complete: {m['error']}")
        mem = open(qmp.pmemsave(src.qmp, 0, RAM_MIB * MiB, os.path.join(work, "src.mem")), "rb").read()
        ram = image_of(out, m, "pc.ram")
        qmp.compare_ram(ram, mem, HOLE)
        r, q = m["records"], final.get("ram", {})
        syncs = q.get("dirty-sync-count", 0)
        check(syncs >= sc.get("min_syncs", 0), f"only {syncs} dirty syncs")
        check(m["return_path"] == bool(caps.get("return-path")),
              f"return path used: {m['return_path']}, configured: {caps.get('return-path')}")
        if sc["qemu"] == "10":
            check(r["page"] == q["normal"], f"PAGE records {r['page']} != ram.normal {q['normal']}")
            check(r["zero"] == q["duplicate"],
                  f"ZERO records {r['zero']} != ram.duplicate {q['duplicate']}")
            if caps.get("xbzrle"):
                xp = final["xbzrle-cache"]["pages"]
                check(r["xbzrle"] == xp and xp >= sc.get("min_xbzrle", 1),
                      f"XBZRLE records {r['xbzrle']}, xbzrle-cache.pages {xp}")
        if caps.get("compress"):
            check(r["compressed"] > 0, "no COMPRESS_PAGE records received")
        check(m["vmdesc"] == "vmdesc.json" and m["device_state"]["bytes"] > 0,
              "device state / vmdesc not kept")
        json.loads(open(os.path.join(out, "vmdesc.json")).read())
        # The --save capture replays to the same memory.
        ex = os.path.join(work, "replay")
        subprocess.run([qmig, "extract", os.path.join(out, "saved.stream"), "-o", ex],
                       check=True, stderr=subprocess.DEVNULL)
        mx = json.load(open(os.path.join(ex, "manifest.json")))
        check(image_of(ex, mx, "pc.ram") == ram, "replay of the --save capture differs")
        check(m["bytes_received"] == os.path.getsize(os.path.join(out, "saved.stream")),
              "--save capture size differs from the bytes received")
        return (f"completed after {syncs} syncs; {m['bytes_received']} bytes; records {r}; "
                f"return path {m['return_path']}")
    finally:
        if recv and recv.poll() is None:
            recv.kill()
            recv.wait()
        src.kill()


def run_postcopy(name, sc, qmig, work):
    """A QEMU source switches to postcopy after ~1 s; `qmig recv --touch N` registers the
    RAM with userfaultfd at LISTEN and asks for every page its touch threads fault on."""
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    ram_mib = sc["ram_mib"]
    img = capture.build_guest(sc["guest"], os.path.join(work, "guest.img"))
    serial = os.path.join(work, "src.serial")
    machine = ["-M", "pc", "-m", str(ram_mib)]
    restore_hugepages = None
    if sc.get("hugepage"):
        # The source's RAM and qmig's copy of it, both in 2 MiB pages.
        restore_hugepages = reserve_hugepages(2 * ram_mib * MiB // HUGE_PAGE)
        machine = ["-M", "pc,memory-backend=hp", "-m", str(ram_mib), "-object",
                   f"memory-backend-file,id=hp,size={ram_mib}M,mem-path=/dev/hugepages,"
                   "share=on"]
    args = machine + ["-nodefaults", "-display", "none",
                      "-drive", f"file={img},format=raw,if=ide", "-serial", f"file:{serial}"]
    src = qmp.Qemu(qmp.qemu_binary(sc["qemu"]), args, work, "src")
    recv = None
    try:
        capture.wait_guest(serial)
        # A killed source pauses the migration (postcopy recovery): keep the wait short.
        extra = ["--recover-timeout", "5"] if sc.get("kill") else []
        recv, port = start_recv(qmig, out, work, ["--touch", str(sc["touch"]), *extra])
        t_migrate = time.monotonic()
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in sc["caps"].items()])
        src.cmd("migrate-set-parameters", **sc["params"])
        # Precopy must not converge on its own: postcopy is started by hand.
        src.cmd("migrate-set-parameters", **{"downtime-limit": 1})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(1.0)
        st = src.cmd("query-migrate")
        check(st.get("status") == "active", f"not in precopy after 1 s: {st.get('status')}")
        src.cmd("migrate-start-postcopy")
        if sc.get("kill"):
            qmp.wait_migration(src.qmp, timeout=60, done=("postcopy-active",))
            time.sleep(0.5)
            src.kill()
            t0 = time.monotonic()
            rc = wait_recv(recv, timeout=90)
            took = time.monotonic() - t0
            err = read_err(recv)
            check(rc != 0, "qmig recv exited 0 after the source was killed mid-postcopy")
            m = json.load(open(os.path.join(out, "manifest.json")))
            check(not m["complete"] and m["error"], f"manifest must record the failure: {m}")
            pc = m["postcopy"]
            check(pc["mode"] == "userfaultfd", f"postcopy mode {pc['mode']}")
            check(pc["touch_threads_unfinished"] == 0, "touch threads still blocked at exit")
            # Images are consistent: the offline replay of the saved prefix up to
            # applied_up_to gives the same pc.ram (every page old or new, none torn).
            saved = open(os.path.join(out, "saved.stream"), "rb").read()
            prefix = os.path.join(work, "prefix.stream")
            open(prefix, "wb").write(saved[:m["applied_up_to"]])
            ex = os.path.join(work, "prefix")
            subprocess.run([qmig, "extract", prefix, "-o", ex], stderr=subprocess.DEVNULL)
            mx = json.load(open(os.path.join(ex, "manifest.json")))
            check(mx["applied_up_to"] == m["applied_up_to"], "prefix replay stops elsewhere")
            check(image_of(ex, mx, "pc.ram") == image_of(out, m, "pc.ram"),
                  "pc.ram differs from the stream applied up to applied_up_to")
            return (f"recv failed cleanly {took:.1f}s after the kill ({pc['page_requests']} "
                    f"requests sent): {err.splitlines()[-1]}")
        final = qmp.wait_migration(src.qmp, timeout=180)
        took = time.monotonic() - t_migrate
        rc = wait_recv(recv)
        err = read_err(recv)
        check(rc == 0, f"qmig recv exited {rc}: {err}")
        m = json.load(open(os.path.join(out, "manifest.json")))
        check(m["complete"], f"manifest not complete: {m['error']}")
        check(m["postcopy_state"] == "end", f"postcopy state {m['postcopy_state']}")
        pc = m["postcopy"]
        check(pc["mode"] == "userfaultfd", f"postcopy mode {pc['mode']}")
        q = final.get("ram", {})
        reqs = q.get("postcopy-requests")
        check(reqs is not None and reqs > 0, f"source's ram.postcopy-requests is {reqs}")
        check(reqs == pc["page_requests"],
              f"source counted {reqs} page requests, qmig sent {pc['page_requests']}")
        check(pc["touched_pages"] > 0 and pc["touch_threads_unfinished"] == 0,
              f"touch threads: {pc['touched_pages']} pages, "
              f"{pc['touch_threads_unfinished']} unfinished")
        qmp.wait_status(src.qmp, "postmigrate")
        mem = open(qmp.pmemsave(src.qmp, 0, ram_mib * MiB, os.path.join(work, "src.mem")),
                   "rb").read()
        # The RAM block: pc.ram, or the memory backend's block.
        ram = next(b["name"] for b in m["blocks"] if b["length"] == ram_mib * MiB)
        qmp.compare_ram(image_of(out, m, ram), mem, HOLE)
        lat = pc["fault_latency_us"]
        extra = ""
        if sc.get("hugepage"):
            bk = next((b for b in pc["backing"] if b["block"] == ram), None)
            check(bk is not None and bk["host_page_size"] == HUGE_PAGE
                  and bk["backing"] == "hugetlbfs",
                  f"block {ram} was not demand-paged in 2 MiB hugetlbfs pages: {bk}")
            extra = f"block {ram} in hugetlbfs, 2 MiB requests; "
        check(took < 120, f"migration took {took:.0f}s")
        return (f"completed in {took:.1f}s; {extra}"
                f"ram.postcopy-requests {reqs} = qmig page_requests; faults "
                f"{pc['faults']}, latency p50 {lat['p50']} us p99 {lat['p99']} us "
                f"(n={lat['count']}); blocktime {pc['blocktime_us']} us (all vCPUs), "
                f"{pc['blocktime_total_us']} us summed; touched {pc['touched_pages']} pages; "
                f"{m['bytes_received']} bytes; records {m['records']}")
    finally:
        if recv and recv.poll() is None:
            recv.kill()
            recv.wait()
        src.kill()
        if restore_hugepages is not None:
            try:
                with open("/proc/sys/vm/nr_hugepages", "w") as f:
                    f.write(str(restore_hugepages))
            except OSError:
                pass


def killed(src, recv, out, qmig, work):
    deadline = time.monotonic() + 60
    while os.path.getsize(os.path.join(out, "saved.stream")) < 256 * 1024 \
            if os.path.exists(os.path.join(out, "saved.stream")) else True:
        check(time.monotonic() < deadline, "source sent too little before the kill")
        time.sleep(0.05)
    src.kill()
    rc = wait_recv(recv)
    err = read_err(recv)
    check(rc != 0, "qmig recv exited 0 after the source was killed")
    m = json.load(open(os.path.join(out, "manifest.json")))
    check(not m["complete"] and m["error_offset"] is not None,
          f"manifest must record the failure: {m['error']}")
    check(f"offset {m['error_offset']}" in err, f"error message lacks the offset: {err}")
    # Images are consistent: replaying the saved prefix up to applied_up_to gives them.
    saved = open(os.path.join(out, "saved.stream"), "rb").read()
    prefix = os.path.join(work, "prefix.stream")
    open(prefix, "wb").write(saved[:m["applied_up_to"]])
    ex = os.path.join(work, "prefix")
    subprocess.run([qmig, "extract", prefix, "-o", ex], stderr=subprocess.DEVNULL)
    mx = json.load(open(os.path.join(ex, "manifest.json")))
    check(mx["applied_up_to"] == m["applied_up_to"], "prefix replay stops elsewhere")
    check(image_of(ex, mx, "pc.ram") == image_of(out, m, "pc.ram"),
          "images differ from the stream applied up to applied_up_to")
    return f"recv failed cleanly: {err.splitlines()[-1]}"


def qemu_missing(_name, sc):
    """Why scenario `sc` cannot run here (its QEMU is not installed), or None."""
    if sc["qemu"] == "7.2" and not os.path.exists(qmp.QEMU72) and not shutil.which(qmp.QEMU72):
        return "QEMU 7.2 not installed (scripts/install-qemu.sh)"
    return None


def main():
    return qmp.run_scenarios("recv_interop", SCENARIOS, run_scenario, retries=1,
                             skip=qemu_missing)


if __name__ == "__main__":
    sys.exit(main())
