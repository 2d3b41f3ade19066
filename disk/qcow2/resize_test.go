package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// resizeImage makes a qcow2 image with qemu-img, writes a pattern at its
// start and just below its end with qemu-io, and returns its path and
// virtual content.
func resizeImage(t *testing.T, opts string, size int64) (string, []byte) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	sh(t, "qemu-img", append(args, p, strconv.FormatInt(size, 10))...)
	qio(t, p, "write -P 0x5a 0 3k", "write -P 0x33 "+strconv.FormatInt(size-4096, 10)+" 4k")
	return p, qemuRaw(t, p)
}

func headerL1(t *testing.T, p string) (off uint64, n uint32) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return be.Uint64(b[hdrL1OffsetOff:]), be.Uint32(b[hdrL1SizeOff:])
}

// qemuSize is the virtual size qemu-img info reports.
func qemuSize(t *testing.T, p string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	out := sh(t, "qemu-img", "info", "--output=json", "-f", "qcow2", p)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info: %v: %s", err, out)
	}
	return info.VirtualSize
}

// checkResized checks a resized image: QEMU finds it clean and of the new
// size, the old content reads back, the new area reads as zeros (at its
// start, middle and end: a resized image may be far larger than memory),
// and a write into the new area lands where QEMU reads it.
func checkResized(t *testing.T, p string, before []byte, size int64) {
	t.Helper()
	qemuClean(t, p)
	if got := qemuSize(t, p); got != size {
		t.Fatalf("qemu-img info: virtual size %d, want %d", got, size)
	}
	f := openFile(t, p, true)
	res, err := Check(f, RepairNone)
	f.Close()
	if err != nil || !res.Clean() || res.Leaks != 0 {
		t.Fatalf("Check after resize: %+v %v", res, err)
	}
	old := int64(len(before))
	const win = 64 << 10
	samples := []int64{old, old + (size-old)/2, size - win}
	im := openImage(t, p, true)
	got := make([]byte, old)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, before) {
		t.Fatalf("old content after the resize: %v, first difference at %d", err, firstDiff(got, before))
	}
	zero := make([]byte, win)
	for _, off := range samples {
		n := min(win, size-off)
		if _, err := im.ReadAt(got[:n], off); err != nil || !bytes.Equal(got[:n], zero[:n]) {
			t.Fatalf("new area at %d: %v, not zeros", off, err)
		}
	}
	im.Close()
	cmds := []string{"read -P 0x5a 0 3k", "read -P 0x33 " + strconv.FormatInt(old-4096, 10) + " 4k"}
	for _, off := range samples {
		cmds = append(cmds, "read -P 0 "+strconv.FormatInt(off, 10)+" "+strconv.FormatInt(min(win, size-off), 10))
	}
	qio(t, p, cmds...)
	im = openImage(t, p, false)
	tail := bytes.Repeat([]byte{0xc7}, 4096)
	if _, err := im.WriteAt(tail, size-4096); err != nil {
		t.Fatalf("write into the new area: %v", err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	qemuClean(t, p)
	qio(t, p, "read -P 0xc7 "+strconv.FormatInt(size-4096, 10)+" 4k", "read -P 0x5a 0 3k")
}

func TestResizeGrows(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name      string
		opts      string
		old, size int64
		moved     bool // the L1 table must move
		junkTail  bool // bytes after the L1 table in its last cluster are not zero
	}{
		{"header only", "", 1 << 20, 100 << 20, false, false},
		{"L1 grows in its cluster", "cluster_size=512", 1 << 20, 2 << 20, false, false},
		{"L1 moves", "cluster_size=512", 1 << 20, 64 << 20, true, false},
		{"L1 moves, refcounts grow", "cluster_size=512,refcount_bits=64", 1 << 20, 1 << 30, true, false},
		// From review: the new table lies past what the refcount table
		// covers; the repair indexed past the table and panicked.
		{"L1 moves past the refcount table", "cluster_size=512", 1 << 20, 100 << 30, true, false},
		{"version 2, in place", "cluster_size=512,compat=0.10", 1 << 20, 2 << 20, false, false},
		{"extended L2, L1 moves", "cluster_size=16384,extended_l2=on", 1 << 20, 64 << 30, true, false},
		{"unaligned old size", "cluster_size=4096", 1<<20 + 512*3, 8 << 20, false, false},
		// Room in the L1 table's cluster that is not zero is not taken
		// for entries: the table moves.
		{"junk after the L1 table", "cluster_size=512", 1 << 20, 2 << 20, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, before := resizeImage(t, tt.opts, tt.old)
			off0, n0 := headerL1(t, p)
			f := openFile(t, p, false)
			if tt.junkTail {
				if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, 8), int64(off0)+int64(n0)*8); err != nil {
					t.Fatal(err)
				}
			}
			if err := Resize(f, tt.size, Options{}); err != nil {
				t.Fatalf("Resize: %v", err)
			}
			f.Close()
			off, n := headerL1(t, p)
			if moved := off != off0; moved != tt.moved {
				t.Fatalf("L1 table at %#x (%d entries), was %#x (%d): moved %v, want %v", off, n, off0, n0, moved, tt.moved)
			}
			checkResized(t, p, before, tt.size)
		})
	}
}

// TestResizeFreshImage grows images straight from qemu-img create, whose
// file ends after the L1 table's entries rather than at the end of its
// cluster (from review: the grown table ran past the end of the file,
// and Open and Check refused the image).
func TestResizeFreshImage(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name, opts string
		size       int64
	}{
		{"64K clusters", "", 10 << 30},
		{"version 2", "compat=0.10", 10 << 30},
		{"512-byte clusters, in place", "cluster_size=512", 2 << 20},
		{"512-byte clusters, L1 moves", "cluster_size=512", 64 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if tt.opts != "" {
				args = append(args, "-o", tt.opts)
			}
			sh(t, "qemu-img", append(args, p, "1M")...)
			f := openFile(t, p, false)
			err := Resize(f, tt.size, Options{})
			f.Close()
			if err != nil {
				t.Fatalf("Resize: %v", err)
			}
			f = openFile(t, p, true)
			res, err := Check(f, RepairNone)
			f.Close()
			if err != nil || !res.Clean() || res.Leaks != 0 {
				t.Fatalf("Check after growing a fresh image: %+v, %v", res, err)
			}
			qemuClean(t, p)
			if got := qemuSize(t, p); got != tt.size {
				t.Fatalf("qemu-img info: virtual size %d, want %d", got, tt.size)
			}
			im := openImage(t, p, false)
			if got := im.Size(); got != tt.size {
				t.Fatalf("size %d, want %d", got, tt.size)
			}
			b := bytes.Repeat([]byte{0x77}, 4096)
			if _, err := im.WriteAt(b, tt.size-4096); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			qemuClean(t, p)
			qio(t, p, "read -P 0x77 "+strconv.FormatInt(tt.size-4096, 10)+" 4k", "read -P 0 0 64k")
		})
	}
}

// TestResizeBlockDevice: on a block device there is no room after the
// end for a new L1 table, so a resize that needs one is refused before
// anything is written (from review: the dirty bit was set, then the
// table's write failed with ENOSPC).
func TestResizeBlockDevice(t *testing.T) {
	needQemu(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not installed (Debian package mount)")
	}
	p := filepath.Join(t.TempDir(), "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1M")
	qio(t, p, "write -P 0x5a 0 64k")
	if err := os.Truncate(p, 4<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", p).CombinedOutput()
	if err != nil {
		t.Skipf("no loop device here: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	f := openFile(t, dev, false)
	err = Resize(f, 64<<20, Options{})
	f.Close()
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "block device") {
		t.Fatalf("Resize on a block device: %v, want a refusal naming the block device", err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Fatalf("the refused resize changed the image (first difference at %d)", firstDiff(before, after))
	}
	// Growing within the L1 table's cluster works there too.
	f = openFile(t, dev, false)
	err = Resize(f, 2<<20, Options{})
	f.Close()
	if err != nil {
		t.Fatalf("Resize within the L1 table on a block device: %v", err)
	}
	qemuClean(t, dev)
}

func TestResizeSameSizeIsNoOp(t *testing.T) {
	needQemu(t)
	p, _ := resizeImage(t, "", 1<<20)
	before, _ := os.ReadFile(p)
	f := openFile(t, p, false)
	defer f.Close()
	if err := Resize(f, 1<<20, Options{}); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Fatal("a resize to the same size changed the file")
	}
}

// TestResizeRefused: what Resize refuses, it refuses with one line and
// leaves the file as it was.
func TestResizeRefused(t *testing.T) {
	needQemu(t)
	tests := []struct {
		name    string
		setup   func(t *testing.T) string
		size    int64
		wantErr error
		wantMsg string
	}{
		{"shrink", plain, 512 << 10, ErrShrink, "not supported"},
		{"not a multiple of 512", plain, 2<<20 + 100, nil, "multiple of 512"},
		{"zero", plain, 0, nil, "multiple of 512"},
		{"internal snapshot", func(t *testing.T) string {
			p := plain(t)
			sh(t, "qemu-img", "snapshot", "-c", "s1", p)
			return p
		}, 2 << 20, ErrUnsupported, "internal snapshots"},
		{"bitmap", func(t *testing.T) string {
			p := plain(t)
			sh(t, "qemu-img", "bitmap", "--add", p, "b0")
			return p
		}, 2 << 20, ErrUnsupported, "bitmaps"},
		{"backing file", func(t *testing.T) string {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
			p := filepath.Join(dir, "top.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", p, "1M")
			return p
		}, 2 << 20, ErrBacking, "not declared"},
		{"external data file", func(t *testing.T) string {
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), p, "1M")
			return p
		}, 2 << 20, ErrUnsupported, "external data file"},
		// A dirty image is repaired, then resized, as qemu-img does
		// (TestResizeRerunAfterInterruptedResize).
		{"marked corrupt", func(t *testing.T) string {
			p := plain(t)
			setIncompat(t, p, incompatCorrupt)
			return p
		}, 2 << 20, ErrCorrupt, "marked corrupt"},
		{"refcount corruption", func(t *testing.T) string {
			p := plain(t)
			// Zero the refcount block: every cluster in use then has
			// refcount 0.
			b, _ := os.ReadFile(p)
			rt := be.Uint64(b[hdrRefTableOff:])
			rb := be.Uint64(b[rt:])
			f := openFile(t, p, false)
			f.WriteAt(make([]byte, 512), int64(rb))
			f.Close()
			return p
		}, 2 << 20, ErrCorrupt, "errors found"},
		{"L1 over its limit", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1M")
			return p
		}, 256 << 30, nil, "L1 table"},
		{"version 2 whose L1 must move", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", p, "1M")
			return p
		}, 64 << 20, ErrUnsupported, "version 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.setup(t)
			before, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			f := openFile(t, p, false)
			err = Resize(f, tt.size, Options{})
			f.Close()
			if err == nil {
				t.Fatal("Resize succeeded")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error %q is not %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q: want one line saying %q", err, tt.wantMsg)
			}
			if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
				t.Errorf("the refused resize changed the file (first difference at %d)", firstDiff(before, after))
			}
		})
	}
}

func plain(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
	qio(t, p, "write -P 0x11 0 64k")
	return p
}

func setIncompat(t *testing.T, p string, bit uint64) {
	t.Helper()
	f := openFile(t, p, false)
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], hdrIncompatOff); err != nil {
		t.Fatal(err)
	}
	if err := writeIncompat(f, be.Uint64(b[:])|bit); err != nil {
		t.Fatal(err)
	}
}

// TestResizeCrash stops a resize that moves the L1 table before each of
// its durable steps: the image left behind is untouched (but for bytes
// after its end) or dirty, and a
// read-write open (this package's, or QEMU's) repairs it to a clean image
// of the old or the new size with the old content.
func TestResizeCrash(t *testing.T) {
	needQemu(t)
	const old, size = 1 << 20, 64 << 20
	errCrash := errors.New("crash")
	for _, step := range []string{"table", "dirty", "header", "repair"} {
		for _, opener := range []string{"krun", "qemu"} {
			t.Run(step+"/"+opener, func(t *testing.T) {
				p, before := resizeImage(t, "cluster_size=512", old)
				f := openFile(t, p, false)
				err := resizeWith(f, size, Options{}, func(s string) error {
					if s == step {
						return errCrash
					}
					return nil
				})
				f.Close()
				if !errors.Is(err, errCrash) {
					t.Fatalf("resize stopped with %v, want the crash at %s", err, step)
				}
				wantSize := int64(old)
				if step == "repair" {
					wantSize = size
				}
				if opener == "krun" {
					im := openImage(t, p, false) // repairs a dirty image
					if err := im.Close(); err != nil {
						t.Fatal(err)
					}
				} else {
					qio(t, p, "read 0 512") // QEMU repairs on a read-write open
				}
				qemuClean(t, p)
				if got := qemuSize(t, p); got != wantSize {
					t.Fatalf("virtual size %d after the crash at %s, want %d", got, step, wantSize)
				}
				if b, _ := os.ReadFile(p); be.Uint64(b[hdrIncompatOff:])&incompatDirty != 0 {
					t.Fatal("still dirty after a read-write open")
				}
				want := make([]byte, wantSize)
				copy(want, before)
				if got := qemuRaw(t, p); !bytes.Equal(got, want) {
					t.Fatalf("content after the crash at %s differs at %d", step, firstDiff(got, want))
				}
				// The interrupted resize can be done again.
				f = openFile(t, p, false)
				err = Resize(f, size, Options{})
				f.Close()
				if err != nil {
					t.Fatalf("Resize after the crash: %v", err)
				}
				checkResized(t, p, before, size)
			})
		}
	}
}

// TestResizeFailedRepairRestores: a Resize whose refcount repair fails
// after the header switched to the new L1 table puts the image back,
// byte for byte (from review: a failure left it dirty at the new size).
func TestResizeFailedRepairRestores(t *testing.T) {
	needQemu(t)
	p, _ := resizeImage(t, "cluster_size=512", 1<<20)
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	resizeRepairFault = func() error { return errors.New("injected repair failure") }
	defer func() { resizeRepairFault = nil }()
	f := openFile(t, p, false)
	err = Resize(f, 100<<30, Options{})
	f.Close()
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("Resize: %v, want the injected failure", err)
	}
	after, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatalf("image changed by a failed resize: %d bytes, was %d; first difference at %d", len(after), len(before), firstDiff(after, before))
	}
	qemuClean(t, p)
}
