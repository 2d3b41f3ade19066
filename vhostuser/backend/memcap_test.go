package backend_test

import (
	"testing"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/vhostuser"
	"github.com/krun-core/krun-core/vhostuser/frontend"
)

// TestMemTableSizeIsBounded: a front-end cannot have the back-end map more
// than MaxGuestMemory in all. A sparse memfd costs no memory, only address
// space: eight regions of 16 TiB filled the plugin's, and the Go runtime's
// next heap growth died with "out of memory" (from review).
func TestMemTableSizeIsBounded(t *testing.T) {
	const TiB = uint64(1) << 40
	f, err := guestmem.NewMemfd("huge", 64*TiB) // sparse: no memory used
	if err != nil {
		t.Skipf("no memfd of 64 TiB here: %v", err)
	}
	defer f.Close()
	c := newHarness(t, newTestDevice(1)).client
	if err := c.SetProtocolFeatures(vhostuser.ProtocolReplyAck); err != nil {
		t.Fatal(err)
	}
	if err := c.SetOwner(); err != nil {
		t.Fatal(err)
	}
	table := func(sizes ...uint64) []frontend.MemRegion {
		var rs []frontend.MemRegion
		var off uint64
		for i, size := range sizes {
			rs = append(rs, frontend.MemRegion{MemRegion: vhostuser.MemRegion{
				GuestAddr: uint64(i) << 46, Size: size, UserAddr: 1<<60 + uint64(i)<<46, MmapOffset: off}, File: f})
			off += size
		}
		return rs
	}
	// REPLY_ACK carries no reason: the table that maps 4 KiB less is
	// taken, so the cap is what refuses this one.
	if err := c.SetMemTable(table(8*TiB, 8*TiB, 4096)); err == nil {
		t.Error("a table of 16 TiB + 4 KiB was mapped")
	}
	if err := c.SetMemTable(table(8*TiB, 8*TiB)); err != nil {
		t.Errorf("a table of 16 TiB: %v", err)
	}
}
