#!/usr/bin/env bash
# Fetches QEMU 10's scripts/analyze-migration.py from Debian's qemu source
# package in bookworm-backports, into DESTDIR (default: a new temporary
# directory), and prints the script's path. Nothing is written to the
# repository or to /etc/apt: apt runs with a private source list and lists
# directory. The mirror is the one the system's bookworm-backports source
# names (/etc/apt/sources.list.d/).
# Usage: scripts/fetch_analyze_migration.sh [DESTDIR]
set -euo pipefail
dest="${1:-$(mktemp -d /tmp/analyze-migration.XXXXXX)}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
if [ -f "$dest/analyze-migration.py" ]; then
    echo "$dest/analyze-migration.py"
    exit 0
fi
fail() { echo "fetch_analyze_migration: $*" >&2; exit 1; }

# The mirror URI of the bookworm-backports source (deb822 or one-line format).
uri=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if grep -q '^Suites:.*bookworm-backports' "$f"; then
        uri="$(awk '/^URIs:/{print $2; exit}' "$f")"
        break
    fi
done
if [ -z "$uri" ]; then
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1=="deb" && $0 ~ /bookworm-backports/ {print $2; exit}')" || true
fi
if [ -z "$uri" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
fi
[ -n "$uri" ] || fail "no Debian mirror found in /etc/apt/sources.list.d/"

work="$(mktemp -d /tmp/analyze-migration-apt.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/src"
cat > "$work/src.sources" <<SRC
Types: deb-src
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceList=$work/src.sources" -o "Dir::Etc::SourceParts=$work/none"
      -o "Dir::State::Lists=$work/lists" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -q update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; fail "apt-get update of the deb-src index failed"; }
# Only the upstream tarball is needed; the Debian parts may be missing on a
# partial mirror, so the exit status alone does not decide.
(cd "$work/src" && apt-get "${opts[@]}" source --download-only qemu >"$work/source.log" 2>&1) || true
tarball="$(ls "$work"/src/qemu_10.*.orig.tar.* 2>/dev/null | head -1)"
[ -n "$tarball" ] || { cat "$work/source.log" >&2; fail "could not download qemu 10's source tarball from $uri bookworm-backports"; }
tar -xf "$tarball" -C "$work" --wildcards 'qemu-10.*/scripts/analyze-migration.py' ||
    fail "$tarball has no scripts/analyze-migration.py"
cp "$work"/qemu-10.*/scripts/analyze-migration.py "$dest/analyze-migration.py"
echo "# from $(basename "$tarball")" >"$dest/SOURCE"
echo "$dest/analyze-migration.py"
