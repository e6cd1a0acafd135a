#!/usr/bin/env python3
"""Live interop: `qmig send` migrates RAM into a real QEMU destination.

usage: send_interop.py [--list] [--keep] [SCENARIO...]     (default: all)
env:   QMIG   path of the qmig binary (default target/release/qmig, then target/debug/qmig)

Each scenario takes a committed capture (tests/data/NAME) as template, extracts its RAM
with `qmig extract`, starts a QEMU destination with the capture's machine options
(oracle.json `machine_args`, plus the IDE disk and serial port the capture's source
had) and `-S -incoming defer`, sets the capabilities the stream
needs, `migrate-incoming tcp:127.0.0.1:PORT`, and runs
`qmig send --ram DIR --template STREAM --to tcp:127.0.0.1:PORT --final-ram FINAL ...`.
It checks:
  * qmig send exits 0, and the destination's query-migrate says `completed`;
  * the destination's pmemsave of [0, ram_size) equals FINAL's pc.ram (the memory as
    qmig last sent it, after its workload) outside the hole [0xA0000, 0x100000);
  * the record kinds the scenario is about were really sent (XBZRLE pages, compressed
    pages, several dirty syncs), from `qmig send --json`.
Postcopy scenarios (`--postcopy`) check instead: a pmemsave on a QEMU 10 destination while
it is postcopy-active completes (its own thread faults, qmig serves the requests), memory
equals the RAM sent after `completed`; a destination running the guest keeps running; and
`qmig send --postcopy` into `qmig recv --touch 4` gives equal images and equal request counts.
Exits non-zero naming the failed scenarios.
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

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
DATA = os.path.join(REPO, "tests", "data")
HOLE = (0xA0000, 0x100000)

SCENARIOS = {
    "q10-plain": dict(qemu="10", capture="q10-stopped", args=[],
                      about="QEMU 10 destination, one pass (stopped-VM replay)"),
    "q10-passes": dict(qemu="10", capture="q10-stopped",
                       args=["--passes", "3", "--dirty-fraction", "0.2", "--seed", "7"],
                       min_syncs=3,
                       about="QEMU 10 destination, 3 passes with a dirtying workload"),
    "q10-passes-xbzrle": dict(qemu="10", capture="q10-stopped", caps={"xbzrle": True},
                              args=["--passes", "5", "--dirty-fraction", "0.2", "--seed", "9",
                                    "--xbzrle", "--cache-size", str(4 << 20)],
                              min_syncs=5, min_xbzrle=40,
                              about="QEMU 10 destination, 5 passes, XBZRLE"),
    "q10-bandwidth": dict(qemu="10", capture="q10-stopped",
                          args=["--passes", "4", "--max-bandwidth", "8000000"],
                          min_syncs=4,
                          about="QEMU 10 destination, rate-limited PART sections"),
    "q10-postcopy-paused": dict(qemu="10", capture="q10-stopped", postcopy=True,
                                caps={"postcopy-ram": True},
                                args=["--postcopy", "--postcopy-after", "0",
                                      "--max-bandwidth", "256K"],
                                about="QEMU 10 destination (-S), postcopy right after setup: "
                                      "pmemsave during postcopy is demand-paged"),
    "q10-postcopy-running": dict(qemu="10", capture="q10-postcopy", postcopy=True, running=True,
                                 caps={"postcopy-ram": True},
                                 args=["--postcopy", "--postcopy-after", "1",
                                       "--dirty-fraction", "0.1", "--max-bandwidth", "512K"],
                                 about="QEMU 10 destination running the guest, postcopy "
                                       "template, switchover after one precopy pass"),
    "q10-postcopy-hugepage": dict(qemu="10", capture="q10-hugepage-postcopy", postcopy=True,
                                  hugepage=True, caps={"postcopy-ram": True},
                                  args=["--postcopy", "--postcopy-after", "0",
                                        "--max-bandwidth", "256K"],
                                  about="QEMU 10 destination (-S) with a hugetlbfs block (2 MiB "
                                        "host pages, -m 8 in two NUMA nodes), postcopy right "
                                        "after setup: requests and placements of 2 MiB"),
    "qmig-postcopy-touch": dict(qemu=None, capture="q10-stopped", postcopy=True, to_qmig=True,
                                args=["--postcopy", "--postcopy-after", "0",
                                      "--max-bandwidth", "1M"],
                                about="qmig recv --touch 4 destination, postcopy"),
    # qmig send --multifd N -> QEMU 10 destination with the same capabilities/parameters.
    "q10-multifd4-none": dict(qemu="10", capture_set="q10-none", caps={"multifd": True},
                              params={"multifd-channels": 4, "multifd-compression": "none"},
                              args=["--multifd", "4", "--passes", "3", "--dirty-fraction", "0.2"],
                              min_syncs=3, min_packets=100,
                              about="QEMU 10 destination, 4 multifd channels, no compression, "
                                    "3 passes"),
    "q10-multifd4-zlib": dict(qemu="10", capture_set="q10-none", caps={"multifd": True},
                              params={"multifd-channels": 4, "multifd-compression": "zlib"},
                              args=["--multifd", "4", "--multifd-compression", "zlib",
                                    "--passes", "2", "--dirty-fraction", "0.1"],
                              min_syncs=2, min_packets=100,
                              about="QEMU 10 destination, 4 multifd channels, zlib"),
    "q10-multifd4-zstd": dict(qemu="10", capture_set="q10-none", caps={"multifd": True},
                              params={"multifd-channels": 4, "multifd-compression": "zstd"},
                              args=["--multifd", "4", "--multifd-compression", "zstd",
                                    "--passes", "2", "--dirty-fraction", "0.1"],
                              min_syncs=2, min_packets=100,
                              about="QEMU 10 destination, 4 multifd channels, zstd"),
    "q10-multifd2-legacy-rp": dict(qemu="10", capture_set="q10-zstd",
                                   caps={"multifd": True, "return-path": True},
                                   params={"multifd-channels": 2, "multifd-compression": "zstd",
                                           "zero-page-detection": "legacy"},
                                   args=["--multifd", "2", "--multifd-compression", "zstd",
                                         "--zero-page-detection", "legacy", "--passes", "2"],
                                   min_syncs=2, min_packets=5,
                                   about="QEMU 10 destination, 2 multifd channels, zstd, "
                                         "zero-page-detection legacy, return-path on"),
    "q10-multifd2-zpd-none": dict(qemu="10", capture_set="q10-zlib", caps={"multifd": True},
                                  params={"multifd-channels": 2,
                                          "zero-page-detection": "none"},
                                  args=["--multifd", "2", "--zero-page-detection", "none"],
                                  min_packets=100,
                                  about="QEMU 10 destination, 2 multifd channels, "
                                        "zero-page-detection none"),
    "q10-multifd2-q72-machine": dict(qemu="10", capture="q72-plain", machine="pc-i440fx-7.2",
                                     caps={"multifd": True},
                                     params={"multifd-channels": 2, "multifd-compression": "zlib"},
                                     args=["--multifd", "2", "--multifd-compression", "zlib",
                                           "--passes", "2"],
                                     min_syncs=2, min_packets=3,
                                     about="QEMU 10 destination -M pc-i440fx-7.2 (a QEMU 7.2 "
                                           "template): multifd-flush-after-each-section, each "
                                           "RAM EOS pairs with the channels' SYNC"),
    "q72-compress6": dict(qemu="7.2", capture="q72-compress6", caps={"compress": True},
                          args=["--compress", "6"], min_compressed=50,
                          about="QEMU 7.2 destination, COMPRESS_PAGE at level 6"),
}


def stream_path(capture, work):
    d = os.path.join(DATA, capture)
    plain = os.path.join(d, "stream")
    if os.path.exists(plain):
        return plain
    out = os.path.join(work, capture + ".stream")
    with gzip.open(plain + ".gz", "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def differing_pages(a, b, skip):
    out = []
    for off in range(0, min(len(a), len(b)), 4096):
        if skip[0] <= off < skip[1]:
            continue
        if a[off:off + 4096] != b[off:off + 4096]:
            out.append(off)
    return out


def check_same_ram(final, got_dir_or_bytes, size=None, layout=None):
    """FINAL's pc.ram (or the blocks of the oracle's `layout` at their guest-physical
    addresses) against a pmemsave (bytes) outside the hole."""
    man = json.load(open(os.path.join(final, "manifest.json")))
    if layout:
        files = {b["name"]: b["file"] for b in man["blocks"]}
        want = bytearray(max(r["gpa"] + r["size"] for r in layout))
        for r in layout:
            img = open(os.path.join(final, files[r["block"]]), "rb").read()[:r["size"]]
            want[r["gpa"]:r["gpa"] + len(img)] = img
        want = bytes(want)
    else:
        blk = next(b for b in man["blocks"] if b["name"] == "pc.ram")
        want = open(os.path.join(final, blk["file"]), "rb").read()
    got = got_dir_or_bytes
    bad = differing_pages(got, want[:size or len(got)], HOLE)
    if bad:
        raise RuntimeError(f"{len(bad)} pages of pc.ram differ, first at {bad[0]:#x}")


def run_postcopy_qmig(name, sc, work, qmig):
    """qmig send --postcopy -> qmig recv --touch 4: every image equal."""
    template = stream_path(sc["capture"], work)
    ramdir = os.path.join(work, "ram")
    final = os.path.join(work, "final")
    out = os.path.join(work, "out")
    sock = os.path.join(work, "mig.sock")
    subprocess.run([qmig, "extract", template, "-o", ramdir], check=True,
                   stdout=subprocess.DEVNULL)
    recv = subprocess.Popen([qmig, "recv", "--listen", f"unix:{sock}", "-o", out,
                             "--touch", "4", "--idle-timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        p = subprocess.run([qmig, "send", "--ram", ramdir, "--template", template,
                            "--to", f"unix:{sock}", "--final-ram", final, "--json",
                            "--idle-timeout", "30"] + sc["args"],
                           capture_output=True, text=True, timeout=120)
        rlog = recv.communicate(timeout=60)[0]
    finally:
        if recv.poll() is None:
            recv.kill()
    if p.returncode != 0 or recv.returncode != 0:
        raise RuntimeError(f"send exited {p.returncode}: {p.stderr.strip()}; "
                           f"recv exited {recv.returncode}: {rlog.strip()}")
    stats = json.loads(p.stdout)
    man = json.load(open(os.path.join(final, "manifest.json")))
    for b in man["blocks"]:
        a = open(os.path.join(final, b["file"]), "rb").read()
        g = open(os.path.join(out, b["file"]), "rb").read()
        if a != g:
            bad = differing_pages(g, a, (0, 0))
            raise RuntimeError(f"block {b['name']}: {len(bad)} pages differ")
    pc = stats["postcopy"]
    if pc["requested_pages"] == 0:
        raise RuntimeError("no page was requested: the touch threads were not demand-paged")
    rman = json.load(open(os.path.join(out, "manifest.json")))
    asked = rman.get("postcopy", {}).get("page_requests")
    if asked is not None and asked != pc["requests"]:
        raise RuntimeError(f"recv sent {asked} page requests, send took {pc['requests']}")
    print(f"  ok: {stats['bytes']} bytes, {pc['requests']} requests (recv: {asked}), "
          f"{pc['requested_pages']} pages served on request; every image equal")


def run_postcopy_qemu(name, sc, work, qmig):
    """qmig send --postcopy -> QEMU 10 with postcopy-ram."""
    oracle = json.load(open(os.path.join(DATA, sc["capture"], "oracle.json")))
    template = stream_path(sc["capture"], work)
    ramdir = os.path.join(work, "ram")
    final = os.path.join(work, "final")
    subprocess.run([qmig, "extract", template, "-o", ramdir], check=True,
                   stdout=subprocess.DEVNULL)
    port = qmp.free_port()
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    running = sc.get("running", False)
    restore_hugepages = None
    if sc.get("hugepage"):
        # The destination's hugetlbfs block: its 2 MiB pages, and spares.
        import recv_interop  # noqa: E402 - only for its hugepage reservation
        restore_hugepages = recv_interop.reserve_hugepages(
            2 * sum(r["size"] for r in oracle["layout"]) // (2 << 20))
    args = oracle["machine_args"] + ["-drive", f"file={disk},format=raw,if=ide",
                                     "-serial", "null", "-incoming", "defer"]
    if not running:
        args.append("-S")
    try:
        dst = qmp.Qemu(qmp.qemu_binary(sc["qemu"]), args, work, "dst")
    except BaseException:
        restore_nr_hugepages(restore_hugepages)
        raise
    size = oracle["ram_size"]
    layout = oracle.get("layout") if sc.get("hugepage") else None
    try:
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in sc["caps"].items()])
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        argv = [qmig, "send", "--ram", ramdir, "--template", template,
                "--to", f"tcp:127.0.0.1:{port}", "--final-ram", final, "--json",
                "--idle-timeout", "30"] + sc["args"]
        t0 = time.monotonic()
        send = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        during = None
        try:
            mig = qmp.wait_migration(dst.qmp, timeout=60,
                                     done=("postcopy-active", "completed"), interval=0.01)
            if mig["status"] == "postcopy-active":
                # The destination's own thread faults on every page not there yet.
                got = open(qmp.pmemsave(dst.qmp, 0, size,
                                        os.path.join(work, "during.pmem")), "rb").read()
                st = dst.cmd("query-migrate")["status"]
                during = (st, send.poll() is None)
            out, err = send.communicate(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
        took = time.monotonic() - t0
        if send.returncode != 0:
            raise RuntimeError(f"qmig send exited {send.returncode}: {err.strip()}\n"
                               f"destination log: {dst.read_log()}")
        stats = json.loads(out)
        mig = qmp.wait_migration(dst.qmp, timeout=60)
        status = dst.cmd("query-status")["status"]
        if during is None:
            raise RuntimeError("the destination never reported postcopy-active")
        if not running:
            check_same_ram(final, got, size, layout)
        dump = qmp.pmemsave(dst.qmp, 0, size, os.path.join(work, "dst.pmem"))
        if running:
            # The guest wrote its own memory since: it runs; compare only
            # what it does not dirty (everything outside its dirty window).
            g = oracle["guest"]
            skip = (g["dirty_start"], g["dirty_start"] + g["dirty_size"])
            want = open(os.path.join(final, "pc.ram.img"), "rb").read()[:size]
            got2 = open(dump, "rb").read()
            bad = [o for o in differing_pages(got2, want, HOLE) if not skip[0] <= o < skip[1]]
            if bad:
                raise RuntimeError(f"{len(bad)} pages outside the guest's dirty window "
                                   f"differ, first at {bad[0]:#x}")
            time.sleep(0.3)
            status2 = dst.cmd("query-status")["status"]
            if status != "running" or status2 != "running":
                raise RuntimeError(f"destination not running after postcopy: {status}/{status2}")
        else:
            check_same_ram(final, open(dump, "rb").read(), size, layout)
        pc = stats["postcopy"]
        if pc["requested_pages"] == 0:
            raise RuntimeError("no page was requested during postcopy")
        print(f"  ok: {stats['bytes']} bytes in {took:.2f}s, dst {mig['status']}/{status}; "
              f"pmemsave during postcopy done while dst was {during[0]} "
              f"(send still running: {during[1]}); {pc['requests']} requests, "
              f"{pc['requested_pages']} pages served on request, "
              f"{pc['discard_commands']} discard commands; memory equals the RAM sent")
    finally:
        dst.quit()
        restore_nr_hugepages(restore_hugepages)


def restore_nr_hugepages(n):
    """Puts vm.nr_hugepages back to `n` (when this script raised it)."""
    if n is not None:
        try:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(n))
        except OSError:
            pass


def capture_set(name, work, qmig, ramdir):
    """A multifd capture set (tests/data/multifd/NAME, 64 MiB `-S` source): its main
    connection as template, its RAM (main + channels) extracted to RAMDIR."""
    d = os.path.join(DATA, "multifd", name)
    oracle = json.load(open(os.path.join(d, "oracle.json")))
    files = []
    for c in oracle["connections"]:
        out = os.path.join(work, c["file"])
        with gzip.open(os.path.join(d, c["file"] + ".gz"), "rb") as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
        files.append(out)
    cmd = [qmig, "extract", files[0], "-o", ramdir]
    for f in files[1:]:
        cmd += ["--multifd-channel", f]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    size = oracle["pmemsave"]["length"]
    # scripts/capture_multifd.py's source, less -S/-incoming added below.
    args = ["-M", "pc", "-m", str(size >> 20), "-nodefaults", "-display", "none",
            "-accel", "tcg"]
    return files[0], {"ram_size": size, "machine_args": args}


def run_scenario(name, sc, work, qmig):
    if sc.get("to_qmig"):
        return run_postcopy_qmig(name, sc, work, qmig)
    if sc.get("postcopy"):
        return run_postcopy_qemu(name, sc, work, qmig)
    ramdir = os.path.join(work, "ram")
    final = os.path.join(work, "final")
    if sc.get("capture_set"):
        template, oracle = capture_set(sc["capture_set"], work, qmig, ramdir)
        extra = []
    else:
        oracle = json.load(open(os.path.join(DATA, sc["capture"], "oracle.json")))
        template = stream_path(sc["capture"], work)
        subprocess.run([qmig, "extract", template, "-o", ramdir], check=True,
                       stdout=subprocess.DEVNULL)
        # The captures' sources also had the guest's boot disk and a serial port
        # (scripts/capture.py); their device state is in the stream.
        disk = os.path.join(work, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        extra = ["-drive", f"file={disk},format=raw,if=ide", "-serial", "null"]
    binary = qmp.qemu_binary(sc["qemu"])
    port = qmp.free_port()
    margs = list(oracle["machine_args"])
    if sc.get("machine"):
        margs[margs.index("-M") + 1] = sc["machine"]
    args = margs + extra + ["-S", "-incoming", "defer"]
    dst = qmp.Qemu(binary, args, work, "dst")
    try:
        caps = sc.get("caps", {})
        if caps:
            dst.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        if sc.get("params"):
            dst.cmd("migrate-set-parameters", **sc["params"])
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        argv = [qmig, "send", "--ram", ramdir, "--template", template,
                "--to", f"tcp:127.0.0.1:{port}", "--final-ram", final, "--json"] + sc["args"]
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"qmig send exited {p.returncode}: {p.stderr.strip()}\n"
                               f"destination log: {dst.read_log()}")
        stats = json.loads(p.stdout)
        mig = qmp.wait_migration(dst.qmp, timeout=60)
        status = dst.cmd("query-status")["status"]
        size = oracle["ram_size"]
        dump = qmp.pmemsave(dst.qmp, 0, size, os.path.join(work, "dst.pmem"))
        got = open(dump, "rb").read()
        man = json.load(open(os.path.join(final, "manifest.json")))
        blk = next(b for b in man["blocks"] if b["name"] == "pc.ram")
        want = open(os.path.join(final, blk["file"]), "rb").read()
        bad = differing_pages(got, want[:size], HOLE)
        if bad:
            raise RuntimeError(f"{len(bad)} pages of pc.ram differ, first at {bad[0]:#x}")
        problems = []
        if stats["dirty_sync_count"] < sc.get("min_syncs", 0):
            problems.append(f"only {stats['dirty_sync_count']} syncs")
        xb = stats.get("xbzrle", {}).get("pages", 0)
        cp = stats.get("compressed", {}).get("pages", 0)
        mf = stats.get("multifd", {})
        if xb < sc.get("min_xbzrle", 0):
            problems.append(f"only {xb} XBZRLE pages")
        if cp < sc.get("min_compressed", 0):
            problems.append(f"only {cp} compressed pages")
        if mf.get("packets", 0) < sc.get("min_packets", 0):
            problems.append(f"only {mf.get('packets', 0)} multifd packets: {stats}")
        if "--multifd" in sc["args"] and mf.get("channels") != sc["params"]["multifd-channels"]:
            problems.append(f"multifd channels {mf.get('channels')}")
        if problems:
            raise RuntimeError("; ".join(problems))
        print(f"  ok: {stats['bytes']} bytes in {took:.2f}s, dst {mig['status']}/{status}, "
              f"normal {stats['normal']} zero {stats['duplicate']} "
              f"xbzrle {xb} compressed {cp} syncs {stats['dirty_sync_count']}"
              + (f" multifd {mf['channels']}x{mf['compression']} packets {mf['packets']} "
                 f"syncs {mf['syncs']}" if mf else "")
              + "; pmemsave equals the RAM sent")
    finally:
        dst.quit()


def main():
    return qmp.run_scenarios("send_interop", SCENARIOS,
                             lambda n, sc, qmig, work: run_scenario(n, sc, work, qmig))


if __name__ == "__main__":
    sys.exit(main())
