package fs

import (
	"os"
	"strings"
	"syscall"
	"testing"

	hclog "github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"github.com/krun-core/krun-core/internal/syncbuf"
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

// TestHandleCapSaid: an open refused for want of a handle is counted
// (fs.handle_refusals) and said in the plugin's log, once a minute at
// most, with what to raise: the guest sees only ENFILE, "Too many open
// files in system", which names no cause on the host.
func TestHandleCapSaid(t *testing.T) {
	var logs syncbuf.Buffer
	e := newEnv(t, 0, func(c *ServerConfig) {
		c.MaxHandles = 2
		c.Log = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	})
	must(t, "write", os.WriteFile(e.path("f"), []byte("data"), 0o644))
	f := e.lookup(fuse.RootID, "f")
	for i := 0; i < 2; i++ {
		_, err := e.c.Open(f.NodeID, unix.O_RDONLY)
		must(t, "OPEN", err)
	}
	if strings.Contains(logs.String(), "open-files") {
		t.Fatalf("warned below the limit:\n%s", logs.String())
	}
	for i := 0; i < 3; i++ {
		_, err := e.c.Opendir(fuse.RootID)
		wantErrno(t, "OPENDIR at the handle limit", err, syscall.ENFILE)
	}
	if got := e.s.stats.HandleRefusals.Load(); got != 3 {
		t.Errorf("%d refusals counted, want 3", got)
	}
	if n := strings.Count(logs.String(), "raise the share's open-files="); n != 1 || !strings.Contains(logs.String(), "limit=2") {
		t.Errorf("want one warning naming open-files= and limit=2, got %d:\n%s", n, logs.String())
	}
	// A minute later the next refusal says it again.
	e.s.handleWarned.Add(-int64(handleWarnEvery))
	_, err := e.c.Opendir(fuse.RootID)
	wantErrno(t, "OPENDIR at the handle limit", err, syscall.ENFILE)
	if n := strings.Count(logs.String(), "raise the share's open-files="); n != 2 {
		t.Errorf("want a second warning a minute later, got %d:\n%s", n, logs.String())
	}
}
