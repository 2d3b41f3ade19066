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
func TestReadOnlyHandleKeepsMode(t *testing.T) {
	tests := []struct {
		name string
		op   func(e *env, node, fh uint64) error
		want syscall.Errno
	}{
		{"FALLOCATE", func(e *env, node, fh uint64) error { return e.c.Fallocate(node, fh, 0, 4096, 0) }, syscall.EBADF},
		{"WRITE", func(e *env, node, fh uint64) error { _, err := e.c.Write(node, fh, 0, []byte("x")); return err }, syscall.EBADF},
		{"truncate", func(e *env, node, fh uint64) error {
			_, err := e.c.Setattr(node, fuse.SetattrIn{Valid: fuse.FattrSize | fuse.FattrFh, Fh: fh, Size: 0})
			return err
		}, syscall.EINVAL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 0, nil)
			hostFile(t, e.path("f"), 0o4755)
			f := e.lookup(fuse.RootID, "f")
			fh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
			must(t, "OPEN", err)
			wantErrno(t, tc.name+" through a read-only handle", tc.op(e, f.NodeID, fh), tc.want)
			if got := hostPerm(t, e.path("f")); got != 0o4755 {
				t.Errorf("a failed %s changed the host file's mode from 4755 to %o", tc.name, got)
			}
		})
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
