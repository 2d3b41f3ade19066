package qcow2out

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk/qcow2"
)

// content builds a guest image of size bytes mixing zero, random,
// repetitive and sparse clusters, deterministic per seed.
func content(size int64, cs int64, seed int64) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewSource(seed))
	for off := int64(0); off < size; off += cs {
		end := min(off+cs, size)
		switch r.Intn(5) {
		case 0: // zero
		case 1:
			r.Read(b[off:end])
		case 2:
			for i := off; i < end; i++ {
				b[i] = "krun-core img "[i%14]
			}
		case 3:
			for i := off; i < end; i += 331 {
				b[i] = byte(i>>3) | 1
			}
		default: // one byte at the end of the cluster only
			b[end-1] = 0xee
		}
	}
	return b
}

// write stores b as an image with the given options in path.
func write(t *testing.T, path string, b []byte, o Options) *Writer {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := New(f, o)
	if err != nil {
		t.Fatal(err)
	}
	cs := w.ClusterSize()
	for off := int64(0); off < int64(len(b)); off += cs {
		if err := w.WriteCluster(uint64(off/cs), b[off:min(off+cs, int64(len(b)))]); err != nil {
			t.Fatalf("WriteCluster %d: %v", off/cs, err)
		}
	}
	if err := w.Finish(int64(len(b))); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	return w
}

// readBack reads the image's virtual content with disk/qcow2.
func readBack(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	res, err := qcow2.Check(f, qcow2.RepairNone)
	if err != nil {
		t.Fatalf("qcow2.Check: %v", err)
	}
	if !res.Clean() {
		t.Fatalf("qcow2.Check: %d corruptions, %d leaks, %d errors: %q", res.Corruptions, res.Leaks, res.CheckErrors, res.Messages)
	}
	im, err := qcow2.Open(f, qcow2.Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("qcow2.Open: %v", err)
	}
	defer im.Close()
	got := make([]byte, im.Size())
	if _, err := im.ReadAt(got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	return got
}

func qemuImg(t *testing.T) string {
	p, err := exec.LookPath("qemu-img")
	if err != nil {
		return ""
	}
	return p
}

func TestWriterRoundTrip(t *testing.T) {
	qi := qemuImg(t)
	cases := []struct {
		cs    int64
		size  int64
		o     Options
		short bool
	}{
		{cs: 512, size: 3<<20 + 512, o: Options{}},
		{cs: 512, size: 1 << 20, o: Options{Compress: true}},
		{cs: 4096, size: 5<<20 + 1000, o: Options{Compress: true, CompressionType: Zstd}},
		{cs: 65536, size: 8 << 20, o: Options{}},
		{cs: 65536, size: 8<<20 - 100, o: Options{Compress: true}},
		{cs: 65536, size: 6 << 20, o: Options{Compress: true, CompressionType: Zstd}},
		{cs: 65536, size: 4 << 20, o: Options{CompressionType: Zstd}},
		{cs: 2 << 20, size: 9 << 20, o: Options{Compress: true}},
		{cs: 2 << 20, size: 7<<20 + 4096, o: Options{}},
		{cs: 65536, size: 0, o: Options{}},
		{cs: 65536, size: 513, o: Options{Compress: true}},
	}
	for i, c := range cases {
		name := fmt.Sprintf("cs%d-size%d-compress%v-%s", c.cs, c.size, c.o.Compress, c.o.CompressionType)
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			b := content(c.size, c.cs, int64(i))
			c.o.ClusterSize = c.cs
			p := filepath.Join(dir, "out.qcow2")
			w := write(t, p, b, c.o)
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st.Size() != w.Size() {
				t.Errorf("file size %d, writer says %d", st.Size(), w.Size())
			}
			if c.o.Compress && w.Written() > 1<<20 {
				plain := c.o
				plain.Compress = false
				wp := write(t, filepath.Join(dir, "plain.qcow2"), b, plain)
				if w.Size() >= wp.Size() {
					t.Errorf("compressed image is %d bytes, uncompressed %d", w.Size(), wp.Size())
				}
			}
			got := readBack(t, p)
			want := append(b, make([]byte, int64(len(got))-c.size)...)
			if int64(len(got)) != (c.size+511)&^511 {
				t.Fatalf("virtual size %d, want %d", len(got), (c.size+511)&^511)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("content differs at byte %d", firstDiff(got, want))
			}
			if qi == "" {
				return
			}
			raw := filepath.Join(dir, "in.raw")
			if err := os.WriteFile(raw, b, 0o644); err != nil {
				t.Fatal(err)
			}
			for _, args := range [][]string{
				{"check", "-f", "qcow2", p},
				{"compare", "-f", "raw", "-F", "qcow2", raw, p},
			} {
				if out, err := exec.Command(qi, args...).CombinedOutput(); err != nil {
					t.Errorf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
				}
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestWriterManyRefblocks makes the writer flush refcount blocks and L2
// tables while streaming (512-byte clusters: 256 counts per block, 64
// entries per L2 table), with compressed clusters packed across cluster
// boundaries.
func TestWriterManyRefblocks(t *testing.T) {
	for _, compress := range []bool{false, true} {
		t.Run(fmt.Sprint("compress=", compress), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "out.qcow2")
			b := content(2<<20, 512, 99)
			w := write(t, p, b, Options{ClusterSize: 512, Compress: compress})
			if w.rcBase == 0 {
				t.Errorf("no refcount block was flushed while streaming")
			}
			if got := readBack(t, p); !bytes.Equal(got, b) {
				t.Fatalf("content differs at byte %d", firstDiff(got, b))
			}
			if qi := qemuImg(t); qi != "" {
				if out, err := exec.Command(qi, "check", "-f", "qcow2", p).CombinedOutput(); err != nil {
					t.Errorf("qemu-img check: %v\n%s", err, out)
				}
			}
		})
	}
}

// TestWriterSparseFarCluster writes one cluster far into a large virtual
// size: the L1 table is sized by Finish, not by the data.
func TestWriterSparseFarCluster(t *testing.T) {
	p := filepath.Join(t.TempDir(), "out.qcow2")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := New(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	size := int64(64 << 30)
	idx := uint64(size/65536 - 1)
	if err := w.WriteCluster(idx, []byte("last cluster")); err != nil {
		t.Fatal(err)
	}
	if err := w.Finish(size); err != nil {
		t.Fatal(err)
	}
	if w.Size() > 1<<20 {
		t.Errorf("sparse image is %d bytes", w.Size())
	}
	im, err := qcow2.Open(f, qcow2.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 12)
	if _, err := im.ReadAt(buf, size-65536); err != nil || string(buf) != "last cluster" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

func TestWriterErrors(t *testing.T) {
	var sink discard
	if _, err := New(sink, Options{ClusterSize: 1000}); err == nil {
		t.Error("cluster size 1000 accepted")
	}
	if _, err := New(sink, Options{ClusterSize: 4 << 20}); err == nil {
		t.Error("cluster size 4M accepted")
	}
	if _, err := New(sink, Options{CompressionType: "lz4"}); err == nil {
		t.Error("compression type lz4 accepted")
	}
	w, err := New(sink, Options{ClusterSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteCluster(5, []byte{1}); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteCluster(5, []byte{1}); !errors.Is(err, ErrOrder) {
		t.Errorf("cluster written twice: %v", err)
	}
	if err := w.WriteCluster(6, make([]byte, 513)); err == nil {
		t.Error("oversized cluster accepted")
	}
	if err := w.Finish(5 * 512); err == nil {
		t.Error("Finish with a size below a written cluster succeeded")
	}
	if err := w.Finish(1 << 20); err == nil {
		t.Error("second Finish succeeded")
	}
	if got := MaxVirtualSize(512); got != 128<<30 {
		t.Errorf("MaxVirtualSize(512) = %d", got)
	}
	w2, _ := New(sink, Options{ClusterSize: 512})
	if err := w2.Finish(128<<30 + 512); err == nil {
		t.Error("virtual size beyond the L1 limit accepted")
	}
}

type discard struct{}

func (discard) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func BenchmarkWriter(b *testing.B) {
	for _, compress := range []bool{false, true} {
		b.Run(fmt.Sprint("compress=", compress), func(b *testing.B) {
			data := content(64<<20, 65536, 1)
			b.SetBytes(int64(len(data)))
			for range b.N {
				w, err := New(discard{}, Options{Compress: compress})
				if err != nil {
					b.Fatal(err)
				}
				for off := 0; off < len(data); off += 65536 {
					if err := w.WriteCluster(uint64(off/65536), data[off:off+65536]); err != nil {
						b.Fatal(err)
					}
				}
				if err := w.Finish(int64(len(data))); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
