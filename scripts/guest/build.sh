#!/usr/bin/env bash
# Build the qmig dirtying guest (guest.S) into a 1 MiB raw disk image.
#
# usage: build.sh [-o OUT.img] [-s DIRTY_START] [-n DIRTY_SIZE] [-w WRITES_PER_PAGE]
#                 [-d DELAY_TSC] [-p MAX_PASSES]
# Defaults: OUT=${QMIG_BUILD_DIR:-/tmp/qmig-guest}/guest.img, other values as in guest.S.
# Prints the path of the image on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${QMIG_BUILD_DIR:-/tmp/qmig-guest}/guest.img"
defs=()
while getopts "o:s:n:w:d:p:h" opt; do
    case "$opt" in
        o) out="$OPTARG" ;;
        s) defs+=("-DDIRTY_START=$OPTARG") ;;
        n) defs+=("-DDIRTY_SIZE=$OPTARG") ;;
        w) defs+=("-DWRITES_PER_PAGE=$OPTARG") ;;
        d) defs+=("-DDELAY_TSC=$OPTARG") ;;
        p) defs+=("-DMAX_PASSES=$OPTARG") ;;
        *) sed -n '2,7p' "$0" >&2; exit 2 ;;
    esac
done
mkdir -p "$(dirname "$out")"
tmp="$(mktemp -d /tmp/qmig-guest-build.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
gcc -m32 -c ${defs[@]+"${defs[@]}"} -o "$tmp/guest.o" "$here/guest.S"
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$tmp/guest.bin" "$tmp/guest.o"
size=$(stat -c %s "$tmp/guest.bin")
if [ "$size" -ne 512 ]; then
    echo "build.sh: boot sector is $size bytes, expected 512" >&2
    exit 1
fi
cp "$tmp/guest.bin" "$out.tmp"
truncate -s 1M "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
