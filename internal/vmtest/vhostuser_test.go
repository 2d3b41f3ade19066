package vmtest_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// startDaemon starts a vhost-user back-end and waits for its socket.
func startDaemon(t *testing.T, socket string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(socket); err == nil {
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s exited before creating %s:\n%s", name, socket, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not create %s in 30s", name, socket)
		}
	}
}

// TestVhostUserBlk checks AddVhostUserBlk (and the shared memfd guest
// RAM) against qemu-storage-daemon's vhost-user-blk export: the guest reads
// what the host wrote and writes a sector the host then reads.
func TestVhostUserBlk(t *testing.T) {
	a := vmtest.Require(t)
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon not installed (Debian: qemu-utils)")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	data := make([]byte, 8<<20)
	copy(data, "host-data-at-0\n")
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "blk.sock")
	startDaemon(t, sock, qsd,
		"--blockdev", "driver=file,node-name=file0,filename="+img,
		"--export", "type=vhost-user-blk,id=exp0,node-name=file0,writable=on,addr.type=unix,addr.path="+sock)

	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_pci", "virtio_blk")
	ib.SetInit(`
[ "$(cat /sys/block/vda/size)" = 16384 ] || e2e_fail "vda has $(cat /sys/block/vda/size) sectors, want 16384"
[ "$(head -c 14 /dev/vda)" = host-data-at-0 ] || e2e_fail "sector 0 lacks the host's data"
echo guest-data-at-4096 | dd of=/dev/vda bs=4096 seek=1 conv=fsync,sync 2>/dev/null
`)
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib})
	vm.AddVhostUserBlk(sock)
	vm.Run()
	got, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(got[4096:], []byte("guest-data-at-4096\n")) {
		t.Errorf("image at 4096 holds %q, want the guest's write", got[4096:4096+20])
	}
}

// TestVhostUserFS checks AddVhostUserFS against QEMU's virtiofsd: the guest
// mounts the tag, reads a host file and creates one the host then reads.
func TestVhostUserFS(t *testing.T) {
	a := vmtest.Require(t)
	const virtiofsd = "/usr/lib/qemu/virtiofsd"
	if _, err := os.Stat(virtiofsd); err != nil {
		t.Skip("virtiofsd not installed at " + virtiofsd + " (Debian: qemu-system-common)")
	}
	if os.Geteuid() != 0 {
		t.Skip("QEMU's virtiofsd needs root (chroot sandbox)")
	}
	dir := t.TempDir()
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "from-host.txt"), []byte("hello guest\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "fs.sock")
	startDaemon(t, sock, virtiofsd, "--socket-path="+sock, "-o", "source="+share, "-o", "sandbox=chroot", "-o", "cache=none")

	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_pci", "virtiofs")
	ib.SetInit(`
mount -t virtiofs hostshare /mnt
[ "$(cat /mnt/from-host.txt)" = "hello guest" ] || e2e_fail "cannot read the host's file"
echo hello host > /mnt/from-guest.txt
umount /mnt
`)
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib})
	vm.AddVhostUserFS(sock, "hostshare")
	vm.Run()
	got, err := os.ReadFile(filepath.Join(share, "from-guest.txt"))
	if err != nil || string(got) != "hello host\n" {
		t.Errorf("host reads %q, %v; want the guest's file", got, err)
	}
}
