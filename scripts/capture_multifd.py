#!/usr/bin/env python3
"""Capture a real QEMU 10 multifd migration: every TCP connection the source opens.

A stopped QEMU 10 source (`-M pc -m 64 -S -nodefaults -display none`) with the
`multifd` capability and `multifd-channels` N migrates to `tcp:127.0.0.1:PORT`;
a listener here accepts every connection and records each one to
`OUT/conn-K.bin` (K = accept order). `OUT/oracle.json` gets the source's
`query-migrate` at completion, the parameters, which connection is the main
stream (starts with "QEVM") and which are multifd channels (start with the
multifd magic 0x11223344, channel id at byte 24), and the SHA-256 of the
source's guest memory (`pmemsave` of the guest's first MiBs, and `ranges`: pc.ram
without the [640 KiB, 1 MiB) hole, where the guest sees ROMs).

Usage: python3 scripts/capture_multifd.py OUT [--channels 2] [--compression none]
Python 3 standard library only; needs qemu-system-x86_64 (QEMU 10).
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qmp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--mem", type=int, default=64, help="guest MiB")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="qmig-multifd-")

    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    lst.settimeout(1.0)
    port = lst.getsockname()[1]
    conns = []
    stop = threading.Event()

    def record(k, c):
        with open(os.path.join(a.out, f"conn-{k}.bin"), "wb") as f:
            while True:
                d = c.recv(1 << 20)
                if not d:
                    break
                f.write(d)
        c.close()

    def accept_loop():
        k = 0
        while not stop.is_set():
            try:
                c, _ = lst.accept()
            except socket.timeout:
                continue
            t = threading.Thread(target=record, args=(k, c), daemon=True)
            t.start()
            conns.append(t)
            k += 1

    acc = threading.Thread(target=accept_loop, daemon=True)
    acc.start()

    vm = qmp.Qemu(qmp.QEMU10, ["-M", "pc", "-m", str(a.mem), "-S", "-nodefaults",
                               "-display", "none", "-accel", "tcg"], work, "src")
    vm.cmd("migrate-set-capabilities",
           capabilities=[{"capability": "multifd", "state": True}])
    params = {"multifd-channels": a.channels}
    if a.compression != "none":
        params["multifd-compression"] = a.compression
    vm.cmd("migrate-set-parameters", **params)
    mem = os.path.join(work, "mem.bin")
    vm.cmd("pmemsave", val=0, size=a.mem << 20, filename=mem)
    vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        st = vm.cmd("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise SystemExit("migration did not finish")
        time.sleep(0.1)
    if st["status"] != "completed":
        raise SystemExit(f"migration {st['status']}: {st}")
    got_params = vm.cmd("query-migrate-parameters")
    vm.quit()
    for t in list(conns):
        t.join(30)
    stop.set()
    acc.join(5)
    files = []
    for k in range(len(conns)):
        p = os.path.join(a.out, f"conn-{k}.bin")
        with open(p, "rb") as f:
            head = f.read(64)
        if head[:4] == b"QEVM":
            kind = {"kind": "main"}
        elif head[:4] == bytes.fromhex("11223344"):
            kind = {"kind": "multifd", "channel_id": head[24]}
        else:
            kind = {"kind": "unknown", "head": head.hex()}
        kind["file"] = os.path.basename(p)
        kind["bytes"] = os.path.getsize(p)
        files.append(kind)
    with open(mem, "rb") as f:
        m = f.read()
    digest = hashlib.sha256(m).hexdigest()
    # pc.ram as the guest sees it, without the legacy VGA/ROM hole [640 KiB, 1 MiB).
    ranges = [{"block": "pc.ram", "offset": o, "length": n,
               "sha256": hashlib.sha256(m[o:o + n]).hexdigest()}
              for o, n in ((0, 640 << 10), (1 << 20, len(m) - (1 << 20)))]
    shutil.rmtree(work, ignore_errors=True)
    oracle = {
        "qemu": f"qemu-system-x86_64 -M pc -m {a.mem} -S, multifd, "
                f"multifd-channels {a.channels}, multifd-compression {a.compression}",
        "connections": files,
        "query_migrate_ram": st.get("ram"),
        "parameters": {k: got_params.get(k) for k in
                       ("multifd-channels", "multifd-compression", "zero-page-detection")},
        "pmemsave": {"offset": 0, "length": a.mem << 20, "sha256": digest},
        "ranges": ranges,
    }
    with open(os.path.join(a.out, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1, sort_keys=True)
    print(json.dumps(files))


if __name__ == "__main__":
    main()
