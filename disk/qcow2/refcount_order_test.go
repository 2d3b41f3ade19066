package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestRefTableChunksOrdered kills the plugin (in the model: keeps a prefix
// of its writes) right after each write to the refcount table during
// allocating writes whose pool refills need several new refcount blocks at
// once: a refill that covers a whole not-yet-existing block's range places
// that block outside its range, counted by another new block. Whatever
// prefix survives, no table entry may name a block whose own refcount is
// in a block the table does not name yet (a corruption; leaks are fine).
// Found in review with small clusters and wide refcounts, where a grown
// pool (up to 4096 clusters) covers whole blocks.
func TestRefTableChunksOrdered(t *testing.T) {
	needQemu(t)
	for _, tc := range []struct {
		opts     string
		prealloc string // preallocated metadata before the writes, then resized to 1G
		mib      int    // 1 MiB writes from the end of the preallocated part
	}{
		{"cluster_size=512,refcount_bits=64", "", 8},
		{"cluster_size=1024,refcount_bits=16", "", 40},
		{"cluster_size=4096,refcount_bits=16", "480M", 48},
	} {
		t.Run(fmt.Sprintf("%s,prealloc=%s", tc.opts, tc.prealloc), func(t *testing.T) {
			if testing.Short() && tc.prealloc != "" {
				t.Skip("-short runs the images without preallocation")
			}
			p := filepath.Join(t.TempDir(), "img.qcow2")
			var start int64
			if tc.prealloc == "" {
				sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, "1G")
			} else {
				sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts+",preallocation=metadata", p, tc.prealloc)
				sh(t, "qemu-img", "resize", "-q", p, "1G")
				var err error
				if start, err = parseSize(tc.prealloc); err != nil {
					t.Fatal(err)
				}
			}
			base, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			im := openImage(t, p, false)
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			data := bytes.Repeat([]byte{0x5A}, 1<<20)
			for i := range tc.mib {
				if _, err := im.WriteAt(data, start+int64(i)<<20); err != nil {
					t.Fatal(err)
				}
			}
			log := rec.log
			rtLo, rtHi := int64(im.rtOff), int64(im.rtOff)+int64(len(im.rt))*8
			im.f, im.data = rec.ioFile, rec.ioFile
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			cp := filepath.Join(t.TempDir(), "crash.qcow2")
			checked := 0
			for end := 1; end <= len(log); end++ {
				e := log[end-1]
				if e.data == nil || e.off >= rtHi || e.off+int64(len(e.data)) <= rtLo {
					continue
				}
				checked++
				checkCrashImage(t, cp, killState(base, log, end, 0), fmt.Sprintf("killed after log entry %d of %d (a refcount table write at %#x)", end, len(log), e.off), false)
			}
			if checked == 0 {
				t.Fatal("no write to the refcount table recorded: the workload does not exercise the table")
			}
			t.Logf("%d refcount table writes, each a kill point, checked", checked)
		})
	}
}

// parseSize reads qemu-img's "480M" style sizes (K, M, G).
func parseSize(s string) (int64, error) {
	var n int64
	var unit string
	if _, err := fmt.Sscanf(s, "%d%s", &n, &unit); err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	switch unit {
	case "K":
		return n << 10, nil
	case "M":
		return n << 20, nil
	case "G":
		return n << 30, nil
	}
	return 0, fmt.Errorf("size %q: unknown unit", s)
}
