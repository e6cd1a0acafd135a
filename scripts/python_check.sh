#!/usr/bin/env bash
# The Python package and its Volatility3 layer, end to end (issue 16):
#   1. a fresh venv: pip install ./python pytest hypothesis volatility3
#      (the extension is built by maturin from the sources, in release mode)
#   2. pytest python/tests (captures vs oracle digests, read_phys vs pmemsave,
#      hypothesis fuzz of qmig.open); pytest's exit codes are told apart
#   3. Volatility3's layerwriter through the qmig layer on a QEMU 10 capture
#      and on the QEMU 7.2 multi-pass capture; the written physical layer must
#      equal the source's pmemsave digests (tests/data/*/oracle.json) outside
#      the legacy hole
#   4. `qmig extract --format raw|elf|lime` of the same QEMU 10 and 7.2
#      captures, read by Volatility3's own layers (no qmig plugin dir): vol
#      must stack Elf64Layer / LimeLayer itself, and its layerwriter output
#      must equal pmemsave outside the legacy hole (same comparison as 3)
# Environment: QMIG (the qmig binary, default target/release/qmig, built if
# missing), QMIG_PY_VENV (default target/pyvenv), QMIG_PY_TIMEOUT (seconds
# per step, default 900 for the install, 300 otherwise), QMIG_PY_REUSE=1 (keep
# an existing venv instead of reinstalling).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
venv="${QMIG_PY_VENV:-$root/target/pyvenv}"
t_install="${QMIG_PY_TIMEOUT:-900}"
t_step="${QMIG_PY_TIMEOUT:-300}"

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
py="$venv/bin/python"
if [ "${QMIG_PY_REUSE:-0}" = 1 ] && [ -x "$py" ]; then
    echo "python_check: reusing $venv (QMIG_PY_REUSE=1)"
else
    rm -rf "$venv"
    python3 -m venv "$venv"
    # Reuse what the workspace build already compiled where it matches.
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
    echo "python_check: pip install ./python pytest hypothesis volatility3 ($(date +%T))"
    timeout "$t_install" "$py" -m pip install -q --disable-pip-version-check \
        ./python pytest hypothesis volatility3
fi
"$py" -c 'import qmig, qmig.vol3; print("qmig", qmig.__file__, "plugin dir", qmig.vol3.plugin_dir())'

echo "python_check: pytest ($(date +%T))"
set +e
(cd python && timeout "$t_step" "$py" -m pytest -q -p no:cacheprovider tests)
rc=$?
set -e
case $rc in
    0) echo "python_check: pytest passed" ;;
    1) echo "python_check: pytest: tests FAILED" >&2; exit 1 ;;
    2) echo "python_check: pytest interrupted" >&2; exit 1 ;;
    3) echo "python_check: pytest internal error" >&2; exit 1 ;;
    4) echo "python_check: pytest usage error" >&2; exit 1 ;;
    5) echo "python_check: pytest collected no tests" >&2; exit 1 ;;
    124) echo "python_check: pytest timed out after ${t_step}s" >&2; exit 1 ;;
    *) echo "python_check: pytest exited with $rc" >&2; exit 1 ;;
esac

# compare_with_oracle ORACLE DIR: the one *.raw layerwriter wrote in DIR
# equals the oracle's pmemsave digests on every range outside the legacy hole.
compare_with_oracle() {
    "$py" - "$1" "$2" <<'PY'
import glob, hashlib, json, sys
oracle = json.load(open(sys.argv[1]))
files = glob.glob(sys.argv[2] + "/*.raw")
assert len(files) == 1, files
data = open(files[0], "rb").read()
hole = oracle.get("hole") or [0xA0000, 0x100000]
n = 0
for d in oracle["digests"]:
    if "gpa" not in d:
        continue
    g, l = d["gpa"], d["length"]
    if g < hole[1] and g + l > hole[0]:
        continue
    got = hashlib.sha256(data[g:g + l]).hexdigest()
    if got != d["sha256"]:
        sys.exit(f"{sys.argv[1]}: layerwriter output differs from pmemsave at [{g:#x}, +{l:#x})")
    n += 1
assert n >= 2, n
print(f"  {oracle['scenario']}: layerwriter output equals pmemsave on {n} ranges outside the hole ({len(data)} bytes)")
PY
}

echo "python_check: Volatility3 layerwriter through the qmig layer ($(date +%T))"
plugins="$("$py" -c 'import qmig.vol3; print(qmig.vol3.plugin_dir())')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for cap in q10-stopped q72-plain q35-backends; do
    out="$work/$cap"
    mkdir -p "$out"
    (cd "$out" && timeout "$t_step" "$venv/bin/vol" -q -f "$root/tests/data/$cap/stream" \
        -p "$plugins" layerwriter >"$out/vol.log" 2>&1) || {
        cat "$out/vol.log" >&2
        echo "python_check: vol layerwriter failed on $cap" >&2
        exit 1
    }
    compare_with_oracle "$root/tests/data/$cap/oracle.json" "$out"
done

# `qmig extract --format raw|elf|lime`, read by Volatility3's own layers (no
# qmig plugin dir): vol must stack its Elf64Layer on the ELF core and its
# LimeLayer on the LiME image (a raw image is its own physical layer), and the
# layer it writes must equal pmemsave outside the legacy hole.
echo "python_check: qmig extract --format raw|elf|lime through Volatility3's built-in layers ($(date +%T))"
qmig="${QMIG:-$root/target/release/qmig}"
[ -x "$qmig" ] || cargo build --release -q -p qmig-cli
for cap in q10-stopped q72-plain; do
    for fmt in raw elf lime; do
        out="$work/builtin-$cap-$fmt"
        mkdir -p "$out/vol"
        timeout "$t_step" "$qmig" -q extract "$root/tests/data/$cap/stream" -o "$out/x" --format "$fmt"
        case $fmt in
            raw) want="" ;;
            elf) want="Elf64Stacker" ;;
            lime) want="LimeStacker" ;;
        esac
        (cd "$out/vol" && timeout "$t_step" "$venv/bin/vol" -vvvv -f "$out/x/physical.$fmt" \
            layerwriter >"$out/vol.log" 2>&1) || {
            cat "$out/vol.log" >&2
            echo "python_check: vol layerwriter failed on $cap --format $fmt" >&2
            exit 1
        }
        # vol -vvvv logs "Stacked NAME using STACKER" for each layer it stacks.
        stacked="$(grep -o 'Stacked [^ ]* using [A-Za-z0-9_]*' "$out/vol.log" || true)"
        if [ -n "$want" ]; then
            grep -q "using $want\$" <<<"$stacked" || {
                echo "$stacked" >&2
                echo "python_check: vol did not stack with its $want on $cap --format $fmt" >&2
                exit 1
            }
        elif [ -n "$stacked" ]; then
            echo "$stacked" >&2
            echo "python_check: vol stacked a layer on the raw image of $cap" >&2
            exit 1
        fi
        echo "  $cap --format $fmt: ${stacked:-no layer stacked (raw is the physical layer)}"
        compare_with_oracle "$root/tests/data/$cap/oracle.json" "$out/vol"
    done
done
echo "python_check: OK ($(date +%T))"
