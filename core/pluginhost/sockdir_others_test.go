package pluginhost

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestSweepKeepsOtherKrunDirectories (from review, helper-98; fixed: the
// directories live in krun.UID, and a sweep removes only what holds
// nothing but go-plugin's directories and sockets): sweepSockDirs
// takes any directory of this user's named krun-WORD-DIGITS, unlocked and
// not changed for 30 s, for a killed host's socket directory and removes it
// with all it holds. os.MkdirTemp names of krun-core's own tools match:
// `krun-bench all` keeps its disks and shares in os.MkdirTemp("",
// "krun-bench-") (cmd/krun-bench/benchall.go:183) for minutes while the
// krun-core it measures launches plugins (each launch sweeps $TMPDIR); the
// sandbox tests' krun-attack-N and krun-sandbox-test-N directories live
// while another package's tests launch plugins; and so does a user's own
// /tmp/krun-build-2024. A sweep must recognise what it removes by more
// than its name (go-plugin's contents only: plugin-dirN holding sockets; a
// marker file; a prefix no tool uses), and never remove regular files.
func TestSweepKeepsOtherKrunDirectories(t *testing.T) {
	base := t.TempDir()
	old := time.Now().Add(-time.Minute)
	for _, name := range []string{"krun-bench-3518830", "krun-attack-1234", "krun-sandbox-test-99", "krun-build-2024"} {
		p := filepath.Join(base, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "disk.img"), []byte("data"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	dir, lock, err := newSockDir(base, "blk-raw", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	lock.Close()
	os.RemoveAll(dir)
	// The same names in krun.UID itself, with files in them.
	parent, _ := sockParent(base)
	for _, name := range []string{"blk-raw-3518830", "fs-virtio-12"} {
		p := filepath.Join(parent, name)
		if err := os.MkdirAll(filepath.Join(p, "plugin-dir1"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "plugin-dir1", "disk.img"), []byte("data"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	sweepSockDirs(parent, hclog.NewNullLogger())
	for _, name := range []string{"blk-raw-3518830", "fs-virtio-12"} {
		if _, err := os.Stat(filepath.Join(parent, name, "plugin-dir1", "disk.img")); err != nil {
			t.Errorf("a sweep removed %s, which holds a file go-plugin never makes: %v", name, err)
		}
	}
	for _, name := range []string{"krun-bench-3518830", "krun-attack-1234", "krun-sandbox-test-99", "krun-build-2024"} {
		if _, err := os.Stat(filepath.Join(base, name, "disk.img")); err != nil {
			t.Errorf("a plugin launch removed %s, a directory it did not make, with its files: %v", name, err)
		}
	}
}
