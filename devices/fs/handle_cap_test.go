package fs

import (
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestHandleCapTruncatesNothing: at the handle limit an OPEN with O_TRUNC
// is refused (ENFILE), and a refused open leaves the file as it was. The
// server truncated first and found out there was no handle for it after,
// so the guest's open failed and the file was empty all the same.
func TestHandleCapTruncatesNothing(t *testing.T) {
	e := newEnv(t, 0, func(c *ServerConfig) { c.MaxHandles = 2 })
	must(t, "write", os.WriteFile(e.path("f"), []byte("data"), 0o644))
	f := e.lookup(fuse.RootID, "f")
	for i := 0; i < 2; i++ {
		_, err := e.c.Opendir(fuse.RootID)
		must(t, "OPENDIR", err)
	}
	for _, flags := range []uint32{unix.O_RDWR | unix.O_TRUNC, unix.O_RDONLY | unix.O_TRUNC, unix.O_WRONLY | unix.O_TRUNC} {
		_, err := e.c.Open(f.NodeID, flags)
		wantErrno(t, "OPEN O_TRUNC at the handle limit", err, syscall.ENFILE)
		if b, _ := os.ReadFile(e.path("f")); string(b) != "data" {
			t.Fatalf("OPEN %#o refused with ENFILE left the file holding %q", flags, b)
		}
	}
	_, _, err := e.c.Create(fuse.RootID, "f", unix.O_RDWR|unix.O_CREAT|unix.O_TRUNC, 0o644)
	wantErrno(t, "CREATE O_TRUNC at the handle limit", err, syscall.ENFILE)
	if b, _ := os.ReadFile(e.path("f")); string(b) != "data" {
		t.Fatalf("CREATE refused with ENFILE left the file holding %q", b)
	}
}
