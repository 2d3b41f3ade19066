package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk"
)

func patch(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func patch32(t testing.TB, path string, off int64, v uint32) {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	patch(t, path, off, b[:])
}

func patch64(t testing.TB, path string, off int64, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	patch(t, path, off, b[:])
}

func read64(t testing.TB, path string, off int64) uint64 {
	t.Helper()
	f := openFile(t, path, true)
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

// layout describes where qemu-img put things in the base image.
type layout struct {
	cs, l1, rt, l2, rb, data int64
}

// baseImage creates a 1 GiB image with 64 KiB clusters: guest clusters 0
// and 1 hold 0x11, cluster 2 holds 0x22, and 64 KiB at 600 MiB (under the
// second L1 entry) hold 0x33. It returns its layout.
func baseImage(t testing.TB, dir string, opts string) (string, layout) {
	t.Helper()
	p := filepath.Join(dir, "img.qcow2")
	o := "cluster_size=65536"
	if opts != "" {
		o += "," + opts
	}
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", o, p, "1G")
	qio(t, p, "write -P 0x11 0 128k", "write -P 0x22 128k 64k", "write -P 0x33 600M 64k")
	l := readLayout(t, p)
	l.l2 = int64(read64(t, p, l.l1) & l1OffsetMask)
	l.data = int64(read64(t, p, l.l2) & l2OffsetMask)
	return p, l
}

// TestMalformedHeaderRefused damages header fields and tables; Open must
// refuse each image with a one-line error.
func TestMalformedHeaderRefused(t *testing.T) {
	needQemu(t)
	big := uint64(1) << 62
	cases := []struct {
		name   string
		mutate func(t *testing.T, p string, l layout)
		want   string
	}{
		{"bad magic", func(t *testing.T, p string, l layout) { patch32(t, p, 0, 0x12345678) }, "bad magic"},
		{"version 1", func(t *testing.T, p string, l layout) { patch32(t, p, 4, 1) }, "version 1"},
		{"version 4", func(t *testing.T, p string, l layout) { patch32(t, p, 4, 4) }, "version 4"},
		{"cluster bits 8", func(t *testing.T, p string, l layout) { patch32(t, p, 20, 8) }, "cluster_bits 8"},
		{"cluster bits 22", func(t *testing.T, p string, l layout) { patch32(t, p, 20, 22) }, "cluster_bits 22"},
		{"cluster bits huge", func(t *testing.T, p string, l layout) { patch32(t, p, 20, 0xffffffff) }, "cluster_bits"},
		{"header length short", func(t *testing.T, p string, l layout) { patch32(t, p, 100, 96) }, "header_length"},
		{"header length odd", func(t *testing.T, p string, l layout) { patch32(t, p, 100, 105) }, "header_length"},
		{"header length huge", func(t *testing.T, p string, l layout) { patch32(t, p, 100, 1<<20) }, "header_length"},
		{"refcount order 7", func(t *testing.T, p string, l layout) { patch32(t, p, 96, 7) }, "refcount_order"},
		{"l1 size huge", func(t *testing.T, p string, l layout) { patch32(t, p, 36, 0xffffffff) }, "L1 table has"},
		{"l1 size too small", func(t *testing.T, p string, l layout) { patch64(t, p, 24, 1<<40) }, "needs"},
		{"virtual size 2^63", func(t *testing.T, p string, l layout) { patch64(t, p, 24, 1<<63) }, "virtual size"},
		{"l1 unaligned", func(t *testing.T, p string, l layout) { patch64(t, p, 40, uint64(l.l1)+512) }, "not aligned"},
		{"l1 past eof", func(t *testing.T, p string, l layout) { patch64(t, p, 40, 1<<40) }, "outside the file"},
		{"l1 offset huge", func(t *testing.T, p string, l layout) { patch64(t, p, 40, big) }, "outside the file"},
		{"l1 at header", func(t *testing.T, p string, l layout) { patch64(t, p, 40, 0) }, "overlaps the header"},
		{"reftable unaligned", func(t *testing.T, p string, l layout) { patch64(t, p, 48, uint64(l.rt)+8) }, "not aligned"},
		{"reftable past eof", func(t *testing.T, p string, l layout) { patch64(t, p, 48, 1<<30) }, "outside the file"},
		{"reftable empty", func(t *testing.T, p string, l layout) { patch32(t, p, 56, 0) }, "refcount table is empty"},
		{"reftable huge", func(t *testing.T, p string, l layout) { patch32(t, p, 56, 0xffffffff) }, "limit"},
		{"too many snapshots", func(t *testing.T, p string, l layout) { patch32(t, p, 60, 65537) }, "snapshots"},
		{"snapshot table past eof", func(t *testing.T, p string, l layout) {
			patch32(t, p, 60, 1)
			patch64(t, p, 64, 1<<30)
		}, "outside the file"},
		{"snapshot table truncated", func(t *testing.T, p string, l layout) {
			patch32(t, p, 60, 3)
			patch64(t, p, 64, uint64(l.data))
		}, "snapshot"},
		{"unknown incompatible bit", func(t *testing.T, p string, l layout) { patch64(t, p, 72, 1<<5) }, "unknown incompatible feature(s): bit 5"},
		{"unknown incompatible bit 63", func(t *testing.T, p string, l layout) { patch64(t, p, 72, 1<<63) }, "bit 63"},
		{"compression bit without type", func(t *testing.T, p string, l layout) { patch64(t, p, 72, incompatCompression) }, "compression"},
		{"unknown compression type", func(t *testing.T, p string, l layout) {
			patch64(t, p, 72, incompatCompression)
			patch(t, p, 104, []byte{7})
		}, "compression type 7"},
		{"compression type without bit", func(t *testing.T, p string, l layout) { patch(t, p, 104, []byte{1}) }, "compression_type 1"},
		{"extended l2 small clusters", func(t *testing.T, p string, l layout) {
			patch64(t, p, 72, incompatExtendedL2)
			patch32(t, p, 20, 12)
		}, "extended L2"},
		{"backing name outside cluster", func(t *testing.T, p string, l layout) {
			patch64(t, p, 8, uint64(l.cs)-4)
			patch32(t, p, 16, 100)
		}, "outside the first cluster"},
		{"backing name too long", func(t *testing.T, p string, l layout) {
			patch64(t, p, 8, 4096)
			patch32(t, p, 16, 2000)
		}, "limit 1023"},
		{"extension overruns", func(t *testing.T, p string, l layout) {
			patch32(t, p, 112, 0x12345678)
			patch32(t, p, 116, 0xfffffff0)
		}, "runs past"},
		{"encrypted", func(t *testing.T, p string, l layout) { patch32(t, p, 32, 1) }, "encrypted"},
		{"data file bit undeclared", func(t *testing.T, p string, l layout) { patch64(t, p, 72, incompatDataFile) }, "external data file"},
		{"raw data bit without data file", func(t *testing.T, p string, l layout) { patch64(t, p, 88, autoclearDataFileRaw) }, "raw external data"},
		{"truncated file", func(t *testing.T, p string, l layout) {
			if err := os.Truncate(p, 50); err != nil {
				t.Fatal(err)
			}
		}, "too small"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, l := baseImage(t, t.TempDir(), "")
			c.mutate(t, p, l)
			for _, ro := range []bool{true, false} {
				f := openFile(t, p, ro)
				im, err := Open(f, Options{ReadOnly: ro, Path: p})
				if err == nil {
					im.Close()
					t.Fatalf("Open(ro=%v) succeeded, want error containing %q", ro, c.want)
				}
				f.Close()
				msg := err.Error()
				if !strings.Contains(msg, c.want) || strings.Contains(msg, "\n") {
					t.Fatalf("Open(ro=%v) error %q, want one line containing %q", ro, msg, c.want)
				}
			}
		})
	}
}

func TestUnknownIncompatibleFeatureNamed(t *testing.T) {
	needQemu(t)
	p, _ := baseImage(t, t.TempDir(), "")
	// qemu-img writes a feature name table; rename the extended L2 entry's
	// bit to 9 and set bit 9.
	f := openFile(t, p, true)
	info, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	var ext Extension
	for _, e := range info.Extensions {
		if e.Type == extFeatureTable {
			ext = e
		}
	}
	if ext.Length == 0 {
		t.Fatal("no feature name table")
	}
	entry := make([]byte, 48)
	entry[0], entry[1] = 0, 9
	copy(entry[2:], "frobnication")
	patch(t, p, ext.Offset, entry)
	patch64(t, p, 72, 1<<9)
	_, err = Open(openFile(t, p, true), Options{ReadOnly: true, Path: p})
	if err == nil || !strings.Contains(err.Error(), `"frobnication" (bit 9)`) || !errors.Is(err, ErrUnsupported) {
		t.Fatalf("err = %v", err)
	}
}

func TestCorruptBitReadOnlyOnly(t *testing.T) {
	needQemu(t)
	p, _ := baseImage(t, t.TempDir(), "")
	patch64(t, p, 72, incompatCorrupt)
	if _, err := Open(openFile(t, p, false), Options{Path: p}); err == nil || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("rw open of corrupt image: %v", err)
	}
	im := openImage(t, p, true)
	defer im.Close()
	buf := make([]byte, 4096)
	if _, err := im.ReadAt(buf, 0); err != nil || buf[0] != 0x11 {
		t.Fatalf("read: %v %x", err, buf[0])
	}
	if !im.Info().Corrupt {
		t.Fatal("Info().Corrupt not set")
	}
}

// protected returns the bytes of the header cluster (minus the incompatible
// features field), the L1 table and the refcount table.
func protected(t testing.TB, p string, l layout) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	hdr := append([]byte(nil), b[:l.cs]...)
	clear(hdr[72:80])
	out = append(out, hdr...)
	out = append(out, b[l.l1:l.l1+l.cs]...)
	out = append(out, b[l.rt:l.rt+l.cs]...)
	return out
}

// TestRuntimeCorruption damages tables that Open does not read; the
// affected requests fail with ErrCorrupt, others keep working, a writable
// image gets the corrupt bit, and nothing outside the image's data
// clusters is written.
func TestRuntimeCorruption(t *testing.T) {
	needQemu(t)
	cases := []struct {
		name   string
		mutate func(t *testing.T, p string, l layout)
		// bad is a guest offset whose reads fail; writes there fail too
		// unless writeOK.
		bad     int64
		writeOK bool
	}{
		{"l2 entry unaligned", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|uint64(l.data)+512)
		}, 0, false},
		{"l2 entry reserved bits", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|1<<58|uint64(l.data))
		}, 0, false},
		{"l2 entry points at L1 table", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|uint64(l.l1))
		}, -1, false},
		{"l2 entry points at refcount table", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|uint64(l.rt))
		}, -1, false},
		{"l2 entry points at header", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|512) // inside the header cluster, unaligned
		}, 0, false},
		{"l2 entry points past eof", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|1<<40)
		}, -1, false},
		{"l1 entry past eof", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, flagCopied|1<<40)
		}, 0, false},
		{"l1 entry reserved bits", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, flagCopied|1<<57|uint64(l.l2))
		}, 0, false},
		{"l1 entry points at refcount block", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l1, flagCopied|uint64(l.rb))
		}, 0, false},
		{"compressed past eof", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCompressed|1<<45)
		}, 0, true},
		{"compressed garbage", func(t *testing.T, p string, l layout) {
			// Point a compressed descriptor at the L2 table's own bytes.
			patch64(t, p, l.l2, flagCompressed|uint64(3)<<54|uint64(l.data)+100)
			patch(t, p, l.data+100, bytes.Repeat([]byte{0xff}, 2048))
		}, 0, true},
		{"compressed with copied flag", func(t *testing.T, p string, l layout) {
			patch64(t, p, l.l2, flagCopied|flagCompressed|uint64(l.data))
		}, 0, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, l := baseImage(t, t.TempDir(), "")
			c.mutate(t, p, l)
			before := protected(t, p, l)
			im := openImage(t, p, false)
			buf := make([]byte, 4096)
			if c.bad >= 0 {
				if _, err := im.ReadAt(buf, c.bad); !errors.Is(err, ErrCorrupt) {
					t.Fatalf("read of damaged cluster: %v, want ErrCorrupt", err)
				}
			}
			// Other clusters keep working.
			if _, err := im.ReadAt(buf, 600<<20); err != nil || buf[0] != 0x33 {
				t.Fatalf("read of good cluster: %v %x", err, buf[0])
			}
			// Writes to the damaged cluster fail, and never land on
			// metadata.
			_, werr := im.WriteAt(bytes.Repeat([]byte{0xee}, 4096), 0)
			if werr == nil && !c.writeOK {
				t.Fatalf("write to damaged cluster succeeded")
			}
			if werr != nil && !errors.Is(werr, ErrCorrupt) {
				t.Fatalf("write error %v, want ErrCorrupt", werr)
			}
			if _, err := im.ReadAt(buf, 600<<20); err != nil || buf[0] != 0x33 {
				t.Fatalf("read of good cluster after the failure: %v %x", err, buf[0])
			}
			im.Close()
			if after := protected(t, p, l); !bytes.Equal(before, after) {
				t.Fatalf("metadata changed at byte %d", firstDiff(before, after))
			}
			f := openFile(t, p, true)
			info, err := ReadInfo(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if werr != nil && !info.Corrupt {
				t.Fatal("corrupt bit not set")
			}
		})
	}
}

func TestBackingPolicy(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	rawSource(t, base, 1<<20, 1)
	top := filepath.Join(dir, "top.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "2M")
	other := filepath.Join(dir, "other.raw")
	rawSource(t, other, 1<<20, 2)

	evil := filepath.Join(dir, "evil.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", evil, "2M")
	// An image without the backing format extension (renamed to an
	// unknown extension type).
	noFmt := filepath.Join(dir, "nofmt.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", noFmt, "2M")
	f := openFile(t, noFmt, true)
	info, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range info.Extensions {
		if e.Type == extBackingFormat {
			patch32(t, noFmt, e.Offset-8, 0x7e57ab1e)
		}
	}

	cases := []struct {
		name  string
		image string
		path  string // Options.Path
		chain []chainEntry
		want  string // "" = success
	}{
		{"declared", top, top, []chainEntry{{base, disk.Raw}}, ""},
		{"undeclared shadow", evil, evil, nil, fmt.Sprintf(`image %s names backing file "/etc/shadow", which was not declared (add backing=...)`, evil)},
		{"shadow vs other", evil, evil, []chainEntry{{other, disk.Raw}}, "but the declared backing is " + other},
		{"undeclared", top, top, nil, `names backing file "base.raw", which was not declared`},
		{"wrong file", top, top, []chainEntry{{other, disk.Raw}}, "but the declared backing is"},
		{"wrong format", top, top, []chainEntry{{base, disk.QCOW2}}, `records backing format "raw"`},
		{"relative needs path", top, "", []chainEntry{{base, disk.Raw}}, "absolute path"},
		{"lexically cleaned", top, top, []chainEntry{{filepath.Join(dir, "x", "..", "base.raw"), disk.Raw}}, ""},
		{"no recorded format", noFmt, noFmt, []chainEntry{{base, disk.Raw}}, ""},
		{"extra layers", top, top, []chainEntry{{base, disk.Raw}, {other, disk.Raw}}, "raw backing"},
		{"declared without backing", base + ".q", base + ".q", nil, ""},
	}
	noBacking := base + ".q"
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", noBacking, "1M")
	cases = append(cases, struct {
		name  string
		image string
		path  string
		chain []chainEntry
		want  string
	}{"declared but none recorded", noBacking, noBacking, []chainEntry{{base, disk.Raw}}, "has no backing file, but backing="})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var layers []Layer
			for _, e := range c.chain {
				l := layerOf(t, filepath.Clean(e.path), e.format)
				l.Path = filepath.Clean(e.path)
				layers = append(layers, l)
			}
			im, err := Open(openFile(t, c.image, true), Options{ReadOnly: true, Path: c.path, Backing: layers})
			if c.want == "" {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				im.Close()
				return
			}
			if err == nil {
				im.Close()
				t.Fatalf("Open succeeded, want %q", c.want)
			}
			if !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrBacking) {
				t.Fatalf("error %q, want %q", err, c.want)
			}
		})
	}
}

func TestBackingLoopAndDepth(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	b := filepath.Join(dir, "b.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", a, "1M")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b, "1M")
	// Make a name b and b name itself: a loop of one.
	sh(t, "qemu-img", "rebase", "-u", "-b", b, "-F", "qcow2", a)
	_, err := Open(openFile(t, b, true), Options{ReadOnly: true, Path: b, Backing: []Layer{
		layerOf(t, a, disk.QCOW2), layerOf(t, b, disk.QCOW2)}})
	if err == nil || !strings.Contains(err.Error(), "loops") {
		t.Fatalf("loop: %v", err)
	}
	// The same file under another name is a loop too.
	link := filepath.Join(dir, "link.qcow2")
	if err := os.Symlink(b, link); err != nil {
		t.Fatal(err)
	}
	sh(t, "qemu-img", "rebase", "-u", "-b", link, "-F", "qcow2", a)
	_, err = Open(openFile(t, b, true), Options{ReadOnly: true, Path: b, Backing: []Layer{
		layerOf(t, a, disk.QCOW2), layerOf(t, link, disk.QCOW2)}})
	if err == nil || !strings.Contains(err.Error(), "loops") {
		t.Fatalf("loop through a link: %v", err)
	}

	// A chain deeper than MaxChainDepth.
	prev := filepath.Join(dir, "c0.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", prev, "1M")
	chain := []Layer{}
	paths := []string{prev}
	for i := 1; i <= MaxChainDepth+1; i++ {
		p := filepath.Join(dir, fmt.Sprintf("c%d.qcow2", i))
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F", "qcow2", p, "1M")
		paths = append(paths, p)
		prev = p
	}
	for i := len(paths) - 2; i >= 0; i-- {
		chain = append(chain, layerOf(t, paths[i], disk.QCOW2))
	}
	_, err = Open(openFile(t, prev, true), Options{ReadOnly: true, Path: prev, Backing: chain})
	if err == nil || !strings.Contains(err.Error(), "deeper than") {
		t.Fatalf("deep chain: %v", err)
	}
	// MaxChainDepth layers are fine.
	top := paths[MaxChainDepth]
	im, err := Open(openFile(t, top, true), Options{ReadOnly: true, Path: top, Backing: chain[1:]})
	if err != nil {
		t.Fatalf("chain of %d: %v", MaxChainDepth, err)
	}
	im.Close()
}

// TestHeaderOnReadWriteOpen: a read-write open clears unknown autoclear
// bits (and the bitmaps bit when there is no bitmaps extension), keeps
// unknown header extensions, and leaves a read-only open's file untouched.
func TestHeaderOnReadWriteOpen(t *testing.T) {
	needQemu(t)
	p, _ := baseImage(t, t.TempDir(), "")
	f := openFile(t, p, true)
	info, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	var unknown Extension
	for _, e := range info.Extensions {
		if e.Type == extFeatureTable {
			unknown = e
			patch32(t, p, e.Offset-8, 0x0badcafe) // now an unknown extension
		}
	}
	patch64(t, p, 88, 1<<7|autoclearBitmaps)
	before, _ := os.ReadFile(p)
	im := openImage(t, p, true)
	im.Close()
	if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
		t.Fatal("read-only open changed the file")
	}
	im = openImage(t, p, false)
	if _, err := im.WriteAt(bytes.Repeat([]byte{1}, 5000), 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f = openFile(t, p, true)
	info, err = ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if info.AutoclearFeatures != 0 {
		t.Fatalf("autoclear bits %#x left set", info.AutoclearFeatures)
	}
	found := false
	for _, e := range info.Extensions {
		if e.Type == 0x0badcafe && e.Length == unknown.Length && e.Offset == unknown.Offset {
			found = true
		}
	}
	if !found {
		t.Fatalf("unknown extension lost: %+v", info.Extensions)
	}
	qemuClean(t, p)
}

// readLayout reads where the image at p keeps its L1 table, its refcount
// table and its first refcount block.
func readLayout(t testing.TB, p string) layout {
	t.Helper()
	f := openFile(t, p, true)
	info, err := ReadInfo(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	l := layout{cs: info.ClusterSize, l1: info.L1TableOffset, rt: info.RefcountTableOffset}
	l.rb = int64(read64(t, p, l.rt) & rtOffsetMask)
	return l
}
