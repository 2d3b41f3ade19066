package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCloneShareKeepsDotDotInside: from the detached copy CloneShare
// makes, ".." stays at the share's root, so the calls Landlock does not
// confine (stat, chmod, utimes) cannot reach a host file beside the share.
// From the plain directory fd a compromised fs plugin changed the mode of
// such a file (from review, helper-83). A read-only copy refuses writes in
// the kernel.
func TestCloneShareKeepsDotDotInside(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: open_tree(OPEN_TREE_CLONE) takes CAP_SYS_ADMIN")
	}
	base := t.TempDir()
	share := filepath.Join(base, "share")
	victim := filepath.Join(base, "victim")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(victim, []byte("host"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		d, err := os.Open(share)
		if err != nil {
			t.Fatal(err)
		}
		c, err := CloneShare(d, ro)
		d.Close()
		if err != nil {
			t.Fatal(err)
		}
		fd := int(c.Fd())
		var up, root unix.Stat_t
		if err := unix.Fstatat(fd, "..", &up, 0); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fstat(fd, &root); err != nil {
			t.Fatal(err)
		}
		if up.Ino != root.Ino || up.Dev != root.Dev {
			t.Errorf("read-only %v: \"..\" of the copy's root leaves it", ro)
		}
		if err := unix.Fchmodat(fd, "../victim", 0o777, 0); err == nil {
			t.Errorf("read-only %v: chmod of ../victim through the copy succeeded", ro)
		}
		err = unix.Mkdirat(fd, fmt.Sprintf("made-%v", ro), 0o755)
		if ro && err != unix.EROFS {
			t.Errorf("mkdir in a read-only copy: %v, want EROFS", err)
		}
		if !ro && err != nil {
			t.Errorf("mkdir in a writable copy: %v", err)
		}
		c.Close()
	}
	if st, err := os.Stat(victim); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the host file beside the share: %v, %v", st.Mode(), err)
	}
}
