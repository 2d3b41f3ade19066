package fs_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// runInner is the guest krun-core boots: it mounts the share, reads the
// host's file, writes its own, makes and lists a directory, and unmounts.
const runInner = `
mkdir -p /mnt
mount -t virtiofs share /mnt || e2e_fail "mount -t virtiofs share: $(dmesg | tail -3)"
[ "$(cat /mnt/from-host)" = "hello from the host" ] || e2e_fail "the host's file reads $(cat /mnt/from-host)"
echo "hello from the inner guest" > /mnt/from-guest || e2e_fail "write"
mkdir /mnt/dir && touch /mnt/dir/a /mnt/dir/b || e2e_fail "mkdir/touch"
[ "$(ls /mnt/dir | wc -l)" = 2 ] || e2e_fail "ls dir"
ln -s from-guest /mnt/link || e2e_fail "symlink"
umount /mnt || e2e_fail "umount"
echo "inner virtio-fs ok"
`

// TestRun boots a guest with `krun-core run --fs path=DIR,tag=share`: the
// core's own virtio-mmio transport with krun-plugin-fs-virtio behind it.
// Where this host's KVM cannot boot a stock kernel (vmtest.DirectKVM) it
// runs inside a QEMU TCG guest with nested SVM.
func TestRun(t *testing.T) {
	a := vmtest.Require(t)
	inner := a.NewInitramfs()
	inner.AddModules(a.Kernel, "virtio_mmio", "virtiofs")
	inner.SetInit(runInner)
	krun := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/cmd/krun-core")
	plugin := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/plugins/fs-virtio")
	marker := inner.ResultMarker()
	if vmtest.DirectKVM(t) {
		runDirect(t, a, inner, krun, plugin, marker)
		return
	}
	payload := vmtest.InnerGuest(t, a, inner, "/nested")
	payload = append(payload,
		vmtest.File{Dst: "/bin/krun-core", Src: krun, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-fs-virtio", Src: plugin, Mode: 0o755})
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload: payload,
		Timeout: 10 * time.Minute,
		Script: `
mkdir -p /tmp/share
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
echo "hello from the host" > /tmp/share/from-host
# The plugin runs as nobody:nogroup (krun-core runs as root), and this outer
# root (an initramfs on Debian 6.1) has no ID-mapped mounts: krun-core warns
# and hands over the plain directory, so the share must be theirs.
chown -R 65534:65534 /tmp/share
rc=0
# The outer root is the initramfs (rootfs): the plugin sandbox's root layer
# moves its empty root over it instead of pivoting.
e2e_bounded 300 /tmp/inner.log krun-core run --handshake-timeout 10m --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
	--plugin-dir /bin --log-level info --cmdline "console=ttyS0 panic=-1 quiet" --boot-timeout 120 \
	--fs path=/tmp/share,tag=share || rc=$?
sed 's/^/inner| /' /tmp/inner.log
[ $rc = 0 ] || e2e_fail "krun-core run exited $rc"
grep -q '` + marker + ` ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
[ "$(cat /tmp/share/from-guest)" = "hello from the inner guest" ] || e2e_fail "the guest's file is not on the host"
[ "$(ls /tmp/share/dir | wc -l)" = 2 ] || e2e_fail "the guest's directory is not on the host"
[ "$(readlink /tmp/share/link)" = from-guest ] || e2e_fail "the guest's symlink is not on the host"
echo "outer checks ok"
`})
	if !strings.Contains(r.Console, "inner| inner virtio-fs ok") || !strings.Contains(r.Console, "outer checks ok") {
		t.Error("the nested run did not report every step")
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

func runDirect(t *testing.T, a *vmtest.Assets, inner *vmtest.Initramfs, krun, plugin, marker string) {
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initramfs.cpio")
	if err := inner.Write(initrd); err != nil {
		t.Fatal(err)
	}
	share := filepath.Join(dir, "share")
	must(t, "mkdir", os.Mkdir(share, 0o755))
	must(t, "write", os.WriteFile(filepath.Join(share, "from-host"), []byte("hello from the host\n"), 0o644))
	bin := filepath.Join(dir, "bin")
	must(t, "mkdir", os.Mkdir(bin, 0o755))
	for dst, src := range map[string]string{"krun-core": krun, "krun-plugin-fs-virtio": plugin} {
		b, err := os.ReadFile(src)
		must(t, "read "+src, err)
		must(t, "write "+dst, os.WriteFile(filepath.Join(bin, dst), b, 0o755))
	}
	out, err := vmtest.RunDirect(t, 0, exec.Command(filepath.Join(bin, "krun-core"), "run", "--kernel", a.Kernel.Vmlinuz, "--initrd", initrd,
		"--memory", "256M", "--cmdline", "console=ttyS0 panic=-1 quiet", "--fs", "path="+share+",tag=share"))
	if err != nil || !strings.Contains(string(out), marker+" ok") {
		t.Fatalf("krun-core run: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(share, "from-guest")); string(b) != "hello from the inner guest\n" {
		t.Errorf("the guest's file reads %q on the host", b)
	}
}
