package fs_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/internal/vmtest"
	"github.com/krun-core/krun-core/sandbox"
)

// guestScript is what the guest does on the share. EXPECTED16 is replaced
// by the SHA-256 of the host's 16 MiB file.
const guestScript = `
fail() { e2e_fail "$*"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
mkdir -p /mnt
mount -t virtiofs share /mnt || fail "mount -t virtiofs share"
cd /mnt
[ "$(cat hello)" = "from the host" ] || fail "the host's file reads $(cat hello)"

mkdir many || fail "mkdir many"
i=0
while [ $i -lt 500 ]; do
	echo "file $i" > many/f$i || fail "create many/f$i"
	i=$((i+1))
done
[ "$(ls many | wc -l)" = 500 ] || fail "ls many lists $(ls many | wc -l) names"
drop
[ "$(ls -l many | grep -c '^-rw-r--r--')" = 500 ] || fail "ls -l many shows $(ls -l many | grep -c '^-rw-r--r--') files with mode 644"
[ "$(cat many/f123)" = "file 123" ] || fail "many/f123 reads $(cat many/f123)"

dd if=/pat/big of=big bs=1M status=none || fail "write 8 MiB"
cmp /pat/big big || fail "8 MiB re-read from the page cache differs"
drop
cmp /pat/big big || fail "8 MiB re-read from the server differs"
[ "$(stat -c %s big)" = 8388608 ] || fail "size of big is $(stat -c %s big)"

mv big big.renamed || fail "rename"
[ ! -e big ] || fail "big still exists after the rename"
ln -s big.renamed sym || fail "symlink"
[ "$(readlink sym)" = big.renamed ] || fail "readlink sym gives $(readlink sym)"
cmp sym /pat/big || fail "read through the symlink differs"
ln big.renamed hard || fail "hard link"
[ "$(stat -c %h big.renamed)" = 2 ] || fail "nlink $(stat -c %h big.renamed) after ln"
[ "$(stat -c %i big.renamed)" = "$(stat -c %i hard)" ] || fail "the hard link has another inode"
chmod 640 hard || fail "chmod"
[ "$(stat -c %a big.renamed)" = 640 ] || fail "mode $(stat -c %a big.renamed) after chmod 640"

echo "hello world" > t
truncate -s 5 t || fail "truncate"
[ "$(cat t)" = hello ] || fail "truncated file reads $(cat t)"
echo " again" >> t || fail "append"
[ "$(cat t)" = "hello again" ] || fail "appended file reads $(cat t)"
drop
[ "$(cat t)" = "hello again" ] || fail "appended file reads $(cat t) after drop_caches"

i=0
while [ $i -lt 100 ]; do
	rm many/f$i || fail "unlink many/f$i"
	i=$((i+1))
done
[ "$(ls many | wc -l)" = 400 ] || fail "ls many lists $(ls many | wc -l) names after 100 unlinks"
[ ! -e many/f42 ] || fail "many/f42 still exists"

mkdir -p d1/d2/d3 || fail "mkdir -p"
rmdir d1/d2/d3 d1/d2 || fail "rmdir"
if rmdir many 2>/dev/null; then fail "rmdir of a non-empty directory succeeded"; fi

set -- $(stat -f -c '%b %S %a' /mnt)
[ "$1" -gt 0 ] && [ "$2" -gt 0 ] || fail "statfs: blocks $1, block size $2"

[ "$(sha256sum host16 | cut -d' ' -f1)" = EXPECTED16 ] || fail "the 16 MiB host file reads differently"
drop
[ "$(sha256sum host16 | cut -d' ' -f1)" = EXPECTED16 ] || fail "the 16 MiB host file reads differently after drop_caches"

cd /
umount /mnt || fail "umount"
echo "virtio-fs guest test done"
`

type fsFixtures struct {
	big    []byte // 8 MiB the guest writes
	host16 []byte // 16 MiB the host provides
}

func newFsFixtures() *fsFixtures {
	rng := rand.New(rand.NewPCG(7, 77))
	rnd := func(n int) []byte {
		b := make([]byte, n)
		for i := 0; i < n; i += 8 {
			v := rng.Uint64()
			for k := 0; k < 8 && i+k < n; k++ {
				b[i+k] = byte(v >> (8 * k))
			}
		}
		return b
	}
	return &fsFixtures{big: rnd(8 << 20), host16: rnd(16 << 20)}
}

// prepare fills a fresh share with what the guest expects to find.
func (f *fsFixtures) prepare(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "share")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("from the host"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "host16"), f.host16, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runGuest boots a guest whose only device is the virtio-fs back-end at
// socket (tag "share") and runs guestScript.
func (f *fsFixtures) runGuest(t *testing.T, a *vmtest.Assets, socket string) *vmtest.Result {
	t.Helper()
	ib := a.NewInitramfs()
	ib.AddModules(a.Kernel, "virtio_pci", "virtiofs")
	ib.AddBytes("/pat/big", f.big, 0o644)
	sum := sha256.Sum256(f.host16)
	ib.SetInit(strings.ReplaceAll(guestScript, "EXPECTED16", hex.EncodeToString(sum[:])))
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib, Timeout: 8 * time.Minute, MemoryMiB: 512})
	vm.AddVhostUserFS(socket, "share")
	return vm.Run()
}

// check verifies from the host what the guest did to the share; the guest's
// new files belong to owner (the server's ids).
func (f *fsFixtures) check(t *testing.T, dir string, owner int) {
	t.Helper()
	p := func(name string) string { return filepath.Join(dir, name) }
	ents, err := os.ReadDir(p("many"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 400 {
		t.Errorf("many/ has %d entries, want 400", len(ents))
	}
	for i := 0; i < 500; i++ {
		b, err := os.ReadFile(p(fmt.Sprintf("many/f%d", i)))
		switch {
		case i < 100 && err == nil:
			t.Errorf("many/f%d was not removed", i)
		case i >= 100 && (err != nil || string(b) != fmt.Sprintf("file %d\n", i)):
			t.Errorf("many/f%d: %q %v", i, b, err)
		}
	}
	b, err := os.ReadFile(p("big.renamed"))
	if err != nil || !bytes.Equal(b, f.big) {
		t.Errorf("big.renamed: %d bytes, %v (want the guest's 8 MiB)", len(b), err)
	}
	if _, err := os.Lstat(p("big")); err == nil {
		t.Error("big still exists on the host")
	}
	var st, hst unix.Stat_t
	if err := unix.Lstat(p("big.renamed"), &st); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lstat(p("hard"), &hst); err != nil {
		t.Fatal(err)
	}
	if st.Ino != hst.Ino || st.Nlink != 2 {
		t.Errorf("hard link: inodes %d and %d, nlink %d", st.Ino, hst.Ino, st.Nlink)
	}
	if st.Mode&0o7777 != 0o640 {
		t.Errorf("big.renamed mode %o, want 640", st.Mode&0o7777)
	}
	if st.Uid != uint32(owner) {
		t.Errorf("big.renamed belongs to uid %d, want %d (krun-core's, or virtiofsd's)", st.Uid, owner)
	}
	if target, err := os.Readlink(p("sym")); err != nil || target != "big.renamed" {
		t.Errorf("sym: %q %v", target, err)
	}
	if b, err := os.ReadFile(p("t")); err != nil || string(b) != "hello again\n" {
		t.Errorf("t: %q %v", b, err)
	}
	if ents, err := os.ReadDir(p("d1")); err != nil || len(ents) != 0 {
		t.Errorf("d1: %v %v (want an empty directory)", ents, err)
	}
	if b, err := os.ReadFile(p("host16")); err != nil || !bytes.Equal(b, f.host16) {
		t.Error("the host's 16 MiB file changed")
	}
}

// TestGuest runs the guest script against krun-core serve --fs.
func TestGuest(t *testing.T) {
	a := vmtest.Require(t)
	f := newFsFixtures()
	dir := f.prepare(t)
	d := serveFS(t, "path="+dir+",tag=share")
	r := f.runGuest(t, a, d.Socket)
	t.Logf("guest run: boot %v, total %v", r.BootTime, r.Total)
	d.Stop()
	// The plugin runs as nobody under a root krun-core, but its share is
	// an ID-mapped mount: the guest's files are krun-core's on the host.
	f.check(t, dir, os.Geteuid())
}

// TestGuestVirtiofsd runs the same guest script and host checks against
// QEMU's C virtiofsd, the reference.
func TestGuestVirtiofsd(t *testing.T) {
	a := vmtest.Require(t)
	f := newFsFixtures()
	dir := f.prepare(t)
	d := virtiofsd(t, dir)
	r := f.runGuest(t, a, d.Socket)
	t.Logf("guest run: boot %v, total %v", r.BootTime, r.Total)
	d.Stop()
	f.check(t, dir, os.Geteuid())
}

// TestServeNoRefusedCalls: the fs plugin serves a request without
// krun-core logging a seccomp refusal (the plugin once read its open-file
// limit with getrlimit, which the filter refuses, at every start).
func TestServeNoRefusedCalls(t *testing.T) {
	dir := t.TempDir()
	d := serveFS(t, "path="+dir+",tag=share")
	g := dialFS(t, d.Socket, 0)
	if _, err := g.req.Getattr(fuse.RootID); err != nil {
		t.Fatalf("GETATTR of the root: %v", err)
	}
	d.Stop()
	if out := d.Out.String(); strings.Contains(out, "seccomp refused") {
		t.Errorf("krun-core logged a refused system call:\n%s", out)
	}
}

// TestServeReplacedFileOverBudget: the sandboxed plugin, with more nodes
// than its file descriptor budget (three quarters of the virtio-fs
// plugin's RLIMIT_NOFILE, sandbox.FSOpenFiles) holds open, closes
// idle ones and reopens them by name. A file the host replaced meanwhile
// must not be reached through its old node id (ESTALE), also when the new
// file has the old inode number: the birth time the plugin takes with
// statx when it closes a node tells them apart, so statx must pass the
// plugin's seccomp filter and Landlock.
func TestServeReplacedFileOverBudget(t *testing.T) {
	dir := t.TempDir()
	d := serveFS(t, "path="+dir+",tag=share")
	g := dialFS(t, d.Socket, 0)
	c := g.req
	first, err := c.Mknod(fuse.RootID, "a", unix.S_IFREG|0o644, 0)
	must(t, "MKNOD a", err)
	for i := range sandbox.FSOpenFiles {
		_, err := c.Mknod(fuse.RootID, fmt.Sprintf("f%d", i), unix.S_IFREG|0o644, 0)
		must(t, "MKNOD filler", err)
	}
	must(t, "host remove a", os.Remove(filepath.Join(dir, "a")))
	must(t, "host create a", os.WriteFile(filepath.Join(dir, "a"), []byte("new"), 0o644))
	var st unix.Stat_t
	must(t, "stat", unix.Lstat(filepath.Join(dir, "a"), &st))
	t.Logf("the new a reuses the old inode number: %v", st.Ino == first.Attr.Ino)
	if attr, err := c.Getattr(first.NodeID); err == nil {
		t.Errorf("GETATTR of the replaced file's old node: ino %d size %d, want ESTALE", attr.Ino, attr.Size)
	} else {
		wantErrno(t, "GETATTR of the old node", err, unix.ESTALE)
	}
	en, err := c.Lookup(fuse.RootID, "a")
	must(t, "LOOKUP a", err)
	if en.NodeID == first.NodeID || en.Attr.Size != 3 {
		t.Errorf("LOOKUP a: node %d size %d, want a new node (old %d) of size 3", en.NodeID, en.Attr.Size, first.NodeID)
	}
	d.Stop()
	if out := d.Out.String(); strings.Contains(out, "seccomp refused") {
		t.Errorf("krun-core logged a refused system call:\n%s", out)
	}
}
