package fs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOverlayCopyUpKeepsClosedDirNode: on overlayfs (the
// usual container root), copying a directory up keeps its st_dev/st_ino
// but gives it the upper inode's birth time. A directory node closed for
// the fd budget before a copy-up below it (a write to a file inside it)
// must still reopen: the birth time is not checked on overlayfs. With the
// check it was ESTALE (from review).
func TestOverlayCopyUpKeepsClosedDirNode(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to mount overlayfs")
	}
	base := t.TempDir()
	for _, d := range []string{"l/a/b", "u", "w", "m"} {
		must(t, "mkdir", os.MkdirAll(base+"/"+d, 0o755))
	}
	must(t, "file", os.WriteFile(base+"/l/a/b/f", []byte("x"), 0o644))
	must(t, "file", os.WriteFile(base+"/l/x", []byte("x"), 0o644))
	m := base + "/m"
	if err := unix.Mount("overlay", m, "overlay", 0, "lowerdir="+base+"/l,upperdir="+base+"/u,workdir="+base+"/w"); err != nil {
		t.Skipf("mount overlayfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(m, unix.MNT_DETACH) })

	tab, insert := tableOn(t, m, 1)
	n := insert("a")
	insert("x") // closes a's fd for the budget, recording its birth time
	tab.mu.Lock()
	closed := n.fd < 0
	tab.mu.Unlock()
	if !closed {
		t.Fatal("a's fd was not closed for the budget")
	}
	// A write below a (the guest through another node, or anyone) copies
	// a up: same inode number, new birth time.
	must(t, "write a/b/f", os.WriteFile(m+"/a/b/f", []byte("y"), 0o644))
	if e := tab.acquire(n); e != 0 {
		t.Fatalf("acquire of the unchanged directory a after an overlayfs copy-up: %v, want success", e)
	}
	tab.release(n)
}
