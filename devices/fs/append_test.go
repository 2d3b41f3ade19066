package fs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestAppendHandleWrites: on a handle the guest opened O_APPEND, its own
// writes append on the host (the host fd keeps O_APPEND, as with the C
// virtiofsd without writeback caching), but a page written back from the
// guest's page cache through it (fuse.WriteCache: an mmap'd file's dirty
// page, sent through whichever writable handle the kernel picks) lands at
// its offset. Appended, it would corrupt the file (from review).
func TestAppendHandleWrites(t *testing.T) {
	e := newEnv(t, 0, nil)
	must(t, "host write", os.WriteFile(e.path("f"), []byte("hello"), 0o644))
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDWR|unix.O_APPEND)
	must(t, "OPEN", err)
	if _, err := e.c.WriteWith(f.NodeID, fh, 0, []byte("J"), fuse.WriteCache); err != nil {
		if err == unix.EIO {
			t.Skip("this host kernel has no RWF_NOAPPEND (Linux 6.9): the write fails, as it should")
		}
		t.Fatalf("a written-back page: %v", err)
	}
	if b, _ := os.ReadFile(e.path("f")); string(b) != "Jello" {
		t.Fatalf("a page written back at offset 0 through an O_APPEND handle: host file %q, want %q", b, "Jello")
	}
	// The guest's own write: an append, wherever its size said the end was.
	if _, err := e.c.Write(f.NodeID, fh, 2, []byte("!")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(e.path("f")); string(b) != "Jello!" {
		t.Fatalf("a write through an O_APPEND handle: host file %q, want %q", b, "Jello!")
	}
}
