package vmm_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

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
// wrote, writes and reads back through the device. With krun_e2e_reboot on
// the command line it reboots instead.
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
[ "$size" = ` + "16384" + ` ] || e2e_fail "vda has $size sectors"
dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | grep -q written-by-host || e2e_fail "host pattern not read from vda"
echo inner-guest-was-here | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | grep -q inner-guest-was-here || e2e_fail "read-back from vda failed"
echo "inner disk ok"
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

// TestBootDiskPoweroffReboot is the core's end-to-end test. The static
// krun-core boots Debian's stock kernel with a busybox initramfs and a raw
// disk served by krun-plugin-blk-raw; the guest writes and reads /dev/vda
// and powers off (poweroff -f), then a second run reboots (reboot -f); both
// must end krun-core with status 0. On a host with /dev/kvm it runs there
// directly; otherwise inside a QEMU TCG guest (-cpu max) whose initramfs
// loads kvm_amd, so /dev/kvm comes from nested SVM.
func TestBootDiskPoweroffReboot(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end boot test skipped in -short mode")
	}
	if _, err := os.Stat("/dev/kvm"); err == nil {
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
		vmtest.File{Dst: "/bin/krun-plugin-blk-raw", Src: plugin, Mode: 0o755})
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
# The outer root is the initramfs (rootfs), which pivot_root cannot leave,
# so the plugin sandbox runs without its empty-root layer here.
krun() {
	rc=0
	krun-core run --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
		--plugin-dir /bin --sandbox-disable root --timing --boot-marker KRUN-E2E-INIT "$@" </dev/null >/tmp/inner.log 2>&1 || rc=$?
	echo "krun-exit=$rc" >>/tmp/inner.log
	sed 's/^/inner| /' /tmp/inner.log
}
krun --cpus 2 --cmdline "` + innerCmdline + `" --disk path=/tmp/disk.raw,format=raw
grep -q '` + marker + ` ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
grep -q '^krun-exit=0$' /tmp/inner.log || e2e_fail "krun-core did not exit 0 after poweroff -f"
dd if=/tmp/disk.raw bs=512 skip=100 count=1 2>/dev/null | grep -q inner-guest-was-here || e2e_fail "the inner guest's write is not in the image"
krun --cmdline "` + innerCmdline + ` krun_e2e_reboot"
grep -q KRUN-E2E-REBOOTING /tmp/inner.log || e2e_fail "inner guest did not start rebooting"
grep -q '^krun-exit=0$' /tmp/inner.log || e2e_fail "krun-core did not exit 0 after reboot -f"
`})
	for _, want := range []string{"inner| inner cpus: 2", "inner| inner disk ok", "inner| KRUN-E2E-REBOOTING with 1 CPUs"} {
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
	run := func(args ...string) string {
		args = append([]string{"run", "--kernel", k.Vmlinuz, "--initrd", initrd, "--memory", "256M",
			"--plugin-dir", dir, "--timing", "--boot-marker", "KRUN-E2E-INIT"}, args...)
		cmd := exec.CommandContext(ctx, krun, args...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		if err != nil {
			t.Fatalf("krun-core %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
		t.Logf("%s", timingRE.FindString(out.String()))
		return out.String()
	}
	out := run("--cpus", "2", "--cmdline", innerCmdline, "--disk", "path="+img+",format=raw")
	for _, want := range []string{inner.ResultMarker() + " ok", "inner cpus: 2", "inner disk ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("guest output lacks %q:\n%s", want, out)
		}
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b[100*512:], []byte("inner-guest-was-here")) {
		t.Error("the guest's write is not in the image")
	}
	if out := run("--cmdline", innerCmdline+" krun_e2e_reboot"); !strings.Contains(out, "KRUN-E2E-REBOOTING") {
		t.Errorf("guest did not reboot:\n%s", out)
	}
}
