package blkstamp

import (
	"math/rand/v2"
	"strings"
	"testing"
)

func TestGen(t *testing.T) {
	stamped := func(sector, gen uint64) []byte {
		p := make([]byte, 4096)
		Stamp(p, sector, gen)
		return p
	}
	tests := []struct {
		name    string
		p       []byte
		sector  uint64
		want    uint64
		wantErr string
	}{
		{"zeros", make([]byte, 4096), 8, 0, ""},
		{"stamped", stamped(8, 42), 8, 42, ""},
		{"misplaced", stamped(16, 42), 8, 0, "sector 8: stamp sector 16"},
		{"torn", func() []byte {
			p := stamped(8, 42)
			copy(p[1024:1536], stamped(10, 41)[:512])
			return p
		}(), 8, 0, "sector 10: stamp sector 10 generation 41"},
		{"one byte off", func() []byte {
			p := stamped(8, 42)
			p[4000]++
			return p
		}(), 8, 0, "sector 15:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Gen(tc.p, tc.sector)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Gen: %d, %v; want an error with %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Gen: %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestFreeRange(t *testing.T) {
	const slots, slotBlocks = 4, 8
	rng := rand.New(rand.NewPCG(1, 2))
	busy := make([]bool, slots*slotBlocks)
	for range 1000 {
		blk, n, err := FreeRange(rng.IntN, busy, slots, slotBlocks)
		if err != nil {
			t.Fatal(err)
		}
		if n < 1 || blk/slotBlocks != (blk+n-1)/slotBlocks {
			t.Fatalf("range %d+%d leaves its slot", blk, n)
		}
	}
	for i := range busy {
		busy[i] = i%slotBlocks != 3 // one free block a slot
	}
	blk, n, err := FreeRange(rng.IntN, busy, slots, slotBlocks)
	if err == nil && (n != 1 || blk%slotBlocks != 3) {
		t.Fatalf("range %d+%d holds a busy block", blk, n)
	}
	for i := range busy {
		busy[i] = true
	}
	if _, _, err := FreeRange(rng.IntN, busy, slots, slotBlocks); err == nil {
		t.Fatal("a range found on a disk with every block busy")
	}
}
