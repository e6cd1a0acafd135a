#!/usr/bin/env bash
# Builds the fuzz seed corpora from the committed real QEMU captures
# (tests/data): whole small streams, their first 64 KiB, and return paths.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/../tests/data"
for t in parse_stream roundtrip return_path xbzrle_decode xbzrle_roundtrip ram_dst_ops cli_args; do
    mkdir -p "$here/corpus/$t"
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
        for t in parse_stream roundtrip ram_dst_ops; do
            head -c 65536 "$s" > "$here/corpus/$t/$n-head"
            # A stream's tail (device sections, EOF, vmdesc) behind a header.
            { head -c 8 "$s"; tail -c 32768 "$s"; } > "$here/corpus/$t/$n-tail"
        done
    fi
    if [ -f "$d/rp" ]; then cp "$d/rp" "$here/corpus/return_path/$n-rp"; fi
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
