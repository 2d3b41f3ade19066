package fs

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestSetattrRefusedSizeChangesNothing (from review, helper-85; fixed:
// the size is checked and the file opened before any change): SETATTR promises that a
// refused request changes nothing (every field checked first;
// TestSetattrRefusedChangesNothing), but the size is only checked for the
// node's type and the handle's access mode inside truncate, after chmod
// has run. A guest that sends MODE|SIZE for a directory (EISDIR), a FIFO
// (EINVAL) or through a handle opened read-only (EINVAL) gets an error
// reply, and the host file's mode has changed all the same; the guest's
// attribute cache keeps the old mode.
func TestSetattrRefusedSizeChangesNothing(t *testing.T) {
	e := newEnv(t, 0, nil)
	must(t, "mkdir", os.Mkdir(e.path("d"), 0o755))
	must(t, "mkfifo", unix.Mkfifo(e.path("p"), 0o644))
	must(t, "write", os.WriteFile(e.path("f"), []byte("data"), 0o644))
	d := e.lookup(fuse.RootID, "d")
	p := e.lookup(fuse.RootID, "p")
	f := e.lookup(fuse.RootID, "f")
	rofh, err := e.c.Open(f.NodeID, unix.O_RDONLY)
	must(t, "OPEN", err)

	for _, tc := range []struct {
		name string
		node uint64
		path string
		in   fuse.SetattrIn
		want syscall.Errno
	}{
		{"directory", d.NodeID, "d", fuse.SetattrIn{Valid: fuse.FattrMode | fuse.FattrSize, Mode: 0o700}, syscall.EISDIR},
		{"fifo", p.NodeID, "p", fuse.SetattrIn{Valid: fuse.FattrMode | fuse.FattrSize, Mode: 0o600}, syscall.EINVAL},
		{"read-only handle", f.NodeID, "f", fuse.SetattrIn{Valid: fuse.FattrMode | fuse.FattrSize | fuse.FattrFh, Fh: rofh, Mode: 0o600}, syscall.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, err := os.Lstat(filepath.Join(e.dir, tc.path))
			must(t, "lstat", err)
			_, err = e.c.Setattr(tc.node, tc.in)
			wantErrno(t, "SETATTR", err, tc.want)
			after, err := os.Lstat(filepath.Join(e.dir, tc.path))
			must(t, "lstat", err)
			if after.Mode() != before.Mode() {
				t.Errorf("SETATTR refused with %v, but the host mode changed from %v to %v", tc.want, before.Mode(), after.Mode())
			}
		})
	}
}
