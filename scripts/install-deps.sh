#!/usr/bin/env bash
# Installs the Debian packages krun-core's tests and tools use, only if
# something is missing. Go modules come through the module proxy (go build).
set -euo pipefail
pkgs=(gcc libc6-dev qemu-system-x86 qemu-utils qemu-system-common passt busybox-static e2fsprogs fio cpio xz-utils zstd debootstrap strace)
need=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
# apt-get download of the test kernel needs package lists even when every
# package above is present.
lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' 2>/dev/null | head -1)
if [ ${#need[@]} -eq 0 ] && [ -n "$lists" ]; then
	exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
echo "install-deps: installing ${need[*]:-(package lists only)}" >&2
$sudo apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
