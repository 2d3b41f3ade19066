package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

// backedImage is a top image over a chain whose every byte is 0xbb, so
// that backing data showing through the grown area is seen.
type backedImage struct {
	top   string
	chain []Layer // declared chain, nearest first
	files []string
}

// makeBacked creates the chain described by layers (nearest first: each
// "qcow2" or "raw" with its size) under a top image of size old made with
// topOpts, fills the bottom layer with 0xbb, and writes 0x5a at the start
// of the top image.
func makeBacked(t *testing.T, topOpts string, old int64, layers []string, sizes []int64) *backedImage {
	t.Helper()
	dir := t.TempDir()
	b := &backedImage{top: filepath.Join(dir, "top.qcow2")}
	paths := make([]string, len(layers))
	for i, f := range layers {
		paths[i] = filepath.Join(dir, "layer"+strconv.Itoa(i)+"."+f)
	}
	for i := len(layers) - 1; i >= 0; i-- {
		args := []string{"create", "-q", "-f", layers[i]}
		if i+1 < len(layers) {
			args = append(args, "-b", paths[i+1], "-F", layers[i+1])
		}
		sh(t, "qemu-img", append(args, paths[i], strconv.FormatInt(sizes[i], 10))...)
		if i == len(layers)-1 {
			sh(t, "qemu-io", "-f", layers[i], "-c", "write -P 0xbb 0 "+strconv.FormatInt(sizes[i], 10), paths[i])
		}
	}
	args := []string{"create", "-q", "-f", "qcow2", "-b", paths[0], "-F", layers[0]}
	if topOpts != "" {
		args = append(args, "-o", topOpts)
	}
	sh(t, "qemu-img", append(args, b.top, strconv.FormatInt(old, 10))...)
	qio(t, b.top, "write -P 0x5a 0 3k")
	b.files = paths
	for i, p := range paths {
		b.chain = append(b.chain, layerOf(t, p, disk.Format(layers[i])))
	}
	return b
}

func (b *backedImage) opts() Options { return Options{Path: b.top, Backing: b.chain} }

// layerBytes is every file of the chain, to check that a resize of the
// top image wrote none of them.
func (b *backedImage) layerBytes(t *testing.T) [][]byte {
	t.Helper()
	var out [][]byte
	for _, p := range b.files {
		c, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// checkBackedResized checks a grown image over its chain: QEMU and Check
// find it clean and of the new size, and its whole virtual content, as
// QEMU and this package read it through the chain, is the old content
// followed by zeros.
func checkBackedResized(t *testing.T, b *backedImage, before []byte, size int64) {
	t.Helper()
	qemuClean(t, b.top)
	if got := qemuSize(t, b.top); got != size {
		t.Fatalf("qemu-img info: virtual size %d, want %d", got, size)
	}
	f := openFile(t, b.top, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil || !res.Clean() || res.Leaks != 0 {
		t.Fatalf("Check after resize: %+v %v", res, err)
	}
	want := make([]byte, size)
	copy(want, before)
	if got := qemuRaw(t, b.top); !bytes.Equal(got, want) {
		i := firstDiff(got, want)
		t.Fatalf("QEMU reads the resized image differently at %d (old size %d): %#x, want %#x", i, len(before), got[i], want[i])
	}
	chain := make([]Layer, len(b.chain))
	for i, l := range b.chain {
		chain[i] = layerOf(t, l.Path, l.Format)
	}
	im := openImage(t, b.top, true, chain...)
	defer im.Close()
	if im.Size() != size {
		t.Fatalf("size %d, want %d", im.Size(), size)
	}
	got := make([]byte, size)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("this package reads the resized image differently: %v, first difference at %d", err, firstDiff(got, want))
	}
}

// TestResizeOverBacking grows images with a backing chain: the backing
// data beyond the old size is hidden, what was visible stays, and the
// chain is only read.
func TestResizeOverBacking(t *testing.T) {
	needQemu(t)
	const m = 1 << 20
	tests := []struct {
		name      string
		topOpts   string
		old, size int64
		layers    []string
		sizes     []int64
		tailWrite bool // the top image has data in its last, partial cluster
		moved     bool // the L1 table must move
	}{
		{"qcow2 base", "", m, 8 * m, []string{"qcow2"}, []int64{4 * m}, false, false},
		{"raw base", "", m, 8 * m, []string{"raw"}, []int64{4 * m}, false, false},
		{"base larger than the new size", "", m, 2 * m, []string{"qcow2"}, []int64{4 * m}, false, false},
		{"base smaller than the old size", "", m, 8 * m, []string{"qcow2"}, []int64{m / 2}, false, false},
		{"unaligned, last cluster from the base", "", m + 1536, 8 * m, []string{"qcow2"}, []int64{4 * m}, false, false},
		{"unaligned, last cluster in the top", "", m + 1536, 8 * m, []string{"raw"}, []int64{4 * m}, true, false},
		{"unaligned base", "", m, 8 * m, []string{"raw"}, []int64{3*m + 4096 + 512}, false, false},
		{"L1 grows in its cluster", "cluster_size=512", m, 2 * m, []string{"qcow2"}, []int64{4 * m}, false, false},
		{"L1 moves", "cluster_size=512", m, 64 * m, []string{"qcow2"}, []int64{32 * m}, false, true},
		{"extended L2, unaligned", "cluster_size=16384,extended_l2=on", m + 1536, 8 * m, []string{"qcow2"}, []int64{4 * m}, true, false},
		{"two layers", "", m, 8 * m, []string{"qcow2", "raw"}, []int64{2 * m, 6 * m}, false, false},
		{"version 2, base within the last cluster", "compat=0.10", m + 1536, 8 * m, []string{"raw"}, []int64{m + 4096}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := makeBacked(t, tt.topOpts, tt.old, tt.layers, tt.sizes)
			if tt.tailWrite {
				qio(t, b.top, "write -P 0x66 "+strconv.FormatInt(tt.old-512, 10)+" 512")
			}
			before := qemuRaw(t, b.top)
			if int64(len(before)) != tt.old {
				t.Fatalf("old content is %d bytes, want %d", len(before), tt.old)
			}
			layers := b.layerBytes(t)
			off0, _ := headerL1(t, b.top)
			f := openFile(t, b.top, false)
			err := Resize(f, tt.size, b.opts())
			f.Close()
			if err != nil {
				t.Fatalf("Resize: %v", err)
			}
			if off, _ := headerL1(t, b.top); (off != off0) != tt.moved {
				t.Fatalf("L1 table at %#x, was %#x: moved %v, want %v", off, off0, off != off0, tt.moved)
			}
			checkBackedResized(t, b, before, tt.size)
			for i, want := range b.layerBytes(t) {
				if !bytes.Equal(layers[i], want) {
					t.Fatalf("backing file %s changed", b.files[i])
				}
			}
			// A write into the new area lands where QEMU reads it.
			im := openImage(t, b.top, false, b.opts().Backing...)
			if _, err := im.WriteAt(bytes.Repeat([]byte{0xc7}, 4096), tt.size-4096); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			qemuClean(t, b.top)
			qio(t, b.top, "read -P 0xc7 "+strconv.FormatInt(tt.size-4096, 10)+" 4k", "read -P 0x5a 0 3k")
		})
	}
}

// TestResizeOverBackingRefused: a wrong or missing chain, and a version 2
// image over backing data, are refused with one line and change nothing.
func TestResizeOverBackingRefused(t *testing.T) {
	needQemu(t)
	const m = 1 << 20
	tests := []struct {
		name    string
		topOpts string
		sizes   []int64
		opts    func(b *backedImage, t *testing.T) Options
		wantErr error
		wantMsg string
	}{
		{"chain not declared", "", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			return Options{Path: b.top}
		}, ErrBacking, "not declared"},
		{"another file declared", "", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			other := filepath.Join(t.TempDir(), "other.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", other, "4M")
			return Options{Path: b.top, Backing: []Layer{layerOf(t, other, disk.QCOW2)}}
		}, ErrBacking, "declared backing is"},
		{"wrong format declared", "", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			return Options{Path: b.top, Backing: []Layer{{File: b.chain[0].File, Format: disk.Raw, Path: b.chain[0].Path}}}
		}, ErrBacking, "backing format"},
		{"relative name without the image's path", "", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			return Options{Backing: b.chain}
		}, ErrBacking, "absolute path"},
		{"version 2 over backing data", "compat=0.10", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			return b.opts()
		}, ErrUnsupported, "version 2"},
		{"data file declared", "", []int64{4 * m}, func(b *backedImage, t *testing.T) Options {
			o := b.opts()
			o.DataFile = &Layer{File: b.chain[0].File, Format: disk.Raw, Path: b.chain[0].Path}
			return o
		}, ErrUnsupported, "data file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := makeBacked(t, tt.topOpts, m, []string{"qcow2"}, tt.sizes)
			if tt.name == "relative name without the image's path" {
				// Record the backing file's name relative to the top.
				sh(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", filepath.Base(b.files[0]), "-F", "qcow2", b.top)
			}
			before, err := os.ReadFile(b.top)
			if err != nil {
				t.Fatal(err)
			}
			f := openFile(t, b.top, false)
			err = Resize(f, 8*m, tt.opts(b, t))
			f.Close()
			if err == nil {
				t.Fatal("Resize succeeded")
			}
			if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.wantMsg) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q: want one line (%v) saying %q", err, tt.wantErr, tt.wantMsg)
			}
			if after, _ := os.ReadFile(b.top); !bytes.Equal(before, after) {
				t.Fatalf("the refused resize changed the image (first difference at %d)", firstDiff(before, after))
			}
		})
	}
	// A chain declared for an image that has none.
	p := plain(t)
	base := filepath.Join(t.TempDir(), "base.raw")
	if err := os.WriteFile(base, make([]byte, 4*m), 0o644); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(p)
	f := openFile(t, p, false)
	err := Resize(f, 8*m, Options{Path: p, Backing: []Layer{layerOf(t, base, disk.Raw)}})
	f.Close()
	if !errors.Is(err, ErrBacking) || !strings.Contains(err.Error(), "has no backing file") {
		t.Fatalf("a chain declared for an image without one: %v", err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Fatal("the refused resize changed the image")
	}
}

// TestResizeOverBackingCrash stops a resize over a backing file before
// each of its durable steps: the image left behind, once opened
// read-write (here or by QEMU), is clean, of the old size with the old
// content (the zeroing happens beyond the old size), and the resize can
// be run again.
func TestResizeOverBackingCrash(t *testing.T) {
	needQemu(t)
	const m = 1 << 20
	errCrash := errors.New("crash")
	tests := []struct {
		name, topOpts string
		old, size     int64
		steps         []string
	}{
		{"in place", "cluster_size=512", m + 1536, 2 * m, []string{"l1", "zero", "size"}},
		{"L1 moves", "cluster_size=512", m, 64 * m, []string{"table", "dirty", "header", "repair", "zero", "size"}},
	}
	for _, tt := range tests {
		for _, step := range tt.steps {
			for _, opener := range []string{"krun", "qemu"} {
				t.Run(tt.name+"/"+step+"/"+opener, func(t *testing.T) {
					b := makeBacked(t, tt.topOpts, tt.old, []string{"qcow2"}, []int64{32 * m})
					before := qemuRaw(t, b.top)
					f := openFile(t, b.top, false)
					seen := false
					err := resizeWith(f, tt.size, b.opts(), func(s string) error {
						if s == step {
							seen = true
							return errCrash
						}
						return nil
					})
					f.Close()
					if !seen || !errors.Is(err, errCrash) {
						t.Fatalf("resize stopped with %v, want the crash at %s", err, step)
					}
					if opener == "krun" {
						chain := []Layer{layerOf(t, b.chain[0].Path, disk.QCOW2)}
						im := openImage(t, b.top, false, chain...) // repairs a dirty image
						if err := im.Close(); err != nil {
							t.Fatal(err)
						}
					} else {
						qio(t, b.top, "read 0 512") // QEMU repairs on a read-write open
					}
					qemuClean(t, b.top)
					if got := qemuSize(t, b.top); got != tt.old {
						t.Fatalf("virtual size %d after the crash at %s, want %d", got, step, tt.old)
					}
					if got := qemuRaw(t, b.top); !bytes.Equal(got, before) {
						t.Fatalf("content after the crash at %s differs at %d", step, firstDiff(got, before))
					}
					f = openFile(t, b.top, false)
					err = Resize(f, tt.size, b.opts())
					f.Close()
					if err != nil {
						t.Fatalf("Resize after the crash: %v", err)
					}
					checkBackedResized(t, b, before, tt.size)
				})
			}
		}
	}
}

// qcow2With creates a qcow2 image of size with qemu-img create -o opts.
func qcow2With(t *testing.T, opts, size string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	sh(t, "qemu-img", append(args, p, size)...)
	return p
}

// growsToZeros grows the image at p (no backing file) to size and checks
// that QEMU finds it clean and QEMU and this package read its old content
// followed by zeros.
func growsToZeros(t *testing.T, p string, size int64) {
	t.Helper()
	before := qemuRaw(t, p)
	f := openFile(t, p, false)
	err := Resize(f, size, Options{Path: p})
	f.Close()
	if err != nil {
		t.Fatalf("Resize: %v", err)
	}
	qemuClean(t, p)
	want := make([]byte, size)
	copy(want, before)
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		i := firstDiff(got, want)
		t.Fatalf("QEMU reads the grown image differently at %d (old size %d): %#x, want %#x", i, len(before), got[i], want[i])
	}
	im := openImage(t, p, true)
	defer im.Close()
	got := make([]byte, size)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("this package reads the grown image differently: %v, at %d", err, firstDiff(got, want))
	}
}

// TestResizeStaleTail: QEMU shrinks a qcow2 image without zeroing the
// part of its new last cluster beyond the new end; growing it again must
// not bring those bytes back.
func TestResizeStaleTail(t *testing.T) {
	needQemu(t)
	for _, opts := range []string{"", "compat=0.10", "cluster_size=16384,extended_l2=on"} {
		t.Run("opts="+opts, func(t *testing.T) {
			p := qcow2With(t, opts, "2M")
			qio(t, p, "write -P 0x77 0 2M")
			sh(t, "qemu-img", "resize", "-q", "-f", "qcow2", "--shrink", p, strconv.Itoa(1<<20+1536))
			growsToZeros(t, p, 8<<20)
		})
	}
}

// TestResizeMappedBeyondSize: an image whose L2 tables map clusters beyond
// its virtual size (QEMU never leaves one, a hostile image may; Check
// finds nothing wrong) grows with those clusters zeroed, not shown (from
// review).
func TestResizeMappedBeyondSize(t *testing.T) {
	needQemu(t)
	for _, opts := range []string{"", "compat=0.10", "cluster_size=16384,extended_l2=on"} {
		t.Run("opts="+opts, func(t *testing.T) {
			p := qcow2With(t, opts, "2M")
			qio(t, p, "write -P 0x5a 0 64k", "write -P 0x77 1M 64k")
			f := openFile(t, p, false)
			var b [8]byte
			be.PutUint64(b[:], 1<<20)
			if _, err := f.WriteAt(b[:], hdrSizeOff); err != nil {
				t.Fatal(err)
			}
			res, err := Check(f, RepairNone)
			f.Close()
			if err != nil || res.Corruptions+res.CheckErrors != 0 {
				t.Fatalf("Check of the patched image: %+v %v", res, err)
			}
			growsToZeros(t, p, 2<<20)
		})
	}
}
