package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// smallClusterImage makes a 16 MiB image of 512-byte clusters with data
// at 0 and 8 MiB, written by this package.
func smallClusterImage(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "small.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 16 << 20, ClusterSize: 512}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(f, Options{Path: p})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 8 << 20} {
		if _, err := im.WriteAt(bytes.Repeat([]byte{0x5a}, 64<<10), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCheckSparseHugeFile: a 400 GiB (sparse) file of 512-byte clusters
// needs 1.6 GB for a flat array of reference counts, more than the image
// plugin's 1 GiB data limit (`img check` died with "runtime: out of
// memory"). Counts are kept per referenced chunk, so the check of an image
// that uses a few MiB at the start of that file fits in 1 MiB of
// bookkeeping and agrees with the check of the same image before the file
// grew.
func TestCheckSparseHugeFile(t *testing.T) {
	p := smallClusterImage(t)
	f := openFile(t, p, false)
	defer f.Close()
	before, err := Check(f, RepairNone)
	if err != nil || !before.Clean() {
		t.Fatalf("check of the fresh image: %+v %v", before, err)
	}
	const huge = 400 << 30
	if err := f.Truncate(huge); err != nil {
		t.Fatal(err)
	}
	for _, repair := range []RepairMode{RepairNone, RepairLeaks} {
		got, err := CheckWith(f, CheckOptions{Repair: repair, MemoryLimit: 1 << 20})
		if err != nil {
			t.Fatalf("repair %d: %v", repair, err)
		}
		got.Messages, before.Messages = nil, nil
		if fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("repair %d: check of the 400 GiB file\n %+v\ndiffers from the check before it grew\n %+v", repair, got, before)
		}
	}
}

// TestCheckMemoryLimit: references spread over a huge file need a chunk of
// counts each; past the limit the check stops with one line instead of
// exhausting memory, and within it the check completes.
func TestCheckMemoryLimit(t *testing.T) {
	p := smallClusterImage(t)
	f := openFile(t, p, false)
	defer f.Close()
	const huge = 400 << 30
	if err := f.Truncate(huge); err != nil {
		t.Fatal(err)
	}
	// Point the 64 entries of the first L2 table 32 MiB (one chunk of
	// counts) apart.
	h, err := readHeader(f, huge)
	if err != nil {
		t.Fatal(err)
	}
	l1, err := readTableAt(f, h.l1Off, uint64(h.l1Size))
	if err != nil {
		t.Fatal(err)
	}
	l2 := l1[0] & l1OffsetMask
	buf := make([]byte, 512)
	for i := uint64(0); i < 64; i++ {
		be.PutUint64(buf[i*8:], (i+1)*refChunk*512)
	}
	if _, err := f.WriteAt(buf, int64(l2)); err != nil {
		t.Fatal(err)
	}
	_, err = CheckWith(f, CheckOptions{MemoryLimit: 4 << 20})
	want := "image too large to check within 4 MiB of memory (838860800 clusters of 512 bytes in a 429496729600-byte file)"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	// The repair refuses the same way and writes nothing.
	st0 := fileSum(t, p)
	if _, err := CheckWith(f, CheckOptions{Repair: RepairAll, MemoryLimit: 4 << 20}); err == nil || err.Error() != want {
		t.Fatalf("repair: got %v", err)
	}
	if fileSum(t, p) != st0 {
		t.Fatal("a refused repair changed the image")
	}
	res, err := CheckWith(f, CheckOptions{MemoryLimit: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// 64 references to clusters without refcounts; the 64 data clusters
	// they replaced leaked.
	if res.Corruptions != 64 || res.Leaks != 64 {
		t.Fatalf("corruptions %d, leaks %d; want 64 and 64:\n%s", res.Corruptions, res.Leaks, strings.Join(res.Messages[:min(5, len(res.Messages))], "\n"))
	}
}

// fileSum is a cheap fingerprint of the image's first 64 KiB.
func fileSum(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 64<<10)
	n, _ := f.ReadAt(b, 0)
	return string(b[:n])
}

// TestCheckStatisticsAgreeWithQemu: allocated, fragmented and compressed
// cluster counts as qemu-img check reports them: contiguity is counted
// within one L2 table, compressed clusters count as fragmented, and zero
// clusters that keep their allocation count as allocated.
func TestCheckStatisticsAgreeWithQemu(t *testing.T) {
	needQemu(t)
	compressible := func(p string) {
		b := make([]byte, 8<<20)
		for i := range b {
			b[i] = byte(i / 4096 % 7)
		}
		raw := p + ".raw"
		if err := os.WriteFile(raw, b, 0o644); err != nil {
			t.Fatal(err)
		}
		sh(t, "qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, p)
	}
	cases := []struct {
		name  string
		build func(p string)
	}{
		{"512-byte clusters, several L2 tables", func(p string) {
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "64M")
			qio(t, p, "write -P 0x11 1M 100k", "write -P 0x22 0 100k", "write -P 3 200k 4k")
		}},
		{"zero clusters keeping their allocation", func(p string) {
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
			qio(t, p, "write -P 0x11 0 1M", "write -z 64k 128k", "write -P 1 10M 64k")
		}},
		{"compressed", func(p string) {
			compressible(p)
			qio(t, p, "write -P 3 1M 128k", "write -P 4 3M 64k")
		}},
		{"extended L2", func(p string) {
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "64M")
			qio(t, p, "write -P 1 0 100k", "write -z 8k 4k", "write -P 2 1M 64k")
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			tc.build(p)
			out := sh(t, "qemu-img", "check", "--output=json", p)
			f := openFile(t, p, true)
			defer f.Close()
			res, err := Check(f, RepairNone)
			if err != nil {
				t.Fatal(err)
			}
			got := fmt.Sprintf("allocated %d fragmented %d compressed %d end %d",
				res.AllocatedClusters, res.FragmentedClusters, res.CompressedClusters, res.ImageEndOffset)
			want := fmt.Sprintf("allocated %d fragmented %d compressed %d end %d",
				jsonInt(out, "allocated-clusters"), jsonInt(out, "fragmented-clusters"), jsonInt(out, "compressed-clusters"), jsonInt(out, "image-end-offset"))
			if got != want {
				t.Errorf("ours: %s\nqemu: %s", got, want)
			}
		})
	}
}
