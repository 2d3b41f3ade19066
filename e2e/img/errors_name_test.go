package img_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestErrorsNameTheFile: an img command's error names the file it is
// about, in one line: the plugin that parsed the image only held a
// descriptor, so its own message ("invalid qcow2 image: L1 table has ...
// entries") could not (from review).
func TestErrorsNameTheFile(t *testing.T) {
	krunCore(t)
	dir := t.TempDir()
	bad := filepath.Join(dir, "l1huge.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", bad, "1M")
	f, err := os.OpenFile(bad, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// l1_size, a big-endian u32 at offset 36 of the header.
	if _, err := f.WriteAt([]byte{0xff, 0xff, 0xff, 0xff}, 36); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out := filepath.Join(dir, "out.raw")
	for _, tc := range []struct {
		args  []string
		names string
	}{
		{[]string{"info", "-f", "qcow2", bad}, bad},
		{[]string{"check", "-f", "qcow2", bad}, bad},
		{[]string{"convert", "-f", "qcow2", "-O", "raw", bad, out}, bad},
	} {
		r := img(t, tc.args...)
		if r.code != 1 || !strings.Contains(r.stderr, tc.names+": ") || !strings.Contains(r.stderr, "L1 table") ||
			strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("img %s: exit %d, stderr %q; want 1 and one line naming %s", tc.args[0], r.code, r.stderr, tc.names)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("the failed convert left %s behind (%v)", out, err)
	}
}
