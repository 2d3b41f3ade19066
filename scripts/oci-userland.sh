#!/usr/bin/env bash
# Builds the Debian userland the OCI end-to-end tests (e2e/oci) boot in
# their outer guest: bookworm with podman, conmon, containerd and ctr, made
# with debootstrap and packed into an ext4 image. It lands in the test
# cache ($KRUN_TEST_CACHE, default ~/.cache/krun-core-test), never in the
# repository, and is built once: the image's name carries a hash of the
# package list. Prints the image's path. Needs root and debootstrap
# (`make deps`).
set -euo pipefail
cache=${KRUN_TEST_CACHE:-$HOME/.cache/krun-core-test}
pkgs=podman,conmon,crun,netavark,containerd,runc,ca-certificates
tag=$(printf '%s' "bookworm $pkgs v1" | sha256sum | cut -c1-12)
img=$cache/oci-userland-$tag.ext4
if [ -s "$img" ]; then
	echo "$img"
	exit 0
fi
command -v debootstrap >/dev/null || { echo "oci-userland: debootstrap is not installed (make deps)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "oci-userland: debootstrap needs root" >&2; exit 2; }
mkdir -p "$cache"
exec 9>"$cache/oci-userland.lock"
flock 9
if [ -s "$img" ]; then
	echo "$img"
	exit 0
fi
# The mirror apt uses here.
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
work=$(mktemp -d "$cache/oci-userland.XXXXXX")
trap 'if [ -s "$img" ]; then rm -rf "$work"; else echo "oci-userland: failed; left $work" >&2; fi' EXIT
echo "oci-userland: debootstrap bookworm ($pkgs) from $mirror" >&2
debootstrap --variant=minbase --include="$pkgs" bookworm "$work/root" "$mirror" >"$work/log" 2>&1 || {
	tail -30 "$work/log" >&2
	exit 1
}
root=$work/root
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# No systemd in the outer guest: cgroupfs and a file event log.
mkdir -p "$root/etc/containers"
cat >"$root/etc/containers/containers.conf" <<'EOF'
[containers]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
[engine.runtimes]
krun = ["/usr/local/bin/krun-oci"]
EOF
size=$(( $(du -sm "$root" | cut -f1) + 2048 ))
# stdout is the image's path only: mke2fs says "Creating regular file"
# there even with -q.
mkfs.ext4 -q -F -L krunroot -d "$root" "$work/img" "${size}M" >&2
mv "$work/img" "$img"
echo "$img"
