#!/usr/bin/env bash
# Fuzzing at scale: runs every cargo-fuzz target (or the ones named) for
# SECONDS each, as many at once as the machine has cores, on the kept corpus
# fuzz/corpus/<target> (gitignored; seeded from the real captures by
# fuzz/seed.sh), and appends one row per target to fuzz/CAMPAIGNS.md:
# executions, coverage (libFuzzer's cov/ft), corpus size, peak RSS, crashes.
# A crash is copied to fuzz/regressions/<target>/ (commit it: the test suite
# replays that directory) and makes the script exit 1.
#
# usage: scripts/fuzz_campaign.sh SECONDS [TARGET...]
# env:   QMIG_FUZZ_JOBS  targets run at once (default: nproc)
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
    echo "usage: $0 SECONDS [TARGET...]" >&2
    exit 2
fi
secs="$1"
shift
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here/fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz
bash ./seed.sh
if [ $# -gt 0 ]; then targets="$*"; else targets="$(cargo fuzz list)"; fi
cargo fuzz build >/dev/null
jobs="${QMIG_FUZZ_JOBS:-$(nproc)}"
logs="$here/target/fuzz-campaign"
rm -rf "$logs"
mkdir -p "$logs"
started="$(date -u +%FT%TZ)"
stamp="$logs/.started"
touch "$stamp"
echo "fuzz campaign: $(echo "$targets" | wc -w) targets x ${secs}s, $jobs at a time ($started)"

run_one() {
    local t="$1"
    mkdir -p "corpus/$t" "artifacts/$t"
    # -timeout: an input slower than 10 s is a finding too (a hang).
    cargo fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=70000 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$logs/$t.log" 2>&1 || echo "exit $?" >>"$logs/$t.log"
}
export -f run_one
export secs logs
printf '%s\n' $targets | xargs -P "$jobs" -I{} bash -c 'run_one {}'

md="$here/fuzz/CAMPAIGNS.md"
if [ ! -f "$md" ]; then
    cat >"$md" <<'EOF'
# Fuzz campaigns

Appended by `scripts/fuzz_campaign.sh SECONDS`: one row per target and run.
`execs` is libFuzzer's `number_of_executed_units`; `cov`/`ft` are its edge
coverage and feature counts at the end of the run; `corpus` the number of
inputs kept in `fuzz/corpus/<target>` afterwards.

| date (UTC) | commit | machine | target | seconds | execs | cov | ft | corpus | peak RSS MB | crashes |
|---|---|---|---|---|---|---|---|---|---|---|
EOF
fi
rev="$(git -C "$here" rev-parse --short HEAD)"
cpu="$(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/ *$//')"
found=0
for t in $targets; do
    log="$logs/$t.log"
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)"
    rss="$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n1)"
    last="$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n1 || true)"
    cov="$(printf '%s' "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || true)"
    ft="$(printf '%s' "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || true)"
    corpus="$(find "corpus/$t" -type f | wc -l)"
    crashes=0
    # Only what this campaign wrote: artifacts/ keeps those of earlier runs.
    for a in $(find "artifacts/$t" -maxdepth 1 -type f -newer "$stamp" \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | sort); do
        crashes=$((crashes + 1))
        mkdir -p "regressions/$t"
        cp "$a" "regressions/$t/"
        echo "CRASH: $t: $a (copied to fuzz/regressions/$t/)"
    done
    [ "$crashes" -eq 0 ] || found=1
    if [ -z "$execs" ]; then
        echo "fuzz campaign: $t did not report stats; see $log" >&2
        tail -n 20 "$log" >&2
        found=1
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
        "$started" "$rev" "$cpu" "$t" "$secs" "${execs:-?}" "${cov:-?}" "${ft:-?}" \
        "$corpus" "${rss:-?}" "$crashes" >>"$md"
    printf '%-18s execs %-10s cov %-6s ft %-7s corpus %-6s crashes %s\n' \
        "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "$crashes"
done
exit "$found"
