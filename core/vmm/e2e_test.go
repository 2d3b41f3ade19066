package vmm_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/core/boot"
	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/internal/vmtest"
)

const (
	krunPackage   = "github.com/krun-core/krun-core/cmd/krun-core"
	blkRawPackage = "github.com/krun-core/krun-core/plugins/blk-raw"

	diskSectors = 16384 // 8 MiB raw image
	// innerCmdline keeps the inner console quiet: every byte on the 8250
	// is a VM exit, and exits are what nested virtualization under TCG
	// makes expensive.
	innerCmdline = "console=ttyS0 panic=-1 quiet"
)

// innerScript runs in the inner guest, booted by krun-core: it finds the
// virtio-mmio disk served by krun-plugin-blk-raw, reads what the host
// wrote, writes and reads back through the device, reads a line typed on
// the console, and then watches the disk fail when the host kills the
// plugin (restarts off: TestPluginRestartUnderIO covers restarts). With
// krun_e2e_reboot on the command line it reboots instead.
const innerScript = `
if grep -q krun_e2e_reboot /proc/cmdline; then
	echo "KRUN-E2E-REBOOTING with $(grep -c ^processor /proc/cpuinfo) CPUs"
	reboot -f
	sleep 10
	e2e_fail "reboot -f returned"
fi
echo "inner cpus: $(grep -c ^processor /proc/cpuinfo)"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
[ -b /dev/vda ] || e2e_fail "no /dev/vda: virtio-mmio disk not found ($(ls /sys/bus/platform/devices | tr '\n' ' '))"
size=$(cat /sys/block/vda/size)
[ "$size" = 16384 ] || e2e_fail "vda has $size sectors"
dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | grep -q written-by-host || e2e_fail "host pattern not read from vda"
echo inner-guest-was-here | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | grep -q inner-guest-was-here || e2e_fail "read-back from vda failed"
echo "inner disk ok"
echo KRUN-E2E-WANT-INPUT
read -t 300 line || e2e_fail "no console input"
[ "$line" = hello-console ] || e2e_fail "console input: got '$line'"
echo "inner console input ok"
echo KRUN-E2E-KILL-PLUGIN
# The core fails the device: DEVICE_NEEDS_RESET and a config interrupt;
# virtio_blk rereads the capacity, which now reads as zero.
i=0
until [ "$(cat /sys/block/vda/size)" = 0 ]; do
	i=$((i+1)); [ $i -lt 600 ] || e2e_fail "vda still has $(cat /sys/block/vda/size) sectors after the plugin died"
	sleep 0.5
done
echo "inner saw the disk fail"
`

func innerInitramfs(a *vmtest.Assets) *vmtest.Initramfs {
	ib := a.NewInitramfs()
	// Debian builds virtio_mmio as a module without command-line device
	// support: it binds to the LNRO0005 devices of the core's DSDT.
	ib.AddModules(a.Kernel, "virtio_mmio", "virtio_blk")
	ib.SetInit(innerScript)
	return ib
}

var timingRE = regexp.MustCompile(`krun-core timing: .*`)

// silentKernel is a bzImage (boot protocol 2.15, 64-bit entry) whose
// 64-bit entry point is "jmp ." with interrupts off: a guest that never
// prints, never touches a device and never exits to the VMM, as a stock
// kernel behaves on a KVM that cannot run it. The boot watchdog must end
// it.
func silentKernel() []byte {
	const setupSects = 1
	img := make([]byte, (setupSects+1)*512+0x1000)
	le := binary.LittleEndian
	img[0x1f1] = setupSects
	le.PutUint16(img[0x1fe:], 0xaa55)     // boot flag
	img[0x200], img[0x201] = 0xeb, 0x6a   // jump over the header (ends at 0x26c)
	copy(img[0x202:], "HdrS")             // header signature
	le.PutUint16(img[0x206:], 0x020f)     // protocol 2.15
	img[0x211] = 1                        // LOADED_HIGH
	le.PutUint32(img[0x22c:], 0x7fffffff) // initrd_addr_max
	le.PutUint32(img[0x230:], 0x200000)   // kernel_alignment
	le.PutUint16(img[0x236:], 1)          // XLF_KERNEL_64
	le.PutUint32(img[0x238:], 255)        // cmdline_size
	le.PutUint32(img[0x260:], 0x10000)    // init_size
	payload := img[(setupSects+1)*512:]
	payload[0x200], payload[0x201] = 0xeb, 0xfe // startup_64: jmp .
	return img
}

// watchdogScript is the outer script's check of the boot watchdog: krun-core
// run on the silent kernel must end by itself within seconds with exit 1
// and one line.
const watchdogScript = `
rc=0
timeout -s KILL 60 krun-core run --kernel /nested/silent --memory 128M --plugin-dir /bin --boot-timeout 3 </dev/null >/tmp/silent.log 2>&1 || rc=$?
sed 's/^/silent| /' /tmp/silent.log
[ $rc = 1 ] || e2e_fail "silent kernel: krun-core exited $rc, want 1"
[ "$(wc -l </tmp/silent.log)" = 1 ] || e2e_fail "silent kernel: want exactly one line from krun-core"
grep -q 'boot watchdog: the guest showed no sign of life' /tmp/silent.log || e2e_fail "silent kernel: no watchdog line"
echo "watchdog ok"
`

// TestBootDiskPoweroffReboot is the core's end-to-end test. The static
// krun-core boots Debian's stock kernel with a busybox initramfs and a raw
// disk served by krun-plugin-blk-raw; the guest writes and reads /dev/vda
// and powers off (poweroff -f), then a second run reboots (reboot -f); both
// must end krun-core with status 0. On a host whose KVM boots stock kernels
// (vmtest.DirectKVM, which asks kvm.CheckHost) it runs there directly;
// otherwise inside a QEMU TCG guest (-cpu max) whose initramfs loads
// kvm_amd, so /dev/kvm comes from nested SVM.
func TestBootDiskPoweroffReboot(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end boot test skipped in -short mode")
	}
	if vmtest.DirectKVM(t) {
		testDirect(t)
		return
	}
	testNested(t)
}

func testNested(t *testing.T) {
	a := vmtest.Require(t) // skips, saying why, without QEMU or the kernel package
	krun := vmtest.BuildStatic(t, krunPackage)
	plugin := vmtest.BuildStatic(t, blkRawPackage)
	inner := innerInitramfs(a)
	payload := vmtest.InnerGuest(t, a, inner, "/nested")
	payload = append(payload,
		vmtest.File{Dst: "/bin/krun-core", Src: krun, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-blk-raw", Src: plugin, Mode: 0o755},
		vmtest.File{Dst: "/nested/silent", Data: silentKernel(), Mode: 0o644})
	marker := inner.ResultMarker()
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload: payload,
		Timeout: 10 * time.Minute, // a loaded 2-core machine; about 70 s when idle
		Script: `
mkdir -p /tmp
# Let shared memory use transparent huge pages where asked (the core
# madvises guest RAM): 2 MiB nested page-table entries instead of 4 KiB
# ones make the nested boot several times faster.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
dd if=/dev/zero of=/tmp/disk.raw bs=1M count=8 2>/dev/null
printf written-by-host | dd of=/tmp/disk.raw bs=512 seek=8 conv=notrunc 2>/dev/null
# The outer root is the initramfs (rootfs): the plugin sandbox's root layer
# moves its empty root over it instead of pivoting.
set -- --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
	--plugin-dir /bin --timing --boot-marker KRUN-E2E-INIT --boot-timeout 120
show() { sed 's/^/inner| /' /tmp/inner.log; }
# waitfor TEXT: until the inner console shows TEXT. An inner guest that
# stops making progress is a nested hang (vmtest retries the outer VM).
waitfor() {
	i=0
	until grep -q "$1" /tmp/inner.log; do
		if ! kill -0 $pid 2>/dev/null; then
			show
			grep -q 'boot watchdog' /tmp/inner.log && e2e_nested_hang "the inner guest never started"
			e2e_fail "krun-core ended before the inner guest printed $1"
		fi
		i=$((i+1)); [ $i -lt 300 ] || { show; kill -9 $pid; e2e_nested_hang "the inner guest never printed $1"; }
		sleep 1
	done
}

# Run 1: two vCPUs, the disk, console input, poweroff -f.
mkfifo /tmp/console.in
krun-core run "$@" --cpus 2 --cmdline "` + innerCmdline + `" --disk path=/tmp/disk.raw,format=raw \
	--plugin-restarts off </tmp/console.in >/tmp/inner.log 2>&1 &
pid=$!
exec 4>/tmp/console.in
waitfor KRUN-E2E-WANT-INPUT
echo hello-console >&4
waitfor KRUN-E2E-KILL-PLUGIN
kill -9 $(pidof krun-plugin-blk-raw)
waitfor 'reboot: Power down'
rc=0
wait $pid || rc=$?
exec 4>&-
echo "krun-exit=$rc" >>/tmp/inner.log
show
grep -q '` + marker + ` ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
grep -q '^krun-exit=0$' /tmp/inner.log || e2e_fail "krun-core did not exit 0 after poweroff -f"
dd if=/tmp/disk.raw bs=512 skip=100 count=1 2>/dev/null | grep -q inner-guest-was-here || e2e_fail "the inner guest's write is not in the image"

# Run 2: reboot -f.
rc=0
e2e_bounded 240 /tmp/inner.log krun-core run "$@" --cmdline "` + innerCmdline + ` krun_e2e_reboot" || rc=$?
echo "krun-exit=$rc" >>/tmp/inner.log
show
grep -q KRUN-E2E-REBOOTING /tmp/inner.log || e2e_fail "inner guest did not start rebooting"
grep -q '^krun-exit=0$' /tmp/inner.log || e2e_fail "krun-core did not exit 0 after reboot -f"
` + watchdogScript})
	for _, want := range []string{"inner| inner cpus: 2", "inner| inner disk ok", "inner| inner console input ok",
		"inner| inner saw the disk fail", "inner| KRUN-E2E-REBOOTING with 1 CPUs", "watchdog ok"} {
		if !strings.Contains(r.Console, want) {
			t.Errorf("outer console lacks %q", want)
		}
	}
	for _, m := range timingRE.FindAllString(r.Console, -1) {
		t.Logf("nested: %s", m)
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

func testDirect(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	k, err := vmtest.FetchKernel(ctx)
	if err != nil {
		t.Skipf("no Debian kernel for the guest: %v", err)
	}
	bb, err := vmtest.FetchBusybox(ctx)
	if err != nil {
		t.Skipf("no busybox for the guest: %v", err)
	}
	a := &vmtest.Assets{Kernel: k, Busybox: bb}
	dir := t.TempDir()
	krun := vmtest.BuildStatic(t, krunPackage)
	plugin := vmtest.BuildStatic(t, blkRawPackage)
	if err := os.Rename(plugin, filepath.Join(dir, "krun-plugin-blk-raw")); err != nil {
		t.Fatal(err)
	}
	inner := innerInitramfs(a)
	initrd := filepath.Join(dir, "initramfs.cpio")
	if err := inner.Write(initrd); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "disk.raw")
	data := make([]byte, diskSectors*512)
	copy(data[8*512:], "written-by-host")
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	base := []string{"run", "--kernel", k.Vmlinuz, "--initrd", initrd, "--memory", "256M",
		"--plugin-dir", dir, "--timing", "--boot-marker", "KRUN-E2E-INIT"}

	// Run 1: two vCPUs, the disk, console input, a killed plugin, poweroff.
	cmd := exec.CommandContext(ctx, krun, append(base, "--cpus", "2", "--cmdline", innerCmdline,
		"--disk", "path="+img+",format=raw", "--plugin-restarts", "off")...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waitFor := func(marker string) {
		t.Helper()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for !strings.Contains(out.String(), marker) {
			select {
			case err := <-done:
				t.Fatalf("krun-core ended (%v) before the guest printed %s:\n%s", err, marker, out.String())
			case <-tick.C:
			}
		}
	}
	waitFor("KRUN-E2E-WANT-INPUT")
	io.WriteString(stdin, "hello-console\n")
	waitFor("KRUN-E2E-KILL-PLUGIN")
	killChildren(t, cmd.Process.Pid, "krun-plugin-blk")
	if err := <-done; err != nil {
		t.Fatalf("krun-core: %v\n%s", err, out.String())
	}
	t.Logf("%s", timingRE.FindString(out.String()))
	for _, want := range []string{inner.ResultMarker() + " ok", "inner cpus: 2", "inner disk ok",
		"inner console input ok", "inner saw the disk fail"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("guest output lacks %q:\n%s", want, out.String())
		}
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b[100*512:], []byte("inner-guest-was-here")) {
		t.Error("the guest's write is not in the image")
	}

	// Run 2: reboot -f.
	cmd = exec.CommandContext(ctx, krun, append(base, "--cmdline", innerCmdline+" krun_e2e_reboot")...)
	b, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("krun-core (reboot): %v\n%s", err, b)
	}
	if !strings.Contains(string(b), "KRUN-E2E-REBOOTING") {
		t.Errorf("guest did not reboot:\n%s", b)
	}

	// Run 3: a guest with no sign of life is ended by the boot watchdog.
	silent := filepath.Join(dir, "silent")
	if err := os.WriteFile(silent, silentKernel(), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err = vmtest.RunDirect(t, time.Minute, exec.Command(krun, "run", "--kernel", silent, "--memory", "128M", "--boot-timeout", "3"))
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("silent kernel: %v, want exit 1\n%s", err, b)
	}
	if lines := strings.Split(strings.TrimSpace(string(b)), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "boot watchdog") {
		t.Errorf("silent kernel: want one watchdog line, got:\n%s", b)
	}
}

// killChildren SIGKILLs the children of ppid whose command name starts with
// prefix.
func killChildren(t *testing.T, ppid int, prefix string) {
	t.Helper()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	killed := 0
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		open, close := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if open < 0 || close < open {
			continue
		}
		var pid, parent int
		var state string
		fmt.Sscanf(string(b[:open]), "%d", &pid)
		fmt.Sscanf(string(b[close+1:]), " %s %d", &state, &parent)
		if parent == ppid && strings.HasPrefix(string(b[open+1:close]), prefix) {
			if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
				killed++
			}
		}
	}
	if killed == 0 {
		t.Fatalf("no %s* child of %d to kill", prefix, ppid)
	}
}

// The watchdog's test kernel must get past the loader's checks, or the
// watchdog tests would pass on a load error.
func TestSilentKernelParses(t *testing.T) {
	h, err := boot.ParseSetupHeader(silentKernel()[:1024])
	if err != nil {
		t.Fatalf("silent kernel: %v", err)
	}
	if h.PayloadOffset() != 1024 {
		t.Errorf("payload at %d", h.PayloadOffset())
	}
}
