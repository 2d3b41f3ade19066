package frontend

import (
	"bytes"
	"testing"

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
			f, err := newRegionFile(tc.mmapSize)
			if err != nil {
				t.Fatal(err)
			}
			in := &Inflight{Inflight: vhostuser.Inflight{MmapSize: tc.mmapSize, NumQueues: tc.queues, QueueSize: tc.size}, File: f}
			defer in.Close()
			full := bytes.Repeat([]byte{0xff}, int(tc.mmapSize))
			if _, err := f.WriteAt(full, 0); err != nil {
				t.Fatal(err)
			}
			if err := in.ResetQueue(tc.queue); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, tc.mmapSize)
			if _, err := f.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
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
