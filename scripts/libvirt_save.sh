#!/usr/bin/env bash
# Makes real libvirt save images (`virsh save`) of a tiny TCG domain (4 MiB,
# no disk, SeaBIOS only) in each save_image_format libvirt offers here:
#   scripts/libvirt_save.sh OUTDIR [FORMAT...]     (default: raw gzip bzip2 xz)
# Needs root. Installs Debian's libvirt daemon and client if missing, appends
# test settings to /etc/libvirt/qemu.conf (restored on exit), starts its own
# virtlogd/libvirtd and stops them on exit. libvirt 9.0 (bookworm) knows
# raw, gzip, bzip2, xz and lzop; zstd needs libvirt >= 10.
set -euo pipefail
out="$(realpath -m "${1:?usage: $0 OUTDIR [FORMAT...]}")"; shift
formats=("$@"); [ ${#formats[@]} -gt 0 ] || formats=(raw gzip bzip2 xz)
mkdir -p "$out"
if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null; then
    apt-get install -y -q --no-install-recommends \
        libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
fi
conf=/etc/libvirt/qemu.conf
cp "$conf" "$conf.qmig-orig"
pids=()
cleanup() {
    virsh -c qemu:///system destroy qmig-tiny >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    mv -f "$conf.qmig-orig" "$conf"
}
trap cleanup EXIT
start_libvirtd() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    pids=()
    virtlogd >/dev/null 2>&1 & pids+=($!)
    libvirtd >>"$out/.libvirtd.log" 2>&1 & pids+=($!)
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && return; sleep 0.2; done
    echo "libvirtd did not start" >&2; exit 1
}
xml="$(mktemp)"
cat > "$xml" <<'XML'
<domain type='qemu'>
  <name>qmig-tiny</name>
  <memory unit='KiB'>4096</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
XML
for f in "${formats[@]}"; do
    { cat "$conf.qmig-orig"
      printf '%s\n' 'user = "root"' 'group = "root"' 'dynamic_ownership = 0' \
        'security_driver = "none"' 'stdio_handler = "file"' 'namespaces = []' \
        'cgroup_controllers = []' 'remember_owner = 0' "save_image_format = \"$f\""
    } > "$conf"
    start_libvirtd
    virsh -c qemu:///system create "$xml" >/dev/null
    sleep 3
    virsh -c qemu:///system save qmig-tiny "$out/$f.sav" >/dev/null
    echo "$out/$f.sav: $(stat -c %s "$out/$f.sav") bytes"
done
rm -f "$xml"
