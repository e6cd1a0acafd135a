#!/usr/bin/env bash
# Install the QEMU peers used by qmig's interop tests (Debian bookworm, run as root).
#
#  * QEMU 10 (qemu-system-x86 from bookworm-backports) system-wide,
#  * build dependencies of the qmig crates (zlib1g-dev, libclang-dev),
#  * QEMU 7.2 (bookworm's own qemu-system-x86) unpacked privately into
#    $QMIG_QEMU72_PREFIX (default /opt/qemu-7.2); run it with scripts/qemu72.
#
# Idempotent and non-interactive: re-running it is cheap when everything is present.
set -euo pipefail

PREFIX="${QMIG_QEMU72_PREFIX:-/opt/qemu-7.2}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-qemu] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install-qemu.sh: must run as root" >&2
    exit 1
fi

SRC=/etc/apt/sources.list.d/backports.sources
DEB822=/etc/apt/sources.list.d/debian.sources

# The machine's own mirror: the first URI of the first deb822 stanza whose
# Suites include bookworm (else the first `deb URI bookworm` line of
# sources.list). No mirror host is named here.
bookworm_uri() {
    if [ -r "$DEB822" ]; then
        awk '
            function flush() { if (!done && uri != "" && has) { print uri; done = 1 } uri = ""; has = 0 }
            /^[[:space:]]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "uris:" { if (uri == "") uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") has = 1 }
            END { flush() }
        ' "$DEB822"
    elif [ -r /etc/apt/sources.list ]; then
        awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list
    fi
}

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq
        updated=1
    fi
}

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri="$(bookworm_uri)"
    if [ -z "$uri" ]; then
        echo "install-qemu.sh: no bookworm entry in $DEB822 or /etc/apt/sources.list to take the mirror from" >&2
        exit 1
    fi
    log "adding bookworm-backports (on $uri) to $SRC"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uri" > "$SRC"
    apt_update
fi

# --- QEMU 10 from backports + build deps --------------------------------------------
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'; }
need=()
major="$(qemu_major || true)"
if [ -z "$major" ] || [ "$major" -lt 10 ]; then
    need+=(qemu-system-x86)
fi
for p in zlib1g-dev libclang-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt_update
    log "installing ${need[*]}"
    # -t backports only raises the priority of backports; zlib/libclang come from bookworm.
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${need[@]}"
fi
major="$(qemu_major)"
if [ "$major" -lt 10 ]; then
    echo "install-qemu.sh: expected QEMU >= 10 from backports, got $(qemu-system-x86_64 --version | head -1)" >&2
    exit 1
fi
log "system QEMU: $(qemu-system-x86_64 --version | head -1)"

# --- QEMU 7.2 privately --------------------------------------------------------------
bin72="$PREFIX/usr/bin/qemu-system-x86_64"
if [ -x "$bin72" ] && [ -f "$PREFIX/.qmig-qemu72-version" ]; then
    log "QEMU 7.2 already in $PREFIX ($(cat "$PREFIX/.qmig-qemu72-version"))"
else
    apt_update
    # Pick, per package, the newest 7.2 version offered (bookworm / bookworm-security).
    # Versions differ between packages (binNMU suffixes like +b3 only on arch:any ones).
    v72() { apt-cache madison "$1" | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
            | grep -E '^1:7\.2' | sort -V | tail -1; }
    specs=()
    for p in qemu-system-x86 qemu-system-common qemu-system-data; do
        v="$(v72 "$p")"
        if [ -z "$v" ]; then
            echo "install-qemu.sh: no 7.2 version of $p found in apt-cache" >&2
            exit 1
        fi
        specs+=("$p=$v")
    done
    ver="${specs[0]#*=}"
    log "downloading ${specs[*]}"
    tmp="$(mktemp -d /tmp/qmig-qemu72.XXXXXX)"
    trap 'rm -rf "$tmp"' EXIT
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -q "${specs[@]}")
    mkdir -p "$PREFIX"
    for deb in "$tmp"/*.deb; do
        log "unpacking $(basename "$deb")"
        dpkg -x "$deb" "$PREFIX"
    done
    echo "$ver" > "$PREFIX/.qmig-qemu72-version"
fi

# Shared libraries: the 7.2 binary must link against bookworm's libraries. Report any
# missing ones (they would be pulled in by installing bookworm's qemu-system-x86 deps).
missing="$(ldd "$bin72" 2>/dev/null | awk '/not found/{print $1}' || true)"
if [ -n "$missing" ]; then
    echo "install-qemu.sh: QEMU 7.2 is missing shared libraries: $missing" >&2
    exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
QMIG_QEMU72_PREFIX="$PREFIX" "$here/qemu72" --version | head -1 | sed 's/^/[install-qemu] private QEMU: /' >&2

# --- Other architectures (optional) --------------------------------------------------
# The non-x86 captures of tests/data (arm, aarch64, ppc, ppc64, s390x, sparc, sparc64;
# scripts/capture.py's "arch" scenarios) need QEMU 10 for those targets. They are only
# installed when asked for (QMIG_EXTRA_ARCHES=1), to keep the CI install short.
# qemu-system-arm: -arm, -aarch64; qemu-system-ppc: -ppc, -ppc64; qemu-system-s390x:
# -s390x (in bookworm itself only inside qemu-system-misc); qemu-system-sparc: -sparc,
# -sparc64.
if [ "${QMIG_EXTRA_ARCHES:-0}" = 1 ]; then
    extra=()
    for pair in arm:qemu-system-arm aarch64:qemu-system-arm ppc:qemu-system-ppc \
                ppc64:qemu-system-ppc s390x:qemu-system-s390x sparc:qemu-system-sparc \
                sparc64:qemu-system-sparc; do
        t="${pair%%:*}" p="${pair#*:}"
        v="$("qemu-system-$t" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' || true)"
        if [ -z "$v" ] || [ "$v" -lt 10 ]; then
            case " ${extra[*]-} " in *" $p "*) ;; *) extra+=("$p") ;; esac
        fi
    done
    if [ "${#extra[@]}" -gt 0 ]; then
        apt_update
        log "installing ${extra[*]} (QMIG_EXTRA_ARCHES=1)"
        apt-get install -y -q --no-install-recommends -t bookworm-backports "${extra[@]}"
    fi
    for t in arm aarch64 ppc ppc64 s390x sparc sparc64; do
        log "qemu-system-$t: $("qemu-system-$t" --version | head -1)"
    done
fi
