// Package oci_test runs krun-oci, the OCI runtime, end to end: containers
// from a busybox bundle booted as krun-core VMs (create, start, state,
// exec, kill, delete, run), the runtime-spec conformance programs of
// opencontainers/runtime-tools, and podman and containerd driving the
// runtime. Where this host's KVM cannot boot a stock kernel everything
// runs inside a QEMU TCG guest with nested SVM.
package oci_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/krun-core/krun-core/internal/vmtest"
)

var bins = vmtest.BinSet{Name: "oci", Pkgs: map[string]string{
	"krun-oci":              "github.com/krun-core/krun-core/cmd/krun-oci",
	"krun-sandbox-exec":     "github.com/krun-core/krun-core/cmd/krun-sandbox-exec",
	"krun-init":             "github.com/krun-core/krun-core/guest/init",
	"krun-plugin-fs-virtio": "github.com/krun-core/krun-core/plugins/fs-virtio",
	"krun-plugin-console":   "github.com/krun-core/krun-core/plugins/console",
	"krun-plugin-net-passt": "github.com/krun-core/krun-core/plugins/net-passt",
}}

func TestMain(m *testing.M) {
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// innerModules are what a container's VM needs from the kernel.
var innerModules = []string{"virtio_mmio", "virtiofs", "virtio_console", "virtio_net"}

// binFiles places the built binaries in /bin of the outer guest.
// nestedSetup is what every test here starts with: the assets, and the
// outer guest's payload (an inner kernel tree with the modules the OCI
// guests need, and the project's binaries); the kernel's path in it. The
// tests run nested only.
func nestedSetup(t *testing.T) (a *vmtest.Assets, payload []vmtest.File, kernel string) {
	t.Helper()
	a = vmtest.Require(t)
	dir := bins.Dir(t)
	if vmtest.DirectKVM(t) {
		t.Skip("the direct path of the OCI tests is not written yet; they run nested here")
	}
	files, kernel := vmtest.InnerKernelTree(t, a, "/nested", innerModules...)
	return a, append(files, binFiles(dir)...), kernel
}

func binFiles(dir string) []vmtest.File {
	var out []vmtest.File
	for name := range bins.Pkgs {
		out = append(out, vmtest.File{Dst: "/bin/" + name, Src: filepath.Join(dir, name), Mode: 0o755})
	}
	return out
}

// podmanCaps are the capabilities podman gives a container by default.
var podmanCaps = []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
	"CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT"}

// busyboxSpec is a container of the busybox root file system in rootfs/
// running args, with the mounts every container runtime sets up.
func busyboxSpec(args ...string) *specs.Spec {
	return &specs.Spec{
		Version:  specs.Version,
		Root:     &specs.Root{Path: "rootfs"},
		Hostname: "box",
		Process: &specs.Process{
			Args: args, Cwd: "/",
			Env:     []string{"PATH=/bin", "TERM=xterm"},
			Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Soft: 1024, Hard: 1024}},
			// podman's default set: a process without capabilities
			// runs with none, as under runc.
			Capabilities: &specs.LinuxCapabilities{Bounding: podmanCaps, Effective: podmanCaps, Permitted: podmanCaps},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: "pid"}, {Type: "network"}, {Type: "ipc"}, {Type: "uts"}, {Type: "mount"}},
		},
		Annotations: map[string]string{"krun.ram_mib": "256"},
	}
}

func specFile(t *testing.T, dst string, s *specs.Spec) vmtest.File {
	t.Helper()
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return vmtest.File{Dst: dst, Data: b, Mode: 0o644}
}

// bundleSetup makes a busybox root file system at $1/rootfs of the outer
// guest (absolute links to /bin/busybox, which resolve inside the root),
// owned by the plugins' ids so the guest can write to it.
const bundleSetup = `
mkbundle() {
	mkdir -p $1/rootfs/bin $1/rootfs/tmp $1/rootfs/etc $1/rootfs/proc $1/rootfs/sys $1/rootfs/dev
	cp /bin/busybox $1/rootfs/bin/busybox
	for applet in $(/bin/busybox --list); do
		[ "$applet" = busybox ] || ln -s /bin/busybox $1/rootfs/bin/$applet
	done
	chown -R 65534:65534 $1/rootfs
}
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
mkdir -p /run/ko
KO="krun-oci --root /run/ko --log /tmp/ko.log --kernel $KERNEL --plugin-dir /bin"
# A failure shows krun-oci's log (its monitors' warnings and errors, the
# console's last lines of a guest that died) and the first container's
# stderr (its monitor's too: a Go panic would be there) first.
e2e_fail() {
	[ ! -s /tmp/ko.log ] || tail -60 /tmp/ko.log | sed 's/^/ko.log| /'
	[ ! -s /tmp/c1.err ] || tail -20 /tmp/c1.err | sed 's/^/c1.err| /'
	echo "$KRUN_E2E_MARKER fail ${*:-no reason given}"
	e2e_poweroff
}
`

// lifecycleScript is the outer guest's part of TestLifecycle.
const lifecycleScript = `
mkbundle /b
mkbundle /b2
$KO create --bundle /b --pid-file /tmp/c1.pid c1 >/tmp/c1.out 2>/tmp/c1.err &
p=$!
i=0
while kill -0 $p 2>/dev/null; do
	i=$((i+1)); [ $i -lt 480 ] || { kill -9 $p; sed 's/^/create| /' /tmp/c1.err; e2e_nested_hang "create never returned"; }
	sleep 0.5
done
rc=0; wait $p || rc=$?
sed 's/^/create err| /' /tmp/c1.err
[ "$rc" = 0 ] || e2e_fail "create: exit $rc"
$KO state c1 >/tmp/state1
cat /tmp/state1
grep -q '"status": "created"' /tmp/state1 || e2e_fail "not created after create"
grep -q "\"pid\": $(cat /tmp/c1.pid)," /tmp/state1 || e2e_fail "state pid is not the pid file's"
grep -q '"krun.ram_mib": "256"' /tmp/state1 || e2e_fail "annotations missing from state"
kill -0 $(cat /tmp/c1.pid) || e2e_fail "the container's pid is not a process"
[ ! -e /b/rootfs/started ] || e2e_fail "the command ran before start"
$KO start c1 || e2e_fail "start failed"
i=0
until grep -q 'ready box' /tmp/c1.out; do
	i=$((i+1)); [ $i -lt 240 ] || { cat /tmp/c1.out /tmp/c1.err; e2e_nested_hang "no output after start"; }
	sleep 0.5
done
$KO state c1 | grep -q '"status": "running"' || e2e_fail "not running after start"
[ -e /b/rootfs/started ] || e2e_fail "the command's file is not on the host"
grep -q '^err$' /tmp/c1.err || e2e_fail "the command's stderr is not create's stderr"
grep -q '^1024 1024$' /tmp/c1.out || e2e_fail "rlimit not applied"
grep -q 'tmpfs /dev tmpfs' /tmp/c1.out || e2e_fail "/dev is not the config's tmpfs"
grep -q 'sysfs /sys sysfs ro' /tmp/c1.out || e2e_fail "/sys is not read-only sysfs"

rc=0
$KO exec --env X=from-exec c1 sh -c 'echo "$X $(hostname)"; echo exec-err >&2; exit 5' >/tmp/e1.out 2>/tmp/e1.err || rc=$?
cat /tmp/e1.out /tmp/e1.err
[ "$rc" = 5 ] || e2e_fail "exec: exit $rc, want 5"
[ "$(cat /tmp/e1.out)" = "from-exec box" ] || e2e_fail "exec stdout: $(cat /tmp/e1.out)"
grep -q exec-err /tmp/e1.err || e2e_fail "exec stderr"
rc=0
echo typed | $KO exec c1 sh -c 'read line; echo "got $line"' >/tmp/e2.out 2>&1 || rc=$?
[ "$rc" = 0 ] && [ "$(cat /tmp/e2.out)" = "got typed" ] || e2e_fail "exec stdin: rc $rc, $(cat /tmp/e2.out)"
$KO exec --detach --pid-file /tmp/e4.pid c1 sleep 30 || e2e_fail "exec --detach (for kill --all)"
$KO kill --all c1 USR1 || e2e_fail "kill --all USR1"
i=0
while kill -0 $(cat /tmp/e4.pid) 2>/dev/null; do
	i=$((i+1)); [ $i -lt 60 ] || e2e_fail "kill --all USR1 did not reach the exec'd process"
	sleep 0.5
done
$KO state c1 | grep -q '"status": "running"' || e2e_fail "not running after kill --all USR1 (its command ignores USR1)"
$KO exec --detach --pid-file /tmp/e3.pid c1 sleep 30 || e2e_fail "exec --detach"
kill -0 $(cat /tmp/e3.pid) || e2e_fail "detached exec's pid is not a process"

$KO kill c1 TERM || e2e_fail "kill TERM"
i=0
until $KO state c1 | grep -q '"status": "stopped"'; do
	i=$((i+1)); [ $i -lt 120 ] || e2e_fail "not stopped after kill TERM"
	sleep 0.5
done
i=0
while kill -0 $(cat /tmp/e3.pid) 2>/dev/null; do
	i=$((i+1)); [ $i -lt 60 ] || e2e_fail "the detached exec outlived its container"
	sleep 0.5
done
rc=0; $KO kill c1 KILL 2>/tmp/k.err || rc=$?
[ "$rc" = 1 ] || e2e_fail "kill of a stopped container: exit $rc"
$KO delete c1 || e2e_fail "delete"
if $KO state c1 2>/dev/null; then e2e_fail "state after delete"; fi
[ -z "$(ls /run/ko)" ] || e2e_fail "state left behind: $(ls /run/ko)"
sleep 1
if ps | grep -v grep | grep -q 'krun-plugin\|__monitor\|__exec'; then ps; e2e_fail "processes left behind"; fi

rc=0
e2e_bounded 240 /tmp/r1.log $KO run --bundle /b2 r1 || rc=$?
cat /tmp/r1.log
[ "$rc" = 3 ] || e2e_fail "run: exit $rc, want 3"
grep -q '^run-hi$' /tmp/r1.log || e2e_fail "run: no output"
[ -z "$(ls /run/ko)" ] || e2e_fail "run left its state behind"
echo "outer checks ok"
`

// TestLifecycle: a busybox container through create (booted, the command
// waiting), start, state, exec (status, stdio, detached), kill --all (an
// exec'd process), kill, delete, and run.
func TestLifecycle(t *testing.T) {
	a, payload, kernel := nestedSetup(t)
	// The command ignores USR1 (and keeps ignoring it across its exec),
	// so that kill --all USR1 leaves it running and ends the exec'd
	// sleep only.
	c1 := busyboxSpec("sh", "-c", "trap '' USR1; touch /started; echo err >&2; "+
		"echo $(ulimit -n) $(ulimit -Hn); grep -e ' /dev ' -e ' /sys ' /proc/mounts; echo ready $(hostname); exec sleep 600")
	payload = append(payload, specFile(t, "/b/config.json", c1), specFile(t, "/b2/config.json", busyboxSpec("sh", "-c", "echo run-hi; exit 3")))
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload: payload,
		CPUs:    2,
		Timeout: 15 * time.Minute,
		Script:  "KERNEL=" + kernel + "\n" + bundleSetup + lifecycleScript,
	})
	if !strings.Contains(r.Console, "outer checks ok") {
		t.Errorf("outer console lacks the end of the checks")
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}
