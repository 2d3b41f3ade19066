package qcow2out

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk/qcow2"
)

// FuzzWriter drives the writer with fuzzed cluster sequences (sizes,
// gaps, compressible, incompressible and all-zero content, a short last
// cluster, compression on or off) and requires disk/qcow2 to find a clean
// image with exactly that content.
func FuzzWriter(f *testing.F) {
	f.Add(uint8(0), true, []byte{1, 0x11, 0, 0x22, 3, 0x00, 200, 0x33})
	f.Add(uint8(3), false, []byte{0, 1, 0, 2, 0, 3, 0, 4})
	f.Add(uint8(1), true, bytes.Repeat([]byte{0, 0xab}, 300))
	f.Add(uint8(0x82), true, []byte{0, 0x70, 2, 0xff, 0, 0x05, 0x80})
	f.Fuzz(func(t *testing.T, csel uint8, compress bool, prog []byte) {
		cs := int64(512) << (csel % 4) // 512 .. 4096: many tables and blocks
		if len(prog) > 2000 {
			return
		}
		p := filepath.Join(t.TempDir(), "out.qcow2")
		fh, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer fh.Close()
		ctype := Zlib
		if csel&0x80 != 0 {
			ctype = Zstd
		}
		w, err := New(fh, Options{ClusterSize: cs, Compress: compress, CompressionType: ctype})
		if err != nil {
			t.Fatal(err)
		}
		// An odd-length prog's last byte cuts the last cluster written
		// short (the image's last cluster, as import writes it) and
		// makes the virtual size end with it.
		short := -1
		if len(prog)%2 == 1 {
			short = 1 + int(prog[len(prog)-1])*int(cs)/256
		}
		model := map[uint64][]byte{}
		var idx uint64
		for i := 0; i+1 < len(prog); i += 2 {
			idx += uint64(prog[i])
			buf := make([]byte, cs)
			switch v := prog[i+1]; {
			case v == 0xff: // all zero: not stored
			case v < 0x40: // repetitive
				for j := range buf {
					buf[j] = v + byte(j%5)
				}
			case v < 0x80: // pseudo-random
				x := uint32(v) * 2654435761
				for j := range buf {
					x = x*1664525 + 1013904223
					buf[j] = byte(x >> 24)
				}
			default: // one byte
				buf[int(v)%len(buf)] = v
			}
			wr := buf
			if short >= 0 && i+3 >= len(prog) {
				wr = buf[:short]
				clear(buf[short:])
			}
			if err := w.WriteCluster(idx, wr); err != nil {
				t.Fatalf("WriteCluster(%d): %v", idx, err)
			}
			model[idx] = buf
			idx++
		}
		size := int64(idx)*cs + 100
		if short >= 0 && idx > 0 {
			size = int64(idx-1)*cs + int64(short)
		}
		if err := w.Finish(size); err != nil {
			t.Fatal(err)
		}
		res, err := qcow2.Check(fh, qcow2.RepairNone)
		if err != nil || !res.Clean() {
			t.Fatalf("Check: %+v, %v", res, err)
		}
		im, err := qcow2.Open(fh, qcow2.Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, cs)
		for c := uint64(0); c < idx; c++ {
			n := min(cs, size-int64(c)*cs)
			if _, err := im.ReadAt(got[:n], int64(c)*cs); err != nil {
				t.Fatal(err)
			}
			want, ok := model[c]
			if !ok {
				want = make([]byte, cs)
			}
			if !bytes.Equal(got[:n], want[:n]) {
				t.Fatalf("cluster %d differs", c)
			}
		}
	})
}
