package fs

import (
	"os"
	"syscall"
	"testing"

	"github.com/krun-core/krun-core/devices/fs/fuse"
	"golang.org/x/sys/unix"
)

// TestSetattrRefusedChangesNothing: SETATTR applied chmod, chown and
// truncate one after the other and checked each field only when it got to
// it: a request refused with EINVAL had already changed the host file.
// Every field is now checked first. (From review.)
func TestSetattrRefusedChangesNothing(t *testing.T) {
	e := newEnv(t, 0, nil)
	f, fh, err := e.c.Create(fuse.RootID, "f", unix.O_RDWR, 0o644)
	must(t, "CREATE", err)
	_, err = e.c.Write(f.NodeID, fh, 0, []byte("precious data"))
	must(t, "WRITE", err)

	t.Run("mode applied, size refused", func(t *testing.T) {
		_, err := e.c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrMode | fuse.FattrSize, Mode: 0o600, Size: 1 << 63})
		wantErrno(t, "SETATTR mode+size 2^63", err, syscall.EINVAL)
		st, _ := os.Lstat(e.path("f"))
		if st.Mode().Perm() != 0o644 {
			t.Errorf("request refused with EINVAL, but the host file's mode changed to %o", st.Mode().Perm())
		}
	})
	t.Run("truncated, mtime refused", func(t *testing.T) {
		_, err := e.c.Setattr(f.NodeID, fuse.SetattrIn{Valid: fuse.FattrSize | fuse.FattrMtime, Size: 0, Mtime: 1, Mtimensec: 2_000_000_000})
		wantErrno(t, "SETATTR size+bad mtime", err, syscall.EINVAL)
		st, _ := os.Lstat(e.path("f"))
		if st.Size() != int64(len("precious data")) {
			t.Errorf("request refused with EINVAL, but the host file was truncated to %d bytes", st.Size())
		}
	})
}
