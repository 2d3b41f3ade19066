package fs

import (
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// A WRITE, FALLOCATE or truncate through a handle opened read-only fails as
// the system call would on such an fd, and changes nothing first: the
// set-id bits were cleared (fchmod needs only ownership) before the call
// that then failed (from review). Linux never sends these on a read-only
// handle; a hostile guest could.

func TestFallocateReadOnlyHandleKeepsMode(t *testing.T) {
	e := newEnv(t, 0, nil)
	hostFile(t, e.path("f"), 0o4755)
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)
	err = e.c.Fallocate(f.NodeID, fh, 0, 4096, 0)
	wantErrno(t, "FALLOCATE on a read-only handle", err, syscall.EBADF)
	if got := hostPerm(t, e.path("f")); got != 0o4755 {
		t.Errorf("failed FALLOCATE changed the host file's mode from 4755 to %o", got)
	}
}

func TestWriteReadOnlyHandleKeepsMode(t *testing.T) {
	e := newEnv(t, 0, nil)
	hostFile(t, e.path("f"), 0o4755)
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)
	_, err = e.c.Write(f.NodeID, fh, 0, []byte("x"))
	wantErrno(t, "WRITE on a read-only handle", err, syscall.EBADF)
	if got := hostPerm(t, e.path("f")); got != 0o4755 {
		t.Errorf("failed WRITE changed the host file's mode from 4755 to %o", got)
	}
}

func TestTruncateReadOnlyHandleKeepsMode(t *testing.T) {
	e := newEnv(t, 0, nil)
	hostFile(t, e.path("f"), 0o4755)
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)
	_, err = e.c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize | fuse.FattrFh, Fh: fh, Size: 0})
	wantErrno(t, "truncate through a read-only handle", err, syscall.EINVAL)
	if got := hostPerm(t, e.path("f")); got != 0o4755 {
		t.Errorf("failed truncate changed the host file's mode from 4755 to %o", got)
	}
}

// A handle opened for writing still writes, clearing the bits as before.
func TestWriteWritableHandleStillClears(t *testing.T) {
	e := newEnv(t, 0, nil)
	hostFile(t, e.path("f"), 0o4755)
	f := e.lookup(fuse.RootID, "f")
	fh, err := e.c.Open(f.NodeID, unix.O_WRONLY)
	must(t, "OPEN", err)
	_, err = e.c.Write(f.NodeID, fh, 0, []byte("x"))
	must(t, "WRITE", err)
	if got := hostPerm(t, e.path("f")); got&0o6000 != 0 {
		t.Errorf("a WRITE left the set-id bits: mode %o", got)
	}
}
