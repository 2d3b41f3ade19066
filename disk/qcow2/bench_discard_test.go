package qcow2

import (
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkDiscard measures DISCARD and WRITE_ZEROES requests: "long"
// discards all of a 64 MiB allocated range in one request (the image is
// written again, untimed, between requests); "cluster" writes one cluster
// and discards it, the per-request cost of a short discard.
func BenchmarkDiscard(b *testing.B) {
	const span = 64 << 20
	for _, cs := range []int64{65536, 4096} {
		open := func(b *testing.B) *Image {
			p := filepath.Join(b.TempDir(), "d.qcow2")
			f, err := os.Create(p)
			if err != nil {
				b.Fatal(err)
			}
			if err := Create(f, CreateOptions{Size: span, ClusterSize: cs}); err != nil {
				b.Fatal(err)
			}
			im, err := Open(f, Options{})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { im.Close() })
			return im
		}
		fill := func(b *testing.B, im *Image) {
			buf := make([]byte, 1<<20)
			for i := range buf {
				buf[i] = byte(i) | 1
			}
			for off := int64(0); off < span; off += int64(len(buf)) {
				if _, err := im.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		}
		for _, op := range []struct {
			name string
			do   func(im *Image) error
		}{
			{"long-discard-", func(im *Image) error { return im.Discard(0, span) }},
			{"long-zeroes-", func(im *Image) error { return im.WriteZeroes(0, span, false) }},
		} {
			b.Run(op.name+clusterName(cs), func(b *testing.B) {
				im := open(b)
				b.SetBytes(span)
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					fill(b, im)
					b.StartTimer()
					if err := op.do(im); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		b.Run("cluster-"+clusterName(cs), func(b *testing.B) {
			im := open(b)
			buf := make([]byte, cs)
			for i := range buf {
				buf[i] = 0x5a
			}
			for i := 0; i < b.N; i++ {
				off := int64(i) * cs % span
				if _, err := im.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				if err := im.Discard(off, cs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
