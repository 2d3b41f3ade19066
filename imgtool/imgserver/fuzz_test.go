package imgserver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// FuzzImageOps feeds hostile files to everything the plugin runs on an
// image it is handed: probe, info, check, verify and convert (to qcow2,
// which reads every allocated cluster, compressed ones included). None
// may panic or hang; errors are fine, but a conversion that succeeds
// writes a clean image that reads as the input does.
func FuzzImageOps(f *testing.F) {
	dir := f.TempDir()
	for i, o := range []qcow2.CreateOptions{
		{Size: 1 << 20, ClusterSize: 512},
		{Size: 4 << 20, BackingFile: "b", BackingFormat: "raw"},
		{Size: 2 << 20, ClusterSize: 4096, CompressionType: "zstd"},
	} {
		p := filepath.Join(dir, string(rune('a'+i)))
		fh, err := os.Create(p)
		if err != nil {
			f.Fatal(err)
		}
		if err := qcow2.Create(fh, o); err != nil {
			f.Fatal(err)
		}
		if o.BackingFile == "" {
			im, err := qcow2.Open(fh, qcow2.Options{})
			if err != nil {
				f.Fatal(err)
			}
			im.WriteAt([]byte("seed data"), 700)
			im.Flush()
			im.Close()
		} else {
			fh.Close()
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	// testdata/fuzz/FuzzImageOps holds disk/qcow2's seeds made with
	// qemu-img (compressed zlib and zstd, snapshots, extended L2, refcount
	// widths, lazy refcounts, a backing name), which Create cannot make.
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 4<<20 {
			return
		}
		dir := t.TempDir()
		p := filepath.Join(dir, "in")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		in, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		Probe(in)
		info, err := Info(in, "qcow2")
		Check(in, "qcow2", imagepb.Repair_REPAIR_NONE)
		Verify(in, "qcow2", nil)
		if err != nil || info.VirtualSize > 16<<20 {
			// Convert reads every virtual byte (disk/qcow2 has no block
			// status); a fuzzed size of terabytes is slow, not wrong.
			return
		}
		out, err := os.Create(filepath.Join(dir, "out"))
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		d, err := dupFile(in)
		if err != nil {
			t.Fatal(err)
		}
		job := ConvertJob{Input: Layer{File: d, Format: "qcow2"}, Output: out, OutputFormat: "qcow2"}
		if _, err := job.Run(context.Background(), nil); err != nil {
			return
		}
		// A conversion that succeeds writes a clean image holding what
		// the input reads as.
		if res, err := qcow2.Check(out, qcow2.RepairNone); err != nil || !res.Clean() {
			t.Fatalf("converted image: %v, %+v", err, res)
		}
		src, err := qcow2.Open(in, qcow2.Options{ReadOnly: true})
		if err != nil {
			t.Fatalf("input converted, but does not open: %v", err)
		}
		defer src.Close()
		dst, err := qcow2.Open(out, qcow2.Options{ReadOnly: true})
		if err != nil {
			t.Fatalf("converted image does not open: %v", err)
		}
		defer dst.Close()
		if dst.Size() != src.Size() {
			t.Fatalf("converted image of %d bytes from %d", dst.Size(), src.Size())
		}
		want, got := make([]byte, 1<<20), make([]byte, 1<<20)
		for off := int64(0); off < src.Size(); off += int64(len(want)) {
			n := min(int64(len(want)), src.Size()-off)
			if _, err := src.ReadAt(want[:n], off); err != nil {
				t.Fatalf("input converted, but reads fail at %d: %v", off, err)
			}
			if _, err := dst.ReadAt(got[:n], off); err != nil {
				t.Fatalf("converted image: read at %d: %v", off, err)
			}
			if !bytes.Equal(got[:n], want[:n]) {
				t.Fatalf("converted image differs from the input in [%d, +%d)", off, n)
			}
		}
	})
}
