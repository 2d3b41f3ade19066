package imgtool

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/proto/imagepb"
)

// TestFullBackingFilenameAsQemu (from review, helper-92): docs/IMAGES.md promises that
// full-backing-filename is "what qemu-img prints". qemu-img 7.2
// (bdrv_get_full_backing_filename_from_filename, path_combine) prints a
// name with a protocol prefix (a colon before the first slash) verbatim,
// and otherwise pastes the name after the image path's prefix up to its
// last '/', without cleaning it. The want column was printed by qemu-img
// 7.2.22; when qemu-img is on PATH the test asks it as well.
func TestFullBackingFilenameAsQemu(t *testing.T) {
	cases := []struct{ image, backing, want string }{
		{"sub/o.qcow2", "../b.raw", "sub/../b.raw"}, // matches today
		{"sub/o.qcow2", "nbd:localhost:10809", "nbd:localhost:10809"},
		{"sub/o.qcow2", `json:{"driver":"raw"}`, `json:{"driver":"raw"}`},
		{"sub/o.qcow2", "file:foo.raw", "file:foo.raw"},
		{"./o.qcow2", "b.raw", "./b.raw"},
		{"sub/../sub/o.qcow2", "b.raw", "sub/../sub/b.raw"},
		{"sub//o.qcow2", "b.raw", "sub//b.raw"},
	}
	haveQemu := false
	if _, err := exec.LookPath("qemu-img"); err == nil {
		haveQemu = true
	}
	for _, c := range cases {
		got := newInfo(c.image, &imagepb.InfoResponse{Format: "qcow2", Version: 3, BackingFile: c.backing, BackingFormat: "raw"}).FullBackingFilename
		want := c.want
		if haveQemu {
			if q, ok := qemuFullBacking(t, c.image, c.backing); ok {
				want = q
			}
		}
		if got != want {
			t.Errorf("image %q backing %q: full-backing-filename %q, qemu-img prints %q", c.image, c.backing, got, want)
		}
	}
}

// qemuFullBacking creates the image under a temp dir (cwd) and asks qemu-img.
func qemuFullBacking(t *testing.T, image, backing string) (string, bool) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	c := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", image, "1M")
	c.Dir = dir
	if b, err := c.CombinedOutput(); err != nil {
		t.Logf("qemu-img create %s: %v %s", image, err, b)
		return "", false
	}
	c = exec.Command("qemu-img", "info", "--output", "json", image)
	c.Dir = dir
	b, err := c.Output()
	if err != nil {
		return "", false
	}
	var m map[string]any
	if json.Unmarshal(b, &m) != nil {
		return "", false
	}
	s, _ := m["full-backing-filename"].(string)
	return s, true
}
