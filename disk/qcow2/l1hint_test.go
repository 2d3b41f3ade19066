package qcow2

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestL1LimitHint: a size whose L1 table is over the limit suggests larger
// clusters only where larger ones exist; with 2 MiB clusters, the largest,
// it said "use larger clusters" too (from review, helper-114).
func TestL1LimitHint(t *testing.T) {
	const huge = 8000 << 50 // 8000 PiB
	for _, tc := range []struct {
		cluster int64
		want    string
		not     string
	}{
		{64 << 10, "use larger clusters", "largest"},
		{2 << 20, "even with the largest clusters", "use larger"},
	} {
		f, err := os.Create(filepath.Join(t.TempDir(), "img"))
		if err != nil {
			t.Fatal(err)
		}
		err = Create(f, CreateOptions{Size: huge, ClusterSize: tc.cluster})
		f.Close()
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), tc.not) {
			t.Errorf("create of %d bytes with %d-byte clusters: %v, want %q", int64(huge), tc.cluster, err, tc.want)
		}
	}
}
