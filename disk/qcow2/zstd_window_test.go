package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"
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
	const cs = 64 << 10
	// A zstd frame: no content size, an 8 MiB window, one RLE block of
	// one cluster of 'A'.
	frame := binary.LittleEndian.AppendUint32(nil, 0xFD2FB528)
	frame = append(frame, 0x00, 13<<3)
	frame = append(frame, rleBlock(true, cs, 'A')...)
	p := zstdClusterImage(t, cs, frame)
	im := openImage(t, p, true)
	defer im.Close()
	buf := make([]byte, cs)
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	_, err := im.ReadAt(buf, 0)
	runtime.ReadMemStats(&m1)
	if err == nil && !bytes.Equal(buf, bytes.Repeat([]byte{'A'}, cs)) {
		t.Fatal("compressed cluster read back wrong")
	}
	if got := m1.TotalAlloc - m0.TotalAlloc; got > 1<<20 {
		t.Fatalf("reading one %d-byte compressed cluster allocated %d KiB (the frame's declared window), err=%v", cs, got>>10, err)
	}
}

// zstdClusterImage makes a zstd qcow2 image of cs-byte clusters whose guest
// cluster 0 is the compressed cluster holding frame (in whole sectors,
// the rest of them zero), and returns its path.
func zstdClusterImage(t *testing.T, cs int64, frame []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
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
	sectors := (uint64(len(frame)) + 511) / 512
	if sectors == 0 || sectors*512 > uint64(cs) {
		t.Fatalf("a frame of %d bytes does not fit one cluster", len(frame))
	}
	x := 62 - (bits64(uint64(cs)) - 8)
	entry := flagCompressed | (sectors-1)<<x | host
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
	return p
}

func bits64(v uint64) uint64 {
	n := uint64(0)
	for v > 1 {
		v >>= 1
		n++
	}
	return n
}

// rleBlock is a zstd RLE block of n bytes b.
func rleBlock(last bool, n int, b byte) []byte {
	bh := uint32(1)<<1 | uint32(n)<<3
	if last {
		bh |= 1
	}
	return []byte{byte(bh), byte(bh >> 8), byte(bh >> 16), b}
}

// TestZstdFrameLongerThanCluster: the frame that fills a compressed
// cluster must end there, as QEMU's decompression wants (it returns EIO
// otherwise); the reader served the frame's first cluster of content and
// ignored the rest (from review, helper-84). What follows the frame in its
// sectors (padding, another frame) is not read, and skippable frames
// before it are skipped.
func TestZstdFrameLongerThanCluster(t *testing.T) {
	const cs = 64 << 10
	magic := binary.LittleEndian.AppendUint32(nil, 0xFD2FB528)
	noSize := append(append([]byte{}, magic...), 0x00, 10<<3) // window descriptor only
	withSize := binary.LittleEndian.AppendUint32(append(append([]byte{}, magic...), 0x80|0x20), cs)
	good := append(append([]byte{}, noSize...), rleBlock(true, cs, 'A')...)
	skippable := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 0x184D2A53), 5)
	skippable = append(skippable, 1, 2, 3, 4, 5)

	data := make([]byte, cs)
	for i := range data {
		data[i] = 'A' + byte(i*7/13%26)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderCRC(true))
	if err != nil {
		t.Fatal(err)
	}
	real := enc.EncodeAll(data, nil)
	realLong := enc.EncodeAll(append(append([]byte{}, data...), data...), nil)
	enc.Close()
	As := bytes.Repeat([]byte{'A'}, cs)

	cases := []struct {
		name  string
		frame []byte
		want  []byte // nil: the read fails
	}{
		{"one-block", good, As},
		{"followed-by-ff", append(append([]byte{}, good...), bytes.Repeat([]byte{0xff}, 100)...), As},
		{"followed-by-a-frame", append(append([]byte{}, good...), append(append([]byte{}, noSize...), rleBlock(true, cs, 'B')...)...), As},
		{"after-a-skippable-frame", append(append([]byte{}, skippable...), good...), As},
		{"encoder-with-checksum", real, data},
		{"two-blocks", append(append(append([]byte{}, noSize...), rleBlock(false, cs, 'A')...), rleBlock(true, 1, 'B')...), nil},
		{"content-size-exceeded", append(append(append([]byte{}, withSize...), rleBlock(false, cs, 'A')...), rleBlock(true, cs, 'B')...), nil},
		{"encoder-two-clusters", realLong, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			im := openImage(t, zstdClusterImage(t, cs, c.frame), true)
			defer im.Close()
			got := make([]byte, cs)
			_, err := im.ReadAt(got, 0)
			switch {
			case c.want == nil && err == nil:
				t.Fatal("a frame of more than one cluster was served")
			case c.want == nil && !errors.Is(err, ErrCorrupt):
				t.Fatalf("read: %v, want ErrCorrupt", err)
			case c.want != nil && err != nil:
				t.Fatalf("read: %v", err)
			case c.want != nil && !bytes.Equal(got, c.want):
				t.Fatal("read back wrong data")
			}
		})
	}
}

// FuzzZstdFrameLen: any bytes; the length is within them when whole.
func FuzzZstdFrameLen(f *testing.F) {
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0x50, 0x0b, 0, 0x08, 'A'})
	f.Add([]byte{0x53, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 9})
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, ok := zstdFrameLen(b); ok && (n < 5 || n > len(b)) {
			t.Fatalf("frame length %d of %d bytes", n, len(b))
		}
	})
}

// TestZstdFrameCutShort (from review, helper-91; fixed: such a read fails
// as corrupt): a frame that does not end within the
// compressed sectors (its last block missing) is not whole, and decode
// then serves the first cluster without asking whether the frame ends.
// QEMU's qcow2_zstd_decompress fails such a cluster (zstd_ret > 0: EIO).
func TestZstdFrameCutShort(t *testing.T) {
	const cs = 64 << 10
	magic := binary.LittleEndian.AppendUint32(nil, 0xFD2FB528)
	noSize := append(append([]byte{}, magic...), 0x00, 10<<3)
	data := make([]byte, 2*cs)
	for i := range data {
		data[i] = 'A' + byte(i*7/13%26)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	long := enc.EncodeAll(data, nil)
	enc.Close()
	cases := []struct {
		name  string
		frame []byte
	}{
		{"no-last-block-ff", append(append(append([]byte{}, noSize...), rleBlock(false, cs, 'A')...), bytes.Repeat([]byte{0xff}, 3)...)},
		{"no-last-block-zeros", append(append([]byte{}, noSize...), rleBlock(false, cs, 'A')...)},
		{"two-cluster-frame-cut", long[:len(long)*2/3]},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if len(c.frame) > cs {
				t.Skip("frame too long")
			}
			if n, whole := zstdFrameLen(c.frame); whole {
				t.Logf("whole frame of %d", n)
			}
			im := openImage(t, zstdClusterImage(t, cs, c.frame), true)
			defer im.Close()
			got := make([]byte, cs)
			if _, err := im.ReadAt(got, 0); err == nil {
				t.Fatalf("a zstd frame that does not end in its cluster's sectors was served (first bytes %q)", got[:8])
			}
		})
	}
}
