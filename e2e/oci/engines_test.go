package oci_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// userland returns the Debian userland image with podman and containerd
// (scripts/oci-userland.sh builds it into the test cache once, with
// debootstrap), or skips naming what is missing.
func userland(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the podman and containerd tests build a Debian userland with debootstrap, which needs root")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap is not installed (make deps installs it): no Debian userland with podman and containerd")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "oci-userland.sh"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("build the Debian userland: %v\n%s", err, stderr.String())
	}
	// The path is the last line (anything a tool printed before it is
	// not).
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	img := strings.TrimSpace(lines[len(lines)-1])
	if fi, err := os.Stat(img); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("build the Debian userland: %q is not an image (%v); the script said:\n%s\n%s", img, err, out, stderr.String())
	}
	return img
}

// userlandOverlay is a fresh qcow2 overlay on the userland image: the test
// writes into it, and the image in the cache stays as it was built.
func userlandOverlay(t *testing.T, img string) string {
	t.Helper()
	overlay := filepath.Join(t.TempDir(), "userland.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", img, "-F", "raw", overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	return overlay
}

// enterUserland mounts the userland at /u of the outer guest and puts
// the krun binaries and the inner kernel in it, with /usr/local/bin/krun,
// krun-oci with the kernel and plugin flags (the engines' runtime), and
// /tmp/lib.sh, the helpers of the test's script. runInUserland then runs
// the script, /tmp/t.sh, in the userland.
const enterUserland = `
mkdir -p /u
mount -t ext4 /dev/vda /u
cp /bin/krun-oci /bin/krun-init /bin/krun-sandbox-exec /bin/krun-plugin-* /u/usr/local/bin/
mkdir -p /u/nested && cp -a /nested/. /u/nested/
cat >/u/usr/local/bin/krun <<EOF
#!/bin/sh
exec /usr/local/bin/krun-oci --kernel $KERNEL --plugin-dir /usr/local/bin "\$@"
EOF
chmod 755 /u/usr/local/bin/krun
mount -t proc proc /u/proc
mount -t sysfs sysfs /u/sys
mount -t cgroup2 cgroup2 /u/sys/fs/cgroup
mount --rbind /dev /u/dev
mount -t tmpfs tmpfs /u/run
mount -t tmpfs tmpfs /u/tmp
mkdir -p /u/etc/containers
printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' >/u/etc/containers/storage.conf
# A busybox root file system as a tarball, for podman import.
mkdir -p /u/tmp/bb/bin /u/tmp/bb/etc /u/tmp/bb/tmp /u/tmp/bb/proc /u/tmp/bb/sys /u/tmp/bb/dev /u/tmp/bb/run
cp /bin/busybox /u/tmp/bb/bin/busybox
for applet in $(/bin/busybox --list); do
	[ "$applet" = busybox ] || ln -s /bin/busybox /u/tmp/bb/bin/$applet
done
chmod 1777 /u/tmp/bb/tmp
(cd /u/tmp/bb && tar -cf ../bb.tar .)
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
cat >/u/tmp/lib.sh <<'LIBEOF'
# Helpers of the scripts that run in the userland (dash).
fail() { echo "INNER-FAIL $*"; exit 1; }
hang() { echo "KRUN-E2E-NESTED-HANG $*"; exit 99; }
# bounded SECONDS NAME CMD...: output in /tmp/NAME.log, status in $rc; a
# command that runs over is a nested hang.
bounded() {
	_limit=$1 _name=$2
	shift 2
	"$@" >/tmp/$_name.log 2>&1 &
	_pid=$!
	_i=0
	while kill -0 $_pid 2>/dev/null; do
		_i=$((_i+1))
		if [ $_i -gt $((_limit*2)) ]; then
			kill -9 $_pid 2>/dev/null
			sed "s/^/$_name| /" /tmp/$_name.log | tail -40
			hang "$_name ran over ${_limit}s"
		fi
		sleep 0.5
	done
	rc=0
	wait $_pid || rc=$?
	sed "s/^/$_name| /" /tmp/$_name.log | tail -60
	echo "$_name rc=$rc"
}
# leftovers lists the krun processes still running.
leftovers() {
	for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' <$f 2>/dev/null; echo; done | grep -E '[k]run-plugin|[_]_monitor|[_]_exec|[p]asst' || true
}
LIBEOF
`

// runInUserland runs /tmp/t.sh of the userland as the root of a mount
// namespace of its own (the userland's mount moved over /, as
// switch_root does: in a chroot the plugins could not create their user
// namespaces) and reports its verdict.
const runInUserland = `
rc=0
unshare -m sh -c 'cd /u && mount --move /u / && exec chroot . /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root /bin/sh /tmp/t.sh' || rc=$?
[ "$rc" = 99 ] && e2e_nested_hang "in the userland"
[ "$rc" = 0 ] || e2e_fail "userland script: exit $rc"
`

// engineOptions are the outer VM's for the engine tests.
func engineVM(t *testing.T, script string) *vmtest.Result {
	t.Helper()
	a, payload, kernel := nestedSetup(t)
	img := userland(t)
	// NestedKVM: an outer guest that wedges as a whole under TCG is killed
	// after its heartbeat stops and run once more, on a fresh overlay.
	return vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload:   payload,
		Modules:   []string{"virtio_pci", "virtio_blk", "ext4"},
		CPUs:      2,
		MemoryMiB: 3072,
		Timeout:   25 * time.Minute,
		Script:    "KERNEL=" + kernel + "\n" + enterUserland + "cat >/u/tmp/t.sh <<'KRUNEOF'\n. /tmp/lib.sh\n" + script + "KRUNEOF\n" + runInUserland,
		Prepare:   func(vm *vmtest.VM) { vm.AddDrive(userlandOverlay(t, img), "qcow2", false) },
	})
}

// podmanScript: podman with krun-oci as its runtime.
const podmanScript = `
P="podman --runtime /usr/local/bin/krun"
bounded 600 import $P import /tmp/bb.tar localhost/busybox
[ "$rc" = 0 ] || fail "podman import: exit $rc"
bounded 600 run $P run --rm --network none localhost/busybox sh -c 'echo hi; exit 3'
[ "$rc" = 3 ] || fail "podman run: exit $rc, want 3"
grep -q '^hi' /tmp/run.log || fail "podman run: no hi"
bounded 600 rund $P run -d --name c1 --network none localhost/busybox sleep 600
[ "$rc" = 0 ] || fail "podman run -d: exit $rc"
bounded 600 exec $P exec c1 sh -c 'echo from-exec $(hostname); exit 4'
[ "$rc" = 4 ] || fail "podman exec: exit $rc, want 4"
grep -q '^from-exec' /tmp/exec.log || fail "podman exec: no output"
bounded 600 stop $P stop -t 10 c1
[ "$rc" = 0 ] || fail "podman stop: exit $rc"
bounded 300 inspect $P inspect --format '{{.State.Status}} {{.State.ExitCode}}' c1
grep -q '^exited' /tmp/inspect.log || fail "podman inspect: not exited"
bounded 300 rm $P rm c1
[ "$rc" = 0 ] || fail "podman rm: exit $rc"
sleep 1
[ -z "$(leftovers)" ] || { leftovers; fail "processes left behind"; }
echo "podman checks ok"
`

// containerdScript: containerd 1.6 with its runc shim pointed at krun-oci
// (ctr --runc-binary), the same image (imported by the podman part, saved
// by podman as an OCI archive).
const containerdScript = `
podman image exists localhost/busybox || bounded 600 import podman import /tmp/bb.tar localhost/busybox
bounded 600 save podman save --format oci-archive -o /tmp/bb-oci.tar localhost/busybox
[ "$rc" = 0 ] || fail "podman save: exit $rc"
mkdir -p /run/containerd /var/lib/containerd
containerd >/tmp/containerd.log 2>&1 &
i=0
until ctr version >/dev/null 2>&1; do
	i=$((i+1)); [ $i -lt 240 ] || { tail -20 /tmp/containerd.log; fail "containerd did not start"; }
	sleep 0.5
done
C="ctr --timeout 10m"
R="--runtime io.containerd.runc.v2 --runc-binary /usr/local/bin/krun --snapshotter native"
bounded 600 cimport $C image import --snapshotter native --base-name localhost/busybox --digests /tmp/bb-oci.tar
[ "$rc" = 0 ] || fail "ctr image import: exit $rc"
img=$(ctr image ls -q | grep busybox | head -1)
[ -n "$img" ] || fail "no imported image"
bounded 600 crun $C run $R --rm $img c1 sh -c 'echo hi; exit 3'
[ "$rc" = 3 ] || fail "ctr run: exit $rc, want 3"
grep -q '^hi' /tmp/crun.log || fail "ctr run: no hi"
bounded 600 crund $C run $R -d $img c2 sleep 600
[ "$rc" = 0 ] || fail "ctr run -d: exit $rc"
bounded 600 cexec $C task exec --exec-id e1 c2 sh -c 'echo from-exec; exit 4'
[ "$rc" = 4 ] || fail "ctr task exec: exit $rc, want 4"
grep -q '^from-exec' /tmp/cexec.log || fail "ctr task exec: no output"
bounded 300 ckill $C task kill c2
i=0
until ctr task ls | grep c2 | grep -q STOPPED; do
	i=$((i+1)); [ $i -lt 240 ] || { ctr task ls; fail "c2 did not stop"; }
	sleep 0.5
done
bounded 300 cdel $C task delete c2
[ "$rc" = 0 ] || fail "ctr task delete: exit $rc"
bounded 300 ccdel $C container delete c2
sleep 1
[ -z "$(leftovers)" ] || { leftovers; fail "processes left behind"; }
echo "containerd checks ok"
`

// enginesScript runs the podman part, then the containerd part, each in a
// subshell of its own so that a failed part does not hide the other's
// result; a nested hang in either ends the run (the harness retries it).
const enginesScript = `
part() {
	_name=$1
	shift
	rc=0
	( "$@" ) || rc=$?
	echo "PART $_name rc=$rc"
	[ "$rc" != 99 ] || exit 99
	[ "$rc" = 0 ] || failed=1
}
podman_part() {
` + podmanScript + `
}
containerd_part() {
` + containerdScript + `
}
failed=0
part podman podman_part
part containerd containerd_part
[ "$failed" = 0 ] || exit 1
`

// TestEngines: podman and containerd drive krun-oci, in one outer VM with
// the Debian userland (one boot, one import of the image for both).
// podman --runtime krun-oci runs a busybox image imported from a root
// file system tarball: run --rm with its output and exit status, run -d,
// exec, stop, rm. containerd 1.6 from Debian, its runc shim running
// krun-oci, runs the same image (saved by podman as an OCI archive) with
// ctr: output and exit status, run -d, task exec, kill, delete.
func TestEngines(t *testing.T) {
	r := engineVM(t, enginesScript)
	for _, part := range []string{"podman", "containerd"} {
		t.Run(part, func(t *testing.T) {
			if !strings.Contains(r.Console, part+" checks ok") {
				t.Errorf("the %s checks did not finish (see the PART %s line and the INNER-FAIL before it)", part, part)
			}
		})
	}
}
