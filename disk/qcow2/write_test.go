package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// TestPartialWriteToFreshCluster: a write smaller than a cluster that
// allocates a new cluster writes only its own bytes when the rest of the
// cluster reads as zeros anyway (no backing data under it), and the whole
// cluster when the rest must come from the backing file; a write over
// several fresh clusters, which the pool hands out consecutively, is one
// write. Either way the image reads back the write surrounded by what was
// there before, also after it is closed and opened again.
func TestPartialWriteToFreshCluster(t *testing.T) {
	const cs = 64 << 10
	for _, tc := range []struct {
		name      string
		backing   byte // 0: no backing file
		off, n    int64
		wantWrite int // length of the data write that carries the payload
	}{
		{"no backing", 0, 3*cs + 8192, 4096, 4096},
		{"backing under it", 0xAA, 3*cs + 8192, 4096, cs},
		// Consecutive fresh clusters take one write.
		{"1 MiB, fresh clusters", 0, cs, 1 << 20, 1 << 20},
		{"1 MiB from mid-cluster", 0, cs + 4096, 1 << 20, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			co := CreateOptions{Size: 4 << 20}
			var chain []Layer
			if tc.backing != 0 {
				bp := filepath.Join(dir, "base.raw")
				if err := os.WriteFile(bp, bytes.Repeat([]byte{tc.backing}, 4<<20), 0o644); err != nil {
					t.Fatal(err)
				}
				co.BackingFile, co.BackingFormat = bp, disk.Raw
				chain = []Layer{layerOf(t, bp, disk.Raw)}
			}
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := Create(f, co); err != nil {
				t.Fatal(err)
			}
			f.Close()

			im := openImage(t, p, false, chain...)
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			payload := bytes.Repeat([]byte{0x5C}, int(tc.n))
			off := tc.off
			if _, err := im.WriteAt(payload, off); err != nil {
				t.Fatal(err)
			}
			got := -1
			for _, e := range rec.log {
				if bytes.Contains(e.data, payload) {
					got = len(e.data)
				}
			}
			if got != tc.wantWrite {
				t.Errorf("the payload went out in a write of %d bytes, want %d", got, tc.wantWrite)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}

			want := bytes.Repeat([]byte{tc.backing}, 4<<20)
			copy(want[off:], payload)
			if tc.backing != 0 {
				chain = []Layer{layerOf(t, co.BackingFile, disk.Raw)}
			}
			im = openImage(t, p, true, chain...)
			defer im.Close()
			compareImage(t, im, want, 1)
		})
	}
}
