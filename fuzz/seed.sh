#!/usr/bin/env bash
# Builds the fuzz seed corpora from the committed real QEMU captures
# (tests/data): whole small streams, their first 64 KiB, and return paths.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/../tests/data"
for t in parse_stream roundtrip return_path src_return_path xbzrle_decode xbzrle_roundtrip ram_dst_ops cli_args vmstate_decode container_open recv_state multifd_packet multifd_apply multifd_offline convert recovery src_recovery phys_map dst_recovery; do
    mkdir -p "$here/corpus/$t"
done
# Machine types, layouts and RAM blocks as qmig-phys sees them.
i=0
for s in 'pc-i440fx-10.0|||pc.ram=4294967296|pc.bios=262144' 'pc-q35-10.0||1073741824|m0=2097152|m1=2097152' \
         'microvm|||microvm.ram=4294967296' 'virt-10.0|||mach-virt.ram=16777216|virt.flash0=67108864' \
         'x|q35:m1,m0||m0=2097152|m1=2097152' 'sun4u|flat||sun4u.ram=16777216'; do
    i=$((i + 1))
    printf '%s' "$s" > "$here/corpus/phys_map/seed-$i"
done
# URIs and sizes as users write them.
i=0
for s in tcp:127.0.0.1:4444 tcp::4444 'tcp:[::1]:4444' unix:/run/qmig.sock file:/tmp/x.stream \
         'exec:cat > x' 64M 1.5G 4096 0.5k; do
    i=$((i + 1))
    printf '%s' "$s" > "$here/corpus/cli_args/seed-$i"
done
for d in "$data"/*/; do
    n="$(basename "$d")"
    if [ -f "$d/stream" ]; then s="$d/stream"; else s=""; fi
    if [ -n "$s" ]; then
        for t in parse_stream roundtrip ram_dst_ops recv_state convert; do
            head -c 65536 "$s" > "$here/corpus/$t/$n-head"
            # A stream's tail (device sections, EOF, vmdesc) behind a header.
            { head -c 8 "$s"; tail -c 32768 "$s"; } > "$here/corpus/$t/$n-tail"
        done
    fi
    if [ -f "$d/rp" ]; then
        cp "$d/rp" "$here/corpus/return_path/$n-rp"
        cp "$d/rp" "$here/corpus/src_return_path/$n-rp"
    fi
done
# recovery: the connections of the recovered postcopy captures, behind the
# target's mode byte (0: recovery main connection, 1: preempt channel,
# 2: return path).
for d in "$data"/recovery/*/; do
    [ -d "$d" ] || continue
    n="$(basename "$d")"
    for f in "$d"main-*.bin.gz "$d"preempt-*.bin.gz "$d"rp-*.bin.gz; do
        [ -f "$f" ] || continue
        b="$(basename "$f" .bin.gz)"
        case "$b" in
            main-1) continue ;;  # starts with a QEVM header, not a recovery connection
            main-*) m='\x00' ;;
            preempt-*) m='\x01' ;;
            *) m='\x02' ;;
        esac
        { printf "$m"; gzip -dc "$f" | head -c 65536 || true; } > "$here/corpus/recovery/$n-$b"
        # src_recovery: the return path after the cut (RECV_BITMAP replies,
        # RESUME_ACK, re-sent requests) behind the target's cut byte.
        case "$b" in
            rp-1) ;;
            rp-*) { printf '\x00'; gzip -dc "$f" || true; } > "$here/corpus/src_recovery/$n-$b" ;;
        esac
    done
done
# dst_recovery: a recovery connection for the target's layout (RECV_BITMAP
# pc.ram, small; POSTCOPY_RESUME; a PAGE naming pc.ram; EOF), the same cut
# after the bitmaps (mode 2), a preempt channel's ZERO record (mode 1), and
# the real recovery connections behind mode byte 0.
printf '\x00\x08\x00\x09\x00\x07\x06pc.ram\x08\x00\x09\x00\x06\x05small\x08\x00\x07\x00\x00\x10\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x10\x02\x06pc.ram\x00\x00\x00\x00\x00\x00\x00\x10\x7e\x00\x00\x00\x02\x1f' > "$here/corpus/dst_recovery/resume"
printf '\x02\x0a\x08\x00\x09\x00\x07\x06pc.ram\x08\x00\x09\x00\x06\x05small\x08\x00\x07\x00\x00' > "$here/corpus/dst_recovery/cut-twice"
printf '\x01\x00\x00\x00\x00\x00\x00\x10\x02\x06pc.ram' > "$here/corpus/dst_recovery/preempt-zero"
for f in "$data"/recovery/*/main-2.bin.gz; do
    [ -f "$f" ] || continue
    { printf '\x00'; gzip -dc "$f" | head -c 65536 || true; } > "$here/corpus/dst_recovery/$(basename "$(dirname "$f")")-main-2"
done
# Field inputs: the mapped-ram file's head (configuration with mapped-ram,
# the MEM_SIZE word, the first block header, its bitmap and padding).
mr="$data/field/mapped-ram-file/stream.gz"
if [ -f "$mr" ]; then
    tmp="$(mktemp)"
    gzip -dc "$mr" > "$tmp"
    for t in parse_stream roundtrip ram_dst_ops convert; do
        head -c 65536 "$tmp" > "$here/corpus/$t/mapped-ram-head"
    done
    rm -f "$tmp"
fi
# multifd_packet: each channel of the multifd captures, whole (mode byte
# 0x80: 4 KiB pages, channel) and from its first packet on (mode byte 0x02:
# 4 KiB pages, one packet).
tmp="$(mktemp)"
for c in "$data"/multifd/*/conn-*.bin.gz; do
    [ -f "$c" ] || continue
    n="$(basename "$(dirname "$c")")-$(basename "$c" .bin.gz)"
    gzip -dc "$c" > "$tmp"
    if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n')" = "11223344" ]; then
        { printf '\x80'; head -c 300000 "$tmp"; } > "$here/corpus/multifd_packet/$n"
        head -c 300000 "$tmp" > "$here/corpus/multifd_apply/$n"
        head -c 300000 "$tmp" > "$here/corpus/multifd_offline/$n"
        # (dd, not tail | head: under pipefail head's early exit is an error)
        { printf '\x02'; dd if="$tmp" iflag=skip_bytes,count_bytes skip=64 count=20000 status=none; } \
            > "$here/corpus/multifd_packet/$n-packet"
    fi
done
rm -f "$tmp"
# vmstate_decode: per device of every capture with a vmdesc, a vmdesc naming
# only that device, a NUL, and the device's payload (walked with the
# description's lengths from the first FULL header of the first device).
python3 - "$data" "$here/corpus/vmstate_decode" <<'PY'
import glob, gzip, json, os, struct, sys
data, out = sys.argv[1], sys.argv[2]
def plen(s):
    n = sum(f["size"] * f.get("array_len", 1) for f in s["fields"])
    return n + sum(6 + len(x["vmsd_name"]) + plen(x) for x in s.get("subsections", []))
for p in sorted(glob.glob(data + "/*/stream") + glob.glob(data + "/*/stream.gz")):
    b = gzip.open(p).read() if p.endswith(".gz") else open(p, "rb").read()
    j = b.rfind(b"\x00\x06")
    if j < 0 or b[-1:] != b"}":
        continue
    try:
        d = json.loads(b[j + 6:])
    except ValueError:
        continue
    devs = d["devices"]
    hdr = lambda v: bytes([len(v["name"])]) + v["name"].encode() + struct.pack(">I", v["instance_id"])
    pos = b.find(hdr(devs[0])) - 5
    name = os.path.basename(os.path.dirname(p))
    for i, v in enumerate(devs):
        if pos < 0 or b[pos] != 4:
            break
        start = pos + 5 + len(hdr(v)) + 4
        end = start + plen(v)
        one = json.dumps({"page_size": d.get("page_size"), "devices": [v]}).encode()
        with open(f"{out}/{name}-{i}", "wb") as f:
            f.write(one + b"\x00" + b[start:end])
        pos = end + 5
PY
# libvirt save images: header, XML and the first bytes of each payload.
for s in "$data"/libvirt-save/*.sav; do
    [ -f "$s" ] || continue
    head -c 70000 "$s" > "$here/corpus/container_open/$(basename "$s")-head"
done
# Committed regression inputs (fuzz crashes turned into tests).
if [ -d "$here/regressions" ]; then
    for t in "$here"/regressions/*/; do
        tn="$(basename "$t")"
        mkdir -p "$here/corpus/$tn"
        cp "$t"/* "$here/corpus/$tn/" 2>/dev/null || true
    done
fi
echo "seeded: $(ls "$here"/corpus | tr '\n' ' ')"
