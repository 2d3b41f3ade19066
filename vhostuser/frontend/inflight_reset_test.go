package frontend

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/vhostuser"
)

// TestResetQueueZeroesOnlyItsPart: ResetQueue zeroes the stopped queue's
// part of the region where the back-end's layout puts it
// (vhostuser.Inflight.QueueBytes), whatever size the back-end asked for:
// a region rounded up to a page is not NumQueues equal parts, and zeroing
// MmapSize/NumQueues bytes at i times that wiped part of the next queue's
// requests in flight. A region too small for the layout is zeroed whole.
func TestResetQueueZeroesOnlyItsPart(t *testing.T) {
	for _, tc := range []struct {
		name           string
		queues, size   uint16
		mmapSize       uint64
		queue          int
		zeroFrom, zero uint64 // the bytes that must be zero after
	}{
		// 2 queues of 128: a part is 16+2048 rounded to 2112 bytes.
		{"exact size, queue 0", 2, 128, 2 * 2112, 0, 0, 2112},
		{"exact size, queue 1", 2, 128, 2 * 2112, 1, 2112, 2112},
		{"page-rounded, queue 0", 2, 128, 8192, 0, 0, 2112},
		{"page-rounded, queue 1", 2, 128, 8192, 1, 2112, 2112},
		{"one queue of 256", 1, 256, 4160, 0, 0, 4160},
		{"too small for the layout: all of it", 2, 128, 4096, 1, 0, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := onesRegion(t, tc.queues, tc.size, tc.mmapSize)
			if err := in.ResetQueue(tc.queue); err != nil {
				t.Fatal(err)
			}
			got := regionBytes(t, in)
			for off, b := range got {
				inPart := uint64(off) >= tc.zeroFrom && uint64(off) < tc.zeroFrom+tc.zero
				if inPart && b != 0 {
					t.Fatalf("byte %d of queue %d's part not zeroed", off, tc.queue)
				}
				if !inPart && b != 0xff {
					t.Fatalf("byte %d outside queue %d's part [%d, %d) zeroed", off, tc.queue, tc.zeroFrom, tc.zeroFrom+tc.zero)
				}
			}
		})
	}
	if err := (&Inflight{Inflight: vhostuser.Inflight{NumQueues: 2}, File: nil}).ResetQueue(5); err != nil {
		t.Errorf("ResetQueue without a region: %v", err)
	}
}

// TestResetFreesTheRegion: a device reset makes a large region zero by
// freeing its pages, not by writing zeros into them: a back-end may ask
// for 256 MiB (256 queues of 32768), which each reset made the core fill
// (from review, helper-95). The edges of a part that are not whole pages
// are written.
func TestResetFreesTheRegion(t *testing.T) {
	const size = 16 << 20
	f, err := newRegionFile(size)
	if err != nil {
		t.Fatal(err)
	}
	in := &Inflight{Inflight: vhostuser.Inflight{MmapSize: size, NumQueues: 1, QueueSize: 1024}, File: f}
	defer in.Close()
	ones := bytes.Repeat([]byte{0xff}, 1<<20)
	for off := int64(0); off < size; off += int64(len(ones)) {
		if _, err := f.WriteAt(ones, off); err != nil {
			t.Fatal(err)
		}
	}
	// An unaligned part first: its edges are written, its pages freed.
	if err := in.zero(100, size-200); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for off, b := range got {
		want := byte(0)
		if off < 100 || off >= size-100 {
			want = 0xff
		}
		if b != want {
			t.Fatalf("byte %d is %#x after zeroing [100, %d), want %#x", off, b, size-100, want)
		}
	}
	if err := in.Reset(); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if held := st.Blocks * 512; held > 64<<10 {
		t.Errorf("the region holds %d KiB of memory after a reset, want its pages freed", held>>10)
	}
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, size)) {
		t.Error("the region is not all zero after a reset")
	}
}

// TestResetKeepsTheDeviceState: a device reset zeroes the queues' parts
// and what lies past the device's own bytes (vhostuser.InflightStateBytes
// after the queues), which stay: they describe the backing store. A
// region without room for them after the queues is zeroed whole.
func TestResetKeepsTheDeviceState(t *testing.T) {
	for _, tc := range []struct {
		name         string
		queues, size uint16
		mmapSize     uint64
		keepFrom     uint64 // keepFrom..keepFrom+64 kept; 0: nothing kept
	}{
		{"exact size with state", 2, 128, 2*2112 + 64, 2 * 2112},
		{"page-rounded with state", 2, 128, 8192, 2 * 2112},
		{"no room for state", 2, 128, 2*2112 + 32, 0},
		{"queues only", 2, 128, 2 * 2112, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := onesRegion(t, tc.queues, tc.size, tc.mmapSize)
			if err := in.Reset(); err != nil {
				t.Fatal(err)
			}
			got := regionBytes(t, in)
			for off, b := range got {
				kept := tc.keepFrom != 0 && uint64(off) >= tc.keepFrom && uint64(off) < tc.keepFrom+vhostuser.InflightStateBytes
				if kept && b != 0xff {
					t.Fatalf("byte %d of the device's state zeroed by a reset", off)
				}
				if !kept && b != 0 {
					t.Fatalf("byte %d not zeroed by a reset", off)
				}
			}
		})
	}
}

// onesRegion is a region of mmapSize bytes for queues queues of size
// descriptors, every byte 0xff, closed at the test's end.
func onesRegion(t *testing.T, queues, size uint16, mmapSize uint64) *Inflight {
	t.Helper()
	f, err := newRegionFile(mmapSize)
	if err != nil {
		t.Fatal(err)
	}
	in := &Inflight{Inflight: vhostuser.Inflight{MmapSize: mmapSize, NumQueues: queues, QueueSize: size}, File: f}
	t.Cleanup(func() { in.Close() })
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xff}, int(mmapSize)), 0); err != nil {
		t.Fatal(err)
	}
	return in
}

// regionBytes reads the whole region back.
func regionBytes(t *testing.T, in *Inflight) []byte {
	t.Helper()
	got := make([]byte, in.MmapSize)
	if _, err := in.File.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}
