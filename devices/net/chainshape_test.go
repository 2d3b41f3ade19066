package net

// Hostile-guest review (helper-137): chains of a shape the ring itself
// refuses (a buffer past the end of guest memory, a loop, a next index
// outside the table, an indirect descriptor the driver did not negotiate),
// on both rings. Each is handed back empty and the rings go on.

import (
	"bytes"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/virtq"
)

// badChains posts, at descriptors first.., a chain of a shape the ring
// refuses; write makes its buffers device-writable (rx).
var badChains = []struct {
	name string
	post func(r *testRing, first uint16, write bool)
}{
	{"buffer past the end of guest memory", func(r *testRing, first uint16, write bool) {
		fl := uint16(0)
		if write {
			fl = virtq.DescFWrite
		}
		r.setDesc(first, r.alloc(12), 12, fl|virtq.DescFNext, first+1)
		r.setDesc(first+1, memSize-100, 200, fl, 0)
	}},
	{"buffer at 2^64-8", func(r *testRing, first uint16, write bool) {
		fl := uint16(0)
		if write {
			fl = virtq.DescFWrite
		}
		r.setDesc(first, ^guestmem.Addr(0)-7, 1600, fl, 0)
	}},
	{"loop", func(r *testRing, first uint16, write bool) {
		fl := uint16(virtq.DescFNext)
		if write {
			fl |= virtq.DescFWrite
		}
		a := r.alloc(64)
		r.setDesc(first, a, 64, fl, first+1)
		r.setDesc(first+1, a, 64, fl, first)
	}},
	{"next outside the table", func(r *testRing, first uint16, write bool) {
		fl := uint16(virtq.DescFNext)
		if write {
			fl |= virtq.DescFWrite
		}
		r.setDesc(first, r.alloc(64), 64, fl, qSize+5)
	}},
	{"indirect, not negotiated", func(r *testRing, first uint16, write bool) {
		r.setDesc(first, r.alloc(32), 32, virtq.DescFIndirect, 0)
	}},
}

// TestHostileTxChainShapes: a tx chain the ring refuses is handed back
// with nothing written, sends nothing to passt, and the frame after it
// arrives intact.
func TestHostileTxChainShapes(t *testing.T) {
	for _, tc := range badChains {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRig(t, 1500, features)
			tc.post(rg.tx, 40, false)
			rg.tx.offer(40)
			good := frame(100, 3)
			rg.send(0, 12, good)
			if got := rg.readPasst(t); !bytes.Equal(got, good) {
				t.Fatalf("passt got %d bytes, want the good %d-byte frame", len(got), len(good))
			}
			rg.tx.waitUsed(2)
			for i := uint16(0); i < 2; i++ {
				if _, n := rg.tx.usedElem(i); n != 0 {
					t.Errorf("tx used element %d has length %d", i, n)
				}
			}
			if c := rg.dev.Counters(); c["tx_frames"] != 1 {
				t.Errorf("counters %v, want one frame sent", c)
			}
		})
	}
}

// TestHostileRxChainShapes: with mergeable buffers, a frame whose second
// buffer is a chain the ring refuses is dropped and counted; both buffers
// are handed back empty, and the next frame fills good buffers whole.
func TestHostileRxChainShapes(t *testing.T) {
	for _, tc := range badChains {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRig(t, 1500, features)
			r := rg.rx
			first := r.alloc(64) // too small for the frame: the next chain is taken too
			r.setDesc(0, first, 64, virtq.DescFWrite, 0)
			r.offer(0)
			tc.post(r, 10, true)
			r.offer(10)
			rg.writePasst(t, frame(1000, 1))
			r.waitUsed(2)
			for i := uint16(0); i < 2; i++ {
				if _, n := r.usedElem(i); n != 0 {
					t.Errorf("rx used element %d has length %d, want 0", i, n)
				}
			}
			if c := rg.dev.Counters(); c["rx_malformed"] != 1 {
				t.Errorf("counters %v, want rx_malformed 1", c)
			}
			addrs := rg.postRx(20, 1, 2048)
			good := frame(1200, 9)
			rg.writePasst(t, good)
			r.waitUsed(3)
			id, n := r.usedElem(2)
			if id != 20 || n != uint32(12+len(good)) {
				t.Fatalf("rx used element (%d, %d), want (20, %d)", id, n, 12+len(good))
			}
			got := make([]byte, len(good))
			r.mem.Read(addrs[0]+12, got)
			if !bytes.Equal(got, good) {
				t.Fatal("the frame after the hostile buffer arrived changed")
			}
		})
	}
}
