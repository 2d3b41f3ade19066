package img_test

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// qcowFile patches a qcow2 image the tests build, to make it malformed.
type qcowFile struct {
	t    *testing.T
	f    *os.File
	cs   int64
	l1   int64 // L1 table offset
	rt   int64 // refcount table offset
	size int64 // file size
}

func openQcow(t *testing.T, path string) *qcowFile {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	q := &qcowFile{t: t, f: f}
	h := make([]byte, 72)
	if _, err := f.ReadAt(h, 0); err != nil {
		t.Fatal(err)
	}
	q.cs = 1 << binary.BigEndian.Uint32(h[20:])
	q.l1 = int64(binary.BigEndian.Uint64(h[40:]))
	q.rt = int64(binary.BigEndian.Uint64(h[48:]))
	st, _ := f.Stat()
	q.size = st.Size()
	return q
}

func (q *qcowFile) u64(off int64) uint64 {
	b := make([]byte, 8)
	if _, err := q.f.ReadAt(b, off); err != nil {
		q.t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b)
}

func (q *qcowFile) put64(off int64, v uint64) {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	if _, err := q.f.WriteAt(b, off); err != nil {
		q.t.Fatal(err)
	}
}

const offMask = 0x00fffffffffffe00

// l2 is the offset of the L2 table of L1 entry 0.
func (q *qcowFile) l2() int64 { return int64(q.u64(q.l1) & offMask) }

// entry is the file offset of L2 entry i (of L1 entry 0).
func (q *qcowFile) entry(i int64) int64 { return q.l2() + 8*i }

// data is the host offset of guest cluster i.
func (q *qcowFile) data(i int64) int64 { return int64(q.u64(q.entry(i)) & offMask) }

// refblock is the offset of refcount block 0 (16-bit refcounts).
func (q *qcowFile) refblock() int64 { return int64(q.u64(q.rt) &^ 0x1ff) }

func (q *qcowFile) setRefcount(hostOff int64, v uint16) {
	b := make([]byte, 2)
	binary.BigEndian.PutUint16(b, v)
	if _, err := q.f.WriteAt(b, q.refblock()+2*(hostOff/q.cs)); err != nil {
		q.t.Fatal(err)
	}
}

// baseImage makes a clean 4 MiB image with guest clusters 0, 1 and 16
// allocated (64 KiB clusters).
func baseImage(t *testing.T, path string) {
	qemuImg(t, "create", "-q", "-f", "qcow2", path, "4M")
	qemuIO(t, path, "write -P 0x11 0 128k", "write -P 0x22 1M 64k")
}

type checkCounts struct {
	code               int
	corruptions, leaks float64
}

func checkJSON(t *testing.T, r result) checkCounts {
	c := checkCounts{code: r.code}
	if r.stdout == "" {
		return c
	}
	m := decodeJSON(t, r.stdout)
	c.corruptions, _ = m["corruptions"].(float64)
	c.leaks, _ = m["leaks"].(float64)
	return c
}

// TestCheckMatchesQemu builds malformed images and requires img check to
// report what qemu-img check reports: the same exit status (0 clean, 2
// corruption, 3 leaks only) and the same numbers of corruptions and leaks.
func TestCheckMatchesQemu(t *testing.T) {
	qi := qemuTool(t, "qemu-img")
	cases := []struct {
		name   string
		damage func(q *qcowFile)
		want   int // the exit status both must give
	}{
		{"clean", func(*qcowFile) {}, 0},
		{"leaked-cluster", func(q *qcowFile) {
			end := (q.size + q.cs - 1) / q.cs * q.cs
			if err := q.f.Truncate(end + q.cs); err != nil {
				t.Fatal(err)
			}
			q.setRefcount(end, 1)
		}, 3},
		{"data-refcount-zero", func(q *qcowFile) { q.setRefcount(q.data(1), 0) }, 2},
		{"l2-refcount-zero", func(q *qcowFile) { q.setRefcount(q.l2(), 0) }, 2},
		{"data-refcount-two", func(q *qcowFile) { q.setRefcount(q.data(0), 2) }, 2},
		{"entry-beyond-eof", func(q *qcowFile) { q.put64(q.entry(16), uint64(1<<30)|1<<63) }, 2},
		{"entry-unaligned", func(q *qcowFile) { q.put64(q.entry(1), uint64(q.data(1)+512)|1<<63) }, 2},
		{"entry-reserved-bits", func(q *qcowFile) { q.put64(q.entry(0), q.u64(q.entry(0))|0x2) }, 2},
		{"entry-on-refcount-table", func(q *qcowFile) { q.put64(q.entry(16), uint64(q.rt)|1<<63) }, 2},
		{"two-entries-one-cluster", func(q *qcowFile) { q.put64(q.entry(5), q.u64(q.entry(0))) }, 2},
		{"compressed-beyond-eof", func(q *qcowFile) { q.put64(q.entry(20), 1<<62|uint64(8<<20)) }, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			baseImage(t, p)
			c.damage(openQcow(t, p))
			theirs := checkJSON(t, run(t, nil, qi, "check", "-f", "qcow2", "--output", "json", p))
			r := img(t, "check", "--format", "qcow2", "--output", "json", p)
			ours := checkJSON(t, r)
			t.Logf("qemu-img check: %+v; img check: %+v", theirs, ours)
			if theirs.code != c.want {
				t.Fatalf("the damage is not what the test meant: qemu-img check exit %d, want %d", theirs.code, c.want)
			}
			if ours != theirs {
				t.Errorf("img check %+v, qemu-img check %+v\n%s", ours, theirs, r.stderr)
			}
			h := img(t, "check", "--format", "qcow2", p)
			if h.code != ours.code {
				t.Errorf("human output exits %d, JSON %d", h.code, ours.code)
			}
		})
	}
}

// TestCheckRepair: --repair leaks writes only refcount entries and leaves a
// clean image; --repair all fixes a refcount that is too low.
func TestCheckRepair(t *testing.T) {
	qi := qemuTool(t, "qemu-img")
	dir := t.TempDir()
	p := filepath.Join(dir, "leak.qcow2")
	baseImage(t, p)
	q := openQcow(t, p)
	end := (q.size + q.cs - 1) / q.cs * q.cs
	if err := q.f.Truncate(end + q.cs); err != nil {
		t.Fatal(err)
	}
	q.setRefcount(end, 1)
	before, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	r := img(t, "check", "--format", "qcow2", "--repair", "leaks", p)
	if r.code != 0 {
		t.Fatalf("repair leaks: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	after, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	rb := q.refblock()
	for i := range min(len(before), len(after)) {
		if before[i] != after[i] && (int64(i) < rb || int64(i) >= rb+q.cs) {
			t.Fatalf("repair of a leak changed byte %#x, outside the refcount block at %#x", i, rb)
		}
	}
	if r := run(t, nil, qi, "check", "-f", "qcow2", p); r.code != 0 {
		t.Errorf("qemu-img check after img check --repair leaks: exit %d\n%s", r.code, r.stdout)
	}

	p2 := filepath.Join(dir, "low.qcow2")
	baseImage(t, p2)
	q2 := openQcow(t, p2)
	q2.setRefcount(q2.data(1), 0)
	if r := img(t, "check", "--format", "qcow2", "--repair", "leaks", p2); r.code != 2 {
		t.Errorf("repair leaks on a corrupt image: exit %d, want 2 (corruption stays)", r.code)
	}
	if r := img(t, "check", "--format", "qcow2", "--repair", "all", p2); r.code != 0 {
		t.Errorf("repair all: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := run(t, nil, qi, "check", "-f", "qcow2", p2); r.code != 0 {
		t.Errorf("qemu-img check after img check --repair all: exit %d\n%s", r.code, r.stdout)
	}
	// Without --repair the image is opened read-only: nothing changes.
	p3 := filepath.Join(dir, "ro.qcow2")
	baseImage(t, p3)
	q3 := openQcow(t, p3)
	q3.setRefcount(q3.data(1), 0)
	b1, _ := os.ReadFile(p3)
	img(t, "check", "--format", "qcow2", p3)
	b2, _ := os.ReadFile(p3)
	if string(b1) != string(b2) {
		t.Error("img check without --repair changed the image")
	}
	for _, output := range []string{"human", "json"} {
		// As qemu-img: one line on stderr, nothing on stdout (where
		// --output json promises JSON).
		r := img(t, "check", "--format", "raw", "--output", output, p3)
		if r.code != 63 || r.stdout != "" || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, "does not support checks") {
			t.Errorf("check --output %s of a raw image: exit %d, stdout %q, stderr %q; want 63, nothing, one line", output, r.code, r.stdout, r.stderr)
		}
	}
	if r := img(t, "check", "--format", "qcow2", filepath.Join(dir, "missing")); r.code != 1 {
		t.Errorf("check of a missing file: exit %d, want 1", r.code)
	}
}

// TestCheckHugeSparseFile: `img check` of an image of 512-byte clusters in
// a 400 GiB (sparse) file ran the plugin out of memory (1.6 GB of counts
// against its 1 GiB data limit) and printed a Go stack trace. It now
// completes in the sandboxed plugin and reports what qemu-img reports.
func TestCheckHugeSparseFile(t *testing.T) {
	qi := qemuTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "huge.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "64M")
	qemuIO(t, p, "write -P 0x11 0 1M", "write -P 0x22 32M 64k")
	if err := os.Truncate(p, 400<<30); err != nil {
		t.Fatal(err)
	}
	r := img(t, "check", "--format", "qcow2", "--output", "json", p)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("img check: exit %d\n%s", r.code, r.stderr)
	}
	ours := decodeJSON(t, r.stdout)
	theirs := decodeJSON(t, sh(t, qi, "check", "-f", "qcow2", "--output", "json", p))
	for _, k := range []string{"image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters"} {
		if ours[k] != theirs[k] {
			t.Errorf("%s: img check %v, qemu-img check %v", k, ours[k], theirs[k])
		}
	}
	if r := img(t, "check", "--format", "qcow2", "--repair", "all", p); r.code != 0 {
		t.Errorf("img check --repair all: exit %d\n%s", r.code, r.stderr)
	}
}
