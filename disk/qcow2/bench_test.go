package qcow2

import (
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

const benchSize = 256 << 20

// allocatedImage creates a fully allocated image (64 KiB clusters) and a
// raw file with the same content.
func allocatedImage(b *testing.B) (qcowPath, rawPath string) {
	b.Helper()
	dir := b.TempDir()
	qcowPath = filepath.Join(dir, "full.qcow2")
	rawPath = filepath.Join(dir, "full.raw")
	f, err := os.Create(qcowPath)
	if err != nil {
		b.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: benchSize}); err != nil {
		b.Fatal(err)
	}
	im, err := Open(f, Options{})
	if err != nil {
		b.Fatal(err)
	}
	raw, err := os.Create(rawPath)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	r := rand.New(rand.NewSource(1))
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
		r.Read(buf)
		if _, err := im.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
		if _, err := raw.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := im.Flush(); err != nil {
		b.Fatal(err)
	}
	im.Close()
	raw.Close()
	return qcowPath, rawPath
}

// BenchmarkRandomRead4K compares 4 KiB random reads of a fully allocated
// qcow2 image with pread of the same data from a raw file (both from the
// page cache).
func BenchmarkRandomRead4K(b *testing.B) {
	qp, rp := allocatedImage(b)
	offsets := make([]int64, 1<<16)
	r := rand.New(rand.NewSource(2))
	for i := range offsets {
		offsets[i] = r.Int63n(benchSize/4096) * 4096
	}
	b.Run("qcow2", func(b *testing.B) {
		im := openImage(b, qp, true)
		defer im.Close()
		buf := make([]byte, 4096)
		b.SetBytes(4096)
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			if _, err := im.ReadAt(buf, offsets[i&(len(offsets)-1)]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("qcow2-parallel", func(b *testing.B) {
		im := openImage(b, qp, true)
		defer im.Close()
		b.SetBytes(4096)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			buf := make([]byte, 4096)
			i := rand.Int()
			for pb.Next() {
				i++
				if _, err := im.ReadAt(buf, offsets[i&(len(offsets)-1)]); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	// pread of the same bytes at their host offsets in the qcow2 file: the
	// cost of the system call alone.
	b.Run("qcow2-file-pread", func(b *testing.B) {
		im := openImage(b, qp, true)
		host := make([]int64, len(offsets))
		for i, off := range offsets {
			ci, err := im.lookup(uint64(off) >> im.cb)
			if err != nil || ci.typ != ctNormal {
				b.Fatalf("lookup %d: %v %v", off, err, ci.typ)
			}
			host[i] = int64(ci.host) + off&int64(im.cs-1)
		}
		im.Close()
		f := openFile(b, qp, true)
		defer f.Close()
		buf := make([]byte, 4096)
		b.SetBytes(4096)
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			if _, err := f.ReadAt(buf, host[i&(len(host)-1)]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("raw-pread", func(b *testing.B) {
		f := openFile(b, rp, true)
		defer f.Close()
		buf := make([]byte, 4096)
		b.SetBytes(4096)
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			if _, err := f.ReadAt(buf, offsets[i&(len(offsets)-1)]); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSeqAllocWrite64K writes 64 KiB requests sequentially into a new
// image, each allocating a cluster, flushing every 16 MiB.
func BenchmarkSeqAllocWrite64K(b *testing.B) {
	for _, cs := range []int64{65536, 4096} {
		b.Run(clusterName(cs), func(b *testing.B) {
			dir := b.TempDir()
			buf := make([]byte, 64<<10)
			rand.New(rand.NewSource(3)).Read(buf)
			var im *Image
			var off int64
			fresh := func() {
				if im != nil {
					im.Close()
				}
				p := filepath.Join(dir, "seq.qcow2")
				f, err := os.Create(p)
				if err != nil {
					b.Fatal(err)
				}
				if err := Create(f, CreateOptions{Size: benchSize, ClusterSize: cs}); err != nil {
					b.Fatal(err)
				}
				if im, err = Open(f, Options{}); err != nil {
					b.Fatal(err)
				}
				off = 0
			}
			fresh()
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for b.Loop() {
				if off+int64(len(buf)) > benchSize {
					b.StopTimer()
					fresh()
					b.StartTimer()
				}
				if _, err := im.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(buf))
				if off%(16<<20) == 0 {
					if err := im.Flush(); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.StopTimer()
			im.Close()
		})
	}
}

func clusterName(cs int64) string {
	if cs >= 1024 {
		return "cluster" + itoa(cs/1024) + "k"
	}
	return "cluster" + itoa(cs)
}

func itoa(v int64) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

// memIO is an ioFile backed by memory, to measure the read path's own cost
// without system calls.
type memIO struct{ b []byte }

func (m memIO) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (m memIO) WriteAt(p []byte, off int64) (int, error) { return 0, errors.New("read-only") }
func (m memIO) Sync() error                              { return nil }
func (m memIO) WriteDurable(p []byte, off int64) error   { return errors.New("read-only") }

// BenchmarkReadPathOverhead reads 4 KiB at random offsets of a fully
// allocated image held in memory: the difference between "qcow2" and
// "memcpy" is the qcow2 read path's cost per request.
func BenchmarkReadPathOverhead(b *testing.B) {
	qp, _ := allocatedImage(b)
	content, err := os.ReadFile(qp)
	if err != nil {
		b.Fatal(err)
	}
	offsets := make([]int64, 1<<16)
	r := rand.New(rand.NewSource(2))
	for i := range offsets {
		offsets[i] = r.Int63n(benchSize/4096) * 4096
	}
	im := openImage(b, qp, true)
	defer im.Close()
	im.f, im.data = memIO{content}, memIO{content}
	buf := make([]byte, 4096)
	b.Run("qcow2", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if _, err := im.ReadAt(buf, offsets[i&(len(offsets)-1)]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("memcpy", func(b *testing.B) {
		m := memIO{content}
		for i := 0; b.Loop(); i++ {
			m.ReadAt(buf, offsets[i&(len(offsets)-1)]+5<<16)
		}
	})
}
