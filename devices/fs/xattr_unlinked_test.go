package fs

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devices/fs/fuse"
)

// TestXattrUnlinkedOpenFile (from the differential test against QEMU's C
// virtiofsd, helper-123): the xattr calls of a file that is still open in
// the guest but has no name left (fsetxattr, fgetxattr, flistxattr and
// fremovexattr on its fd; Linux sends them by node id, without the handle)
// answered ESTALE, since the server reopened the file by name. They must
// use the guest's open handle, as they do on Linux and on virtiofsd.
func TestXattrUnlinkedOpenFile(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags uint32
	}{
		{"O_RDWR", unix.O_RDWR},
		{"O_WRONLY", unix.O_WRONLY},
		{"O_RDONLY", unix.O_RDONLY},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 7, nil)
			en, fh, err := e.c.Create(fuse.RootID, "f", unix.O_RDWR, unix.S_IFREG|0o644)
			must(t, "CREATE", err)
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			fh, err = e.c.Open(en.NodeID, tc.flags)
			must(t, "OPEN", err)
			must(t, "UNLINK", e.c.Unlink(fuse.RootID, "f"))
			must(t, "SETXATTR", e.c.Setxattr(en.NodeID, "user.k", []byte("v"), 0))
			v, err := e.c.Getxattr(en.NodeID, "user.k", 64)
			must(t, "GETXATTR", err)
			if string(v) != "v" {
				t.Errorf("GETXATTR user.k = %q, want \"v\"", v)
			}
			list, err := e.c.Listxattr(en.NodeID, 256)
			must(t, "LISTXATTR", err)
			if string(list) != "user.k\x00" {
				t.Errorf("LISTXATTR = %q, want \"user.k\\x00\"", list)
			}
			must(t, "REMOVEXATTR", e.c.Removexattr(en.NodeID, "user.k"))
			_, err = e.c.Getxattr(en.NodeID, "user.k", 64)
			wantErrno(t, "GETXATTR after REMOVEXATTR", err, unix.ENODATA)

			// Once the last handle is released nothing can reach the file:
			// ESTALE, as before.
			must(t, "RELEASE", e.c.Release(en.NodeID, fh, false))
			_, err = e.c.Getxattr(en.NodeID, "user.k", 64)
			wantErrno(t, "GETXATTR after the last RELEASE", err, unix.ESTALE)
		})
	}
}
