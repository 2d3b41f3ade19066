package imgserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/krun-core/krun-core/disk"
	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
)

// newQcow2 creates a qcow2 image with disk/qcow2 and writes data at off.
func newQcow2(t *testing.T, path string, o qcow2.CreateOptions, writes map[int64][]byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := qcow2.Create(f, o); err != nil {
		t.Fatal(err)
	}
	if len(writes) == 0 {
		f.Close()
		return
	}
	im, err := qcow2.Open(f, qcow2.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if _, err := im.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	im.Close()
}

func open(t *testing.T, path string, flag int) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestInfo(t *testing.T) {
	dir := t.TempDir()
	q := filepath.Join(dir, "a.qcow2")
	newQcow2(t, q, qcow2.CreateOptions{Size: 8 << 20, ClusterSize: 4096, BackingFile: "../base.img", BackingFormat: disk.Raw, CompressionType: "zstd"}, nil)
	r := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(r, []byte("QFI\xfb raw that looks like qcow2"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path, format string
		check        func(*imagepb.InfoResponse) string
		err          string
	}{
		{q, "qcow2", func(in *imagepb.InfoResponse) string {
			switch {
			case in.Format != "qcow2" || in.VirtualSize != 8<<20 || in.ClusterSize != 4096 || in.Version != 3:
				return "header facts"
			case in.BackingFile != "../base.img" || in.BackingFormat != "raw":
				return "backing"
			case in.CompressionType != "zstd" || in.FileSize == 0:
				return "compression/size"
			}
			return ""
		}, ""},
		{r, "raw", func(in *imagepb.InfoResponse) string {
			if in.Format != "raw" || in.VirtualSize != 30 || in.BackingFile != "" {
				return "raw facts"
			}
			return ""
		}, ""},
		{r, "qcow2", nil, "invalid qcow2"},
		{q, "vmdk", nil, "unknown format"},
		{q, "", nil, "format= is required"},
	}
	for _, c := range cases {
		in, err := Info(open(t, c.path, os.O_RDONLY), c.format)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Info(%s, %q) error %v, want %q", filepath.Base(c.path), c.format, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Info(%s, %q): %v", filepath.Base(c.path), c.format, err)
			continue
		}
		if what := c.check(in); what != "" {
			t.Errorf("Info(%s, %q): wrong %s: %+v", filepath.Base(c.path), c.format, what, in)
		}
	}
}

// TestInfoNeverOpensBacking: the backing name is only reported; a FIFO
// there would block any open.
func TestInfoNeverOpensBacking(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := exec.Command("mkfifo", fifo).Run(); err != nil {
		t.Skipf("mkfifo not available: %v", err)
	}
	q := filepath.Join(dir, "a.qcow2")
	newQcow2(t, q, qcow2.CreateOptions{Size: 1 << 20, BackingFile: fifo, BackingFormat: disk.Raw}, nil)
	in, err := Info(open(t, q, os.O_RDONLY), "qcow2")
	if err != nil || in.BackingFile != fifo {
		t.Fatalf("Info: %+v, %v", in, err)
	}
}

// corruptRefcount sets the refcount of host cluster c of a 64 KiB-cluster
// image to v (first refcount block only).
func corruptRefcount(t *testing.T, path string, c int, v uint16) {
	t.Helper()
	f := open(t, path, os.O_RDWR)
	hdr := make([]byte, 104)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	rt := binary.BigEndian.Uint64(hdr[48:])
	ent := make([]byte, 8)
	if _, err := f.ReadAt(ent, int64(rt)); err != nil {
		t.Fatal(err)
	}
	rb := binary.BigEndian.Uint64(ent)
	binary.BigEndian.PutUint16(ent[:2], v)
	if _, err := f.WriteAt(ent[:2], int64(rb)+int64(2*c)); err != nil {
		t.Fatal(err)
	}
}

// aliasL1 makes L1 entry 1 of the image at p name L1 entry 0's L2 table,
// as a hostile uploader would: the table and its data clusters get
// refcount 2 and lose their copied flags, so the refcounts agree with the
// references (16-bit refcounts, 64 KiB clusters, one refcount block).
func aliasL1(t *testing.T, p string) {
	t.Helper()
	const copied = 1 << 63
	f := open(t, p, os.O_RDWR)
	hdr := make([]byte, 48)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	l1Off := int64(binary.BigEndian.Uint64(hdr[40:]))
	l1 := make([]byte, 16)
	if _, err := f.ReadAt(l1, l1Off); err != nil {
		t.Fatal(err)
	}
	e := binary.BigEndian.Uint64(l1) &^ copied
	l2Off := e & 0x00fffffffffffe00
	if l2Off == 0 || binary.BigEndian.Uint64(l1[8:]) != 0 {
		t.Fatalf("L1 entries %#x: want one table named by entry 0 only", l1)
	}
	binary.BigEndian.PutUint64(l1, e)
	binary.BigEndian.PutUint64(l1[8:], e)
	if _, err := f.WriteAt(l1, l1Off); err != nil {
		t.Fatal(err)
	}
	l2 := make([]byte, 65536)
	if _, err := f.ReadAt(l2, int64(l2Off)); err != nil {
		t.Fatal(err)
	}
	twice := []int{int(l2Off / 65536)}
	for i := 0; i < len(l2); i += 8 {
		if v := binary.BigEndian.Uint64(l2[i:]); v&0x00fffffffffffe00 != 0 {
			binary.BigEndian.PutUint64(l2[i:], v&^copied)
			twice = append(twice, int(v&0x00fffffffffffe00/65536))
		}
	}
	if _, err := f.WriteAt(l2, int64(l2Off)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, c := range twice {
		corruptRefcount(t, p, c, 2)
	}
}

func TestCheckAndVerify(t *testing.T) {
	dir := t.TempDir()
	mk := func(name string, o qcow2.CreateOptions, damage func(string)) string {
		p := filepath.Join(dir, name)
		var writes map[int64][]byte
		if o.BackingFile == "" {
			writes = map[int64][]byte{0: bytes.Repeat([]byte{7}, 4096), 3 << 20: []byte("x")}
		}
		newQcow2(t, p, o, writes)
		if damage != nil {
			damage(p)
		}
		return p
	}
	clean := mk("clean.qcow2", qcow2.CreateOptions{Size: 4 << 20}, nil)
	// One more cluster with a refcount but no reference: a leak.
	leak := mk("leak.qcow2", qcow2.CreateOptions{Size: 4 << 20}, func(p string) {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		c := (st.Size() + 65535) / 65536
		if err := os.Truncate(p, (c+1)*65536); err != nil {
			t.Fatal(err)
		}
		corruptRefcount(t, p, int(c), 1)
	})
	// The header cluster with refcount 0: corruption.
	bad := mk("bad.qcow2", qcow2.CreateOptions{Size: 4 << 20}, func(p string) { corruptRefcount(t, p, 0, 0) })
	backed := mk("backed.qcow2", qcow2.CreateOptions{Size: 4 << 20, BackingFile: "base.raw", BackingFormat: disk.Raw}, nil)
	// Two L1 entries naming one L2 table, refcounts and copied flags to
	// match: no corruption, but a read-write open refuses it.
	aliased := mk("aliased.qcow2", qcow2.CreateOptions{Size: 1 << 30}, func(p string) { aliasL1(t, p) })
	raw := filepath.Join(dir, "r.raw")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		path, format     string
		corrupt, leaks   bool
		supported        bool
		violation        string // "" valid
		violationMissing bool
	}{
		{clean, "qcow2", false, false, true, "", false},
		{leak, "qcow2", false, true, true, "", false},
		{bad, "qcow2", true, false, true, "corruption", false},
		{backed, "qcow2", false, false, true, "", false},
		{aliased, "qcow2", false, false, true, "named by more than one entry of the active L1 table", false},
		{raw, "raw", false, false, false, "", false},
		{raw, "qcow2", false, false, true, "not a valid qcow2 image", true},
		{clean, "raw", false, false, false, "", false}, // a qcow2 file is a valid raw image
	}
	for _, c := range cases {
		name := filepath.Base(c.path) + "/" + c.format
		res, err := Check(open(t, c.path, os.O_RDONLY), c.format, imagepb.Repair_REPAIR_NONE)
		if c.violationMissing {
			if err == nil {
				t.Errorf("%s: Check succeeded on a file that is not qcow2", name)
			}
		} else if err != nil {
			t.Errorf("%s: Check: %v", name, err)
		} else if res.Supported != c.supported || (res.Corruptions > 0) != c.corrupt || (res.Leaks > 0) != c.leaks {
			t.Errorf("%s: Check = %+v, want corrupt %v leaks %v supported %v", name, res, c.corrupt, c.leaks, c.supported)
		}
		v, err := Verify(open(t, c.path, os.O_RDONLY), c.format, nil)
		if err != nil {
			t.Errorf("%s: Verify: %v", name, err)
			continue
		}
		if c.violation == "" && v.Violation != "" || c.violation != "" && !strings.Contains(v.Violation, c.violation) {
			t.Errorf("%s: Verify violation %q, want %q", name, v.Violation, c.violation)
		}
		if c.violation == "" && v.Info == nil {
			t.Errorf("%s: Verify returned no info", name)
		}
	}

	// What verify's refusal of the aliased image stands for.
	if im, err := qcow2.Open(open(t, aliased, os.O_RDWR), qcow2.Options{Path: aliased}); err == nil {
		im.Close()
		t.Error("a read-write open accepted the aliased image; verify need not refuse it")
	}

	// Repair: leaks only writes the leak fix; the image is clean after.
	res, err := Check(open(t, leak, os.O_RDWR), "qcow2", imagepb.Repair_REPAIR_LEAKS)
	if err != nil || res.LeaksFixed == 0 || res.Leaks != 0 {
		t.Fatalf("repair leaks: %+v, %v", res, err)
	}
	if res, err := Check(open(t, leak, os.O_RDONLY), "qcow2", imagepb.Repair_REPAIR_NONE); err != nil || res.Leaks != 0 || res.Corruptions != 0 {
		t.Fatalf("after repair: %+v, %v", res, err)
	}
}

func TestVerifyFlags(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name      string
		o         qcow2.CreateOptions
		patch     func(f *os.File)
		violation string
	}{
		{"dirty", qcow2.CreateOptions{Size: 1 << 20}, func(f *os.File) { setIncompat(t, f, 1) }, "dirty"},
		{"corrupt", qcow2.CreateOptions{Size: 1 << 20}, func(f *os.File) { setIncompat(t, f, 2) }, "marked corrupt"},
		{"unknown-feature", qcow2.CreateOptions{Size: 1 << 20}, func(f *os.File) { setIncompat(t, f, 1<<40) }, "not a valid qcow2 image"},
	}
	for _, c := range cases {
		p := filepath.Join(dir, c.name)
		newQcow2(t, p, c.o, nil)
		c.patch(open(t, p, os.O_RDWR))
		v, err := Verify(open(t, p, os.O_RDONLY), "qcow2", nil)
		if err != nil || !strings.Contains(v.Violation, c.violation) {
			t.Errorf("%s: Verify = %+v, %v; want violation %q", c.name, v, err, c.violation)
		}
	}
}

func setIncompat(t *testing.T, f *os.File, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], 72); err != nil {
		t.Fatal(err)
	}
}

func TestProbe(t *testing.T) {
	dir := t.TempDir()
	q := filepath.Join(dir, "q")
	newQcow2(t, q, qcow2.CreateOptions{Size: 1 << 20}, nil)
	files := map[string][]byte{
		"empty":  nil,
		"zeros":  make([]byte, 4096),
		"vmdk":   append([]byte("KDMV"), make([]byte, 600)...),
		"vhdx":   append([]byte("vhdxfile"), make([]byte, 600)...),
		"vdi":    append(append(make([]byte, 0x40), 0x7f, 0x10, 0xda, 0xbe), make([]byte, 600)...),
		"vpcfix": append(make([]byte, 4096), append([]byte("conectix"), make([]byte, 504)...)...),
		"qcow1":  append([]byte("QFI\xfb\x00\x00\x00\x01"), make([]byte, 600)...),
		"qbad":   append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 600)...),
	}
	want := map[string]string{"empty": "raw", "zeros": "raw", "vmdk": "vmdk", "vhdx": "vhdx", "vdi": "vdi",
		"vpcfix": "vpc", "qcow1": "qcow", "qbad": "qcow2", "q": "qcow2"}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for n, w := range want {
		r, err := Probe(open(t, filepath.Join(dir, n), os.O_RDONLY))
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		if r.Format != w || r.Supported != (w == "raw" || w == "qcow2") {
			t.Errorf("%s: probed %+v, want %s", n, r, w)
		}
		// The detail goes inside parentheses in img probe's warning: none
		// of its own ("... only (convert it ...))." read doubled).
		if !r.Supported && strings.ContainsAny(r.Detail, "()") {
			t.Errorf("%s: detail %q has parentheses", n, r.Detail)
		}
		if n == "qbad" && !strings.Contains(r.Detail, "does not parse") {
			t.Errorf("qbad: detail %q does not say the header is broken", r.Detail)
		}
	}
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	newQcow2(t, base, qcow2.CreateOptions{Size: 3<<20 + 512}, nil)
	rawBase := filepath.Join(dir, "base.raw")
	os.WriteFile(rawBase, make([]byte, 5<<20), 0o644)
	cases := []struct {
		name     string
		req      *imagepb.CreateRequest
		backing  string
		wantSize int64
		err      string
	}{
		{"plain", &imagepb.CreateRequest{Format: "qcow2", Size: 1<<30 + 1}, "", 1<<30 + 512, ""},
		// Rounded up to whole sectors, as qemu-img does (from review: a
		// 12345-byte raw image would lose its last 57 bytes to the guest).
		{"raw", &imagepb.CreateRequest{Format: "raw", Size: 12345}, "", 12800, ""},
		{"raw-whole-sectors", &imagepb.CreateRequest{Format: "raw", Size: 1 << 20}, "", 1 << 20, ""},
		{"backing-size", &imagepb.CreateRequest{Format: "qcow2", BackingName: "base.qcow2", BackingFormat: "qcow2"}, base, 3<<20 + 512, ""},
		{"raw-backing-size", &imagepb.CreateRequest{Format: "qcow2", BackingName: "base.raw", BackingFormat: "raw", ClusterSize: 4096}, rawBase, 5 << 20, ""},
		{"wrong-backing-format", &imagepb.CreateRequest{Format: "qcow2", BackingName: "base.raw", BackingFormat: "qcow2"}, rawBase, 0, "not a valid qcow2"},
		{"no-size", &imagepb.CreateRequest{Format: "qcow2"}, "", 0, "size is required"},
		{"raw-with-backing", &imagepb.CreateRequest{Format: "raw", BackingName: "x", BackingFormat: "raw"}, rawBase, 0, "no backing"},
		{"bad-cluster", &imagepb.CreateRequest{Format: "qcow2", Size: 1 << 20, ClusterSize: 1000}, "", 0, "cluster"},
		{"raw-cluster", &imagepb.CreateRequest{Format: "raw", Size: 1 << 20, ClusterSize: 4096}, "", 0, "qcow2 only"},
	}
	for _, c := range cases {
		p := filepath.Join(dir, c.name+".out")
		out := open(t, p, os.O_RDWR|os.O_CREATE|os.O_EXCL)
		var bf *os.File
		if c.backing != "" {
			bf = open(t, c.backing, os.O_RDONLY)
		}
		r, err := Create(out, bf, c.req)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: error %v, want %q", c.name, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if r.VirtualSize != c.wantSize {
			t.Errorf("%s: virtual size %d, want %d", c.name, r.VirtualSize, c.wantSize)
		}
		in, err := Info(open(t, p, os.O_RDONLY), c.req.Format)
		if err != nil || in.VirtualSize != c.wantSize || in.BackingFile != c.req.BackingName {
			t.Errorf("%s: created image info %+v, %v", c.name, in, err)
		}
	}
}

// image content with zero, random and patterned regions.
func testContent(size int64, seed int64) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewSource(seed))
	for off := int64(0); off < size; off += 32 << 10 {
		end := min(off+32<<10, size)
		switch r.Intn(3) {
		case 0:
		case 1:
			r.Read(b[off:end])
		default:
			for i := off; i < end; i++ {
				b[i] = byte(i / 100)
			}
		}
	}
	return b
}

func readVirtual(t *testing.T, path, format string) []byte {
	t.Helper()
	if format == "raw" {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	im, err := qcow2.Open(open(t, path, os.O_RDONLY), qcow2.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, im.Size())
	if _, err := im.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestConvertRoundTrips(t *testing.T) {
	dir := t.TempDir()
	data := testContent(5<<20+4096, 1)
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	// A hole in the middle of the raw source, found with SEEK_DATA.
	holey := filepath.Join(dir, "holey.raw")
	hf := open(t, holey, os.O_RDWR|os.O_CREATE)
	hf.Truncate(64 << 20)
	hf.WriteAt([]byte("start"), 0)
	hf.WriteAt([]byte("end"), 64<<20-3)
	holeyData := make([]byte, 64<<20)
	copy(holeyData, "start")
	copy(holeyData[64<<20-3:], "end")

	cases := []struct {
		name      string
		in, inFmt string
		want      []byte
		outFmt    string
		out       OutputOptions
	}{
		{"raw-raw", src, "raw", data, "raw", OutputOptions{}},
		{"raw-qcow2", src, "raw", data, "qcow2", OutputOptions{}},
		{"raw-qcow2-zlib", src, "raw", data, "qcow2", OutputOptions{Compress: true}},
		{"raw-qcow2-zstd-4k", src, "raw", data, "qcow2", OutputOptions{Compress: true, CompressionType: "zstd", ClusterSize: 4096}},
		{"holey-qcow2", holey, "raw", holeyData, "qcow2", OutputOptions{ClusterSize: 2 << 20}},
		{"holey-raw", holey, "raw", holeyData, "raw", OutputOptions{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".out")
			job := ConvertJob{Input: Layer{File: open(t, c.in, os.O_RDONLY), Format: c.inFmt},
				Output: open(t, p, os.O_RDWR|os.O_CREATE|os.O_EXCL), OutputFormat: c.outFmt, Out: c.out}
			var calls int
			res, err := job.Run(context.Background(), func(done, total int64) { calls++ })
			if err != nil {
				t.Fatal(err)
			}
			if calls == 0 || !res.Finished {
				t.Errorf("progress calls %d, result %+v", calls, res)
			}
			got := readVirtual(t, p, c.outFmt)
			want := append(c.want, make([]byte, int64(len(got))-int64(len(c.want)))...)
			if !bytes.Equal(got, want) {
				t.Fatalf("content differs (len %d vs %d)", len(got), len(c.want))
			}
			// Convert the result back through the qcow2 reader path.
			back := filepath.Join(dir, c.name+".back")
			job2 := ConvertJob{Input: Layer{File: open(t, p, os.O_RDONLY), Format: c.outFmt},
				Output: open(t, back, os.O_RDWR|os.O_CREATE|os.O_EXCL), OutputFormat: "raw"}
			if _, err := job2.Run(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			if got := readVirtual(t, back, "raw"); !bytes.Equal(got, want) {
				t.Fatalf("round trip differs")
			}
			if strings.HasPrefix(c.name, "holey") {
				// Zero regions are not written: holes in raw, unallocated
				// clusters in qcow2.
				var st syscall.Stat_t
				if err := syscall.Stat(p, &st); err != nil {
					t.Fatal(err)
				}
				if st.Blocks*512 > 16<<20 { // 2 MiB clusters: 5 metadata clusters
					t.Errorf("output of a 64 MiB sparse input occupies %d bytes", st.Blocks*512)
				}
			}
		})
	}
}

func TestConvertChainFlattens(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	baseData := testContent(2<<20, 3)
	os.WriteFile(base, baseData, 0o644)
	top := filepath.Join(dir, "top.qcow2")
	newQcow2(t, top, qcow2.CreateOptions{Size: 3 << 20, BackingFile: "base.raw", BackingFormat: disk.Raw},
		nil)
	// Write through Open with the chain declared.
	f := open(t, top, os.O_RDWR)
	im, err := qcow2.Open(f, qcow2.Options{Path: top, Backing: []qcow2.Layer{{File: open(t, base, os.O_RDONLY), Format: disk.Raw, Path: base}}})
	if err != nil {
		t.Fatal(err)
	}
	im.WriteAt([]byte("top data"), 1<<20)
	im.Flush()
	want := append(append([]byte(nil), baseData...), make([]byte, 1<<20)...)
	copy(want[1<<20:], "top data")

	out := filepath.Join(dir, "flat.raw")
	job := ConvertJob{Input: Layer{File: open(t, top, os.O_RDONLY), Format: "qcow2", Path: top},
		Backing: []Layer{{File: open(t, base, os.O_RDONLY), Format: "raw", Path: base}},
		Output:  open(t, out, os.O_RDWR|os.O_CREATE|os.O_EXCL), OutputFormat: "raw"}
	if _, err := job.Run(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if got := readVirtual(t, out, "raw"); !bytes.Equal(got, want) {
		t.Fatal("flattened content differs")
	}
	// The chain must be declared: without it, and with the wrong path, no.
	for _, backing := range [][]Layer{nil, {{File: open(t, base, os.O_RDONLY), Format: "raw", Path: filepath.Join(dir, "other.raw")}}} {
		job := ConvertJob{Input: Layer{File: open(t, top, os.O_RDONLY), Format: "qcow2", Path: top}, Backing: backing,
			Output: open(t, filepath.Join(dir, "x"+string(rune('a'+len(backing)))), os.O_RDWR|os.O_CREATE|os.O_EXCL), OutputFormat: "raw"}
		if _, err := job.Run(context.Background(), nil); !errors.Is(err, qcow2.ErrBacking) {
			t.Errorf("undeclared/mismatched chain: %v", err)
		}
	}
}

func TestImport(t *testing.T) {
	dir := t.TempDir()
	data := testContent(3<<20+777, 5)
	cases := []struct {
		name    string
		input   []byte
		max     int64
		outFmt  string
		out     OutputOptions
		tooBig  bool
		wantLen int64
	}{
		{"qcow2", data, 4 << 20, "qcow2", OutputOptions{}, false, (int64(len(data)) + 511) &^ 511},
		{"qcow2-exact-limit", data, (int64(len(data)) + 511) &^ 511, "qcow2", OutputOptions{Compress: true}, false, (int64(len(data)) + 511) &^ 511},
		// The cap is on the virtual size, as img verify's: content that
		// fits the cap but rounds up past it is too large (from review,
		// helper-82: the image then failed verify with the same cap).
		{"qcow2-rounds-past-limit", data, int64(len(data)), "qcow2", OutputOptions{}, true, 0},
		{"raw", data, 4 << 20, "raw", OutputOptions{}, false, int64(len(data))},
		{"over-by-one", data, int64(len(data)) - 1, "qcow2", OutputOptions{}, true, 0},
		{"raw-over", data, 1 << 20, "raw", OutputOptions{}, true, 0},
		{"empty", nil, 1 << 20, "qcow2", OutputOptions{}, false, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name)
			in := &countingReader{r: bytes.NewReader(c.input)}
			job := ImportJob{Input: in, InputFormat: "raw", Output: open(t, p, os.O_RDWR|os.O_CREATE|os.O_EXCL),
				OutputFormat: c.outFmt, MaxSize: c.max, Out: c.out}
			res, err := job.Run(context.Background(), nil)
			if c.tooBig {
				if !errors.Is(err, ErrTooLarge) {
					t.Fatalf("error %v, want ErrTooLarge", err)
				}
				if in.n > c.max+1 {
					t.Errorf("read %d bytes with a limit of %d", in.n, c.max)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.VirtualSize != c.wantLen {
				t.Errorf("virtual size %d, want %d", res.VirtualSize, c.wantLen)
			}
			got := readVirtual(t, p, c.outFmt)
			want := append(append([]byte(nil), c.input...), make([]byte, int64(len(got))-int64(len(c.input)))...)
			if !bytes.Equal(got, want) {
				t.Fatal("imported content differs")
			}
		})
	}
	job := ImportJob{Input: bytes.NewReader(nil), InputFormat: "qcow2", Output: open(t, filepath.Join(dir, "q"), os.O_RDWR|os.O_CREATE), OutputFormat: "qcow2", MaxSize: 1}
	if _, err := job.Run(context.Background(), nil); err == nil {
		t.Error("qcow2 input accepted for streaming")
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func TestOutputMustBeEmpty(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, []byte("data"), 0o644)
	out := filepath.Join(dir, "out")
	os.WriteFile(out, []byte("existing"), 0o644)
	job := ConvertJob{Input: Layer{File: open(t, src, os.O_RDONLY), Format: "raw"}, Output: open(t, out, os.O_RDWR), OutputFormat: "qcow2"}
	if _, err := job.Run(context.Background(), nil); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("non-empty output: %v", err)
	}
}
