package qcow2

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// TestZstdWindowBoundedByCluster (from review): a compressed cluster is one
// cluster of data, but the zstd decoder accepted any window up to 8 MiB
// that the image's frame header declared, and allocated it. A hostile image whose
// compressed clusters declare an 8 MiB window makes every read of one
// cost about 8 MiB per decoder in use: with the plugin's default 8 queues
// of 8 workers that is over 512 MiB of its 1 GiB RLIMIT_DATA for 64 KiB
// clusters (4 GiB with queues=64), and the plugin dies of it. The window a
// cluster can need is bounded by the cluster size.
func TestZstdWindowBoundedByCluster(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "img.qcow2")
	const cs = 64 << 10
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := Create(f, CreateOptions{Size: 1 << 20, ClusterSize: cs, CompressionType: "zstd"}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Allocate guest cluster 0 to learn where its L2 entry and host
	// cluster are.
	im := openImage(t, p, false)
	if _, err := im.WriteAt(make([]byte, cs), 0); err != nil {
		t.Fatal(err)
	}
	ci, err := im.lookup(0)
	if err != nil || ci.typ != ctNormal {
		t.Fatalf("lookup: %v %+v", err, ci)
	}
	l2 := im.l1[0] & l1OffsetMask
	host := ci.host
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}

	// A zstd frame: no content size, an 8 MiB window, one RLE block of
	// one cluster of 'A'.
	frame := binary.LittleEndian.AppendUint32(nil, 0xFD2FB528)
	frame = append(frame, 0x00, 13<<3)
	bh := uint32(1) | uint32(1)<<1 | uint32(cs)<<3
	frame = append(frame, byte(bh), byte(bh>>8), byte(bh>>16), 'A')
	x := 62 - (16 - 8)
	entry := flagCompressed | 0<<x | host // one 512-byte sector
	var e [8]byte
	be.PutUint64(e[:], entry)
	wf := openFile(t, p, false)
	if _, err := wf.WriteAt(frame, int64(host)); err != nil {
		t.Fatal(err)
	}
	if _, err := wf.WriteAt(e[:], int64(l2)); err != nil {
		t.Fatal(err)
	}
	wf.Close()

	im = openImage(t, p, true)
	defer im.Close()
	buf := make([]byte, cs)
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	_, err = im.ReadAt(buf, 0)
	runtime.ReadMemStats(&m1)
	if err == nil && !bytes.Equal(buf, bytes.Repeat([]byte{'A'}, cs)) {
		t.Fatal("compressed cluster read back wrong")
	}
	if got := m1.TotalAlloc - m0.TotalAlloc; got > 1<<20 {
		t.Fatalf("reading one %d-byte compressed cluster allocated %d KiB (the frame's declared window), err=%v", cs, got>>10, err)
	}
}
