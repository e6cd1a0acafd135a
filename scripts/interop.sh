#!/usr/bin/env bash
# Live interop suite: real QEMU 10 / 7.2 streams against the qmig CLI.
#
#   QMIG=target/release/qmig scripts/interop.sh [SCENARIO...]
#
# 1. installs QEMU (scripts/install-qemu.sh; needs root, idempotent; skip with
#    QMIG_SKIP_INSTALL=1),
# 2. captures fresh streams of every scenario (scripts/capture.py --list) into a temp dir
#    (no size limit, no gzip); scenarios this host cannot run (q10-hugepage-postcopy
#    without root/hugetlbfs) are reported as SKIPPED and do not fail the suite,
# 3. checks each one with scripts/check_capture.py: `qmig roundtrip` exits 0,
#    `qmig inspect --json` counts match the stream and QEMU's counters, `qmig extract`
#    images match the source's pmemsave digests,
# 4. also checks the committed corpus in tests/data.
# Exits non-zero on any failure; prints a summary table. Keep the temp dir with
# QMIG_KEEP=1.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

if [ -z "${QMIG:-}" ]; then
    for c in target/release/qmig target/debug/qmig; do
        if [ -x "$c" ]; then QMIG="$c"; break; fi
    done
fi
QMIG="${QMIG:-target/release/qmig}"
if [ ! -x "$QMIG" ]; then
    echo "interop: qmig binary '$QMIG' not found; build it or set QMIG" >&2
    exit 2
fi
QMIG="$(cd "$(dirname "$QMIG")" && pwd)/$(basename "$QMIG")"
export QMIG

if [ "${QMIG_SKIP_INSTALL:-0}" != 1 ]; then
    "$here/install-qemu.sh"
fi

work="$(mktemp -d /tmp/qmig-interop.XXXXXX)"
cleanup() {
    if [ "${QMIG_KEEP:-0}" = 1 ]; then
        echo "interop: kept $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

status=0
echo "== capturing fresh streams into $work" >&2
if ! python3 "$here/capture.py" --out "$work/fresh" --max-size 0 --retries 2 "$@"; then
    echo "interop: capture failed for some scenarios (see above)" >&2
    status=1
fi

echo "== checking fresh captures with $QMIG" >&2
if [ -d "$work/fresh" ] && ls "$work"/fresh/*/oracle.json >/dev/null 2>&1; then
    python3 "$here/check_capture.py" --qmig "$QMIG" "$work/fresh" || status=1
else
    echo "interop: no fresh captures to check" >&2
    status=1
fi

if [ -d "$repo/tests/data" ] && ls "$repo"/tests/data/*/oracle.json >/dev/null 2>&1; then
    echo "== checking committed corpus tests/data with $QMIG" >&2
    python3 "$here/check_capture.py" --qmig "$QMIG" "$repo/tests/data" || status=1
fi

if [ "$status" -ne 0 ]; then
    echo "interop: FAILED" >&2
else
    echo "interop: all checks passed" >&2
fi
exit "$status"
