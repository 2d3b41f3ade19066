package imgserver

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

func TestResizeQcow2(t *testing.T) {
	const start = 1 << 20
	head := bytes.Repeat([]byte{0xa5}, 64<<10)
	tail := bytes.Repeat([]byte{0x3c}, 4096)
	cases := []struct {
		name    string
		cluster int64
		req     *imagepb.ResizeRequest
		want    int64  // the virtual size after; start when refused
		err     string // substring of the refusal
	}{
		{"grow", 0, &imagepb.ResizeRequest{Size: 64 << 30}, 64 << 30, ""},
		{"grow-relative", 0, &imagepb.ResizeRequest{Size: 10 << 20, Relative: true}, start + 10<<20, ""},
		{"same", 0, &imagepb.ResizeRequest{Size: start}, start, ""},
		// 512-byte clusters: 1 GiB needs a larger L1 table, written
		// elsewhere, and the refcounts rebuilt.
		{"grow-new-l1", 512, &imagepb.ResizeRequest{Size: 1 << 30}, 1 << 30, ""},
		{"shrink", 0, &imagepb.ResizeRequest{Size: 512 << 10}, start, "shrinking a qcow2 image is not supported"},
		{"shrink-with-shrink", 0, &imagepb.ResizeRequest{Size: -4096, Relative: true, Shrink: true}, start, "shrinking a qcow2 image is not supported"},
		{"unaligned", 0, &imagepb.ResizeRequest{Size: 1000, Relative: true}, start, "not a multiple of 512"},
		{"to-zero", 0, &imagepb.ResizeRequest{Size: -start, Relative: true, Shrink: true}, start, "must be positive"},
		{"too-large", 0, &imagepb.ResizeRequest{Size: 1 << 62}, start, "L1 table"},
	}
	dir := t.TempDir()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			newQcow2(t, p, qcow2.CreateOptions{Size: start, ClusterSize: c.cluster}, map[int64][]byte{0: head, start - 4096: tail})
			before, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			c.req.Format = "qcow2"
			r, err := Resize(open(t, p, os.O_RDWR), nil, c.req)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || strings.Contains(err.Error(), "\n") {
					t.Errorf("error %v, want one line with %q", err, c.err)
				}
				if after, _ := os.ReadFile(p); !bytes.Equal(after, before) {
					t.Error("a refused resize changed the file")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.GetOldSize() != start || r.GetVirtualSize() != c.want {
				t.Errorf("response %+v, want old %d, new %d", r, start, c.want)
			}
			in, err := Info(open(t, p, os.O_RDONLY), "qcow2")
			if err != nil || in.GetVirtualSize() != c.want || in.GetDirty() {
				t.Fatalf("info after: %+v, %v", in, err)
			}
			ck, err := Check(open(t, p, os.O_RDONLY), "qcow2", imagepb.Repair_REPAIR_NONE)
			if err != nil || ck.GetCorruptions()+ck.GetLeaks()+ck.GetCheckErrors() != 0 {
				t.Errorf("check after: %+v, %v", ck, err)
			}
			im, err := qcow2.Open(open(t, p, os.O_RDONLY), qcow2.Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			type at struct {
				off  int64
				want []byte
			}
			checks := []at{{0, head}, {start - 4096, tail}}
			if c.want > start { // the new area reads as zeros
				checks = append(checks, at{start, make([]byte, min(c.want-start, 1<<20))}, at{c.want - 4096, make([]byte, 4096)})
			}
			for _, w := range checks {
				got := make([]byte, len(w.want))
				if _, err := im.ReadAt(got, w.off); err != nil || !bytes.Equal(got, w.want) {
					t.Errorf("at %d after the resize: %v (or other bytes)", w.off, err)
				}
			}
		})
	}
	// Not a qcow2 image: refused before anything is written.
	p := filepath.Join(dir, "not.qcow2")
	os.WriteFile(p, make([]byte, 4096), 0o644)
	if _, err := Resize(open(t, p, os.O_RDWR), nil, &imagepb.ResizeRequest{Format: "qcow2", Size: 8192}); err == nil || !strings.Contains(err.Error(), "not a valid qcow2 image") {
		t.Errorf("a raw file as qcow2: %v", err)
	}
}
