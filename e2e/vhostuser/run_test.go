package vhostuser_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/syncbuf"
	"github.com/krun-core/krun-core/internal/vmtest"
)

const virtiofsdPath = "/usr/lib/qemu/virtiofsd"

// The disks carry a label in their first 8 bytes, so the guest tells them
// apart whatever order it finds them in, and writes its answer at byte 4096.
const (
	labelQSD   = "disk-qsd" // served by qemu-storage-daemon
	labelServe = "disk-krn" // served by a krun-core serve of its own
	answerOff  = 4096
)

// runInner is the guest krun-core run boots: it reads each disk's label and
// writes an answer after it, and on each share reads the host's file and
// writes its own.
const runInner = `
seen=""
for d in /dev/vd?; do
	label=$(head -c 8 "$d")
	case "$label" in
	disk-qsd|disk-krn) ;;
	*) e2e_fail "$d starts with '$label', not a label the host wrote" ;;
	esac
	printf 'written by the inner guest to %s\n' "$label" | dd of="$d" bs=512 seek=8 conv=notrunc 2>/dev/null || e2e_fail "write $d"
	seen="$seen $label"
done
sync
echo "disks:$seen"
case "$seen" in *disk-qsd*) ;; *) e2e_fail "no disk from qemu-storage-daemon" ;; esac
case "$seen" in *disk-krn*) ;; *) e2e_fail "no disk from krun-core serve" ;; esac
for tag in vfsd kfs; do
	mkdir -p /mnt/$tag
	mount -t virtiofs $tag /mnt/$tag || e2e_fail "mount -t virtiofs $tag: $(dmesg | tail -3)"
	[ "$(cat /mnt/$tag/from-host)" = "hello from the host to $tag" ] || e2e_fail "$tag: the host's file reads $(cat /mnt/$tag/from-host)"
	echo "hello from the inner guest to $tag" > /mnt/$tag/from-guest || e2e_fail "$tag: write"
	umount /mnt/$tag || e2e_fail "umount $tag"
done
echo "inner vhost-user ok"
# --plugin null,fill=zero: a third-party plugin's virtio-rng.
[ -c /dev/hwrng ] || e2e_fail "no /dev/hwrng: $(dmesg | grep -i rng | tail -3)"
grep -q virtio_rng /sys/class/misc/hw_random/rng_current || e2e_fail "hw_random uses $(cat /sys/class/misc/hw_random/rng_current)"
z=$(head -c 64 /dev/hwrng | od -v -An -tx1 | tr -d ' \n')
[ ${#z} = 128 ] || e2e_fail "read ${#z} hex digits from /dev/hwrng"
case "$z" in *[1-9a-f]*) e2e_fail "fill=zero entropy is not zero: $z" ;; esac
echo "inner plugin ok"
`

// TestRunExternalBackends boots a guest with krun-core run whose four
// devices are external vhost-user back-ends: a disk from
// qemu-storage-daemon, a share from QEMU's C virtiofsd (which has no config
// space: the tag comes from --vhost-user's tag=), and a disk and a share
// from `krun-core serve` processes started on their own (the share's tag
// comes from the back-end's config space). The host checks what the guest
// wrote on each. A fifth device, in the same guest to save a nested boot,
// is a third-party plugin attached with --plugin (examples/plugin-null, a
// virtio-rng whose bytes are zero with fill=zero).
func TestRunExternalBackends(t *testing.T) {
	a := vmtest.Require(t)
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (Debian package qemu-utils)")
	}
	if _, err := os.Stat(virtiofsdPath); err != nil {
		t.Skipf("%s is not installed (Debian package qemu-system-common)", virtiofsdPath)
	}
	inner := a.NewInitramfs()
	inner.AddModules(a.Kernel, "virtio_mmio", "virtio_blk", "virtiofs", "virtio_rng")
	inner.SetInit(runInner)
	marker := inner.ResultMarker()
	krun := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/cmd/krun-core")
	blkPlugin := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/plugins/blk-raw")
	fsPlugin := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/plugins/fs-virtio")
	nullPlugin := vmtest.BuildStatic(t, "github.com/krun-core/krun-core/examples/plugin-null")
	if vmtest.DirectKVM(t) {
		runDirect(t, a, inner, marker, qsd, map[string]string{"krun-core": krun, "krun-plugin-blk-raw": blkPlugin,
			"krun-plugin-fs-virtio": fsPlugin, "krun-plugin-null": nullPlugin})
		return
	}
	payload := vmtest.InnerGuest(t, a, inner, "/nested")
	payload = append(payload,
		vmtest.File{Dst: "/bin/krun-core", Src: krun, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-blk-raw", Src: blkPlugin, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-fs-virtio", Src: fsPlugin, Mode: 0o755},
		vmtest.File{Dst: "/bin/krun-plugin-null", Src: nullPlugin, Mode: 0o755})
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{
		Payload:      payload,
		HostBinaries: []string{qsd, virtiofsdPath},
		Timeout:      10 * time.Minute,
		Script: fmt.Sprintf(`
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
for tag in vfsd kfs; do
	mkdir -p /tmp/share-$tag
	echo "hello from the host to $tag" > /tmp/share-$tag/from-host
done
# A root krun-core serves shares as nobody (the outer root, an initramfs on
# Debian 6.1, has no idmapped mounts): the share is nobody's.
chown -R 65534:65534 /tmp/share-kfs
for label in %[1]s %[2]s; do
	dd if=/dev/zero of=/tmp/$label.raw bs=1M count=8 2>/dev/null
	printf $label | dd of=/tmp/$label.raw conv=notrunc 2>/dev/null
done
%[3]s --blockdev driver=file,node-name=f,filename=/tmp/%[1]s.raw \
	--export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/qsd.sock,writable=on >/tmp/qsd.log 2>&1 &
# The outer root is the initramfs, where pivot_root does not work: the
# C virtiofsd's chroot sandbox instead of its namespace one.
%[4]s --socket-path=/tmp/vfsd.sock -o source=/tmp/share-vfsd -o sandbox=chroot --rlimit-nofile=0 >/tmp/vfsd.log 2>&1 &
krun-core serve --plugin-dir /bin --socket /tmp/kblk.sock --disk path=/tmp/%[2]s.raw,format=raw >/tmp/kblk.log 2>&1 &
krun-core serve --plugin-dir /bin --socket /tmp/kfs.sock --fs path=/tmp/share-kfs,tag=kfs >/tmp/kfs.log 2>&1 &
for s in qsd vfsd kblk kfs; do
	i=0
	until [ -S /tmp/$s.sock ]; do
		i=$((i+1)); [ $i -lt 120 ] || { cat /tmp/$s.log; e2e_fail "no socket from $s"; }
		sleep 0.5
	done
done
sleep 1 # the daemons bind before they listen
rc=0
e2e_bounded 300 /tmp/inner.log krun-core run --handshake-timeout 10m --kernel /nested/vmlinuz --initrd /nested/initramfs.cpio --memory 256M \
	--plugin-dir /bin --log-level info --cmdline "console=ttyS0 panic=-1 quiet" --boot-timeout 120 \
	--vhost-user type=blk,socket=/tmp/qsd.sock \
	--vhost-user type=fs,socket=/tmp/vfsd.sock,tag=vfsd \
	--vhost-user type=blk,socket=/tmp/kblk.sock \
	--vhost-user type=fs,socket=/tmp/kfs.sock \
	--plugin null,fill=zero || rc=$?
sed 's/^/inner| /' /tmp/inner.log
[ $rc = 0 ] || { for s in qsd vfsd kblk kfs; do sed "s/^/$s| /" /tmp/$s.log; done; e2e_fail "krun-core run exited $rc"; }
grep -q '%[5]s ok' /tmp/inner.log || e2e_fail "inner guest did not report ok"
[ "$(grep -c 'not sandboxed by krun-core' /tmp/inner.log)" = 1 ] || e2e_fail "the log does not say once that the back-ends are not sandboxed"
for label in %[1]s %[2]s; do
	got=$(dd if=/tmp/$label.raw bs=512 skip=8 count=1 2>/dev/null | head -n 1)
	[ "$got" = "written by the inner guest to $label" ] || e2e_fail "$label.raw holds '$got'"
done
for tag in vfsd kfs; do
	[ "$(cat /tmp/share-$tag/from-guest)" = "hello from the inner guest to $tag" ] || e2e_fail "the guest's file on $tag is not on the host"
done
echo "outer checks ok"
`, labelQSD, labelServe, qsd, virtiofsdPath, marker)})
	if !strings.Contains(r.Console, "inner| inner vhost-user ok") || !strings.Contains(r.Console, "inner| inner plugin ok") ||
		!strings.Contains(r.Console, "outer checks ok") {
		t.Error("the nested run did not report every step")
	}
	t.Logf("nested: outer QEMU ran %v", r.Total.Round(time.Millisecond))
}

// runDirect is the test on a host whose KVM boots stock kernels: the
// back-ends run on the host.
func runDirect(t *testing.T, a *vmtest.Assets, inner *vmtest.Initramfs, marker, qsd string, bins map[string]string) {
	if os.Getuid() != 0 {
		t.Skip("the C virtiofsd needs root for its sandbox")
	}
	dir, err := os.MkdirTemp("", "kvu") // short: socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	initrd := filepath.Join(dir, "initramfs.cpio")
	must(t, inner.Write(initrd))
	bin := filepath.Join(dir, "bin")
	must(t, os.Mkdir(bin, 0o755))
	for dst, src := range bins {
		b, err := os.ReadFile(src)
		must(t, err)
		must(t, os.WriteFile(filepath.Join(bin, dst), b, 0o755))
	}
	krun := filepath.Join(bin, "krun-core")
	for _, tag := range []string{"vfsd", "kfs"} {
		must(t, os.Mkdir(filepath.Join(dir, "share-"+tag), 0o755))
		must(t, os.WriteFile(filepath.Join(dir, "share-"+tag, "from-host"), []byte("hello from the host to "+tag+"\n"), 0o644))
	}
	for _, label := range []string{labelQSD, labelServe} {
		b := make([]byte, 8<<20)
		copy(b, label)
		must(t, os.WriteFile(filepath.Join(dir, label+".raw"), b, 0o644))
	}
	sock := func(name string) string { return filepath.Join(dir, name+".sock") }
	daemon(t, sock("qsd"), true, qsd, "--blockdev", "driver=file,node-name=f,filename="+filepath.Join(dir, labelQSD+".raw"),
		"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="+sock("qsd")+",writable=on")
	daemon(t, sock("vfsd"), false, virtiofsdPath, "--socket-path="+sock("vfsd"), "-o", "source="+filepath.Join(dir, "share-vfsd"))
	daemon(t, sock("kblk"), true, krun, "serve", "--plugin-dir", bin, "--socket", sock("kblk"), "--disk", "path="+filepath.Join(dir, labelServe+".raw")+",format=raw")
	daemon(t, sock("kfs"), true, krun, "serve", "--plugin-dir", bin, "--socket", sock("kfs"), "--fs", "path="+filepath.Join(dir, "share-kfs")+",tag=kfs")
	out, err := vmtest.RunDirect(t, 0, exec.Command(krun, "run", "--kernel", a.Kernel.Vmlinuz, "--initrd", initrd,
		"--memory", "256M", "--cmdline", "console=ttyS0 panic=-1 quiet", "--plugin-dir", bin, "--log-level", "info",
		"--vhost-user", "type=blk,socket="+sock("qsd"),
		"--vhost-user", "type=fs,socket="+sock("vfsd")+",tag=vfsd",
		"--vhost-user", "type=blk,socket="+sock("kblk"),
		"--vhost-user", "type=fs,socket="+sock("kfs"),
		"--plugin", "null,fill=zero"))
	if err != nil || !strings.Contains(string(out), marker+" ok") {
		t.Fatalf("krun-core run: %v\n%s", err, out)
	}
	if n := strings.Count(string(out), "not sandboxed by krun-core"); n != 1 {
		t.Errorf("the log says %d times that the back-ends are not sandboxed, want once", n)
	}
	for _, label := range []string{labelQSD, labelServe} {
		b, err := os.ReadFile(filepath.Join(dir, label+".raw"))
		must(t, err)
		want := "written by the inner guest to " + label + "\n"
		if got := b[answerOff : answerOff+len(want)]; string(got) != want {
			t.Errorf("%s.raw holds %q at %d", label, got, answerOff)
		}
	}
	for _, tag := range []string{"vfsd", "kfs"} {
		if b, _ := os.ReadFile(filepath.Join(dir, "share-"+tag, "from-guest")); string(b) != "hello from the inner guest to "+tag+"\n" {
			t.Errorf("%s: the guest's file reads %q on the host", tag, b)
		}
	}
}

// daemon starts a back-end until the test ends and returns once its socket
// is there. A daemon that serves one front-end only (the C virtiofsd exits
// when it disconnects) must not be probed with a connection: for it, once
// the socket exists, a short wait covers the gap between bind and listen.
func daemon(t *testing.T, sock string, probe bool, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out syncbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	must(t, cmd.Start())
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(name), out.String())
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if probe {
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				return
			}
		} else if _, err := os.Stat(sock); err == nil {
			time.Sleep(500 * time.Millisecond)
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s exited before listening: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no socket %s after 30 s: %s", name, sock, out.String())
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
