package pluginhost

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
)

// TestSweepSockDirs: a launch removes the private socket directories a
// killed host left in krun.UID (this user's, old, unlocked, holding only
// go-plugin's directories and sockets) and nothing else. From review,
// helper-94: a host killed while its plugin started left its directory in
// $TMPDIR for good.
func TestSweepSockDirs(t *testing.T) {
	base, ok := sockParent(t.TempDir())
	if !ok {
		t.Fatal("no krun.UID directory made")
	}
	old := time.Now().Add(-time.Hour)
	type entry struct {
		name   string
		dir    bool
		old    bool
		locked bool
		file   bool
		swept  bool
	}
	entries := []entry{
		{name: "blk-raw-123", dir: true, old: true, swept: true},
		{name: "fs-virtio-9", dir: true, old: true, swept: true},
		{name: "blk-raw-124", dir: true, old: true, locked: true}, // a live host's
		{name: "blk-raw-125", dir: true},                          // just made, not locked yet
		{name: "blk-raw-12a", dir: true, old: true},               // not os.MkdirTemp's
		{name: "blk-raw-", dir: true, old: true},
		{name: "notes", dir: true, old: true},
		{name: "-7", dir: true, old: true}, // no kind
		{name: "other_blk-raw-1", dir: true, old: true},
		{name: "blk-raw-126", old: true},                        // a file
		{name: "blk-raw-127", dir: true, old: true, file: true}, // holds a file: not go-plugin's
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
		if e.file {
			if err := os.WriteFile(filepath.Join(p, "plugin-dir1", "disk.img"), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
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

// leftSockDirs lists what launches left in base: anything but krun.UID,
// and what krun.UID holds (it stays, empty).
func leftSockDirs(base string) []string {
	var left []string
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		if e.Name() != fmt.Sprintf("krun.%d", os.Geteuid()) {
			left = append(left, e.Name())
			continue
		}
		inner, _ := os.ReadDir(filepath.Join(base, e.Name()))
		for _, i := range inner {
			left = append(left, filepath.Join(e.Name(), i.Name()))
		}
	}
	return left
}
