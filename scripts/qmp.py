"""Minimal QMP client and QEMU process helpers for qmig's capture/interop scripts.

Python 3 standard library only. Every wait has a timeout; every QEMU process started
through `Qemu` is killed when the Python process exits (atexit and SIGTERM/SIGINT).
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
QEMU10 = os.environ.get("QMIG_QEMU10", "qemu-system-x86_64")
QEMU72 = os.environ.get("QMIG_QEMU72", os.path.join(SCRIPTS, "qemu72"))


class QMPError(Exception):
    pass


class QMP:
    """One QMP connection over a unix socket."""

    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"cannot connect to QMP socket {path}")
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events = []
        # The greeting comes first on a fresh connection; an event read
        # before it (seen under load: RESUME of a guest started without -S)
        # is kept for wait_event, anything else is a protocol error.
        while True:
            self.greeting = self._recv()
            if "event" in self.greeting and "QMP" not in self.greeting:
                self.events.append(self.greeting)
                continue
            break
        if "QMP" not in self.greeting:
            raise QMPError(f"bad QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities")

    def _recv(self, timeout=None):
        if timeout is not None:
            self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise QMPError("timeout waiting for QMP message")
            if not data:
                raise QMPError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, timeout=60.0, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"timeout waiting for reply to {cmd}")
            resp = self._recv(left)
            if "event" in resp:
                self.events.append(resp)
                continue
            if "error" in resp:
                raise QMPError(f"{cmd} {args}: {resp['error']}")
            return resp.get("return")

    def wait_event(self, name, timeout=30.0, pred=None):
        """Return the first (queued or new) event called `name` satisfying pred."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (pred is None or pred(ev)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"timeout waiting for event {name}")
            try:
                msg = self._recv(left)
            except QMPError:
                if time.monotonic() >= deadline:
                    raise QMPError(f"timeout waiting for event {name}")
                raise
            if "event" in msg:
                self.events.append(msg)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


_procs = []


def _cleanup():
    for p in list(_procs):
        p.kill()


atexit.register(_cleanup)


def _on_signal(signum, _frame):
    _cleanup()
    sys.exit(128 + signum)


for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_s, _on_signal)


class Qemu:
    """A QEMU process with a QMP socket in `workdir`."""

    def __init__(self, binary, args, workdir, name, qmp_timeout=30.0):
        self.name = name
        self.workdir = workdir
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.log = os.path.join(workdir, f"{name}.log")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = list(binary if isinstance(binary, (list, tuple)) else [binary]) + list(args)
        argv += ["-qmp", f"unix:{self.sock},server=on,wait=off"]
        self.argv = argv
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _procs.append(self)
        try:
            deadline = time.monotonic() + qmp_timeout
            while not os.path.exists(self.sock):
                if self.proc.poll() is not None:
                    raise QMPError(f"{name} exited early ({self.proc.returncode}): "
                                   + self.read_log())
                if time.monotonic() > deadline:
                    raise QMPError(f"{name}: QMP socket never appeared")
                time.sleep(0.02)
            self.qmp = QMP(self.sock, timeout=qmp_timeout)
        except Exception:
            self.kill()
            raise

    def read_log(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def cmd(self, name, **args):
        return self.qmp.execute(name, **args)

    def quit(self, timeout=10.0):
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=timeout)
            except (QMPError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.kill()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if hasattr(self, "qmp"):
            self.qmp.close()
        if not self.logf.closed:
            self.logf.close()
        if self in _procs:
            _procs.remove(self)


def qmig_binary(who, given=None):
    """Path of the qmig binary: `given`, else $QMIG, else the repo's target/release or
    target/debug build. Exits naming the calling script `who` when there is none."""
    q = given or os.environ.get("QMIG")
    if q:
        return q
    for c in ("target/release/qmig", "target/debug/qmig"):
        p = os.path.join(REPO, c)
        if os.path.exists(p):
            return p
    sys.exit(f"{who}: no qmig binary (set QMIG or cargo build --release)")


def run_scenarios(prog, scenarios, run_one, *, jobs=1, retries=0, skip=None, argv=None):
    """The command line every interop script shares: `[NAME...] [--list] [--keep]
    [--jobs N] [--retries N]`. Runs each named scenario (all by default) through
    `run_one(name, scenario, qmig, workdir) -> message`, `jobs` at a time, each attempt
    in its own work directory under one temporary root; a scenario passes when an
    attempt returns, fails when every attempt raised. `skip(name, scenario)` may return
    a reason the scenario cannot run here, which counts as a failure. Prints one line per
    scenario and a summary; returns the exit code (0 only when every scenario passed)."""
    import argparse
    import concurrent.futures
    import tempfile

    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--jobs", type=int, default=jobs, help="scenarios run at once")
    ap.add_argument("--retries", type=int, default=retries, help="extra attempts per scenario")
    a = ap.parse_args(argv)
    if a.list:
        for n, sc in scenarios.items():
            about = sc.get("about", "") if isinstance(sc, dict) else ""
            print(f"{n:24} {about}")
        return 0
    names = a.scenarios or list(scenarios)
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        sys.exit(f"{prog}: unknown scenario {' '.join(unknown)}; use --list")
    qmig = qmig_binary(prog)
    root = tempfile.mkdtemp(prefix=f"qmig-{prog}.", dir="/tmp")

    def one(n):
        sc = scenarios[n]
        why = skip(n, sc) if skip else None
        if why:
            return n, False, why
        err = "not run"
        about = sc.get("about") if isinstance(sc, dict) else None
        print(f"{prog}: {n}: start" + (f" ({about})" if about else ""), flush=True)
        for attempt in range(max(0, a.retries) + 1):
            work = os.path.join(root, f"{n}.{attempt}")
            os.makedirs(work)
            t0 = time.monotonic()
            try:
                msg = run_one(n, sc, qmig, work)
                return n, True, f"ok in {time.monotonic() - t0:.1f}s" + (f": {msg}" if msg else "")
            except Exception as e:  # noqa: BLE001 - every scenario is reported
                err = f"{type(e).__name__}: {e}"
                print(f"{prog}: {n}: attempt {attempt + 1} failed: {err}", flush=True)
        return n, False, err

    failed = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            for n, ok, msg in pool.map(one, names):
                print(f"{prog}: {n}: {msg if ok else 'FAIL: ' + msg}", flush=True)
                if not ok:
                    failed.append(n)
    finally:
        if a.keep or failed:
            print(f"{prog}: work directories kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"{prog}: FAILED: {' '.join(failed)}", flush=True)
        return 1
    print(f"{prog}: all {len(names)} scenarios passed", flush=True)
    return 0


class Fail(Exception):
    """A check of a live interop run failed; the message says which."""


def check(cond, msg):
    """Raise `Fail(msg)` unless `cond`."""
    if not cond:
        raise Fail(msg)


def compare_ram(img, mem, hole):
    """Check a received pc.ram image `img` against the source's pmemsave `mem`, byte for
    byte outside `hole` (the (start, end) guest-physical range pmemsave cannot read back
    faithfully). Raises `Fail` naming the first differing address."""
    check(len(img) == len(mem), f"pc.ram is {len(img)} bytes, pmemsave {len(mem)}")
    for lo, hi in ((0, hole[0]), (hole[1], len(mem))):
        if img[lo:hi] != mem[lo:hi]:
            bad = next(i for i in range(lo, hi) if img[i] != mem[i])
            raise Fail(f"pc.ram differs from the source's memory at {bad:#x}")


def qemu_binary(version):
    """'10' -> system QEMU, '7.2' -> the private 7.2 wrapper."""
    if version in ("10", "q10", None):
        return [QEMU10]
    if version in ("7.2", "q72", "72"):
        return [QEMU72]
    raise ValueError(f"unknown QEMU version {version}")


def version_string(qmp):
    v = qmp.execute("query-version")
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}{v.get('package', '')}"


def wait_migration(qmp, timeout=120.0, done=("completed",), interval=0.05,
                   fail=("failed", "cancelled")):
    """Poll query-migrate until status is in `done`; return the last answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = qmp.execute("query-migrate")
        st = last.get("status")
        if st in done:
            return last
        if st in fail:
            raise QMPError(f"migration {st}: {last}")
        time.sleep(interval)
    raise QMPError(f"timeout waiting for migration ({done}); last: {last}")


def wait_status(qmp, want, timeout=30.0):
    """Wait until query-status reports one of `want` (a str or tuple)."""
    if isinstance(want, str):
        want = (want,)
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = qmp.execute("query-status")["status"]
        if st in want:
            return st
        time.sleep(0.05)
    raise QMPError(f"timeout waiting for run state {want}; last {st}")


def pmemsave(qmp, addr, size, path, timeout=60.0):
    if os.path.exists(path):
        os.unlink(path)
    qmp.execute("pmemsave", val=addr, size=size, filename=path, timeout=timeout)
    deadline = time.monotonic() + timeout
    while os.path.getsize(path) < size:
        if time.monotonic() > deadline:
            raise QMPError(f"pmemsave to {path} incomplete")
        time.sleep(0.02)
    return path


def wait_file_size(path, minimum, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) >= minimum):
        if time.monotonic() > deadline:
            raise QMPError(f"{path} never reached {minimum} bytes")
        time.sleep(0.05)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def have(binary):
    return shutil.which(binary) is not None or os.path.exists(binary)
