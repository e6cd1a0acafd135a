#!/usr/bin/env bash
# Runs the whole workspace test suite as an unprivileged user: builds every
# test binary (`cargo test --workspace --no-run`, as the caller), then runs
# each one as QMIG_TEST_USER (default nobody) through setpriv, from its
# package directory as cargo does, with HOME=/tmp. Exits non-zero if any
# binary fails. Must be started as root (setpriv changes the user); the
# checkout and target/ must be readable by that user.
# vm.unprivileged_userfaultfd is reported, never changed: with 0 the
# userfaultfd tests take their user-mode-only path (Linux 5.11 or later).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
user="${QMIG_TEST_USER:-nobody}"
uid="$(id -u "$user")" || exit 2
gid="$(id -g "$user")" || exit 2
if [ "$(id -u)" != 0 ]; then
    echo "test_unprivileged.sh: run as root (setpriv switches to $user)" >&2
    exit 2
fi
as_user() { HOME=/tmp setpriv --reuid="$uid" --regid="$gid" --clear-groups "$@"; }
# A checkout under a private directory (e.g. /root, mode 700) cannot be
# reached by $user: grant search permission (o+x, never read) on the
# ancestors that lack it for the length of the run, and take it back after.
opened=()
restore() { [ ${#opened[@]} -eq 0 ] || chmod o-x "${opened[@]}"; }
if ! as_user test -r "$root/Cargo.toml"; then
    d="$root"
    while [ "$d" != / ]; do
        d="$(dirname "$d")"
        if [ "$(( 0$(stat -c %a "$d") & 1 ))" -eq 0 ]; then opened+=("$d"); fi
    done
    if [ ${#opened[@]} -gt 0 ]; then
        echo "test_unprivileged.sh: granting o+x for this run on: ${opened[*]}"
        chmod o+x "${opened[@]}"
    fi
    if ! as_user test -r "$root/Cargo.toml"; then
        restore
        echo "test_unprivileged.sh: $user cannot read $root (make the checkout readable)" >&2
        exit 2
    fi
fi
echo "vm.unprivileged_userfaultfd = $(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo '?')"

list="$(mktemp)"
trap 'rm -f "$list"; restore' EXIT
if ! cargo test --workspace --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m.get("profile", {}).get("test"):
        print(m["executable"], os.path.dirname(m["manifest_path"]))
' >"$list"; then
    echo "test_unprivileged.sh: cargo test --workspace --no-run failed" >&2
    exit 1
fi
n="$(wc -l <"$list")"
if [ "$n" -eq 0 ]; then
    echo "test_unprivileged.sh: no test binaries found" >&2
    exit 1
fi

fail=0
while read -r exe dir; do
    out="$(cd "$dir" && as_user "$exe" -q --nocapture 2>&1)"
    rc=$?
    printf '%s %s %s\n' "$rc" "$(basename "$exe")" \
        "$(printf '%s\n' "$out" | grep -E '^test result' | tail -1)"
    printf '%s\n' "$out" | grep -E 'SKIPPED' | sed 's/^/    /'
    if [ "$rc" -ne 0 ]; then
        fail=1
        printf '%s\n' "$out" | grep -E 'FAILED|panicked|failures:' | head -20 | sed 's/^/    /'
    fi
done <"$list"
if [ "$fail" -ne 0 ]; then
    echo "unprivileged test run ($user, $n binaries): FAILED"
    exit 1
fi
echo "unprivileged test run ($user, $n binaries): all passed"
