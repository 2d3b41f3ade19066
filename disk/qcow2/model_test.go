package qcow2

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

type modelCase struct {
	name     string
	cs       int64
	size     int64
	create   string // extra qemu-img create -o options
	v2       bool
	backing  string // "", "raw", "qcow2"
	snapshot bool   // take a snapshot before the run
	compress bool   // start from a compressed image
	dataFile bool
	cache    int64 // CacheBytes
	ops      int
}

func modelCases(short bool) []modelCase {
	cases := []modelCase{
		{name: "cs512-rc64-growth", cs: 512, size: 4 << 20, create: "refcount_bits=64", cache: 8 * 512, ops: 3000},
		{name: "cs4k-rc1", cs: 4096, size: 8 << 20, create: "refcount_bits=1", ops: 3000},
		{name: "cs64k", cs: 65536, size: 32 << 20, ops: 3000},
		{name: "cs64k-tinycache", cs: 65536, size: 32 << 20, cache: 4 * 65536, ops: 2000},
		{name: "cs2m", cs: 2 << 20, size: 32 << 20, ops: 600},
		{name: "v2-cs4k", cs: 4096, size: 8 << 20, create: "compat=0.10", v2: true, ops: 2000},
		{name: "v2-cs64k-backing", cs: 65536, size: 16 << 20, create: "compat=0.10", v2: true, backing: "qcow2", ops: 2000},
		{name: "extl2-cs64k", cs: 65536, size: 16 << 20, create: "extended_l2=on", ops: 3000},
		{name: "extl2-cs16k-backing", cs: 16384, size: 8 << 20, create: "extended_l2=on", backing: "qcow2", ops: 3000},
		{name: "cs64k-raw-backing", cs: 65536, size: 16 << 20, backing: "raw", ops: 2000},
		{name: "cs8k-qcow2-backing", cs: 8192, size: 8 << 20, backing: "qcow2", cache: 16 * 8192, ops: 3000},
		{name: "snapshot-cs4k", cs: 4096, size: 8 << 20, snapshot: true, ops: 2000},
		{name: "snapshot-extl2", cs: 32768, size: 8 << 20, create: "extended_l2=on", snapshot: true, ops: 2000},
		{name: "compressed-cs64k", cs: 65536, size: 8 << 20, compress: true, ops: 2000},
		{name: "zstd-cs4k", cs: 4096, size: 4 << 20, compress: true, create: "compression_type=zstd", ops: 2000},
		{name: "lazy-refcounts", cs: 65536, size: 8 << 20, create: "lazy_refcounts=on", ops: 1500},
		{name: "data-file", cs: 65536, size: 8 << 20, dataFile: true, ops: 1500},
	}
	if short {
		for i := range cases {
			cases[i].ops /= 4
		}
	}
	return cases
}

// TestModel applies thousands of random writes, zero writes, discards and
// flushes to an image and to an in-memory model, then compares every byte,
// checks the image with qemu-img, reopens it and compares again.
func TestModel(t *testing.T) {
	needQemu(t)
	for i, mc := range modelCases(testing.Short()) {
		t.Run(mc.name, func(t *testing.T) { runModel(t, mc, int64(i)+1) })
	}
}

func runModel(t *testing.T, mc modelCase, seed int64) {
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	opts := fmt.Sprintf("cluster_size=%d", mc.cs)
	if mc.create != "" {
		opts += "," + mc.create
	}
	var chain []chainEntry
	var backingSize int64
	switch mc.backing {
	case "raw":
		b := filepath.Join(dir, "base.raw")
		backingSize = mc.size/2 + 12345&^511
		rawSource(t, b, backingSize, seed)
		chain = append(chain, chainEntry{b, disk.Raw})
	case "qcow2":
		b := filepath.Join(dir, "base.qcow2")
		backingSize = mc.size * 3 / 4
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, backingSize, seed)
		bo := "cluster_size=4096"
		if mc.v2 {
			bo += ",compat=0.10"
		}
		sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", bo, src, b)
		chain = append(chain, chainEntry{b, disk.QCOW2})
	}
	if len(chain) > 0 {
		opts += ",backing_file=" + chain[0].path + ",backing_fmt=" + string(chain[0].format)
	}
	dataPath := filepath.Join(dir, "img.data")
	if mc.dataFile {
		opts += ",data_file=" + dataPath
	}
	if mc.compress {
		src := filepath.Join(dir, "src.raw")
		rawSource(t, src, mc.size, seed)
		sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, p)
	} else {
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, fmt.Sprint(mc.size))
		qio(t, p, "write -P 0xc1 0 128k", fmt.Sprintf("write -P 0xc2 %d 192k", mc.size/3))
	}
	var snapWant []byte
	if mc.snapshot {
		sh(t, "qemu-img", "snapshot", "-c", "before", p)
		snapWant = qemuRaw(t, p)
	}
	model := qemuRaw(t, p)

	open := func() *Image {
		var layers []Layer
		for _, e := range chain {
			layers = append(layers, layerOf(t, e.path, e.format))
		}
		o := Options{Path: p, Backing: layers, CacheBytes: mc.cache}
		if mc.dataFile {
			o.DataFile = &Layer{File: openFile(t, dataPath, false), Format: disk.Raw, Path: dataPath}
		}
		im, err := Open(openFile(t, p, false), o)
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		if seed%2 == 0 {
			// Every other case serves its discards and zero writes
			// in pieces of one to three clusters (zeroOrDiscard),
			// each as if a request of its own.
			im.pieceClusters = uint64(1 + seed%3)
		}
		return im
	}
	im := open()
	r := rand.New(rand.NewSource(seed))
	cs := mc.cs
	maxLen := int(min(max(4*cs, 32<<10), 256<<10))
	if cs >= 1<<20 {
		maxLen = int(3 * cs)
	}
	randRange := func() (int64, int64) {
		var off, n int64
		if r.Intn(3) == 0 {
			// Cluster-aligned.
			k := mc.size / cs
			off = r.Int63n(k) * cs
			n = cs * (1 + r.Int63n(3))
		} else {
			off = r.Int63n(mc.size)
			n = 1 + r.Int63n(int64(maxLen))
			if r.Intn(2) == 0 {
				off &^= 511
				n = (n + 511) &^ 511
			}
		}
		return off, min(n, mc.size-off)
	}
	rawData := false
	for op := 0; op < mc.ops; op++ {
		switch k := r.Intn(100); {
		case k < 45:
			off, n := randRange()
			buf := make([]byte, n)
			r.Read(buf)
			if r.Intn(4) == 0 {
				clear(buf[:n/2]) // some zero data written as data
			}
			if _, err := im.WriteAt(buf, off); err != nil {
				t.Fatalf("op %d WriteAt(%d, %d): %v", op, off, n, err)
			}
			copy(model[off:], buf)
		case k < 60:
			off, n := randRange()
			unmap := r.Intn(2) == 0
			if err := im.WriteZeroes(off, n, unmap); err != nil {
				t.Fatalf("op %d WriteZeroes(%d, %d, %v): %v", op, off, n, unmap, err)
			}
			clear(model[off : off+n])
		case k < 70:
			off, n := randRange()
			if err := im.Discard(off, n); err != nil {
				t.Fatalf("op %d Discard(%d, %d): %v", op, off, n, err)
			}
			// Whole clusters read back as zeroes, except where a
			// version 2 image would have to hide backing data.
			for pos := off; pos < off+n; {
				base := pos &^ (cs - 1)
				l := min(base+cs, off+n) - pos
				full := pos == base && (l == cs || base+l == mc.size)
				if full && !rawData && !(mc.v2 && base < backingSize) {
					clear(model[pos : pos+l])
				}
				pos += l
			}
		case k < 75:
			if err := im.Flush(); err != nil {
				t.Fatalf("op %d Flush: %v", op, err)
			}
		case k == 75 && op > mc.ops/2 && op < mc.ops/2+100:
			if err := im.Close(); err != nil {
				t.Fatalf("op %d Close: %v", op, err)
			}
			qemuClean(t, p)
			im = open()
		default:
			off, n := randRange()
			buf := make([]byte, n)
			if _, err := im.ReadAt(buf, off); err != nil {
				t.Fatalf("op %d ReadAt(%d, %d): %v", op, off, n, err)
			}
			if !bytes.Equal(buf, model[off:off+n]) {
				t.Fatalf("op %d ReadAt(%d, %d) differs from the model at byte %d", op, off, n, off+int64(firstDiff(buf, model[off:off+n])))
			}
		}
	}
	compareImage(t, im, model, seed)
	if err := im.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := im.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	qemuClean(t, p)
	if got := qemuRaw(t, p); !bytes.Equal(got, model) {
		t.Fatalf("qemu-img reads different content at byte %d", firstDiff(got, model))
	}
	if mc.snapshot {
		if got := qemuRaw(t, p, "-l", "snapshot.name=before"); !bytes.Equal(got, snapWant) {
			t.Fatalf("snapshot content changed at byte %d", firstDiff(got, snapWant))
		}
	}
	// Our own checker agrees that the image is clean.
	f := openFile(t, p, true)
	if mc.name == "cs512-rc64-growth" {
		info, err := ReadInfo(f)
		if err != nil || info.RefcountTableSize < 2 {
			t.Fatalf("refcount table did not grow: %d clusters, %v", info.RefcountTableSize, err)
		}
	}
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil || !res.Clean() {
		t.Fatalf("Check: %v %+v", err, res)
	}
	im = open()
	compareImage(t, im, model, seed+1)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	_ = os.Remove(p)
}
