package imgserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/disk/qcow2"
	"github.com/krun-core/krun-core/proto/imagepb"
	"google.golang.org/protobuf/proto"
)

// FuzzImageOps feeds hostile files to everything the plugin runs on an
// image it is handed: probe, info, check, verify and convert (to qcow2,
// which reads every allocated cluster, compressed ones included). None
// may panic or hang; errors are fine, but a conversion that succeeds
// writes a clean image that reads as the input does.
func FuzzImageOps(f *testing.F) {
	dir := f.TempDir()
	for i, o := range []qcow2.CreateOptions{
		{Size: 1 << 20, ClusterSize: 512},
		{Size: 4 << 20, BackingFile: "b", BackingFormat: "raw"},
		{Size: 2 << 20, ClusterSize: 4096, CompressionType: "zstd"},
	} {
		p := filepath.Join(dir, string(rune('a'+i)))
		fh, err := os.Create(p)
		if err != nil {
			f.Fatal(err)
		}
		if err := qcow2.Create(fh, o); err != nil {
			f.Fatal(err)
		}
		if o.BackingFile == "" {
			im, err := qcow2.Open(fh, qcow2.Options{})
			if err != nil {
				f.Fatal(err)
			}
			im.WriteAt([]byte("seed data"), 700)
			im.Flush()
			im.Close()
		} else {
			fh.Close()
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x03"))
	// testdata/fuzz/FuzzImageOps holds disk/qcow2's seeds made with
	// qemu-img (compressed zlib and zstd, snapshots, extended L2, refcount
	// widths, lazy refcounts, a backing name), which Create cannot make.
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 4<<20 {
			return
		}
		dir := t.TempDir()
		p := filepath.Join(dir, "in")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		// Read-write, as for a check that repairs: a read-only operation
		// that writes would not go unseen.
		in, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		probe, perr := Probe(in)
		info, err := Info(in, "qcow2")
		check, cerr := Check(in, "qcow2", imagepb.Repair_REPAIR_NONE)
		verify, verr := Verify(in, "qcow2", nil)
		checkReadOnly(t, p, b)
		checkProbe(t, b, probe, perr, err)
		if err == nil {
			checkInfo(t, b, info)
		}
		if cerr == nil && err == nil {
			checkCheck(t, b, info, check)
		}
		checkVerify(t, info, err, check, cerr, verify, verr)
		if err != nil || info.VirtualSize > 16<<20 {
			// Convert reads every virtual byte (disk/qcow2 has no block
			// status); a fuzzed size of terabytes is slow, not wrong.
			return
		}
		out, err := os.Create(filepath.Join(dir, "out"))
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		d, err := dupFile(in)
		if err != nil {
			t.Fatal(err)
		}
		job := ConvertJob{Input: Layer{File: d, Format: "qcow2"}, Output: out, OutputFormat: "qcow2"}
		if _, err := job.Run(context.Background(), nil); err != nil {
			return
		}
		// A conversion that succeeds writes a clean image holding what
		// the input reads as.
		if res, err := qcow2.Check(out, qcow2.RepairNone); err != nil || !res.Clean() {
			t.Fatalf("converted image: %v, %+v", err, res)
		}
		src, err := qcow2.Open(in, qcow2.Options{ReadOnly: true})
		if err != nil {
			t.Fatalf("input converted, but does not open: %v", err)
		}
		defer src.Close()
		dst, err := qcow2.Open(out, qcow2.Options{ReadOnly: true})
		if err != nil {
			t.Fatalf("converted image does not open: %v", err)
		}
		defer dst.Close()
		if dst.Size() != src.Size() {
			t.Fatalf("converted image of %d bytes from %d", dst.Size(), src.Size())
		}
		want, got := make([]byte, 1<<20), make([]byte, 1<<20)
		for off := int64(0); off < src.Size(); off += int64(len(want)) {
			n := min(int64(len(want)), src.Size()-off)
			if _, err := src.ReadAt(want[:n], off); err != nil {
				t.Fatalf("input converted, but reads fail at %d: %v", off, err)
			}
			if _, err := dst.ReadAt(got[:n], off); err != nil {
				t.Fatalf("converted image: read at %d: %v", off, err)
			}
			if !bytes.Equal(got[:n], want[:n]) {
				t.Fatalf("converted image differs from the input in [%d, +%d)", off, n)
			}
		}
	})
}

// checkReadOnly: probe, info, check without repair and verify leave the
// image's bytes as they were.
func checkReadOnly(t *testing.T, path string, b []byte) {
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after, b) {
		t.Fatalf("probe, info, check or verify wrote to the image (%d bytes, %d before)", len(after), len(b))
	}
}

// checkProbe: probe names what the first bytes say, and calls a qcow2
// header unparsable exactly when Info cannot read it.
func checkProbe(t *testing.T, b []byte, r *imagepb.ProbeResponse, err, infoErr error) {
	if err != nil {
		t.Fatalf("probe of a regular file: %v", err)
	}
	if len(b) < 8 || be.Uint32(b) != 0x514649fb {
		if r.Format == "qcow2" {
			t.Fatalf("probe says qcow2 without the magic: % x", b[:min(len(b), 8)])
		}
		return
	}
	switch v := be.Uint32(b[4:]); {
	case v == 1:
		if r.Format != "qcow" || r.Supported {
			t.Fatalf("probe of a qcow version 1 header: %+v", r)
		}
	case v != 2 && v != 3:
		if r.Format != "qcow2" || r.Supported || infoErr == nil {
			t.Fatalf("qcow2 version %d: probe %+v, info error %v", v, r, infoErr)
		}
	default:
		bad := strings.Contains(r.Detail, "does not parse")
		if r.Format != "qcow2" || !r.Supported || bad != (infoErr != nil) {
			t.Fatalf("probe %+v, info error %v", r, infoErr)
		}
	}
}

var be = binary.BigEndian

// checkInfo: what Info read is the header's bytes at their offsets, and
// the backing file's name lies inside the file.
func checkInfo(t *testing.T, b []byte, r *imagepb.InfoResponse) {
	if len(b) < 72 || be.Uint32(b) != 0x514649fb {
		t.Fatalf("info parsed %d bytes without a qcow2 header", len(b))
	}
	v := be.Uint32(b[4:])
	var incompat, compat, autoclear uint64
	refcountBits := uint32(16)
	if v == 3 {
		if len(b) < 104 {
			t.Fatalf("info parsed a version 3 header of %d bytes", len(b))
		}
		incompat, compat, autoclear = be.Uint64(b[72:]), be.Uint64(b[80:]), be.Uint64(b[88:])
		refcountBits = 1 << be.Uint32(b[96:])
	}
	type fields struct {
		Version, RefcountBits                       uint32
		ClusterSize, VirtualSize, FileSize          int64
		Encrypted, Dirty, Corrupt, ExtendedL2, Lazy bool
		Incompat, Compat, Autoclear                 uint64
		Snapshots                                   int
	}
	got := fields{r.Version, r.RefcountBits, r.ClusterSize, r.VirtualSize, r.FileSize,
		r.Encrypted, r.Dirty, r.Corrupt, r.ExtendedL2, r.LazyRefcounts,
		r.IncompatibleFeatures, r.CompatibleFeatures, r.AutoclearFeatures, len(r.Snapshots)}
	want := fields{v, refcountBits, 1 << be.Uint32(b[20:]), int64(be.Uint64(b[24:]) &^ 511), int64(len(b)),
		be.Uint32(b[32:]) != 0, incompat&1 != 0, incompat&2 != 0, incompat&16 != 0, compat&1 != 0,
		incompat, compat, autoclear, int(be.Uint32(b[60:]))}
	if got != want {
		t.Fatalf("info %+v, the header says %+v", got, want)
	}
	off, n := be.Uint64(b[8:]), uint64(be.Uint32(b[16:]))
	if r.BackingFile == "" && off != 0 && n != 0 {
		t.Fatalf("info names no backing file; the header names %d bytes at %#x", n, off)
	}
	if r.BackingFile != "" {
		if off == 0 || n == 0 || off >= uint64(len(b)) || n > uint64(len(b))-off {
			t.Fatalf("backing file %q from %d bytes at %#x of a %d-byte file", r.BackingFile, n, off, len(b))
		}
		if name := printable(string(b[off : off+n])); r.BackingFile != name {
			t.Fatalf("backing file %q, the header's bytes say %q", r.BackingFile, name)
		}
	}
}

// printable replaces control characters with '?', as info shows names.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return '?'
		}
		return r
	}, s)
}

// checkCheck: check's counts agree with the header and, for an image it
// found no fault in, with the active L1 and L2 tables walked here.
func checkCheck(t *testing.T, b []byte, info *imagepb.InfoResponse, r *imagepb.CheckResponse) {
	cs := info.ClusterSize
	if !r.Supported || r.CorruptionsFixed != 0 || r.LeaksFixed != 0 || r.RefcountsRebuilt {
		t.Fatalf("check without repair: %+v", r)
	}
	if size := be.Uint64(b[24:]); r.TotalClusters != int64(size/uint64(cs))+int64(min(size%uint64(cs), 1)) {
		t.Fatalf("check counts %d guest clusters of %d bytes in %d", r.TotalClusters, cs, size)
	}
	if r.CompressedClusters > r.AllocatedClusters || r.FragmentedClusters > r.AllocatedClusters || r.ImageEndOffset%cs != 0 {
		t.Fatalf("check: %d allocated clusters, %d compressed, %d fragmented, image end %#x", r.AllocatedClusters, r.CompressedClusters, r.FragmentedClusters, r.ImageEndOffset)
	}
	if r.Corruptions != 0 || r.CheckErrors != 0 || info.ExternalData {
		return
	}
	step := int64(8)
	if info.ExtendedL2 {
		step = 16
	}
	const offMask, compressed = 0x00fffffffffffe00, 1 << 62
	l1Size, l1Off := int64(be.Uint32(b[36:])), int64(be.Uint64(b[40:]))
	if l1Off+l1Size*8 > int64(len(b)) {
		t.Fatalf("check finds no fault in an L1 table of %d entries at %#x of a %d-byte file", l1Size, l1Off, len(b))
	}
	var alloc, comp int64
	seen := map[int64]bool{}
	for i := range l1Size {
		l2 := int64(be.Uint64(b[l1Off+i*8:]) & offMask)
		if l2 == 0 || seen[l2] {
			continue
		}
		seen[l2] = true
		if l2+cs > int64(len(b)) {
			t.Fatalf("check finds no fault in an L2 table at %#x of a %d-byte file", l2, len(b))
		}
		for j := l2; j < l2+cs; j += step {
			switch e := be.Uint64(b[j:]); {
			case e&compressed != 0:
				alloc++
				comp++
			case e&offMask != 0:
				alloc++
			}
		}
	}
	if r.AllocatedClusters != alloc || r.CompressedClusters != comp {
		t.Fatalf("check counts %d allocated clusters, %d compressed; the active tables hold %d and %d", r.AllocatedClusters, r.CompressedClusters, alloc, comp)
	}
}

// checkVerify: verify shows what info shows, and passes only an image
// that info reads and check finds no corruption in.
func checkVerify(t *testing.T, info *imagepb.InfoResponse, infoErr error, check *imagepb.CheckResponse, checkErr error, r *imagepb.VerifyResponse, err error) {
	if err != nil {
		t.Fatalf("verify of a regular file: %v", err)
	}
	if r.Info != nil && (infoErr != nil || !proto.Equal(r.Info, info)) {
		t.Fatalf("verify shows %v; info %v, %v", r.Info, info, infoErr)
	}
	if r.Violation != "" {
		return
	}
	if infoErr != nil || checkErr != nil || r.Info == nil {
		t.Fatalf("verify passed an image info (%v) or check (%v) fails on", infoErr, checkErr)
	}
	if check.Corruptions != 0 || check.CheckErrors != 0 || info.Encrypted || info.ExternalData || info.Corrupt || info.Dirty {
		t.Fatalf("verify passed an image with %d corruptions, %d check errors, info %+v", check.Corruptions, check.CheckErrors, info)
	}
}

// TestFuzzSeedsAgreeWithQemuImg: on FuzzImageOps's qemu-img seeds, info
// and check report what qemu-img info and check do. (The fuzz body checks
// them against the header's bytes and the tables it walks; qemu-img is too
// slow to run there.)
func TestFuzzSeedsAgreeWithQemuImg(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("no qemu-img")
	}
	seeds, err := filepath.Glob("testdata/fuzz/FuzzImageOps/*")
	if err != nil || len(seeds) == 0 {
		t.Fatalf("no seeds: %v", err)
	}
	for _, s := range seeds {
		t.Run(filepath.Base(s), func(t *testing.T) {
			b := readFuzzSeed(t, s)
			p := filepath.Join(t.TempDir(), "img")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			var qi struct {
				VirtualSize int64  `json:"virtual-size"`
				ClusterSize int64  `json:"cluster-size"`
				BackingFile string `json:"backing-filename"`
			}
			out, err := exec.Command("qemu-img", "info", "--output=json", "-U", p).Output()
			if err != nil || json.Unmarshal(out, &qi) != nil {
				t.Fatalf("qemu-img info: %v\n%s", err, out)
			}
			// qemu-img check exits 2 and 3 for corruptions and leaks.
			var qc struct {
				Corruptions int64 `json:"corruptions"`
				Leaks       int64 `json:"leaks"`
				Total       int64 `json:"total-clusters"`
				Allocated   int64 `json:"allocated-clusters"`
				Compressed  int64 `json:"compressed-clusters"`
				Fragmented  int64 `json:"fragmented-clusters"`
				End         int64 `json:"image-end-offset"`
			}
			out, _ = exec.Command("qemu-img", "check", "--output=json", "-U", p).Output()
			if err := json.Unmarshal(out, &qc); err != nil {
				t.Fatalf("qemu-img check: %v\n%s", err, out)
			}
			f := open(t, p, os.O_RDONLY)
			defer f.Close()
			info, err := Info(f, "qcow2")
			if err != nil {
				t.Fatal(err)
			}
			if info.VirtualSize != qi.VirtualSize || info.ClusterSize != qi.ClusterSize || info.BackingFile != qi.BackingFile {
				t.Errorf("info: size %d, clusters of %d, backing %q; qemu-img: %+v", info.VirtualSize, info.ClusterSize, info.BackingFile, qi)
			}
			c, err := Check(f, "qcow2", imagepb.Repair_REPAIR_NONE)
			if err != nil {
				t.Fatal(err)
			}
			got := [7]int64{c.Corruptions, c.Leaks, c.TotalClusters, c.AllocatedClusters, c.CompressedClusters, c.FragmentedClusters, c.ImageEndOffset}
			want := [7]int64{qc.Corruptions, qc.Leaks, qc.Total, qc.Allocated, qc.Compressed, qc.Fragmented, qc.End}
			if got != want {
				t.Errorf("check (corruptions, leaks, total, allocated, compressed, fragmented, end) = %v, qemu-img %v", got, want)
			}
		})
	}
}

// readFuzzSeed reads a corpus file of one []byte value.
func readFuzzSeed(t *testing.T, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v, ok := strings.CutPrefix(string(b), "go test fuzz v1\n[]byte(")
	v, ok2 := strings.CutSuffix(strings.TrimSpace(v), ")")
	s, err := strconv.Unquote(v)
	if !ok || !ok2 || err != nil {
		t.Fatalf("%s: not a corpus file of one []byte (%v)", path, err)
	}
	return []byte(s)
}
