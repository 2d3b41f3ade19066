package fs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestOpenReadOnlyTrunc: the server claims FUSE_ATOMIC_O_TRUNC, so
// Linux sends open(O_RDONLY|O_TRUNC) as OPEN with both flags (the guest
// VFS has already checked write permission; Linux truncates). The server
// opened read-only and then ftruncated that fd, which the kernel refuses:
// the guest's open failed with EINVAL, and so did CREATE without O_EXCL of
// an existing file. Both truncate now, and the handle stays read-only.
// (From review.)
func TestOpenReadOnlyTrunc(t *testing.T) {
	e := newEnv(t, 0, nil)
	must(t, "host write", os.WriteFile(e.path("f"), []byte("old"), 0o644))
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDONLY|unix.O_TRUNC)
	if err != nil {
		t.Errorf("OPEN O_RDONLY|O_TRUNC: %v (Linux truncates and opens)", err)
	} else {
		if _, err := e.c.Write(f.NodeID, fh, 0, []byte("x")); err == nil {
			t.Error("a handle opened O_RDONLY|O_TRUNC took a write")
		}
		e.c.Release(f.NodeID, fh, false)
	}
	if b, _ := os.ReadFile(e.path("f")); len(b) != 0 {
		t.Errorf("after OPEN O_RDONLY|O_TRUNC the file holds %q", b)
	}
	must(t, "host write", os.WriteFile(e.path("g"), []byte("old"), 0o644))
	_, _, err = e.c.Create(fuse.RootID, "g", unix.O_RDONLY|unix.O_CREAT|unix.O_TRUNC, 0o644)
	if err != nil {
		t.Errorf("CREATE O_RDONLY|O_CREAT|O_TRUNC of an existing file: %v", err)
	}
	if b, _ := os.ReadFile(e.path("g")); len(b) != 0 {
		t.Errorf("after CREATE O_RDONLY|O_CREAT|O_TRUNC the file holds %q", b)
	}
}
