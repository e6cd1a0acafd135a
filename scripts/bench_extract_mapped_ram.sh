#!/usr/bin/env bash
# Benchmark `qmig extract` of a mapped-ram file against `cp --sparse=always` of the same
# file, in the same run (issue 11: goal extract <= 1.0x cp).
#
# usage: bench_extract_mapped_ram.sh [MAPPED_RAM_FILE]
#   MAPPED_RAM_FILE  a mapped-ram file (QEMU `migrate file:` with mapped-ram on, or
#                    `qmig convert --format mapped-ram`); default: a >= 256 MiB QEMU 10
#                    capture made by scripts/big_capture.py (every page of its dirtied
#                    range non-zero), converted with `qmig convert --format mapped-ram`
#                    (the layout QEMU 10 writes; scripts/convert_interop.py checks QEMU
#                    restores it) into $QMIG_BENCH_DIR (default /tmp/qmig-bench)
# env:     RUNS (default 7) timed runs of each, interleaved; MIB (default 256) size of the
#          default capture's dirtied range.
# The page cache is never dropped: the file is read once first so every run sees it warm.
# Both outputs go to the same filesystem ($QMIG_BENCH_DIR). Prints best, median and the
# range of per-run ratios (the machine may be loaded: read the range, not one number).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
runs="${RUNS:-7}"
mib="${MIB:-256}"
work="${QMIG_BENCH_DIR:-/tmp/qmig-bench}"
mkdir -p "$work"

echo "== building qmig (release)" >&2
(cd "$repo" && cargo build --release -q -p qmig-cli)
qmig="$repo/target/release/qmig"

if [ $# -ge 1 ]; then
    file="$1"
else
    stream="$work/big-$mib.stream"
    file="$work/big-$mib.mapped-ram"
    if [ ! -f "$stream" ]; then
        echo "== making the big capture: scripts/big_capture.py $stream --mib $mib" >&2
        python3 "$here/big_capture.py" "$stream" --mib "$mib" >&2
    fi
    if [ ! -f "$file" ]; then
        "$qmig" convert -q --format mapped-ram "$stream" "$file"
    fi
fi
[ -f "$file" ] || { echo "no such file: $file" >&2; exit 1; }
size=$(stat -c %s "$file")
alloc=$(( $(stat -c %b "$file") * $(stat -c %B "$file") ))

echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs," \
     "load $(cut -d' ' -f1-3 /proc/loadavg), fs of $work: $(df -T "$work" | awk 'NR==2{print $2}')"
echo "qmig: $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- crates || echo ' +uncommitted changes in crates/')"
echo "file: $file  $size bytes apparent ($((size >> 20)) MiB), $((alloc >> 20)) MiB allocated"
cat "$file" >/dev/null

now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }
cp_t=(); ex_t=(); ratios=()
for i in $(seq "$runs"); do
    rm -f "$work/m.cp"; rm -rf "$work/m.extract"; sync
    t0=$(now); cp --sparse=always "$file" "$work/m.cp"; t1=$(now)
    c="$(calc "$t1 - $t0")"
    rm -f "$work/m.cp"; sync
    t0=$(now); "$qmig" extract -q "$file" -o "$work/m.extract" >/dev/null 2>"$work/m.err" \
        || { cat "$work/m.err" >&2; exit 1; }; t1=$(now)
    e="$(calc "$t1 - $t0")"
    rm -rf "$work/m.extract"; sync
    cp_t+=("$c"); ex_t+=("$e"); ratios+=("$(calc "$e / $c" 2)")
done
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "best %s median %s worst %s", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "cp --sparse=always : $(stats "${cp_t[@]}") s  (runs: ${cp_t[*]})"
echo "qmig extract       : $(stats "${ex_t[@]}") s  (runs: ${ex_t[*]})"
echo "extract/cp per run : $(stats "${ratios[@]}")  (goal <= 1.0)"
cb=$(printf '%s\n' "${cp_t[@]}" | sort -g | head -1); eb=$(printf '%s\n' "${ex_t[@]}" | sort -g | head -1)
echo "best/best ratio    : $(calc "$eb / $cb" 2)"
