package qcow2

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestBackingDataFileHint (from review, helper-125): a backing file that
// keeps its data in an external data file cannot have that file declared
// (only the top image's data file can be), but its open failed with "which
// was not declared (add data-file=...)", which img reworded to "declare it
// with --data-file FILE"; doing so declared it for the top image and failed
// differently. The error now says that such a chain is not supported,
// while the top image's own undeclared data file keeps its hint.
func TestBackingDataFileHint(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	data := filepath.Join(dir, "base.data")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, base, "1M")
	top := filepath.Join(dir, "top.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M")
	for _, c := range []struct {
		name   string
		path   string
		opts   func() Options
		want   error
		has    string
		hasNot string
	}{
		{"top's own data file", base, func() Options { return Options{Path: base, ReadOnly: true} },
			ErrBacking, "which was not declared (add data-file=...)", ""},
		{"backing file's data file", top, func() Options {
			return Options{Path: top, ReadOnly: true, Backing: []Layer{layerOf(t, base, disk.QCOW2)}}
		}, ErrUnsupported, "backing file " + base + " keeps its data in an external data file", "add data-file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			im, err := Open(openFile(t, c.path, true), c.opts())
			if err == nil {
				im.Close()
				t.Fatal("Open accepted an undeclared data file")
			}
			msg := err.Error()
			if !errors.Is(err, c.want) || !strings.Contains(msg, c.has) || (c.hasNot != "" && strings.Contains(msg, c.hasNot)) {
				t.Errorf("Open: %v\nwant %v, containing %q, not %q", err, c.want, c.has, c.hasNot)
			}
		})
	}
}
