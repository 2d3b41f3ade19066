#!/usr/bin/env bash
# make kernel: fetches Debian's stock kernel package (what linux-image-amd64
# depends on) into a cache outside the repository, unpacked with dpkg -x,
# and points $cache/vmlinuz at it. krun-core run looks there when neither
# --kernel nor $KRUN_KERNEL is given and the host has no kernel of its own
# in /boot. Nothing is downloaded at run time.
set -euo pipefail
cache=${KRUN_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/krun-core/kernel}
mkdir -p "$cache"
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
	echo "make kernel: apt-cache cannot resolve linux-image-amd64 (run apt-get update first)" >&2
	exit 1
fi
if [ ! -d "$cache/$pkg" ]; then
	tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1 && dpkg -x ./*.deb root) || {
		echo "make kernel: apt-get download $pkg failed" >&2
		exit 1
	}
	mv "$tmp/root" "$cache/$pkg"
fi
vmlinuz=$(ls "$cache/$pkg"/boot/vmlinuz-* | head -n1)
ln -sfn "$vmlinuz" "$cache/vmlinuz"
echo "make kernel: $vmlinuz (modules in $(ls -d "$cache/$pkg"/lib/modules/* | head -n1))"
echo "krun-core run uses it when neither --kernel nor KRUN_KERNEL is set and /boot has no kernel for $(uname -r);"
echo "to choose it explicitly: export KRUN_KERNEL=$vmlinuz"
