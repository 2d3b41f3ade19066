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
	img := strings.TrimSpace(string(out))
	// The test writes into an overlay; the image in the cache stays as
	// it was built.
	overlay := filepath.Join(t.TempDir(), "userland.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", img, "-F", "raw", overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	return overlay
}

// enterUserland mounts the userland at /u of the outer guest, puts the
// krun binaries and the inner kernel in it, and defines `in` (a command
// in the userland, chroot) and $KO (krun-oci with the kernel and plugin
// flags, as a wrapper script the engines take as their runtime).
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
in() { chroot /u /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root "$@"; }
# A busybox root file system as a tarball, for podman import.
mkdir -p /u/tmp/bb/bin /u/tmp/bb/etc /u/tmp/bb/tmp /u/tmp/bb/proc /u/tmp/bb/sys /u/tmp/bb/dev /u/tmp/bb/run
cp /bin/busybox /u/tmp/bb/bin/busybox
for applet in $(/bin/busybox --list); do
	[ "$applet" = busybox ] || ln -s /bin/busybox /u/tmp/bb/bin/$applet
done
chmod 1777 /u/tmp/bb/tmp
(cd /u/tmp/bb && tar -cf ../bb.tar .)
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
# bounded SECONDS NAME CMD...: CMD in the userland, output in /tmp/NAME.log,
# status in $rc; a command that runs over is a nested hang.
bounded() {
	_limit=$1 _name=$2
	shift 2
	in "$@" >/tmp/$_name.log 2>&1 &
	_pid=$!
	_i=0
	while kill -0 $_pid 2>/dev/null; do
		_i=$((_i+1))
		if [ $_i -gt $((_limit*2)) ]; then
			kill -9 $_pid 2>/dev/null
			sed "s/^/$_name| /" /tmp/$_name.log | tail -40
			e2e_nested_hang "$_name ran over ${_limit}s"
		fi
		sleep 0.5
	done
	rc=0
	wait $_pid || rc=$?
	sed "s/^/$_name| /" /tmp/$_name.log | tail -60
	echo "$_name rc=$rc"
}
`

// engineOptions are the outer VM's for the engine tests.
func engineVM(t *testing.T, script string) *vmtest.Result {
	t.Helper()
	a := vmtest.Require(t)
	dir := bins.Dir(t)
	if vmtest.DirectKVM(t) {
		t.Skip("the direct path of the OCI tests is not written yet; they run nested here")
	}
	img := userland(t)
	files, kernel := vmtest.InnerKernelTree(t, a, "/nested", innerModules...)
	payload := append(files, binFiles(dir)...)
	vm := vmtest.NewNestedVM(t, a, vmtest.NestedOptions{
		Payload:   payload,
		Modules:   []string{"virtio_pci", "virtio_blk", "ext4"},
		CPUs:      2,
		MemoryMiB: 3072,
		Timeout:   25 * time.Minute,
		Script:    "KERNEL=" + kernel + "\n" + enterUserland + script,
	})
	vm.AddDrive(img, "qcow2", false)
	return vm.Run()
}

// podmanScript: podman with krun-oci as its runtime.
const podmanScript = `
P="podman --runtime /usr/local/bin/krun"
bounded 600 import $P import /tmp/bb.tar localhost/busybox
[ "$rc" = 0 ] || e2e_fail "podman import: exit $rc"
bounded 600 run $P run --rm --network none localhost/busybox sh -c 'echo hi; exit 3'
[ "$rc" = 3 ] || e2e_fail "podman run: exit $rc, want 3"
grep -q '^hi' /tmp/run.log || e2e_fail "podman run: no hi"
bounded 600 rund $P run -d --name c1 --network none localhost/busybox sleep 600
[ "$rc" = 0 ] || e2e_fail "podman run -d: exit $rc"
bounded 600 exec $P exec c1 sh -c 'echo from-exec $(hostname); exit 4'
[ "$rc" = 4 ] || e2e_fail "podman exec: exit $rc, want 4"
grep -q '^from-exec' /tmp/exec.log || e2e_fail "podman exec: no output"
bounded 600 stop $P stop -t 10 c1
[ "$rc" = 0 ] || e2e_fail "podman stop: exit $rc"
bounded 300 inspect $P inspect --format '{{.State.Status}} {{.State.ExitCode}}' c1
grep -q '^exited' /tmp/inspect.log || e2e_fail "podman inspect: not exited"
bounded 300 rm $P rm c1
[ "$rc" = 0 ] || e2e_fail "podman rm: exit $rc"
sleep 1
if ps | grep -v grep | grep -q 'krun-plugin\|__monitor\|__exec\|passt'; then ps; e2e_fail "processes left behind"; fi
echo "podman checks ok"
`

// TestPodman: podman --runtime krun-oci runs a busybox image imported
// from a root file system tarball: run --rm with its output and exit
// status, run -d, exec, stop, rm.
func TestPodman(t *testing.T) {
	r := engineVM(t, podmanScript)
	if !strings.Contains(r.Console, "podman checks ok") {
		t.Error("the podman checks did not finish")
	}
}

// containerdScript: containerd 1.6 with its runc shim pointed at krun-oci
// (ctr --runc-binary), the same image (saved by podman as an OCI archive).
const containerdScript = `
bounded 600 import podman import /tmp/bb.tar localhost/busybox
bounded 600 save podman save --format oci-archive -o /tmp/bb-oci.tar localhost/busybox
[ "$rc" = 0 ] || e2e_fail "podman save: exit $rc"
mkdir -p /u/run/containerd /u/var/lib/containerd
in containerd >/tmp/containerd.log 2>&1 &
i=0
until in ctr version >/dev/null 2>&1; do
	i=$((i+1)); [ $i -lt 240 ] || { tail -20 /tmp/containerd.log; e2e_fail "containerd did not start"; }
	sleep 0.5
done
C="ctr --timeout 10m"
R="--runtime io.containerd.runc.v2 --runc-binary /usr/local/bin/krun --snapshotter native"
bounded 600 cimport $C image import --snapshotter native --base-name localhost/busybox --digests /tmp/bb-oci.tar
[ "$rc" = 0 ] || e2e_fail "ctr image import: exit $rc"
img=$(in ctr image ls -q | grep busybox | head -1)
[ -n "$img" ] || e2e_fail "no imported image"
bounded 600 crun $C run $R --rm $img c1 sh -c 'echo hi; exit 3'
[ "$rc" = 3 ] || e2e_fail "ctr run: exit $rc, want 3"
grep -q '^hi' /tmp/crun.log || e2e_fail "ctr run: no hi"
bounded 600 crund $C run $R -d $img c2 sleep 600
[ "$rc" = 0 ] || e2e_fail "ctr run -d: exit $rc"
bounded 600 cexec $C task exec --exec-id e1 c2 sh -c 'echo from-exec; exit 4'
[ "$rc" = 4 ] || e2e_fail "ctr task exec: exit $rc, want 4"
grep -q '^from-exec' /tmp/cexec.log || e2e_fail "ctr task exec: no output"
bounded 300 ckill $C task kill c2
i=0
until in ctr task ls | grep c2 | grep -q STOPPED; do
	i=$((i+1)); [ $i -lt 240 ] || { in ctr task ls; e2e_fail "c2 did not stop"; }
	sleep 0.5
done
bounded 300 cdel $C task delete c2
[ "$rc" = 0 ] || e2e_fail "ctr task delete: exit $rc"
bounded 300 ccdel $C container delete c2
sleep 1
if ps | grep -v grep | grep -q 'krun-plugin\|__monitor\|__exec'; then ps; e2e_fail "processes left behind"; fi
echo "containerd checks ok"
`

// TestContainerd: containerd 1.6 from Debian, its runc shim running
// krun-oci, ctr run of the busybox image: output and exit status,
// run -d, task exec, kill, delete.
func TestContainerd(t *testing.T) {
	r := engineVM(t, containerdScript)
	if !strings.Contains(r.Console, "containerd checks ok") {
		t.Error("the containerd checks did not finish")
	}
}
