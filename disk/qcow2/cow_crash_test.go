package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestCowDataDurableBeforeL2Entry: a write into part of a cluster (or, with
// extended L2, of a subcluster) that goes to a host cluster whose old
// content is not what the rest of the guest cluster reads (a reused freed
// cluster; a preallocated zero cluster) writes its data with the fill, then
// the L2 entry. A power failure that keeps the L2 write and loses the data
// write would make the bytes the write did not touch read the host
// cluster's old content: data that was durable (zeros) before the write
// would be lost. The fill is therefore written durably (writeData).
func TestCowDataDurableBeforeL2Entry(t *testing.T) {
	needQemu(t)
	freedGap := func(t *testing.T, im *Image) {
		// 1 MiB of 0xAA, discarded: the freed clusters hold 0xAA.
		if _, err := im.WriteAt(bytes.Repeat([]byte{0xAA}, 1<<20), 0); err != nil {
			t.Fatal(err)
		}
		if err := im.Discard(0, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		opts  string
		cs    int64
		setup func(t *testing.T, im *Image)
		off   int64 // the partial write, inside a cluster that reads as zeros
	}{
		{"extended L2, part of a subcluster, reused freed cluster", "cluster_size=65536,extended_l2=on", 65536, freedGap, 3<<19 + 1024},
		{"reused freed cluster", "cluster_size=4096", 4096, freedGap, 3<<19 + 2048}, // 1.5 MiB: same L2 table, never written
		{"preallocated zero cluster", "cluster_size=4096", 4096, func(t *testing.T, im *Image) {
			if _, err := im.WriteAt(bytes.Repeat([]byte{0xAA}, 4096), 0); err != nil {
				t.Fatal(err)
			}
			if err := im.WriteZeroes(0, 4096, false); err != nil { // keeps the cluster
				t.Fatal(err)
			}
		}, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			cs := tc.cs
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tc.opts, p, "8M")
			im := openImage(t, p, false)
			tc.setup(t, im)
			if err := im.Close(); err != nil { // writes back, frees what was discarded
				t.Fatal(err)
			}
			im = openImage(t, p, false)
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			base, err := os.ReadFile(p) // durable: the guest reads zeros at off
			if err != nil {
				t.Fatal(err)
			}
			rec := &recorder{ioFile: im.f}
			im.f, im.data = rec, rec
			if _, err := im.WriteAt(bytes.Repeat([]byte{0x55}, 512), tc.off); err != nil {
				t.Fatal(err)
			}
			log := rec.log
			im.f, im.data = rec.ioFile, rec.ioFile
			l1 := im.l1[uint64(tc.off/cs)>>im.l2Bits] & l1OffsetMask
			im.Close()
			// Power fails: of the writes not made durable, the disk kept
			// the L2 table's and lost the others (the data write).
			crash := crashState(base, log, len(log), func(i int) bool {
				return log[i].off >= int64(l1) && log[i].off < int64(l1)+cs
			})
			cp := filepath.Join(t.TempDir(), "crash.qcow2")
			checkCrashImage(t, cp, crash, "L2 write kept, data write lost", true)
			ci := openImage(t, cp, true)
			defer ci.Close()
			cl := tc.off &^ (cs - 1)
			got := make([]byte, cs)
			if _, err := ci.ReadAt(got, cl); err != nil {
				t.Fatal(err)
			}
			in := tc.off - cl
			for i, b := range got {
				if (int64(i) < in || int64(i) >= in+512) && b != 0 {
					t.Fatalf("guest byte %d, not written since it was durably 0, reads %#x after the crash", cl+int64(i), b)
				}
			}
		})
	}
}
