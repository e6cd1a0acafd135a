#!/usr/bin/env bash
# Benchmark `qmig convert` against `cp` of the same multi-pass stream, same run.
#
# usage: bench_convert.sh
# env:   RUNS (default 5) timed runs of each of cp and convert, interleaved;
#        QMIG_BENCH_DIR work directory (default /tmp/qmig-bench-convert; needs ~1 GiB);
#        MIB (default 128) MiB of pc.ram; PASSES (default 4), FRACTION (default 0.5).
#
# The stream is generated with `qmig send --to file:` from 128 MiB of random
# pc.ram (the other blocks and the container from tests/data/q10-stopped) over
# PASSES passes, a deterministic workload rewriting pages between passes, so
# it carries many pages several times (~200 MB for 128 MiB of RAM). The page
# cache is never dropped: the stream is read once first so every run sees it
# warm. Checks once that `extract` of the converted stream equals `extract` of
# the input, and prints sizes, the compaction ratio and convert's peak RSS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
runs="${RUNS:-5}"
work="${QMIG_BENCH_DIR:-/tmp/qmig-bench-convert}"
mib="${MIB:-128}"
passes="${PASSES:-4}"
fraction="${FRACTION:-0.5}"
mkdir -p "$work"

echo "== building qmig (release)" >&2
(cd "$repo" && cargo build --release -q -p qmig-cli)
qmig="$repo/target/release/qmig"

stream="$work/multipass.stream"
if [ ! -f "$stream" ]; then
    echo "== generating a $passes-pass stream of $mib MiB pc.ram" >&2
    rm -rf "$work/ram"
    "$qmig" extract "$repo/tests/data/q10-stopped/stream" -o "$work/ram" >/dev/null 2>&1
    python3 - "$work/ram" "$mib" <<'PY'
import json, os, random, sys
d, mib = sys.argv[1], int(sys.argv[2])
m = json.load(open(os.path.join(d, "manifest.json")))
b = next(b for b in m["blocks"] if b["name"] == "pc.ram")
rng = random.Random(7)
size = mib << 20
path = os.path.join(d, b["file"])
# The first MiB stays the captured guest's (BIOS data, option ROMs, the
# vapic ROM kvm-tpr-opt's state points into), so QEMU 10 can load the
# stream (scripts/bench_convert_load.py).
low = open(path, "rb").read(1 << 20).ljust(1 << 20, b"\0")
with open(path, "wb") as f:
    f.write(low)
    # Mostly non-zero pages, one in eight left zero.
    for p in range(256, size // 4096):
        f.write(bytes(4096) if p % 8 == 0 else rng.randbytes(4096))
b["length"] = size
json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
PY
    "$qmig" send --ram "$work/ram" --template "$repo/tests/data/q10-stopped/stream" \
        --to "file:$stream" --passes "$passes" --dirty-fraction "$fraction" --seed 3 --force 2>&1 \
        | grep -v warning >&2 || true
fi
size=$(stat -c %s "$stream")
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs," \
     "$(free -g | awk '/^Mem:/{print $2}') GiB RAM, fs of $work: $(df -T "$work" | awk 'NR==2{print $2}')"
echo "qmig: $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- crates || echo ' +uncommitted changes in crates/')"
echo "stream: $stream  $size bytes ($((size >> 20)) MiB), $("$qmig" inspect --json "$stream" | python3 -c 'import json,sys; t=json.load(sys.stdin)["totals"]; print(t["page"], "PAGE,", t["zero"], "ZERO records")')"

cat "$stream" >/dev/null
now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }
cp_t=(); cv_t=()
for i in $(seq "$runs"); do
    rm -f "$work/x.cp"; sync
    t0=$(now); cp "$stream" "$work/x.cp"; t1=$(now)
    cp_t+=("$(calc "$t1 - $t0")")
    rm -f "$work/x.cp" "$work/x.conv"; sync
    t0=$(now); "$qmig" convert "$stream" "$work/x.conv" 2>"$work/convert.err" \
        || { cat "$work/convert.err" >&2; exit 1; }; t1=$(now)
    cv_t+=("$(calc "$t1 - $t0")")
    sync
done
best() { printf '%s\n' "$@" | sort -n | head -1; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
cb=$(best "${cp_t[@]}"); cm=$(median "${cp_t[@]}")
vb=$(best "${cv_t[@]}"); vm=$(median "${cv_t[@]}")
echo "cp:      runs ${cp_t[*]}  best $cb s, median $cm s"
echo "convert: runs ${cv_t[*]}  best $vb s, median $vm s"
echo "ratio convert/cp: best $(calc "$vb / $cb" 2) x, median $(calc "$vm / $cm" 2) x"

rm -f "$work/x.conv"
/usr/bin/time -v "$qmig" convert "$stream" "$work/x.conv" --report 2>"$work/time.err" \
    | sed 's/^/  /'
echo "convert peak RSS: $(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/time.err") KiB" \
     "(the final RAM image, $mib MiB of pc.ram and the other blocks, is anonymous memory and counts in it);" \
     "CPU: user $(sed -n 's/.*User time (seconds): //p' "$work/time.err") s, system $(sed -n 's/.*System time (seconds): //p' "$work/time.err") s"
rm -rf "$work/a" "$work/b"
"$qmig" extract "$stream" -o "$work/a" >/dev/null 2>&1
"$qmig" extract "$work/x.conv" -o "$work/b" >/dev/null 2>&1
for f in "$work"/a/*.img; do cmp -s "$f" "$work/b/$(basename "$f")" \
    || { echo "MISMATCH: $(basename "$f")" >&2; exit 1; }; done
echo "extract(convert(x)) == extract(x): all $(ls "$work"/a/*.img | wc -l) images equal"
rm -rf "$work/a" "$work/b" "$work/x.conv"
