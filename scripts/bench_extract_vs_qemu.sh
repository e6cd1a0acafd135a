#!/usr/bin/env bash
# Time `qmig extract` of a >= 100 MiB real capture beside QEMU 10 loading the same file.
#
# usage: bench_extract_vs_qemu.sh [-m MIB] [-k]     (env QMIG: qmig binary, default
#        target/release/qmig; QMIG_BENCH_DIR: work dir, default a fresh /tmp dir)
#
# 1. A `-m MIB` (default 256) pc guest (scripts/guest, one pass over [1 MiB, MIB - 1 MiB))
#    writes every page, so nearly all of RAM migrates as PAGE records; it is stopped and
#    migrated to file:STREAM.
# 2. The page cache is warmed with the stream; then, in one run:
#    - `cp STREAM` (the throughput floor we compare with),
#    - `qmig extract STREAM -o DIR` (wall time of the process),
#    - QEMU 10 `-incoming defer` + `migrate-incoming file:STREAM`: time between the
#      MIGRATION events `active` and `completed` (QMP event timestamps).
# Prints the three times, throughputs and the ratios. -k keeps the work dir.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
mib=256
keep=0
while getopts "m:kh" opt; do
    case "$opt" in
        m) mib="$OPTARG" ;;
        k) keep=1 ;;
        *) sed -n '2,14p' "$0" >&2; exit 2 ;;
    esac
done
QMIG="${QMIG:-$repo/target/release/qmig}"
if [ ! -x "$QMIG" ]; then
    echo "bench: $QMIG not found (cargo build --release -p qmig-cli, or set QMIG)" >&2
    exit 1
fi
work="${QMIG_BENCH_DIR:-$(mktemp -d /tmp/qmig-bench.XXXXXX)}"
mkdir -p "$work"
if [ "$keep" -eq 0 ] && [ -z "${QMIG_BENCH_DIR:-}" ]; then
    trap 'rm -rf "$work"' EXIT
fi
export QMIG MIB="$mib" WORK="$work" SCRIPTS="$here"
python3 - <<'PY'
import json, os, shutil, subprocess, sys, time
sys.path.insert(0, os.environ["SCRIPTS"])
import qmp

qmig, mib, work, scripts = os.environ["QMIG"], int(os.environ["MIB"]), os.environ["WORK"], os.environ["SCRIPTS"]
MiB = 1 << 20
stream = os.path.join(work, "stream")
img = os.path.join(work, "guest.img")
size = (mib - 2) * MiB
subprocess.run([os.path.join(scripts, "guest", "build.sh"), "-o", img, "-s", hex(MiB),
                "-n", hex(size), "-w", "4", "-p", "1", "-d", "0x1000"],
               check=True, stdout=subprocess.DEVNULL)
base = ["-M", "pc", "-m", str(mib), "-nodefaults", "-display", "none"]

if not os.path.exists(stream):
    serial = os.path.join(work, "src.serial")
    src = qmp.Qemu(qmp.qemu_binary("10"), base + ["-drive", f"file={img},format=raw,if=ide",
                                                  "-serial", f"file:{serial}"], work, "src")
    qmp.wait_file_size(serial, 1, timeout=300)   # one full pass written
    src.cmd("stop")
    src.cmd("migrate", uri=f"file:{stream}")
    qmp.wait_migration(src.qmp, timeout=300)
    src.quit()
nbytes = os.path.getsize(stream)
if nbytes < 100 * MiB:
    sys.exit(f"bench: capture is only {nbytes} bytes (< 100 MiB)")

# Warm the page cache.
with open(stream, "rb") as f:
    while f.read(8 * MiB):
        pass

def timed(argv):
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t

copy = os.path.join(work, "copy")
out = os.path.join(work, "extract")
t_cp = timed(["cp", stream, copy])
os.unlink(copy)
shutil.rmtree(out, ignore_errors=True)
t_qmig = timed([qmig, "extract", stream, "-o", out])
m = json.load(open(os.path.join(out, "manifest.json")))
if not m["complete"]:
    sys.exit(f"bench: extract incomplete: {m['error']}")

dst = qmp.Qemu(qmp.qemu_binary("10"), base + ["-drive", f"file={img},format=raw,if=ide",
                                              "-serial", "null", "-incoming", "defer"], work, "dst")
dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
dst.cmd("migrate-incoming", uri=f"file:{stream}")
ts = lambda ev: ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
active = dst.qmp.wait_event("MIGRATION", timeout=120, pred=lambda e: e["data"]["status"] == "active")
done = dst.qmp.wait_event("MIGRATION", timeout=300,
                          pred=lambda e: e["data"]["status"] in ("completed", "failed"))
if done["data"]["status"] != "completed":
    sys.exit("bench: QEMU failed to load the stream: " + dst.read_log())
t_qemu = ts(done) - ts(active)
dst.quit()

gbs = lambda t: nbytes / t / 1e9
print(f"stream: {nbytes / MiB:.1f} MiB ({m['records']})")
print(f"cp            : {t_cp:8.3f} s  {gbs(t_cp):6.2f} GB/s")
print(f"qmig extract  : {t_qmig:8.3f} s  {gbs(t_qmig):6.2f} GB/s  (process wall time)")
print(f"QEMU 10 load  : {t_qemu:8.3f} s  {gbs(t_qemu):6.2f} GB/s  (MIGRATION active -> completed)")
print(f"ratio qmig/QEMU = {t_qmig / t_qemu:.2f}   ratio qmig/cp = {t_qmig / t_cp:.2f}")
PY
