package pluginhost

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestSweepSockDirs: a launch removes the private socket directories a
// killed host left (this user's, old, unlocked) and nothing else. From
// review, helper-94: a host killed while its plugin started left its
// directory in $TMPDIR for good.
func TestSweepSockDirs(t *testing.T) {
	base := t.TempDir()
	old := time.Now().Add(-time.Hour)
	type entry struct {
		name   string
		dir    bool
		old    bool
		locked bool
		swept  bool
	}
	entries := []entry{
		{name: "krun-blk-raw-123", dir: true, old: true, swept: true},
		{name: "krun-fs-virtio-9", dir: true, old: true, swept: true},
		{name: "krun-blk-raw-124", dir: true, old: true, locked: true}, // a live host's
		{name: "krun-blk-raw-125", dir: true},                          // just made, not locked yet
		{name: "krun-blk-raw-12a", dir: true, old: true},               // not os.MkdirTemp's
		{name: "krun-blk-raw-", dir: true, old: true},
		{name: "krun-notes", dir: true, old: true},
		{name: "krun--7", dir: true, old: true}, // no kind
		{name: "other-blk-raw-1", dir: true, old: true},
		{name: "krun-blk-raw-126", old: true}, // a file
	}
	for _, e := range entries {
		p := filepath.Join(base, e.name)
		if e.dir {
			if err := os.MkdirAll(filepath.Join(p, "plugin-dir1"), 0o700); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if e.locked {
			f, err := lockSockDir(p)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
		}
		if e.old {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	sweepSockDirs(base, hclog.NewNullLogger())
	for _, e := range entries {
		_, err := os.Lstat(filepath.Join(base, e.name))
		if gone := os.IsNotExist(err); gone != e.swept {
			t.Errorf("%s: removed %v, want %v", e.name, gone, e.swept)
		}
	}
}
