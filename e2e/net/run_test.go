package net_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/netnstest"
	"github.com/krun-core/krun-core/internal/vmtest"
)

// runInner is the guest `krun-core run --net passt` boots: the device's
// config space gives it the MAC and link status, passt's DHCP its address,
// and it fetches a page through the gateway (PORT). Then the host kills
// passt, and the link must go down in the guest.
const runInner = `
ip link set lo up
ip link set eth0 up
mac=$(cat /sys/class/net/eth0/address)
[ "$mac" = 52:54:00:12:34:57 ] || e2e_fail "eth0 has MAC $mac, not the one given with --net"
for i in 1 2 3 4 5 6 7 8 9 10; do [ "$(cat /sys/class/net/eth0/carrier)" = 1 ] && break; sleep 0.5; done
[ "$(cat /sys/class/net/eth0/carrier)" = 1 ] || e2e_fail "eth0 has no carrier (link status)"
udhcpc -i eth0 -s /udhcpc.sh -q -n -t 10 -T 2 || e2e_fail "no DHCP lease from passt"
gw=$(cat /tmp/gateway)
( printf 'GET /page HTTP/1.0\r\n\r\n'; sleep 60 ) | nc "$gw" PORT > /tmp/page &
for i in $(seq 1 40); do
	if grep -qs "hello from the host" /tmp/page; then break; fi
	sleep 0.5
done
grep -qs "hello from the host" /tmp/page || e2e_fail "page not fetched through passt: $(cat /tmp/page)"
echo "inner network ok"
# The host kills passt: the plugin reports link down, the core raises a
# config-change interrupt, and the driver drops the carrier. krun-core
# then restarts the plugin with a new passt and the link comes back,
# about half a second later: a poll of carrier can miss the drop, the
# kernel's count of carrier losses cannot.
downs=$(cat /sys/class/net/eth0/carrier_down_count)
echo KRUN-E2E-KILL-PASST
for i in $(seq 1 40); do [ "$(cat /sys/class/net/eth0/carrier_down_count)" -gt "$downs" ] && break; sleep 0.5; done
[ "$(cat /sys/class/net/eth0/carrier_down_count)" -gt "$downs" ] || e2e_fail "eth0 never lost its carrier after passt died"
echo "inner link down ok"
`

// TestRun boots a guest with `krun-core run --net passt,mac=...`: the core's
// own virtio-mmio transport with krun-plugin-net-passt behind it and passt
// started by krun-core, with the whole plugin sandbox. Where this host's
// KVM cannot boot a stock kernel (vmtest.DirectKVM) it runs inside a QEMU TCG guest with nested SVM, whose network is a dummy
// interface holding the default route (passt copies its address and maps
// the gateway to the loopback).
func TestRun(t *testing.T) {
	a := vmtest.Require(t)
	passt, err := exec.LookPath("passt")
	if err != nil {
		t.Skip("passt is not installed (Debian package passt)")
	}
	const port = 8080
	inner := a.NewInitramfs()
	inner.AddModules(a.Kernel, "virtio_mmio", "virtio_net")
	inner.AddBytes("/udhcpc.sh", []byte(udhcpcScript), 0o755)
	inner.SetInit(strings.ReplaceAll(runInner, "PORT", fmt.Sprint(port)))
	krun := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/cmd/krun-core")
	plugin := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/plugins/net-passt")
	marker := inner.ResultMarker()
	if vmtest.DirectKVM(t) {
		runDirect(t, a, inner, krun, plugin, marker, port)
		return
	}
	payload := vmtest.InnerGuest(t, a, inner, "/nested")
	payload = append(payload,
		vmtest.File{Dst: "/bin/krun-core", Src: krun, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-net-passt", Src: plugin, Mode: 0o755},
		vmtest.File{Dst: "/etc/passwd", Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		vmtest.File{Dst: "/etc/group", Data: []byte("root:x:0:\nnogroup:x:65534:\n")})
	payload = append(payload, dynamicProgram(t, passt)...)
	if avx2 := passt + ".avx2"; fileExists(avx2) {
		payload = append(payload, dynamicProgram(t, avx2)...)
	}
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload: payload,
		Modules: []string{"dummy"},
		Timeout: 10 * time.Minute,
		Script: fmt.Sprintf(`
ip link set lo up
ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy # loading dummy makes one
ip addr add 10.200.0.2/24 dev dummy0
ip link set dummy0 up
ip route add default via 10.200.0.1 dev dummy0
mkdir -p /www
echo "hello from the host" > /www/page
httpd -p %d -h /www
# passt isolates itself with pivot_root, which fails on the initramfs root
# (the plugin sandbox copes, passt does not), and a chroot may not make
# user namespaces: move a tmpfs over / in a mount namespace of its own (as
# switch_root does) and run from there.
mkdir /newroot
mount -t tmpfs -o size=1g tmpfs /newroot
for d in bin sbin usr lib lib64 etc nested; do [ -e /$d ] && cp -a /$d /newroot/; done
mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp
mount -t proc proc /newroot/proc
mount --rbind /sys /newroot/sys
mount --rbind /dev /newroot/dev
rc=0
# --handshake-timeout: this guest's clock can run many times faster than
# the host's when it booted on a loaded machine (CI run 22: 281 s of guest
# time in 18 s), so a plugin's 60 s handshake deadline was a few seconds.
unshare -m sh -c 'cd /newroot && mount --move /newroot / && exec chroot . krun-core run --handshake-timeout 10m \
	--kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
	--plugin-dir /bin --cmdline "console=ttyS0 panic=-1 quiet" --boot-timeout 120 \
	--log-level info --net passt,mac=52:54:00:12:34:57' </dev/null >/tmp/inner.log 2>/tmp/inner.err &
pid=$!
# An inner guest that stops making progress is a nested hang (vmtest
# retries the outer VM).
# krun-core's log goes to its own file: written into the guest's console
# stream, its lines would split the guest's.
hung() { kill -9 $pid; sed 's/^/hung| /' /tmp/inner.log /tmp/inner.err; e2e_nested_hang "$1"; }
i=0
until grep -q KRUN-E2E-KILL-PASST /tmp/inner.log; do
	kill -0 $pid 2>/dev/null || break
	i=$((i+1)); [ $i -lt 600 ] || hung "the inner guest never asked to kill passt"
	sleep 0.5
done
grep -q 'boot watchdog' /tmp/inner.err && { sed 's/^/hung| /' /tmp/inner.log /tmp/inner.err; e2e_nested_hang "the inner guest never started"; }
if grep -q KRUN-E2E-KILL-PASST /tmp/inner.log; then
	killall passt passt.avx2 2>/dev/null || true
	echo "outer killed passt"
fi
i=0
while kill -0 $pid 2>/dev/null; do
	i=$((i+1)); [ $i -lt 600 ] || hung "the inner guest did not end after passt died"
	sleep 0.5
done
wait $pid || rc=$?
sed 's/^/inner| /' /tmp/inner.log
sed 's/^/inner-log| /' /tmp/inner.err
[ $rc = 0 ] || e2e_fail "krun-core run exited $rc"
grep -q '%s ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
echo "outer checks ok"
`, port, marker)})
	if !strings.Contains(r.Console, "inner| inner network ok") || !strings.Contains(r.Console, "inner| inner link down ok") ||
		!strings.Contains(r.Console, "outer checks ok") {
		t.Error("the nested run did not report every step")
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

// runDirect is TestRun on a machine whose KVM boots stock kernels: krun-core runs in a
// network namespace of the test's own, next to the page's server.
func runDirect(t *testing.T, a *vmtest.Assets, inner *vmtest.Initramfs, krun, plugin, marker string, port int) {
	ns := netnstest.New(t)
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initramfs.cpio")
	if err := inner.Write(initrd); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for dst, src := range map[string]string{"krun-core": krun, "krun-plugin-net-passt": plugin} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bin, dst), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	www := filepath.Join(dir, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(www, "page"), []byte("hello from the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	httpd := netnstest.Command(ns, "busybox", "httpd", "-f", "-p", fmt.Sprint(port), "-h", www)
	if err := httpd.Start(); err != nil {
		t.Skipf("busybox httpd for the page: %v", err)
	}
	t.Cleanup(func() { httpd.Process.Kill(); httpd.Wait() })
	out, err := vmtest.RunDirect(t, 0, netnstest.Command(ns, filepath.Join(bin, "krun-core"), "run", "--kernel", a.Kernel.Vmlinuz, "--initrd", initrd,
		"--memory", "256M", "--cmdline", "console=ttyS0 panic=-1 quiet", "--net", "passt,mac=52:54:00:12:34:57"))
	if err != nil || !strings.Contains(string(out), marker+" ok") {
		t.Fatalf("krun-core run: %v\n%s", err, out)
	}
}

// dynamicProgram places a dynamically linked host program in the outer
// initramfs at its own path, with the shared libraries ldd names.
func dynamicProgram(t *testing.T, path string) []vmtest.File {
	t.Helper()
	files := []vmtest.File{{Dst: path, Src: path, Mode: 0o755}}
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		t.Skipf("ldd %s: %v", path, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") && fileExists(f) {
				real, err := filepath.EvalSymlinks(f)
				if err != nil {
					t.Fatal(err)
				}
				files = append(files, vmtest.File{Dst: f, Src: real, Mode: 0o755})
			}
		}
	}
	return files
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
