#!/usr/bin/env bash
# Time `qmig send --to file:` of a RAM image beside QEMU 10 migrating a stopped VM that
# holds the same memory to file:, in one run (issue 5, item 7).
#
# usage: bench_send_vs_qemu.sh [CAPTURE]
#   CAPTURE  a QEMU 10 `pc` migration stream; default: a fresh ~200 MiB capture of a guest
#            whose RAM is mostly non-zero, made by scripts/big_capture.py in the work dir
# env:     RUNS (default 5) timed runs of each side; QMIG (default target/release/qmig,
#          built with `cargo build --release -p qmig-cli` when QMIG is unset);
#          QMIG_BENCH_DIR work dir (default a fresh /tmp/qmig-bench-send.XXXXXX, removed at
#          exit unless KEEP=1; both output streams are written there).
#
# 1. `qmig extract CAPTURE -o RAMDIR`.
# 2./3. are interleaved (qmig run, QEMU run, qmig run, ...) after one untimed warm-up run
#    of each, so that load from concurrent jobs hits both alike.
# 2. qmig: RUNS x `qmig send --ram RAMDIR --template CAPTURE --to file:WORK/out.stream`,
#    wall time of the process (the output is deleted before each run; qmig's file sink
#    does not fsync, like QEMU's), and qmig's own `--json` "seconds" (sink open to
#    last write: excludes loading RAMDIR and the template).
# 3. QEMU: RUNS x (fresh QEMU 10 with the capture's machine options, `-S -incoming defer`,
#    `migrate-incoming file:CAPTURE`, wait for completed, VM stays paused, max-bandwidth
#    1 TiB/s, `migrate file:WORK/q.stream`): QEMU's `query-migrate` total-time, and wall
#    time from issuing `migrate` to the MIGRATION `completed` event
#    (scripts/bench_send_vs_qemu.py). QEMU is restarted for every run because QEMU 10
#    refuses to migrate a VM left in `postmigrate` again without `cont`.
# 4. Prints best/median of both (ms), the ratio qmig/QEMU (goal <= 1.0), both stream
#    sizes, and whether `qmig diff --records q.stream out.stream` finds them identical.
# The page cache is never dropped; the capture and RAM images are read once first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
runs="${RUNS:-5}"

if [ -z "${QMIG:-}" ]; then
    echo "== building qmig (release)" >&2
    (cd "$repo" && cargo build --release -q -p qmig-cli)
    QMIG="$repo/target/release/qmig"
fi
[ -x "$QMIG" ] || { echo "bench: no qmig binary at $QMIG" >&2; exit 1; }

if [ -n "${QMIG_BENCH_DIR:-}" ]; then
    work="$QMIG_BENCH_DIR"; mkdir -p "$work"
else
    work="$(mktemp -d /tmp/qmig-bench-send.XXXXXX)"
    [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
fi

if [ $# -ge 1 ]; then
    capture="$(realpath "$1")"
else
    capture="$work/big.stream"
    if [ ! -f "$capture" ]; then
        echo "== making the big capture: scripts/big_capture.py $capture" >&2
        python3 "$here/big_capture.py" "$capture" >&2
    fi
fi
[ -f "$capture" ] || { echo "no such stream: $capture" >&2; exit 1; }
csize=$(stat -c %s "$capture")

ramdir="$work/ram"
rm -rf "$ramdir"
"$QMIG" extract "$capture" -o "$ramdir" >/dev/null

echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs," \
     "$(free -g | awk '/^Mem:/{print $2}') GiB RAM, fs of $work: $(df -T "$work" | awk 'NR==2{print $2}')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "qmig: $QMIG ($(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- crates || echo ' +uncommitted changes in crates/'))"
echo "qemu: $(qemu-system-x86_64 --version | head -1)"
echo "capture: $capture  $csize bytes ($((csize >> 20)) MiB); RAM images: $(du -sb "$ramdir" | cut -f1) bytes"

# Warm the page cache (never dropped).
cat "$capture" "$ramdir"/* >/dev/null

now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{printf "%.1f %.1f", a[1], a[int((NR+1)/2)]}'; }

# --- timed runs: qmig send and QEMU 10 interleaved, one untimed warm-up of each first ---
out="$work/out.stream"
qout="$work/q.stream"
q_t=(); s_t=()
: >"$work/qemu.jsonl"
for i in $(seq 0 "$runs"); do
    # qmig
    rm -f "$out"; sync
    t0=$(now)
    "$QMIG" send --ram "$ramdir" --template "$capture" --to "file:$out" --json \
        >"$work/send.json" 2>"$work/send.err" || { cat "$work/send.err" >&2; exit 1; }
    t1=$(now)
    if [ "$i" -gt 0 ]; then
        q_t+=("$(calc "($t1 - $t0) * 1000")")
        s_t+=("$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["seconds"]*1000, 1))' "$work/send.json")")
    fi
    # QEMU (a fresh process loading the capture; only the migrate is timed)
    rm -f "$qout"; sync
    python3 "$here/bench_send_vs_qemu.py" --qmig "$QMIG" --runs 1 "$capture" "$work" "$qout" \
        | { if [ "$i" -gt 0 ]; then cat >>"$work/qemu.jsonl"; else cat >/dev/null; fi; }
done
osize=$(stat -c %s "$out")
qsize=$(stat -c %s "$qout")
{ read -r -a e_t; read -r -a w_t; read -r qinfo; } < <(python3 - "$work/qemu.jsonl" <<'PY'
import json, sys
L = [json.loads(l) for l in open(sys.argv[1])]
runs = [d for d in L if "total_ms" in d]
print(" ".join(str(d["total_ms"]) for d in runs))
print(" ".join(str(d["wall_ms"]) for d in runs))
m, r = L[0], runs[-1]
ld = [x for d in L if "load_ms" in d for x in d["load_ms"]]
print(f"{m['machine']} -m {m['ram_mib']}; normal {r['normal']} duplicate {r['duplicate']}; "
      f"setup {r['setup_ms']} ms, downtime {r['downtime_ms']} ms (last run); "
      f"loads of the capture (migrate-incoming): {ld} ms")
PY
)

read -r q_best q_med <<<"$(stats "${q_t[@]}")"
read -r s_best s_med <<<"$(stats "${s_t[@]}")"
read -r e_best e_med <<<"$(stats "${e_t[@]}")"
read -r w_best w_med <<<"$(stats "${w_t[@]}")"
echo "QEMU dst: $qinfo"
echo "qmig send --to file:         best ${q_best} ms  median ${q_med} ms  ($runs runs: ${q_t[*]})"
echo "  (qmig's own --json seconds: best ${s_best} ms  median ${s_med} ms: sink open to last write;" \
     "excludes reading RAMDIR + template before it; runs: ${s_t[*]})"
echo "QEMU migrate total-time:     best ${e_best} ms  median ${e_med} ms  ($runs runs: ${e_t[*]})"
echo "QEMU migrate wall (cmd->evt): best ${w_best} ms  median ${w_med} ms  ($runs runs: ${w_t[*]})"
echo "ratio qmig/QEMU total-time: best $(calc "$q_best / $e_best" 2)  median $(calc "$q_med / $e_med" 2)" \
     " (vs QEMU wall: best $(calc "$q_best / $w_best" 2)  median $(calc "$q_med / $w_med" 2); goal <= 1.0)"
echo "ratio qmig own seconds/QEMU total-time: best $(calc "$s_best / $e_best" 2)  median $(calc "$s_med / $e_med" 2)"
echo "streams: qmig $out $osize bytes; QEMU $qout $qsize bytes; capture $csize bytes"
rc=0; "$QMIG" diff --records "$qout" "$out" >"$work/diff.txt" 2>&1 || rc=$?
if [ "$rc" -eq 0 ]; then
    echo "qmig diff --records q.stream out.stream: identical (exit 0)"
else
    echo "qmig diff --records q.stream out.stream: DIFFERENT (exit $rc):"
    head -5 "$work/diff.txt"
fi
rc=0; "$QMIG" diff "$qout" "$out" >"$work/diff-all.txt" 2>&1 || rc=$?
echo "qmig diff (whole stream) q.stream out.stream: exit $rc"
[ "$rc" -eq 0 ] || sed -n '/first difference/,+2p' "$work/diff-all.txt" | sed 's/^/  /'
echo "(neither file: sink fsyncs: both commands return with the data in the page cache)"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
