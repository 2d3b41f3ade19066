package fs

import (
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"golang.org/x/sys/unix"
)

// TestSlowCloseHoldsNoOtherRequest: the close of a released handle's fd
// (on NFS or a FUSE host file system it flushes; the last close of a large
// unlinked file frees its blocks) runs outside the table's lock, so the
// share's other requests go on meanwhile (left open by helper-141: every
// request waited behind it).
func TestSlowCloseHoldsNoOtherRequest(t *testing.T) {
	e := newEnv(t, 0, nil)
	must(t, "write", os.WriteFile(e.path("slow"), []byte("x"), 0o644))
	must(t, "write", os.WriteFile(e.path("other"), []byte("y"), 0o644))
	slow := e.lookup(fuse.RootID, "slow")
	other := e.lookup(fuse.RootID, "other")
	fh, err := e.c.Open(slow.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)

	e.s.t.mu.Lock()
	slowFd := e.s.t.handles[fh].fd
	e.s.t.mu.Unlock()
	closing := make(chan struct{})
	finish := make(chan struct{})
	e.s.t.closeFd = func(fd int) error {
		if fd == slowFd {
			close(closing)
			<-finish
		}
		return unix.Close(fd)
	}
	released := make(chan error, 1)
	go func() { released <- e.c.Release(slow.NodeID, fh, false) }()
	select {
	case <-closing:
	case <-time.After(10 * time.Second):
		t.Fatal("RELEASE never closed the handle's fd")
	}
	got := make(chan error, 1)
	go func() {
		_, err := e.c.Getattr(other.NodeID)
		got <- err
	}()
	select {
	case err := <-got:
		must(t, "GETATTR during a slow close", err)
	case <-time.After(5 * time.Second):
		close(finish)
		t.Fatal("GETATTR of another file waited for a slow close")
	}
	close(finish)
	select {
	case err := <-released:
		must(t, "RELEASE", err)
	case <-time.After(10 * time.Second):
		t.Fatal("RELEASE did not end after its close")
	}
	if _, h := e.live(); h != 0 {
		t.Errorf("%d handles open after RELEASE", h)
	}
}
