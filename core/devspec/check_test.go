package devspec

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/devopts"
)

// TestCheck: Check names each file a device spec names that Open would
// refuse, without opening anything for writing or locking it.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	for _, c := range []struct {
		name string
		spec Checker
		want string // "" for no error
	}{
		{"disk present", &DiskSpec{Path: img, Format: devopts.Raw}, ""},
		{"disk missing", &DiskSpec{Path: missing, Format: devopts.Raw}, "disk image: open " + missing},
		{"disk is a directory", &DiskSpec{Path: dir, Format: devopts.Raw}, "is not a regular file or block device"},
		{"backing file missing", &DiskSpec{Path: img, Format: devopts.QCOW2, Backing: []Backing{{Path: missing, Format: devopts.Raw}}}, "backing file: open " + missing},
		{"data file missing", &DiskSpec{Path: img, Format: devopts.QCOW2, DataFile: missing}, "data file: open " + missing},
		{"share present", &FSSpec{Path: dir, Tag: "a"}, ""},
		{"share missing", &FSSpec{Path: missing, Tag: "a"}, "shared directory: open " + missing},
		{"share is a file", &FSSpec{Path: img, Tag: "a"}, "is not a directory"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.spec.Check()
			switch {
			case c.want == "" && err != nil:
				t.Fatalf("Check: %v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Fatalf("Check = %v, want an error containing %q", err, c.want)
			}
		})
	}
}
