package img_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// The differential test: images of many shapes made with qemu-img (and
// qemu-io), then every img command run on them and its results compared
// with qemu-img's, the reference. Where the two differ on purpose the
// difference is in docs/IMAGES.md ("Differences from qemu-img") and
// excluded below with a comment naming it.

// diffShape is one image shape: qemu-img create options and size, and
// what is built around the image.
type diffShape struct {
	name     string
	opts     string // qemu-img -o for the image itself
	size     int64  // as given to qemu-img create (rounded up to 512 there)
	compress string // build with qemu-img convert -c, this compression_type
	snapshot bool   // two internal snapshots
	bitmap   bool   // a persistent bitmap
	backing  string // "qcow2" or "raw": a backing file, recorded with -F
	dataFile string // "off" or "on": an external data file, data_file_raw
}

func diffShapes() []diffShape {
	var s []diffShape
	// Every cluster size, with a virtual size that is not a multiple of
	// the cluster (nor of 512, before qemu-img rounds it up).
	for _, cs := range []int64{512, 1024, 4096, 16384, 65536, 262144, 1 << 20, 2 << 20} {
		s = append(s, diffShape{name: fmt.Sprintf("v3-cs%d", cs), opts: fmt.Sprintf("cluster_size=%d", cs), size: 3*cs + 5*cs/2 + 1000001})
	}
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		s = append(s, diffShape{name: fmt.Sprintf("v2-cs%d", cs), opts: fmt.Sprintf("compat=0.10,cluster_size=%d", cs), size: 4*cs + 1000001})
	}
	for _, rb := range []int{1, 2, 4, 8, 16, 32, 64} {
		s = append(s, diffShape{name: fmt.Sprintf("refcount%d", rb), opts: fmt.Sprintf("refcount_bits=%d,cluster_size=1024", rb), size: 3 << 20})
	}
	for _, cs := range []int64{16384, 65536, 2 << 20} {
		s = append(s, diffShape{name: fmt.Sprintf("extl2-cs%d", cs), opts: fmt.Sprintf("extended_l2=on,cluster_size=%d", cs), size: 5*cs + 1536})
	}
	s = append(s,
		diffShape{name: "lazy-refcounts", opts: "lazy_refcounts=on", size: 3 << 20},
		diffShape{name: "prealloc-metadata", opts: "preallocation=metadata,cluster_size=4096", size: 3<<20 + 512},
		diffShape{name: "prealloc-falloc", opts: "preallocation=falloc", size: 3<<20 + 512},
		diffShape{name: "zero-length", size: 0},
		diffShape{name: "one-byte", size: 1},
		diffShape{name: "one-byte-v2", opts: "compat=0.10", size: 1},
		diffShape{name: "snapshots", opts: "cluster_size=4096", size: 3<<20 + 1024, snapshot: true},
		diffShape{name: "snapshots-v2", opts: "compat=0.10,cluster_size=512", size: 1 << 20, snapshot: true},
		diffShape{name: "bitmaps", size: 3 << 20, bitmap: true},
		diffShape{name: "backing-qcow2", opts: "cluster_size=16384", size: 5<<20 + 512, backing: "qcow2"},
		diffShape{name: "backing-raw-extl2", opts: "extended_l2=on", size: 3<<20 + 1536, backing: "raw"},
		diffShape{name: "backing-v2", opts: "compat=0.10,cluster_size=4096", size: 2 << 20, backing: "qcow2"},
		diffShape{name: "data-file", size: 3<<20 + 512, dataFile: "off"},
		diffShape{name: "data-file-raw", opts: "cluster_size=4096", size: 3<<20 + 512, dataFile: "on"},
		diffShape{name: "data-file-extl2", opts: "extended_l2=on", size: 2 << 20, dataFile: "off"},
	)
	for _, ct := range []string{"zlib", "zstd"} {
		for _, cs := range []int64{512, 65536, 2 << 20} {
			s = append(s, diffShape{name: fmt.Sprintf("%s-cs%d", ct, cs), opts: fmt.Sprintf("cluster_size=%d", cs), size: 3<<20 + 512, compress: ct})
		}
	}
	s = append(s, diffShape{name: "zlib-extl2", opts: "extended_l2=on,cluster_size=32768", size: 2<<20 + 512, compress: "zlib"})
	return s
}

// diffOp is one write of the known pattern: bytes of value val (zero
// writes and discards when val is 0, discard set), clipped to the disk.
type diffOp struct {
	off, n  int64
	val     byte
	discard bool
}

func diffOps(cs, vs int64) []diffOp {
	ops := []diffOp{
		{0, 512, 0x11, false},
		{cs - 512, 1024, 0x22, false},
		{2*cs + 100, 3000, 0x33, false},
		{4 * cs, cs, 0, false},
		{3 * cs, cs, 0, true},
		{vs / 2, min(cs, 5000), 0x55, false},
		{vs - 4096, 4096, 0x44, false},
		{vs - 700, 300, 0, false},
	}
	var out []diffOp
	for _, o := range ops {
		o.off = max(o.off, 0)
		o.n = min(o.n, vs-o.off)
		if o.n > 0 {
			out = append(out, o)
		}
	}
	return out
}

// fill writes the pattern into a qcow2 image: with qemu-io when it is
// installed; otherwise the pattern (discards as zeros) is written into a
// raw file that qemu-img convert -n copies into the image, whole.
func fill(t *testing.T, dir, path string, cs, vs, seed int64) {
	t.Helper()
	if vs == 0 {
		return
	}
	ops := diffOps(cs, vs)
	if _, err := exec.LookPath("qemu-io"); err == nil {
		var cmds []string
		for _, o := range ops {
			switch {
			case o.discard:
				cmds = append(cmds, fmt.Sprintf("discard %d %d", o.off, o.n))
			case o.val == 0:
				cmds = append(cmds, fmt.Sprintf("write -z %d %d", o.off, o.n))
			default:
				cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", o.val+byte(seed), o.off, o.n))
			}
		}
		qemuIO(t, path, cmds...)
		return
	}
	b := make([]byte, vs)
	for _, o := range ops {
		v := o.val
		if v != 0 {
			v += byte(seed)
		}
		for i := o.off; i < o.off+o.n; i++ {
			b[i] = v
		}
	}
	src := filepath.Join(dir, fmt.Sprintf("pattern%d.raw", seed))
	if err := os.WriteFile(src, b, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "convert", "-n", "-f", "raw", "-O", "qcow2", src, path)
}

func virtualSize(t *testing.T, path, format string) int64 {
	t.Helper()
	m := decodeJSON(t, qemuImg(t, "info", "-f", format, "--output", "json", path))
	return int64(m["virtual-size"].(float64))
}

// build makes the shape's image in dir (the test's working directory);
// names are relative, as a user in that directory types them.
func (s diffShape) build(t *testing.T, dir string) corpusImage {
	t.Helper()
	cs := int64(65536)
	if i := strings.Index(s.opts, "cluster_size="); i >= 0 {
		fmt.Sscanf(s.opts[i+len("cluster_size="):], "%d", &cs)
	}
	img := corpusImage{path: "img.qcow2"}
	create := []string{"create", "-q", "-f", "qcow2"}
	opts := s.opts
	switch s.backing {
	case "qcow2":
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", fmt.Sprint(s.size-3000))
		fill(t, dir, "base.qcow2", 4096, virtualSize(t, "base.qcow2", "qcow2"), 7)
		create = append(create, "-b", "base.qcow2", "-F", "qcow2")
		img.backing = []layer{{"base.qcow2", "qcow2"}}
	case "raw":
		rawSource(t, "base.raw", s.size+4096, 7) // longer than the image
		create = append(create, "-b", "base.raw", "-F", "raw")
		img.backing = []layer{{"base.raw", "raw"}}
	}
	if s.dataFile != "" {
		o := "data_file=img.data,data_file_raw=" + s.dataFile
		opts = strings.TrimPrefix(opts+","+o, ",")
		img.dataFile = "img.data"
	}
	if opts != "" {
		create = append(create, "-o", opts)
	}
	if s.compress != "" {
		rawSource(t, "src.raw", s.size, cs)
		o := strings.TrimPrefix(opts+",compression_type="+s.compress, ",")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, "src.raw", img.path)
	} else {
		qemuImg(t, append(create, img.path, fmt.Sprint(s.size))...)
	}
	vs := virtualSize(t, img.path, "qcow2")
	if s.compress != "" {
		// Overwrite some compressed clusters, partly.
		vs = min(vs, 4*cs)
	}
	fill(t, dir, img.path, cs, vs, 0)
	if s.snapshot {
		qemuImg(t, "snapshot", "-c", "one", img.path)
		fill(t, dir, img.path, cs, vs/2, 1)
		qemuImg(t, "snapshot", "-c", "a-tag-longer-than-16", img.path)
		fill(t, dir, img.path, cs, vs, 2)
	}
	if s.bitmap {
		qemuImg(t, "bitmap", "--add", img.path, "b0")
		fill(t, dir, img.path, cs, vs, 3)
	}
	return img
}

// infoKeys are the top-level keys of `info --output json` compared with
// qemu-img's.
var infoKeys = []string{"filename", "format", "virtual-size", "actual-size", "cluster-size",
	"backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag", "snapshots"}

// compareInfo compares img info with qemu-img info on every shared key and
// every key of format-specific.data.
func compareInfo(t *testing.T, path string) {
	t.Helper()
	ours := decodeJSON(t, mustImg(t, "info", "--format", "qcow2", "--output", "json", path))
	theirs := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", path))
	for _, k := range infoKeys {
		if !reflect.DeepEqual(ours[k], theirs[k]) {
			t.Errorf("info %s key %q: img %v, qemu-img %v", path, k, ours[k], theirs[k])
		}
	}
	od, _ := ours["format-specific"].(map[string]any)["data"].(map[string]any)
	td, _ := theirs["format-specific"].(map[string]any)["data"].(map[string]any)
	for k := range td {
		if !reflect.DeepEqual(od[k], td[k]) {
			t.Errorf("info %s format-specific.data key %q: img %v, qemu-img %v", path, k, od[k], td[k])
		}
	}
	for k := range od {
		if _, ok := td[k]; !ok {
			t.Errorf("info %s format-specific.data key %q: img %v, qemu-img has none", path, k, od[k])
		}
	}
}

// backingLine is the human info's backing file line, without what each
// tool adds after the name.
var backingLine = regexp.MustCompile(`^(backing file: .*?)( \(actual path: .*\)| \(recorded, not opened\))$`)

// humanInfo is info's human output with the deliberate differences taken
// out: the krun-core section and the note after the backing file's name
// (qemu-img: the actual path; img: "recorded, not opened", since it opens
// nothing) (docs/IMAGES.md).
func humanInfo(s string) []string {
	var out []string
	skip := 0 // skip lines indented deeper than this (0: none)
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		indent := len(l) - len(strings.TrimLeft(l, " "))
		if skip > 0 && indent > skip-1 {
			continue
		}
		skip = 0
		switch strings.TrimSpace(l) {
		case "krun-core:":
			skip = indent + 1
			continue
		}
		if m := backingLine.FindStringSubmatch(l); m != nil {
			l = m[1]
		}
		out = append(out, l)
	}
	return out
}

// compareHuman compares the human output of img info and img check with
// qemu-img's.
func compareHuman(t *testing.T, path string) {
	t.Helper()
	ours := humanInfo(mustImg(t, "info", "--format", "qcow2", path))
	theirs := humanInfo(qemuImg(t, "info", "-f", "qcow2", path))
	if !reflect.DeepEqual(ours, theirs) {
		t.Errorf("info %s:\nimg:\n%s\nqemu-img:\n%s", path, strings.Join(ours, "\n"), strings.Join(theirs, "\n"))
	}
	o := img(t, "check", "--format", "qcow2", path)
	q := run(t, nil, qemuTool(t, "qemu-img"), "check", "-f", "qcow2", path)
	if o.stdout != q.stdout {
		t.Errorf("check %s:\nimg:\n%s\nqemu-img:\n%s", path, o.stdout, q.stdout)
	}
}

// compareCheck compares img check with qemu-img check: exit status and
// every key of the JSON output.
func compareCheck(t *testing.T, path string) {
	t.Helper()
	ours := img(t, "check", "--format", "qcow2", "--output", "json", path)
	theirs := run(t, nil, qemuTool(t, "qemu-img"), "check", "-f", "qcow2", "--output", "json", path)
	if ours.code != theirs.code {
		t.Errorf("check %s: img exit %d, qemu-img exit %d\n%s%s", path, ours.code, theirs.code, ours.stderr, theirs.stderr)
		return
	}
	o, q := decodeJSON(t, ours.stdout), decodeJSON(t, theirs.stdout)
	if !reflect.DeepEqual(o, q) {
		t.Errorf("check %s --output json:\nimg      %v\nqemu-img %v", path, o, q)
	}
}

// qemuCheckClean runs qemu-img check on an image krun-core wrote: no
// errors, no leaks (exit 0 and no count in the JSON).
func qemuCheckClean(t *testing.T, path string, args ...string) {
	t.Helper()
	r := run(t, nil, qemuTool(t, "qemu-img"), append(append([]string{"check", "-f", "qcow2", "--output", "json"}, args...), path)...)
	if r.code != 0 {
		t.Errorf("qemu-img check %s: exit %d\n%s%s", path, r.code, r.stdout, r.stderr)
		return
	}
	m := decodeJSON(t, r.stdout)
	for _, k := range []string{"check-errors", "corruptions", "leaks"} {
		if n, _ := m[k].(float64); n != 0 {
			t.Errorf("qemu-img check %s: %s %v", path, k, n)
		}
	}
}

// TestDifferential runs every img command on images qemu-img made and
// compares the results with qemu-img's: info, check, convert to raw and to
// qcow2 (with each option img offers), resize and import. Every qcow2
// image krun-core writes must pass qemu-img check without errors or leaks.
func TestDifferential(t *testing.T) {
	qemuTool(t, "qemu-img")
	zstd := qemuHasZstd(t)
	for _, s := range diffShapes() {
		t.Run(s.name, func(t *testing.T) {
			if s.compress == "zstd" && !zstd {
				t.Skip("this qemu-img has no zstd compression")
			}
			dir := t.TempDir()
			t.Chdir(dir)
			ci := s.build(t, dir)
			compareInfo(t, ci.path)
			compareCheck(t, ci.path)
			compareHuman(t, ci.path)

			// The gate passes what qemu-img check finds clean, but for an
			// external data file, which it cannot declare (docs/IMAGES.md,
			// img verify).
			r := img(t, "verify", "--format", "qcow2", "--backing-dir", dir, "--max-size", "1G", ci.path)
			if want := ci.dataFile == ""; (r.code == 0) != want {
				t.Errorf("img verify: exit %d, want success %v\n%s%s", r.code, want, r.stdout, r.stderr)
			}

			// Export: convert to raw, byte for byte what qemu-img writes.
			decl := ci.declare()
			args := append([]string{"convert", "--format", "qcow2"}, decl...)
			mustImg(t, append(args, "-O", "raw", ci.path, "ours.raw")...)
			qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", ci.path, "qemu.raw")
			if !sameFile(t, "ours.raw", "qemu.raw") {
				t.Errorf("img convert -O raw differs from qemu-img convert -O raw")
			}
			for _, v := range []struct {
				name string
				opts []string
			}{
				{"plain", nil},
				{"zlib", []string{"--compress"}},
				{"zstd-512", []string{"--compress", "--compression", "zstd", "--cluster-size", "512"}},
				{"cs2M", []string{"--cluster-size", "2M"}},
			} {
				out := "ours-" + v.name + ".qcow2"
				mustImg(t, append(append(append([]string(nil), args...), v.opts...), "-O", "qcow2", ci.path, out)...)
				qemuCheckClean(t, out)
				qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "raw", out, "qemu.raw")
				compareInfo(t, out)
				if v.name == "zlib" {
					// qemu-img's statistics of our packing of compressed data.
					compareCheck(t, out)
				}
			}

			// Import: the raw content streamed into a new qcow2 image.
			in, err := os.Open("qemu.raw")
			if err != nil {
				t.Fatal(err)
			}
			r = run(t, in, krunCore(t), "img", "import", "--format", "qcow2", "--max-size", "1G", "imported.qcow2")
			in.Close()
			if s.size == 0 {
				// Deliberate: an empty input makes no image (docs/IMAGES.md,
				// img import), where qemu-img convert makes an empty one.
				if r.code != 1 || !strings.Contains(r.stderr, "empty") {
					t.Errorf("img import of 0 bytes: exit %d, want 1 (the input is empty)\n%s", r.code, r.stderr)
				}
			} else if r.code != 0 {
				t.Errorf("img import: exit %d\n%s", r.code, r.stderr)
			} else {
				qemuCheckClean(t, "imported.qcow2")
				qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "raw", "imported.qcow2", "qemu.raw")
			}

			compareResize(t, s, ci)
		})
	}
}

// compareResize grows a copy of the image with img resize and another
// with qemu-img resize, by a size that is not a multiple of the cluster
// (and, for small clusters, needs a larger L1 table): the two must read
// the same and have the same size, and ours must check clean.
func compareResize(t *testing.T, s diffShape, ci corpusImage) {
	t.Helper()
	for _, n := range []string{"a.qcow2", "b.qcow2"} {
		b, err := os.ReadFile(ci.path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(n, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	grow := "+5121536" // 5 MiB + 3 sectors
	if strings.Contains(s.opts, "compat=0.10") {
		// Deliberate: a version 2 image (no dirty bit) grows only within
		// its L1 table's clusters (docs/IMAGES.md, img resize), where
		// qemu-img also writes a larger table; grow it within its table.
		grow = "+1536"
	}
	args := append(append([]string{"resize", "--format", "qcow2"}, declareBacking(ci)...), "a.qcow2", grow)
	r := img(t, args...)
	if s.snapshot || s.bitmap || s.dataFile != "" {
		// Deliberate: img resize refuses images with internal snapshots,
		// bitmaps or an external data file (docs/IMAGES.md, img resize).
		if r.code != 1 || !strings.Contains(r.stderr, "not supported") {
			t.Errorf("img resize of %s: exit %d, want 1 (not supported)\n%s", s.name, r.code, r.stderr)
		}
		return
	}
	if r.code != 0 {
		t.Errorf("img resize: exit %d\n%s", r.code, r.stderr)
		return
	}
	qemuImg(t, "resize", "-q", "-f", "qcow2", "b.qcow2", grow)
	qemuCheckClean(t, "a.qcow2")
	if a, b := virtualSize(t, "a.qcow2", "qcow2"), virtualSize(t, "b.qcow2", "qcow2"); a != b {
		t.Errorf("after resize %s: img's virtual size %d, qemu-img's %d", grow, a, b)
	}
	qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2")
	compareInfo(t, "a.qcow2")
	compareCheck(t, "a.qcow2")
}

// declareBacking is the image's chain as resize takes it (no data file).
func declareBacking(c corpusImage) []string {
	var a []string
	for _, b := range c.backing {
		a = append(a, "--backing", b.path, "--backing-format", b.format)
	}
	return a
}

func qemuHasZstd(t *testing.T) bool {
	t.Helper()
	p := filepath.Join(t.TempDir(), "z.qcow2")
	r := run(t, nil, qemuTool(t, "qemu-img"), "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M")
	return r.code == 0
}

// TestDifferentialCreate compares img create with qemu-img create given
// the same cluster size, compression type and size: qemu-img info must
// report the same, and qemu-img check find nothing.
func TestDifferentialCreate(t *testing.T) {
	qemuTool(t, "qemu-img")
	zstd := qemuHasZstd(t)
	dir := t.TempDir()
	t.Chdir(dir)
	rawSource(t, "base.raw", 1<<20+4096, 1)
	i := 0
	for _, cs := range []string{"512", "4096", "65536", "2097152"} {
		for _, ct := range []string{"zlib", "zstd"} {
			for _, size := range []string{"1", "1000000", "3G"} {
				if ct == "zstd" && !zstd {
					continue
				}
				i++
				ours, theirs := fmt.Sprintf("ours%d.qcow2", i), fmt.Sprintf("qemu%d.qcow2", i)
				mustImg(t, "create", "--format", "qcow2", "--cluster-size", cs, "--compression", ct, ours, size)
				qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size="+cs+",compression_type="+ct, theirs, size)
				compareCreated(t, ours, theirs)
			}
		}
	}
	mustImg(t, "create", "--format", "qcow2", "--backing", "base.raw", "--backing-format", "raw", "ours-b.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "qemu-b.qcow2")
	compareCreated(t, "ours-b.qcow2", "qemu-b.qcow2")
}

func compareCreated(t *testing.T, ours, theirs string) {
	t.Helper()
	qemuCheckClean(t, ours)
	o := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", ours))
	q := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", theirs))
	for _, k := range []string{"virtual-size", "cluster-size", "backing-filename", "backing-filename-format", "format-specific", "dirty-flag"} {
		if !reflect.DeepEqual(o[k], q[k]) {
			t.Errorf("create %s: qemu-img info key %q: ours %v, qemu-img's %v", ours, k, o[k], q[k])
		}
	}
	qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "qcow2", ours, theirs)
	compareInfo(t, ours)
}

// TestDifferentialProbe compares img probe with the format qemu-img
// probes (qemu-img info without -f) on an empty image of every format
// qemu-img creates.
func TestDifferentialProbe(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	t.Chdir(dir)
	for _, c := range []struct {
		name, format string
		opts         []string
	}{
		{"raw", "raw", nil},
		{"qcow2", "qcow2", nil},
		{"qcow2-v2", "qcow2", []string{"-o", "compat=0.10"}},
		{"qcow", "qcow", nil},
		{"qed", "qed", nil},
		{"vmdk", "vmdk", nil},
		{"vmdk-stream", "vmdk", []string{"-o", "subformat=streamOptimized"}},
		{"vmdk-flat", "vmdk", []string{"-o", "subformat=monolithicFlat"}},
		{"vhdx", "vhdx", nil},
		{"vdi", "vdi", nil},
		{"vpc", "vpc", nil},
		{"vpc-fixed", "vpc", []string{"-o", "subformat=fixed"}},
		{"parallels", "parallels", nil},
		{"luks", "luks", []string{"--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := c.name + "." + c.format
			args := append(append([]string{"create", "-q", "-f", c.format}, c.opts...), p, "1M")
			if r := run(t, nil, qemuTool(t, "qemu-img"), args...); r.code != 0 {
				t.Skipf("this qemu-img cannot create %s: %s", c.name, r.stderr)
			}
			theirs := decodeJSON(t, qemuImg(t, "info", "--output", "json", p))["format"]
			ours := strings.TrimSpace(mustImg(t, "probe", p))
			if c.name == "vpc-fixed" {
				// Deliberate: a fixed VHD has its footer only in its last
				// 512 bytes, which qemu-img does not probe (it says raw);
				// img probe reads them and says vpc (docs/IMAGES.md).
				theirs = "vpc"
			}
			if ours != theirs {
				t.Errorf("img probe %s: %q, qemu-img probes %q", p, ours, theirs)
			}
		})
	}
}

// TestDifferentialRawInput converts raw files, some not a whole number of
// sectors long, with img and with qemu-img.
func TestDifferentialRawInput(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	t.Chdir(dir)
	for _, n := range []int64{1, 1000, 4097, 1<<20 + 1, 3 << 20} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			src := fmt.Sprintf("src%d.raw", n)
			rawSource(t, src, n, n)
			for _, o := range [][]string{nil, {"--compress"}, {"--cluster-size", "512"}} {
				ours, theirs := fmt.Sprintf("ours%d-%d.qcow2", n, len(o)), fmt.Sprintf("qemu%d-%d.qcow2", n, len(o))
				mustImg(t, append(append([]string{"convert", "--format", "raw", "-O", "qcow2"}, o...), src, ours)...)
				qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", src, theirs)
				qemuCheckClean(t, ours)
				if a, b := virtualSize(t, ours, "qcow2"), virtualSize(t, theirs, "qcow2"); a != b {
					t.Errorf("convert %s -O qcow2: virtual size %d, qemu-img's %d", src, a, b)
				}
				qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "qcow2", ours, theirs)
			}
			ours, theirs := fmt.Sprintf("ours%d.raw", n), fmt.Sprintf("qemu%d.raw", n)
			mustImg(t, "convert", "--format", "raw", "-O", "raw", src, ours)
			qemuImg(t, "convert", "-f", "raw", "-O", "raw", src, theirs)
			// Deliberate: a raw output has the input's length; qemu-img
			// pads it to whole sectors (docs/IMAGES.md). The bytes agree.
			if !sameFile(t, ours, src) {
				t.Errorf("img convert -O raw of %s is not a copy of it", src)
			}
			qemuImg(t, "compare", "-q", "-f", "raw", "-F", "raw", ours, theirs)
		})
	}
}

// TestDifferentialSizes gives img create and qemu-img create the same size
// arguments: where both accept one, they make images of the same size.
func TestDifferentialSizes(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	t.Chdir(dir)
	for i, c := range []struct {
		size string
		ours bool // img accepts it
	}{
		{"1", true}, {"513", true}, {"1k", true}, {"64K", true}, {"1m", true}, {"3M", true},
		{"1g", true}, {"2T", true}, {"1000001", true},
		// Deliberate: sizes are whole numbers with a binary suffix;
		// qemu-img's fractions, hexadecimal, `b` suffix and leading
		// blanks are refused with one line (docs/IMAGES.md).
		{"1.5G", false}, {"0x1000", false}, {"512b", false}, {" 1M", false},
	} {
		ours, theirs := fmt.Sprintf("ours%d.qcow2", i), fmt.Sprintf("qemu%d.qcow2", i)
		r := img(t, "create", "--format", "qcow2", ours, c.size)
		qemuImg(t, "create", "-q", "-f", "qcow2", theirs, c.size)
		if !c.ours {
			if r.code != 1 || !strings.Contains(r.stderr, "is not a size") {
				t.Errorf("img create SIZE %q: exit %d, want 1 (is not a size)\n%s", c.size, r.code, r.stderr)
			}
			continue
		}
		if r.code != 0 {
			t.Errorf("img create SIZE %q: exit %d\n%s", c.size, r.code, r.stderr)
			continue
		}
		if a, b := virtualSize(t, ours, "qcow2"), virtualSize(t, theirs, "qcow2"); a != b {
			t.Errorf("SIZE %q: img makes %d bytes, qemu-img %d", c.size, a, b)
		}
	}
}

// TestDifferentialResizeAfterShrink grows images that qemu-img resize
// --shrink cut inside a cluster. qemu-img 7.2 then shows the bytes the
// shrink left in the old last cluster's tail again; img resize zeroes them
// (docs/IMAGES.md, img resize), so the result is compared with the cut
// content followed by zeros, not with qemu-img's.
func TestDifferentialResizeAfterShrink(t *testing.T) {
	qemuTool(t, "qemu-img")
	dir := t.TempDir()
	t.Chdir(dir)
	rawSource(t, "src.raw", 4<<20, 5)
	const cut, grown = 3<<20 + 1536, 4<<20 + 1536
	b, err := os.ReadFile("src.raw")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("want.raw", append(b[:cut:cut], make([]byte, grown-cut)...), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, o := range []string{"cluster_size=65536", "cluster_size=65536,extended_l2=on", "cluster_size=2M", "compat=0.10,cluster_size=4096"} {
		for _, c := range []string{"", "-c"} {
			p := fmt.Sprintf("img%d%s.qcow2", i, c)
			args := []string{"convert", "-f", "raw", "-O", "qcow2", "-o", o}
			if c != "" {
				args = append(args, c)
			}
			qemuImg(t, append(args, "src.raw", p)...)
			qemuImg(t, "resize", "-q", "-f", "qcow2", "--shrink", p, fmt.Sprint(cut))
			mustImg(t, "resize", "--format", "qcow2", p, fmt.Sprint(grown))
			qemuCheckClean(t, p)
			if r := run(t, nil, qemuTool(t, "qemu-img"), "compare", "-f", "qcow2", "-F", "raw", p, "want.raw"); r.code != 0 {
				t.Errorf("%s (%s %s) shrunk to %d, grown to %d: %s", p, o, c, cut, grown, r.stdout)
			}
		}
	}
}

// TestDifferentialRepair leaves lazy-refcount images dirty (qemu-io
// aborts after writing) and repairs one copy with img check --repair all,
// another with qemu-img check -r all: the same report, both clean after,
// the same content.
func TestDifferentialRepair(t *testing.T) {
	qemuTool(t, "qemu-img")
	qemuTool(t, "qemu-io")
	dir := t.TempDir()
	t.Chdir(dir)
	for i, o := range []string{"cluster_size=512", "cluster_size=4096,refcount_bits=1", "cluster_size=65536,refcount_bits=64",
		"cluster_size=16384,extended_l2=on", "cluster_size=2M", "compat=1.1"} {
		p := fmt.Sprintf("img%d.qcow2", i)
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,"+o, p, "8M")
		// abort kills qemu-io (SIGABRT): exit status ignored.
		_ = exec.Command(qemuTool(t, "qemu-io"), "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 100k",
			"-c", "write -z 5M 1M", "-c", "discard 0 64k", "-c", "abort", p).Run()
		if m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", p)); m["dirty-flag"] != true {
			t.Fatalf("%s (%s): qemu-io abort left it clean", p, o)
		}
		compareCheck(t, p)
		// The human check: the summary on stdout, one line per finding on
		// stderr, as qemu-img writes them.
		oh := img(t, "check", "--format", "qcow2", p)
		qh := run(t, nil, qemuTool(t, "qemu-img"), "check", "-f", "qcow2", p)
		if oh.stdout != qh.stdout || oh.stderr != qh.stderr {
			t.Errorf("%s (%s): img check wrote\n%s\non stdout and\n%s\non stderr; qemu-img check\n%s\nand\n%s",
				p, o, oh.stdout, oh.stderr, qh.stdout, qh.stderr)
		}
		ours, theirs := "ours-"+p, "qemu-"+p
		for _, n := range []string{ours, theirs} {
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(n, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		r := img(t, "check", "--format", "qcow2", "--repair", "all", "--output", "json", ours)
		q := run(t, nil, qemuTool(t, "qemu-img"), "check", "-f", "qcow2", "-r", "all", "--output", "json", theirs)
		if r.code != q.code {
			t.Errorf("%s (%s): check --repair all exit %d, qemu-img's %d\n%s", p, o, r.code, q.code, r.stderr)
			continue
		}
		om, qm := decodeJSON(t, r.stdout), decodeJSON(t, q.stdout)
		for _, m := range []map[string]any{om, qm} {
			delete(m, "filename")
			// Deliberate: a rebuilt refcount structure is placed where
			// img puts it, so the image's end differs (docs/IMAGES.md).
			delete(m, "image-end-offset")
		}
		if !reflect.DeepEqual(om, qm) {
			t.Errorf("%s (%s): check --repair all:\nimg      %v\nqemu-img %v", p, o, om, qm)
		}
		qemuCheckClean(t, ours)
		qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "qcow2", ours, theirs)
		if m := decodeJSON(t, qemuImg(t, "info", "-f", "qcow2", "--output", "json", ours)); m["dirty-flag"] != false {
			t.Errorf("%s (%s): still dirty after img check --repair all", p, o)
		}
	}
}
