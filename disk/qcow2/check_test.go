package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// setRefcountOnDisk patches the 16-bit refcount of host cluster c (the base
// image's single refcount block covers it).
func setRefcountOnDisk(t *testing.T, p string, l layout, c int64, v uint16) {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	patch(t, p, l.rb+2*c, b[:])
}

func copyFile(t *testing.T, src, dst string) {
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCheckAgreesWithQemu damages images and compares Check's counts with
// qemu-img check's, then repairs and checks again with qemu-img.
func TestCheckAgreesWithQemu(t *testing.T) {
	needQemu(t)
	cases := []struct {
		name   string
		opts   string
		mutate func(t *testing.T, p string, l layout)
		// fixable: after RepairAll qemu-img check must be clean.
		fixable bool
	}{
		{"clean", "", func(t *testing.T, p string, l layout) {}, true},
		{"refcount too high", "", func(t *testing.T, p string, l layout) {
			setRefcountOnDisk(t, p, l, l.data/l.cs, 2)
		}, true},
		{"refcount zero", "", func(t *testing.T, p string, l layout) {
			setRefcountOnDisk(t, p, l, l.data/l.cs, 0)
		}, true},
		{"leaked cluster", "", func(t *testing.T, p string, l layout) {
			st, _ := os.Stat(p)
			if err := os.Truncate(p, st.Size()+2*l.cs); err != nil {
				t.Fatal(err)
			}
			setRefcountOnDisk(t, p, l, st.Size()/l.cs+1, 1)
		}, true},
		{"refcount beyond eof", "", func(t *testing.T, p string, l layout) {
			st, _ := os.Stat(p)
			setRefcountOnDisk(t, p, l, st.Size()/l.cs+3, 1)
		}, true},
		{"l2 entry past eof", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|1<<30)
		}, false},
		{"l2 entry unaligned", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|uint64(l.data)+512)
		}, false},
		{"l2 entry reserved bits", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2+8, read64(t, p, l.l2+8)|1<<60)
		}, false},
		{"l1 entry past eof", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, flagCopied|1<<30)
		}, false},
		{"copied flag missing", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, read64(t, p, l.l2)&^flagCopied)
		}, true},
		{"l1 copied flag missing", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, read64(t, p, l.l1)&^flagCopied)
		}, true},
		{"refcount block unaligned", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.rt, uint64(l.rb)+512)
		}, false},
		// From review: an entry of reserved bits only (offset 0) was
		// skipped as empty.
		{"refcount table entry reserved bits", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.rt+8*11, 1)
		}, true},
		{"refcount block missing", "", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.rt, 0)
		}, true},
		{"refcount8 leak", "refcount_bits=8", func(t *testing.T, p string, l layout) {
			patch(t, p, l.rb+l.data/l.cs, []byte{5})
		}, true},
		{"refcount1 zero", "refcount_bits=1", func(t *testing.T, p string, l layout) {
			// Clear the bit of the first data cluster.
			c := l.data / l.cs
			b := make([]byte, 1)
			f := openFile(t, p, true)
			f.ReadAt(b, l.rb+c/8)
			f.Close()
			b[0] &^= 1 << (c % 8)
			patch(t, p, l.rb+c/8, b)
		}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			p, l := baseImage(t, dir, c.opts)
			if c.opts != "refcount_bits=1" {
				sh(t, "qemu-img", "snapshot", "-c", "s", p)
			}
			qio(t, p, "write -P 0x44 64k 4k")
			// Refresh the layout: the write copied cluster 1's L2 table.
			l.l2 = int64(read64(t, p, l.l1) & l1OffsetMask)
			l.data = int64(read64(t, p, l.l2) & l2OffsetMask)
			c.mutate(t, p, l)
			q := qemuCheck(t, p)
			f := openFile(t, p, true)
			res, err := Check(f, RepairNone)
			f.Close()
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if res.Corruptions != q.Corruptions || res.Leaks != q.Leaks || res.CheckErrors != q.CheckErrors {
				human, _ := exec.Command("qemu-img", "check", p).CombinedOutput()
				t.Fatalf("Check: corruptions %d leaks %d check-errors %d; qemu-img: %d %d %d\nours:\n%s\nqemu-img:\n%s",
					res.Corruptions, res.Leaks, res.CheckErrors, q.Corruptions, q.Leaks, q.CheckErrors, joinLines(res.Messages), human)
			}
			// Repair leaks only: no leaks remain, corruptions untouched.
			pl := filepath.Join(dir, "leaks.qcow2")
			copyFile(t, p, pl)
			f = openFile(t, pl, false)
			rl, err := Check(f, RepairLeaks)
			f.Close()
			if err != nil {
				t.Fatalf("Check(RepairLeaks): %v", err)
			}
			if rl.LeaksFixed != res.Leaks || rl.Leaks != 0 {
				t.Fatalf("RepairLeaks fixed %d of %d leaks, %d remain", rl.LeaksFixed, res.Leaks, rl.Leaks)
			}
			if q2 := qemuCheck(t, pl); q2.Leaks != 0 || q2.Corruptions != q.Corruptions {
				t.Fatalf("after RepairLeaks qemu-img reports %d leaks, %d corruptions (was %d)", q2.Leaks, q2.Corruptions, q.Corruptions)
			}
			if !c.fixable {
				return
			}
			pa := filepath.Join(dir, "all.qcow2")
			copyFile(t, p, pa)
			f = openFile(t, pa, false)
			ra, err := Check(f, RepairAll)
			f.Close()
			if err != nil {
				t.Fatalf("Check(RepairAll): %v", err)
			}
			if !ra.Clean() {
				t.Fatalf("RepairAll left %+v", ra)
			}
			qemuClean(t, pa)
			// The content did not change.
			sh(t, "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", p, pa)
		})
	}
}

func joinLines(s []string) string {
	var b bytes.Buffer
	for _, l := range s {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

// TestDirtyImageRepairedOnOpen kills qemu-io in the middle of writing a
// lazy-refcounts image, so the image is left dirty with stale refcounts.
// A read-only open serves it as is; a read-write open rebuilds refcounts.
func TestDirtyImageRepairedOnOpen(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", p, "16M")
	// qemu-io exits with the signal, so ignore its status.
	out, _ := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 1M", "-c", "write -P 0x5d 8M 300k",
		"-c", "flush", "-c", "write -P 0x5e 12M 64k", "-c", "sigraise 9", p).CombinedOutput()
	_ = out
	f := openFile(t, p, true)
	info, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !info.Dirty {
		t.Skip("qemu-io left the image clean; cannot build a dirty image here")
	}
	q := qemuCheck(t, p)
	f = openFile(t, p, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if res.Corruptions != q.Corruptions || res.Leaks != q.Leaks {
		t.Fatalf("Check %d/%d, qemu-img %d/%d", res.Corruptions, res.Leaks, q.Corruptions, q.Leaks)
	}
	if res.Clean() {
		t.Fatal("dirty image has consistent refcounts; the test proves nothing")
	}
	want := qemuRaw(t, p, "-U")
	im := openImage(t, p, true)
	compareImage(t, im, want, 1)
	im.Close()
	im = openImage(t, p, false)
	compareImage(t, im, want, 2)
	if im.Info().Dirty {
		t.Fatal("dirty bit still set after a read-write open")
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x77}, 8192), 4<<20); err != nil {
		t.Fatal(err)
	}
	copy(want[4<<20:], bytes.Repeat([]byte{0x77}, 8192))
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	qemuClean(t, p)
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("content differs at %d", firstDiff(got, want))
	}
}

// TestCreate makes images with Create; qemu-img must find them clean, read
// them, and write to them; Open must serve what qemu-io wrote.
func TestCreate(t *testing.T) {
	needQemu(t)
	cases := []CreateOptions{
		{Size: 16 << 20},
		{Size: 1 << 30, ClusterSize: 512},
		{Size: 64 << 20, ClusterSize: 512, RefcountBits: 64},
		{Size: 8 << 20, ClusterSize: 2 << 20},
		{Size: 8 << 20, Version: 2},
		{Size: 8 << 20, Version: 2, ClusterSize: 4096},
		{Size: 8 << 20, RefcountBits: 1},
		{Size: 8 << 20, CompressionType: "zstd"},
		{Size: 8 << 20, ExtendedL2: true},
		{Size: 8 << 20, ExtendedL2: true, ClusterSize: 16384},
		{Size: 8 << 20, LazyRefcounts: true},
		{Size: 0},
		{Size: 1000}, // rounded up to 1024
		{Size: 8 << 20, BackingFile: "base.raw", BackingFormat: disk.Raw},
		{Size: 1 << 40, ClusterSize: 65536},
	}
	for i, o := range cases {
		t.Run(fmt.Sprintf("%d", i), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "new.qcow2")
			var chain []Layer
			if o.BackingFile != "" {
				b := filepath.Join(dir, o.BackingFile)
				rawSource(t, b, 1<<20, 3)
				chain = append(chain, layerOf(t, b, disk.Raw))
			}
			f, err := os.Create(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := Create(f, o); err != nil {
				t.Fatalf("Create: %v", err)
			}
			f.Close()
			qemuClean(t, p)
			info := sh(t, "qemu-img", "info", p)
			size := (o.Size + 511) &^ 511
			if !bytes.Contains([]byte(info), []byte(fmt.Sprintf("(%d bytes)", size))) {
				t.Fatalf("qemu-img info: %s", info)
			}
			if size >= 4<<20 {
				qio(t, p, "write -P 0x3c 1M 100k")
			}
			im := openImage(t, p, false, chain...)
			if got := im.Info(); got.VirtualSize != size || got.ExtendedL2 != o.ExtendedL2 || got.LazyRefcounts != o.LazyRefcounts {
				t.Fatalf("Info %+v", got)
			}
			if size >= 4<<20 {
				buf := make([]byte, 4096)
				if _, err := im.ReadAt(buf, 1<<20); err != nil || buf[0] != 0x3c {
					t.Fatalf("read: %v %x", err, buf[0])
				}
				if _, err := im.WriteAt(bytes.Repeat([]byte{9}, 70000), 3<<20+5); err != nil {
					t.Fatal(err)
				}
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			qemuClean(t, p)
		})
	}
	// Invalid options are refused.
	for _, o := range []CreateOptions{
		{Size: -1}, {Size: 1 << 20, ClusterSize: 1000}, {Size: 1 << 20, ClusterSize: 4 << 20},
		{Size: 1 << 20, RefcountBits: 3}, {Size: 1 << 20, RefcountBits: 128}, {Size: 1 << 20, Version: 4},
		{Size: 1 << 20, Version: 2, ExtendedL2: true}, {Size: 1 << 20, ExtendedL2: true, ClusterSize: 4096},
		{Size: 1 << 20, CompressionType: "lz4"}, {Size: 1 << 50, ClusterSize: 512},
		{Size: 1 << 20, BackingFormat: disk.Raw},
	} {
		f, err := os.Create(filepath.Join(t.TempDir(), "bad"))
		if err != nil {
			t.Fatal(err)
		}
		if err := Create(f, o); err == nil {
			t.Errorf("Create(%+v) succeeded", o)
		}
		f.Close()
	}
}

// TestInfo compares ReadInfo with what qemu-img created.
func TestInfo(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	rawSource(t, base, 1<<20, 1)
	p := filepath.Join(dir, "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
		"-o", "cluster_size=32768,refcount_bits=32,compression_type=zstd,extended_l2=on,lazy_refcounts=on", p, "3G")
	sh(t, "qemu-img", "snapshot", "-c", "first", p)
	sh(t, "qemu-img", "bitmap", "--add", p, "dirty0")
	sh(t, "qemu-img", "bitmap", "--add", "-g", "131072", "--disable", p, "off")
	f := openFile(t, p, true)
	in, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if in.Version != 3 || in.ClusterSize != 32768 || in.RefcountBits != 32 || in.VirtualSize != 3<<30 ||
		in.BackingFile != "base.raw" || in.BackingFormat != "raw" || in.CompressionType != "zstd" ||
		!in.ExtendedL2 || !in.LazyRefcounts || in.Dirty || in.Corrupt || in.Bitmaps != 2 ||
		len(in.Snapshots) != 1 || in.Snapshots[0].Name != "first" || in.Snapshots[0].DiskSize != 3<<30 {
		t.Fatalf("ReadInfo = %+v", in)
	}
	// The bitmap directory, as qemu-img info lists it (its default
	// granularity is the cluster size).
	if want := []BitmapInfo{{Name: "dirty0", Granularity: 32768, Auto: true}, {Name: "off", Granularity: 131072}}; !reflect.DeepEqual(in.BitmapList, want) {
		t.Fatalf("BitmapList %+v, want %+v", in.BitmapList, want)
	}
	var names []uint32
	for _, e := range in.Extensions {
		names = append(names, e.Type)
	}
	want := map[uint32]bool{extBackingFormat: true, extFeatureTable: true, extBitmaps: true}
	for _, n := range names {
		delete(want, n)
	}
	if len(want) != 0 {
		t.Fatalf("extensions %x, missing %v", names, want)
	}
	// Opening read-write marks the bitmap in use and keeps the image clean.
	im := openImage(t, p, false, layerOf(t, base, disk.Raw))
	if got := im.Info(); got.Bitmaps != 2 || got.BackingFile != "base.raw" {
		t.Fatalf("Info = %+v", got)
	}
	im.Close()
	qemuClean(t, p)
	out := sh(t, "qemu-img", "info", p)
	if !bytes.Contains([]byte(out), []byte("in-use")) {
		t.Fatalf("bitmap not marked in use:\n%s", out)
	}
	f = openFile(t, p, false)
	in, err = ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(in.BitmapList) != 2 || !in.BitmapList[0].InUse || !in.BitmapList[1].InUse || !in.BitmapList[0].Auto {
		t.Fatalf("after a read-write open, BitmapList %+v, want both in use", in.BitmapList)
	}
}

// TestRepairNeverOverwritesOtherMetadata points the refcount table at the
// L1 table; a full repair must not write refcounts over it. It rebuilds
// the refcount structure elsewhere (the L1 table's cluster doubling as a
// refcount block is itself a corruption, as in qemu-img check), leaving
// the L1 table and the old refcount table as they were.
func TestRepairNeverOverwritesOtherMetadata(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	p, l := baseImage(t, dir, "")
	orig := filepath.Join(dir, "orig.qcow2")
	copyFile(t, p, orig)
	patch64(t, p, l.rt, uint64(l.l1))
	tables := func() []byte { return protected(t, p, l)[l.cs:] } // all but the header
	before := tables()
	f := openFile(t, p, false)
	res, err := Check(f, RepairAll)
	f.Close()
	if err != nil || !res.Clean() || !res.RefcountsRebuilt {
		t.Fatalf("Check(RepairAll) = %+v, %v; want the refcount structure rebuilt", res, err)
	}
	if after := tables(); !bytes.Equal(before, after) {
		t.Fatalf("repair changed metadata at byte %d", firstDiff(before, after))
	}
	qemuClean(t, p)
	sh(t, "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", orig, p)
}

// TestCheckRefcountStructureShared: from review, a refcount table or
// block that an L2 table shares (refcounts raised to match, so no count
// differs) passed Check, which the reader then refused as corrupt. Check
// must report it as qemu-img does, and a full repair must rebuild the
// refcount structure rather than keep refcounts of 2; and an image with
// more refcount blocks than its table holds must not panic the repair
// (it indexed past the table).
func TestCheckRefcountStructureShared(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name, opts, write string
		mutate            func(t *testing.T, p string, l layout)
		want              string // in Check's messages
	}{
		{"L2 table is the refcount table", "cluster_size=65536", "write -P 1 0 64k", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, uint64(l.rt)) // L1 entry 0: the refcount table as an L2 table
			setRefcountOnDisk(t, p, l, l.rt/l.cs, 2)
			setRefcountOnDisk(t, p, l, l.rb/l.cs, 2) // the table's entry 0 maps it as data
		}, "refcount block 0 refcount=2"},
		{"refcount table too short for its blocks", "cluster_size=512", "write -P 1 0 12M", func(t *testing.T, p string, l layout) {
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], 1)
			patch(t, p, 56, b[:]) // refcount_table_clusters
		}, "ERROR cluster 16384 refcount=0 reference=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tt.opts, p, "64M")
			qio(t, p, tt.write)
			l := readLayout(t, p)
			tt.mutate(t, p, l)
			if q := qemuCheck(t, p); q.Corruptions == 0 && q.CheckErrors == 0 {
				t.Fatalf("qemu-img check finds the image clean")
			}
			f := openFile(t, p, true)
			res, err := Check(f, RepairNone)
			f.Close()
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if res.Clean() || !strings.Contains(joinLines(res.Messages), tt.want) {
				t.Fatalf("Check: %d corruptions, want one reporting %q; first messages: %q", res.Corruptions, tt.want, res.Messages[:min(len(res.Messages), 5)])
			}
			f = openFile(t, p, false)
			ra, err := Check(f, RepairAll)
			f.Close()
			if err != nil {
				t.Fatalf("Check(RepairAll): %v", err)
			}
			if !ra.Clean() || !ra.RefcountsRebuilt {
				t.Fatalf("RepairAll: %+v", ra)
			}
			qemuClean(t, p)
		})
	}
}
