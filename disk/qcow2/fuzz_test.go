package qcow2

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// memFile returns a memfd holding b.
func memFile(t testing.TB, b []byte) *os.File {
	fd, err := unix.MemfdCreate("qcow2-fuzz", 0)
	if err != nil {
		t.Fatalf("memfd_create: %v", err)
	}
	f := os.NewFile(uintptr(fd), "qcow2-fuzz")
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return f
}

// seedImage builds a small image with Create and a few writes, without
// QEMU.
func seedImage(t testing.TB, o CreateOptions, writes [][2]int64) []byte {
	f := memFile(t, nil)
	if err := Create(f, o); err != nil {
		t.Fatal(err)
	}
	im, err := Open(f, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range writes {
		if _, err := im.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, int(w[1])), w[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.WriteZeroes(o.Size/2, min(o.ClusterSize, o.Size/2), false); err != nil {
		t.Fatal(err)
	}
	// Close writes the metadata back; read the bytes before it closes f.
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	im.mu.Lock()
	if err := im.writeback(); err != nil {
		t.Fatal(err)
	}
	st, _ := f.Stat()
	b := make([]byte, st.Size())
	f.ReadAt(b, 0)
	im.mu.Unlock()
	im.Close()
	return b
}

func addSeeds(f *testing.F) {
	f.Add(seedImage(f, CreateOptions{Size: 64 << 10, ClusterSize: 512}, [][2]int64{{0, 1000}, {40 << 10, 512}}))
	f.Add(seedImage(f, CreateOptions{Size: 64 << 10, ClusterSize: 512, Version: 2}, [][2]int64{{100, 3000}}))
	f.Add(seedImage(f, CreateOptions{Size: 64 << 10, ClusterSize: 512, RefcountBits: 1}, [][2]int64{{512, 512}}))
}

// FuzzHeader parses fuzzed header clusters and snapshot tables.
func FuzzHeader(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b[:min(len(b), 2<<20)], int64(len(b)))
		if err != nil {
			return
		}
		if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits || h.refcountOrder > 6 {
			t.Fatalf("accepted header with cluster_bits %d refcount_order %d", h.clusterBits, h.refcountOrder)
		}
		if uint64(h.l1Size) < h.l1Needed() || uint64(h.l1Size)*8 > maxL1Bytes {
			t.Fatalf("accepted L1 size %d for virtual size %d", h.l1Size, h.size)
		}
		if uint64(h.rtClusters)*h.clusterSize() > maxRefTableBytes || h.rtOff+h.refTableBytes() > uint64(len(b)) {
			t.Fatalf("accepted refcount table %#x+%d clusters in %d bytes", h.rtOff, h.rtClusters, len(b))
		}
		snaps, n, err := readSnapshots(bytes.NewReader(b), h)
		if err == nil && (len(snaps) != int(h.nbSnapshots) || n > maxSnapTableBytes) {
			t.Fatalf("snapshot table: %d entries, %d bytes", len(snaps), n)
		}
		_ = h.info(snaps)
	})
}

// FuzzOpenRead opens fuzzed images, reads them, writes to them and checks
// them. Nothing may panic or hang, and writes may only grow the file by
// the clusters they allocate.
func FuzzOpenRead(f *testing.F) {
	addSeeds(f)
	f.Fuzz(fuzzBody)
}

// fuzzBody is FuzzOpenRead's target.
func fuzzBody(t *testing.T, b []byte) {
	if len(b) > 4<<20 {
		return
	}
	opts := Options{ReadOnly: true, MaxVirtualSize: 64 << 20, CacheBytes: 64 << 10}
	mf := memFile(t, b)
	im, err := Open(mf, opts)
	if err != nil {
		mf.Close()
		return
	}
	size := im.Size()
	buf := make([]byte, 64<<10)
	for off := int64(0); off < min(size, 1<<20); off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		im.ReadAt(buf[:n], off)
	}
	if size > 0 {
		im.ReadAt(buf[:min(size, 4096)], size-min(size, 4096))
	}
	im.Info()
	im.Close()

	mf = memFile(t, b)
	opts.ReadOnly = false
	im, err = Open(mf, opts)
	if err != nil {
		mf.Close()
		return
	}
	rtBefore := im.rt
	data := bytes.Repeat([]byte{0xa5}, 3000)
	for _, off := range []int64{0, 700, size / 2, size - 3000} {
		if off >= 0 && off+3000 <= size {
			im.WriteAt(data, off)
		}
	}
	if size >= 8192 {
		im.WriteZeroes(1024, 4096, true)
		im.Discard(0, size/2)
		im.WriteAt(data, 100)
	}
	im.Flush()
	// New clusters go to the first place the refcounts call free:
	// below the old end or the old refcount table's reach, plus what
	// these few writes may allocate (data, L2 tables, refcount blocks,
	// a grown refcount table).
	im.mu.Lock()
	reach := max(divRoundUp(uint64(len(b)), im.cs), uint64(len(rtBefore))*im.rbEntries)
	bound := reach + 64 + maxRefTableBytes/im.cs
	if im.fileClusters > bound {
		t.Fatalf("image grew to %d clusters (bound %d)", im.fileClusters, bound)
	}
	im.mu.Unlock()
	st, _ := mf.Stat()
	if st.Size() > 64<<20 {
		im.Close()
		return
	}
	after := make([]byte, st.Size())
	mf.ReadAt(after, 0)
	im.Close()
	cf := memFile(t, after)
	Check(cf, RepairNone)
	cf.Close()

	// Growing the image is refused, or leaves it without errors and
	// with a new area that reads as zeros.
	rf := memFile(t, b)
	grown := (size + 1<<20) &^ 511
	if err := Resize(rf, grown, Options{}); err == nil {
		if res, err := Check(rf, RepairNone); err != nil || res.Corruptions+res.CheckErrors > 0 {
			t.Fatalf("resized image: %v, %d corruptions, %d check errors: %v", err, res.Corruptions, res.CheckErrors, res.Messages)
		}
		if gi, err := Open(rf, Options{ReadOnly: true}); err == nil {
			tail := make([]byte, min(grown-size, 256<<10))
			if _, err := gi.ReadAt(tail, size); err == nil && !bytes.Equal(tail, make([]byte, len(tail))) {
				t.Fatalf("the area grown from %d to %d does not read as zeros", size, grown)
			}
			gi.Close()
			return
		}
	}
	rf.Close()
}

// TestWriteFuzzSeeds regenerates the committed seed corpora from images
// made with qemu-img (compressed, snapshots, extended L2, backing names).
// It only runs when KRUN_WRITE_FUZZ_SEEDS is set.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("KRUN_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set KRUN_WRITE_FUZZ_SEEDS=1 to regenerate testdata/fuzz seeds")
	}
	needQemu(t)
	dir := t.TempDir()
	type seed struct {
		name, create string
		cmds         []string
		compress     bool
		snapshot     bool
	}
	seeds := []seed{
		{name: "v3-cs512", create: "cluster_size=512", cmds: []string{"write -P 1 0 1500", "write -z 8k 1k", "write -P 2 60k 4k"}},
		{name: "v2-cs512", create: "cluster_size=512,compat=0.10", cmds: []string{"write -P 1 0 1500", "write -P 2 60k 4k"}},
		{name: "rc1-cs512", create: "cluster_size=512,refcount_bits=1", cmds: []string{"write -P 1 512 1500"}},
		{name: "rc64-cs512", create: "cluster_size=512,refcount_bits=64", cmds: []string{"write -P 1 512 1500"}},
		{name: "zlib-cs512", create: "cluster_size=512", compress: true},
		{name: "zstd-cs512", create: "cluster_size=512,compression_type=zstd", compress: true},
		{name: "extl2-cs16k", create: "cluster_size=16384,extended_l2=on", cmds: []string{"write -P 1 1k 600", "write -z 5k 512"}},
		{name: "snap-cs512", create: "cluster_size=512", cmds: []string{"write -P 1 0 2k"}, snapshot: true},
		{name: "backing-cs512", create: "cluster_size=512", cmds: []string{"write -P 1 0 600"}},
		{name: "lazy-cs512", create: "cluster_size=512,lazy_refcounts=on", cmds: []string{"write -P 1 0 600"}},
	}
	for _, s := range seeds {
		p := filepath.Join(dir, s.name+".qcow2")
		if s.compress {
			src := filepath.Join(dir, "src")
			b := make([]byte, 16<<10)
			for i := range b {
				b[i] = byte(i / 700)
			}
			os.WriteFile(src, b, 0o644)
			sh(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", s.create, src, p)
		} else {
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", s.create, p, "64k")
			qio(t, p, s.cmds...)
		}
		if s.name == "backing-cs512" {
			sh(t, "qemu-img", "rebase", "-u", "-b", "/etc/shadow", "-F", "raw", p)
		}
		if s.snapshot {
			sh(t, "qemu-img", "snapshot", "-c", "s1", p)
			qio(t, p, "write -P 3 1k 1k")
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, target := range []string{"FuzzHeader", "FuzzOpenRead"} {
			b := b
			if target == "FuzzHeader" {
				// The header fuzzer only needs the header and its
				// extensions; small inputs keep minimization quick.
				// FuzzOpenRead gets the whole image (it got these
				// 1024 bytes too, which no longer open).
				b = b[:min(len(b), 1024)]
			}
			d := filepath.Join("testdata", "fuzz", target)
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
			content := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(b)))
			if err := os.WriteFile(filepath.Join(d, s.name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
