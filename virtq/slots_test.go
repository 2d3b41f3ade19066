package virtq

import "testing"

// TestChainSlots: a direct chain occupies one descriptor-table entry per
// buffer, an indirect one only its head (the virtio-net device decides
// from this that a full ring can never hold a frame).
func TestChainSlots(t *testing.T) {
	d, q := newPair(t, 16, false, true)
	// Chain at head 3: three direct descriptors 3 -> 4 -> 5.
	d.setDesc(tDesc, 3, tDataStart, 64, DescFNext, 4)
	d.setDesc(tDesc, 4, tDataStart+64, 64, DescFNext|DescFWrite, 5)
	d.setDesc(tDesc, 5, tDataStart+128, 64, DescFWrite, 0)
	// Chain at head 7: an indirect table of four descriptors.
	for i := uint16(0); i < 4; i++ {
		flags := uint16(DescFWrite)
		if i < 3 {
			flags |= DescFNext
		}
		d.setDesc(tIndirect, i, tDataStart+0x1000+64*uint64(i), 64, flags, i+1)
	}
	d.setDesc(tDesc, 7, tIndirect, 4*16, DescFIndirect, 0)
	// Chain at head 9: one descriptor.
	d.setDesc(tDesc, 9, tDataStart+0x2000, 64, DescFWrite, 0)
	for _, c := range []struct {
		head  uint16
		slots int
	}{{3, 3}, {7, 1}, {9, 1}} {
		d.offer(c.head)
		var ch Chain
		ok, err := q.Pop(&ch)
		if err != nil || !ok {
			t.Fatalf("Pop head %d: %v, %v", c.head, ok, err)
		}
		if ch.Head != c.head || ch.Slots() != c.slots {
			t.Errorf("chain at head %d: Slots() = %d, want %d", ch.Head, ch.Slots(), c.slots)
		}
	}
}
