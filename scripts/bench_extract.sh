#!/usr/bin/env bash
# Benchmark `qmig extract` against `cp` of the same stream, and measure peak RSS of
# `qmig extract`, `qmig inspect` and (on a synthesized ~1 GiB stream) `qmig inspect` and
# `qmig roundtrip` (requirement: incremental reader peak RSS < 64 MiB on a 1 GiB stream).
#
# usage: bench_extract.sh [STREAM]
#   STREAM  a migration stream; default: a fresh >= 200 MiB QEMU 10 capture made by
#           scripts/big_capture.py into $QMIG_BENCH_DIR (default /tmp/qmig-bench)
# env:     RUNS (default 5) timed runs of each of cp and extract, interleaved;
#          QMIG_BENCH_DIR work directory (must have ~3 GiB free; cp/extract targets live
#          there, so both write to the same filesystem); SYNTH_GIB (default 1).
#
# Needs GNU time as /usr/bin/time for peak RSS ("Maximum resident set size"); when it is
# missing the script installs Debian's `time` package with apt-get (root only).
# The page cache is never dropped: the stream is read once first so every run sees it warm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
runs="${RUNS:-5}"
work="${QMIG_BENCH_DIR:-/tmp/qmig-bench}"
synth_gib="${SYNTH_GIB:-1}"
mkdir -p "$work"

if [ ! -x /usr/bin/time ]; then
    echo "== /usr/bin/time missing: installing the Debian 'time' package (apt-get)" >&2
    apt-get install -y time >/dev/null || { apt-get update >/dev/null && apt-get install -y time >/dev/null; }
fi

echo "== building qmig (release)" >&2
(cd "$repo" && cargo build --release -q -p qmig-cli)
qmig="$repo/target/release/qmig"

if [ $# -ge 1 ]; then
    stream="$1"
else
    stream="$work/big.stream"
    echo "== making the big capture: scripts/big_capture.py $stream" >&2
    python3 "$here/big_capture.py" "$stream" >&2
fi
[ -f "$stream" ] || { echo "no such stream: $stream" >&2; exit 1; }
size=$(stat -c %s "$stream")

echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs," \
     "$(free -g | awk '/^Mem:/{print $2}') GiB RAM, fs of $work: $(df -T "$work" | awk 'NR==2{print $2}')"
echo "qmig: $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- crates || echo ' +uncommitted changes in crates/')"
echo "stream: $stream  $size bytes ($((size >> 20)) MiB)"

# Warm the page cache (never dropped).
cat "$stream" >/dev/null

now() { echo "$EPOCHREALTIME"; }
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }
cp_t=() ; ex_t=()
for i in $(seq "$runs"); do
    rm -f "$work/x.cp"; rm -rf "$work/x.extract"; sync
    t0=$(now); cp "$stream" "$work/x.cp"; t1=$(now)
    cp_t+=("$(calc "$t1 - $t0")")
    rm -f "$work/x.cp"; sync
    t0=$(now); "$qmig" extract "$stream" -o "$work/x.extract" >/dev/null 2>"$work/extract.err" \
        || { cat "$work/extract.err" >&2; exit 1; }; t1=$(now)
    ex_t+=("$(calc "$t1 - $t0")")
    rm -rf "$work/x.extract"
done
stats() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{printf "%.3f %.3f", a[1], a[int((NR+1)/2)]}'; }
read -r cp_best cp_med <<<"$(stats "${cp_t[@]}")"
read -r ex_best ex_med <<<"$(stats "${ex_t[@]}")"
echo "cp      STREAM $work/x.cp    : best ${cp_best}s  median ${cp_med}s  ($runs runs: ${cp_t[*]})"
echo "extract STREAM -o $work/x.extract: best ${ex_best}s  median ${ex_med}s  ($runs runs: ${ex_t[*]})"
echo "ratio extract/cp: best $(calc "$ex_best / $cp_best" 2)" \
     " median $(calc "$ex_med / $cp_med" 2)  (goal <= 1.0; analyze-migration.py: 3.75)"
echo "throughput: cp $(calc "$size / $cp_best / 1048576" 0) MiB/s," \
     "extract $(calc "$size / $ex_best / 1048576" 0) MiB/s (best runs)"

# peak_rss LABEL CMD...: runs CMD under GNU time, prints peak RSS and wall time.
peak_rss() {
    local label="$1"; shift
    local log="$work/time.log" rc=0
    /usr/bin/time -v "$@" >/dev/null 2>"$log" || rc=$?
    local kb wall
    kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$log")
    wall=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$log")
    printf '%-44s peak RSS %7.1f MiB  wall %s  exit %d\n' "$label" "$(calc "$kb / 1024" 1)" "$wall" "$rc"
    if [ "$rc" -ne 0 ]; then tail -5 "$log" >&2; fi
    PEAK_KB=$kb
}

peak_rss "qmig extract ($((size >> 20)) MiB stream)" "$qmig" extract "$stream" -o "$work/x.extract"
rm -rf "$work/x.extract"
peak_rss "qmig inspect ($((size >> 20)) MiB stream)" "$qmig" inspect "$stream"

# ~SYNTH_GIB GiB stream without QEMU: the capture's bytes with K copies of a RAM PART section
# of real PAGE records (16384 pc.ram pages of the capture, the first record naming the
# block, the rest CONTINUE) inserted right after the RAM START section (before the first
# original PART, whose first record names its block, so the copies change no context).
synth="$work/synth.stream"
echo "== synthesizing $synth (~${synth_gib} GiB)" >&2
python3 - "$stream" "$synth" "$synth_gib" "$here" <<'PY'
import struct
import sys
src, out, gib, scripts = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
sys.path.insert(0, scripts)
import qemustream as q  # noqa: E402  (read-only use of the reference reader)


class Spans(q.Stream):
    """Records (type, section id, start, end) of every RAM live section, footer included."""

    def ram_section(self, r, is_start):
        t, sid = self.sections[-1][0], self.sections[-1][1]
        p0 = r.p
        super().ram_section(r, is_start)
        self.spans = getattr(self, "spans", [])
        self.spans.append((t, sid, p0, r.p + 5))


d = q.load(src)
s = Spans(d, decode=False)
start = [x for x in s.spans if x[0] == q.SEC_START][0]
part = [x for x in s.spans if x[0] == q.SEC_PART]
if not part:
    sys.exit("no RAM PART section in the capture")
sid, insert_at = start[1], start[3]

# Collect real PAGE records of pc.ram from the PART sections.
pages = []
want = 16384
for _, _, p0, _ in part:
    r = q.Reader(d, p0)
    blk = None
    while len(pages) < want:
        h = r.u64()
        flags, addr = h & 0xFFF, h & ~0xFFF
        if flags & q.F_EOS:
            break
        if not flags & q.F_CONTINUE:
            blk = r.take(r.u8()).decode()
        kind = flags & ~q.F_CONTINUE
        if kind == q.F_PAGE:
            data = r.take(q.PAGE)
            if blk == "pc.ram":
                pages.append((addr, data))
        elif kind == q.F_ZERO:
            r.u8()
        else:
            break  # other record kinds: use what we have
    if len(pages) >= want:
        break
if not pages:
    sys.exit("no pc.ram PAGE records found")

sec = bytearray(struct.pack(">BI", q.SEC_PART, sid))
for i, (addr, data) in enumerate(pages):
    if i == 0:
        sec += struct.pack(">Q", addr | q.F_PAGE) + bytes([len(b"pc.ram")]) + b"pc.ram"
    else:
        sec += struct.pack(">Q", addr | q.F_PAGE | q.F_CONTINUE)
    sec += data
sec += struct.pack(">Q", q.F_EOS) + struct.pack(">BI", q.SEC_FOOTER, sid)
target = int(gib * (1 << 30))
k = max(1, -(-(target - len(d)) // len(sec)))
with open(out, "wb") as f:
    f.write(memoryview(d)[:insert_at])
    for _ in range(k):
        f.write(sec)
    f.write(memoryview(d)[insert_at:])
total = len(d) + k * len(sec)
print(f"synth: {total} bytes ({total / (1 << 30):.2f} GiB) = capture + {k} x PART of "
      f"{len(pages)} PAGE records ({len(sec)} bytes) after the RAM START section",
      file=sys.stderr)
PY
ssize=$(stat -c %s "$synth")
cat "$synth" >/dev/null
rc=0; "$qmig" roundtrip "$synth" >/dev/null || rc=$?
echo "synthesized stream: $synth  $ssize bytes ($((ssize >> 20)) MiB); qmig roundtrip exit $rc"
limit_kb=$((64 * 1024))
for sub in inspect roundtrip; do
    peak_rss "qmig $sub ($((ssize >> 20)) MiB synthesized)" "$qmig" "$sub" "$synth"
    if [ "$PEAK_KB" -gt "$limit_kb" ]; then
        echo "  FAIL: qmig $sub peak RSS $((PEAK_KB / 1024)) MiB EXCEEDS the 64 MiB limit"
    else
        echo "  ok: qmig $sub peak RSS under 64 MiB"
    fi
done
peak_rss "qmig extract ($((ssize >> 20)) MiB synthesized, info)" "$qmig" extract "$synth" -o "$work/x.extract"
rm -rf "$work/x.extract"
[ "${KEEP_SYNTH:-0}" = 1 ] || rm -f "$synth"
