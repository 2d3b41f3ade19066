package imgserver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/proto/imagepb"
)

// TestTruncateErrorSaysItOnce: os.File.Truncate's error already reads
// "truncate PATH: ...", and the wrapping said "truncate: truncate PATH:
// ..." (left open as a wording item). A descriptor that cannot be
// truncated (opened read-only) makes both Create and Resize fail there.
func TestTruncateErrorSaysItOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	for name, call := range map[string]func() error{
		"create": func() error {
			_, err := Create(ro, nil, &imagepb.CreateRequest{Format: "raw", Size: 8192})
			return err
		},
		"create qcow2": func() error {
			_, err := Create(ro, nil, &imagepb.CreateRequest{Format: "qcow2", Size: 8192})
			return err
		},
		"resize": func() error {
			_, err := Resize(ro, nil, &imagepb.ResizeRequest{Format: "raw", Size: 8192})
			return err
		},
	} {
		err := call()
		if err == nil {
			t.Fatalf("%s on a read-only descriptor succeeded", name)
		}
		t.Logf("%s: %v", name, err)
		if n := strings.Count(err.Error(), "truncate"); n != 1 {
			t.Errorf("%s: %q says truncate %d times", name, err, n)
		}
	}
}
