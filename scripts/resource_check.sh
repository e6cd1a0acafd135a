#!/usr/bin/env bash
# Resource check (issue 14): runs qmig inspect, extract, roundtrip and diff on
# adversarial inputs generated here, each at two sizes (N and 4N), and fails
# if any run peaks above 64 MiB RSS, or if going from N to 4N makes the peak
# RSS more than double (+8 MiB slack: memory must not grow with the input) or
# the time grow more than 8-fold (+2 s slack: super-linear time).
#
# Usage: [QMIG=path/to/qmig] scripts/resource_check.sh [WORKDIR]
# Needs /usr/bin/time (Debian package `time`) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
QMIG="${QMIG:-$root/target/release/qmig}"
if [ ! -x "$QMIG" ]; then
    cargo build -q --release -p qmig-cli
fi
work="${1:-$(mktemp -d /tmp/qmig-resource-XXXXXX)}"
mkdir -p "$work"
LIMIT_KIB=$((64 * 1024))
fail=0

# gen KIND SCALE OUT: writes one adversarial input (built byte by byte).
gen() {
    python3 - "$1" "$2" "$3" <<'PY'
import struct, sys
kind, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PS = 4096
b = bytearray()
def u8(v): b.append(v)
def be16(v): b.extend(struct.pack(">H", v))
def be32(v): b.extend(struct.pack(">I", v))
def be64(v): b.extend(struct.pack(">Q", v))
def counted(s): u8(len(s)); b.extend(s.encode())
def cmd(c, p=b""): u8(0x08); be16(c); be16(len(p)); b.extend(p)
def head(machine):
    b.extend(b"QEVM"); be32(3); u8(0x07); be32(len(machine)); b.extend(machine.encode())
def ram_start(blocks):
    u8(0x01); be32(2); counted("ram"); be32(0); be32(4)
    be64(sum(x[1] for x in blocks) | 0x04)
    for name, length, ps in blocks:
        counted(name); be64(length)
        if ps is not None: be64(ps)
    be64(0x10); u8(0x7e); be32(2)
def part(): u8(0x02); be32(2)
def sec_end(): be64(0x10); u8(0x7e); be32(2)
def zero(off, name, fill=0):
    if name: be64(off | 0x02); counted(name)
    else: be64(off | 0x22)
    u8(fill)
def finish(): u8(0x03); be32(2); sec_end(); u8(0x00)

if kind == "pings":            # n PINGs: inspect kept every command
    head("pc-i440fx-10.0"); cmd(1)
    for i in range(n): cmd(2, struct.pack(">I", i))
    ram_start([("pc.ram", 16 * PS, None)]); finish()
elif kind == "discards":       # n commands of 4000 ranges over a whole 512 GiB block
    T = 512 << 30
    head("pc-i440fx-10.0"); cmd(3)
    ram_start([("pc.ram", T, None)])
    part(); be64((T // 2) | 0x08); counted("pc.ram"); b.extend(b"\xaa" * PS); sec_end()
    rng = struct.pack(">QQ", 0, T) * 4000
    for _ in range(n): cmd(6, b"\x00\x06pc.ram\x00" + rng)
    finish()
elif kind == "sections":       # n RAM PART sections of one ZERO record each
    head("pc-i440fx-10.0")
    ram_start([("pc.ram", 1 << 30, None)])
    for i in range(n):
        part(); zero((i * PS) % (1 << 30), "pc.ram", 0); sec_end()
    finish()
elif kind == "hugepages":      # postcopy, n host pages of 2 MiB, all ZERO
    H = 2 << 20
    head("pc-i440fx-10.0"); cmd(1)
    cmd(3, struct.pack(">QQ", PS | H, PS))
    ram_start([("mem0", n * H, H)])
    cmd(4); cmd(5); part()
    for p in range(n * H // PS): zero(p * PS, "mem0" if p == 0 else None)
    sec_end(); finish()
elif kind == "gib":            # postcopy, one 1 GiB host page, all ZERO
    G = 1 << 30
    head("pc-i440fx-10.0"); cmd(1)
    cmd(3, struct.pack(">QQ", PS | G, PS))
    ram_start([("mem0", G, G)])
    cmd(4); cmd(5); part()
    for p in range(G // PS): zero(p * PS, "mem0" if p == 0 else None)
    sec_end(); finish()
elif kind == "spread":         # 512 GiB block, one ZERO (fill 0x55) per bitmap page
    L = 512 << 30; stride = 32768 * PS
    head("pc-i440fx-7.2")
    ram_start([("pc.ram", L, None)]); part()
    for i in range(L // stride): zero(i * stride, "pc.ram" if i == 0 else None, 0x55)
    sec_end(); finish()
elif kind == "fill72":         # QEMU 7.2 machine: n ZERO records with fill 0x55 (leniency)
    head("pc-i440fx-7.2")
    ram_start([("pc.ram", 1 << 30, None)]); part()
    for p in range(n): zero(p * PS, "pc.ram" if p == 0 else None, 0x55)
    sec_end(); finish()
elif kind == "mapped":         # mapped-ram: n blocks of 64 pages at 1 MiB-aligned offsets (n MiB)
    head("pc-i440fx-10.0")
    u8(0x05); counted("configuration/capabilities"); be32(1); be32(1); counted("mapped-ram")
    u8(0x01); be32(2); counted("ram"); be32(0); be32(4)
    be64(n * 64 * PS | 0x04)
    for i in range(n):
        counted("b%d" % i); be64(64 * PS)
        after = len(b) + 28
        po = (after + 8 + (1 << 20) - 1) // (1 << 20) * (1 << 20)
        be32(1); be64(PS); be64(after); be64(po)
        b.extend(b"\x01" + b"\x00" * 7)       # bitmap: page 0 set
        b.extend(b"\x00" * (po - len(b)))
        b.extend(b"\xaa" * PS + b"\x00" * (63 * PS))
    sec_end(); finish()
    # The vmdesc trailer QEMU writes after EOF (no device sections here).
    j = b'{"page_size": 4096, "devices": []}'
    u8(0x06); be32(len(j)); b.extend(j)
elif kind == "rp":             # a return path of n PONGs (for inspect --return-path)
    for i in range(n): be16(2); be16(4); be32(i)
    be16(1); be16(4); be32(0)
else:
    sys.exit("unknown kind " + kind)
open(out, "wb").write(b)
PY
}

# measure CMD...: prints "KiB seconds exit-status" of one run. A refused
# input is fine here (the hostile suite checks verdicts); a huge one is not.
measure() {
    local f="$work/time.out"
    /usr/bin/time -f "%M %e %x" -o "$f" "$@" >/dev/null 2>&1 || true
    tail -n 1 "$f"
}

check() { # LABEL SMALL_RSS SMALL_T SMALL_RC BIG_RSS BIG_T BIG_RC
    local label="$1" rs="$2" ts="$3" xs="$4" rb="$5" tb="$6" xb="$7" bad=""
    if [ "$rb" -gt "$LIMIT_KIB" ] || [ "$rs" -gt "$LIMIT_KIB" ]; then bad="peak RSS over 64 MiB"; fi
    if [ "$rb" -gt $((2 * rs + 8192)) ]; then bad="${bad:+$bad; }RSS grows with the input"; fi
    if python3 -c "import sys; sys.exit(0 if $tb > 8 * $ts + 2 else 1)"; then
        bad="${bad:+$bad; }time grows super-linearly"
    fi
    printf '%-28s N: %7s KiB %6ss exit %s   4N: %7s KiB %6ss exit %s   %s\n' \
        "$label" "$rs" "$ts" "$xs" "$rb" "$tb" "$xb" "${bad:-ok}"
    if [ -n "$bad" ]; then fail=1; fi
}

declare -A scale=([pings]=200000 [discards]=4 [sections]=50000 [hugepages]=16 [fill72]=10000 [mapped]=64 [rp]=200000)
for kind in pings discards sections hugepages fill72 mapped; do
    n="${scale[$kind]}"
    gen "$kind" "$n" "$work/$kind-1"
    gen "$kind" $((4 * n)) "$work/$kind-4"
    for c in inspect "inspect --json" "inspect --records" roundtrip extract diff; do
        res=()
        for s in 1 4; do
            in="$work/$kind-$s"
            case "$c" in
                extract) r="$(measure "$QMIG" extract "$in" -o "$work/out-$kind-$s")"
                         rm -rf "$work/out-$kind-$s" ;;
                diff) r="$(measure "$QMIG" diff "$in" "$in")" ;;
                *) r="$(measure "$QMIG" $c "$in")" ;;
            esac
            res+=($r)
        done
        check "$kind: $c" "${res[@]}"
    done
done
n="${scale[rp]}"
gen rp "$n" "$work/rp-1"
gen rp $((4 * n)) "$work/rp-4"
gen pings 10 "$work/tiny"
res=()
for s in 1 4; do
    r="$(measure "$QMIG" inspect "$work/tiny" --return-path "$work/rp-$s")"
    res+=($r)
done
check "return path: inspect" "${res[@]}"

# Fixed-size cases, where only the 64 MiB limit applies: a 1 GiB host page
# (all ZERO) in postcopy; ZERO records spread over the largest adoptable
# block so that every page of its bitmaps is touched.
for kind in gib spread; do
    gen "$kind" 1 "$work/$kind"
    for c in inspect roundtrip extract diff; do
        case "$c" in
            extract) r=($(measure "$QMIG" extract "$work/$kind" -o "$work/out-$kind")); rm -rf "$work/out-$kind" ;;
            diff) r=($(measure "$QMIG" diff "$work/$kind" "$work/$kind")) ;;
            *) r=($(measure "$QMIG" $c "$work/$kind")) ;;
        esac
        printf '%-28s %7s KiB %6ss exit %s\n' "$kind: $c" "${r[@]}"
        if [ "${r[0]}" -gt "$LIMIT_KIB" ]; then echo "  peak RSS over 64 MiB"; fail=1; fi
    done
done

# Peak RSS of inspect/roundtrip/extract/convert on every committed capture and
# on a generated 1 GiB stream piped in (issue 13).
QMIG="$QMIG" bash scripts/rss_check.sh "$work/rss" || fail=1

if [ -z "${1:-}" ]; then rm -rf "$work"; fi
if [ "$fail" -ne 0 ]; then
    echo "resource check FAILED"
    exit 1
fi
echo "resource check passed"
