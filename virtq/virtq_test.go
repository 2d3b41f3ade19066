package virtq

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
)

func TestNewQueueRejects(t *testing.T) {
	mem := newTestMemory(t)
	tests := []struct {
		name string
		cfg  Config
	}{
		{"size zero", Config{Size: 0, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed}},
		{"size not power of two", Config{Size: 100, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed}},
		{"desc misaligned", Config{Size: 8, DescTable: tDesc + 8, AvailRing: tAvail, UsedRing: tUsed}},
		{"avail misaligned", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail + 1, UsedRing: tUsed}},
		{"used misaligned", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed + 2}},
		{"desc outside memory", Config{Size: 8, DescTable: tMemSize - 64, AvailRing: tAvail, UsedRing: tUsed}},
		{"avail outside memory", Config{Size: 8, DescTable: tDesc, AvailRing: tMemSize - 8, UsedRing: tUsed}},
		{"used outside memory", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail, UsedRing: tMemSize - 16}},
		{"used event word outside", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail, UsedRing: tMemSize - 68, EventIdx: true}},
		{"addresses wrap", Config{Size: 8, DescTable: 0xfffffffffffffff0, AvailRing: tAvail, UsedRing: tUsed}},
		{"chain bound below the size", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed, MaxChain: 4}},
		{"chain bound above the largest queue", Config{Size: 8, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed, MaxChain: MaxSize + 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewQueue(mem, tt.cfg); err == nil {
				t.Fatal("NewQueue accepted a bad configuration")
			}
		})
	}
}

func TestReadWriteChain(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	// header (readable, 2 descriptors), data area (writable, 2 descriptors)
	if err := d.mem.Write(tDataStart, []byte("hello ")); err != nil {
		t.Fatal(err)
	}
	if err := d.mem.Write(tDataStart+0x100, []byte("world")); err != nil {
		t.Fatal(err)
	}
	d.setDesc(tDesc, 3, tDataStart, 6, DescFNext, 5)
	d.setDesc(tDesc, 5, tDataStart+0x100, 5, DescFNext, 0)
	d.setDesc(tDesc, 0, tDataStart+0x200, 4, DescFNext|DescFWrite, 7)
	d.setDesc(tDesc, 7, tDataStart+0x300, 4, DescFWrite, 0)
	d.offer(3)

	var c Chain
	ok, err := q.Pop(&c)
	if !ok || err != nil {
		t.Fatalf("Pop = %v, %v", ok, err)
	}
	if c.Head != 3 || c.ReadableLen() != 11 || c.WritableLen() != 8 {
		t.Fatalf("head %d readable %d writable %d", c.Head, c.ReadableLen(), c.WritableLen())
	}
	got, err := io.ReadAll(&c)
	if err != nil || string(got) != "hello world" {
		t.Fatalf("read %q, %v", got, err)
	}
	n, err := c.Write([]byte("0123456789"))
	if n != 8 || !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Write = %d, %v; want 8, ErrNoSpace", n, err)
	}
	if c.Written() != 8 {
		t.Fatalf("Written = %d", c.Written())
	}
	if err := q.Push(c.Head, c.Written()); err != nil {
		t.Fatal(err)
	}
	if d.usedIdx() != 1 {
		t.Fatalf("used idx %d", d.usedIdx())
	}
	if id, l := d.usedElem(0); id != 3 || l != 8 {
		t.Fatalf("used elem = %d,%d", id, l)
	}
	out := make([]byte, 4)
	d.mem.Read(tDataStart+0x200, out)
	if string(out) != "0123" {
		t.Fatalf("guest sees %q", out)
	}
	d.mem.Read(tDataStart+0x300, out)
	if string(out) != "4567" {
		t.Fatalf("guest sees %q", out)
	}
	if ok, err := q.Pop(&c); ok || err != nil {
		t.Fatalf("second Pop = %v, %v", ok, err)
	}
}

func TestIndirectChain(t *testing.T) {
	d, q := newPair(t, 8, false, true)
	// three descriptors in an indirect table
	d.setDesc(tIndirect, 0, tDataStart, 16, DescFNext, 1)
	d.setDesc(tIndirect, 1, tDataStart+0x1000, 4096, DescFNext|DescFWrite, 2)
	d.setDesc(tIndirect, 2, tDataStart+0x3000, 1, DescFWrite, 0)
	d.setDesc(tDesc, 2, tIndirect, 48, DescFIndirect, 0)
	d.offer(2)
	var c Chain
	ok, err := q.Pop(&c)
	if !ok || err != nil {
		t.Fatalf("Pop = %v, %v", ok, err)
	}
	if c.Head != 2 || c.ReadableLen() != 16 || c.WritableLen() != 4097 || len(c.PeekWritable(nil, 1<<20)) != 2 {
		t.Fatalf("indirect chain: head %d r %d w %d", c.Head, c.ReadableLen(), c.WritableLen())
	}
}

func TestHostileChains(t *testing.T) {
	tests := []struct {
		name     string
		indirect bool
		setup    func(d *driver)
		want     error
	}{
		{"self loop", false, func(d *driver) {
			d.setDesc(tDesc, 0, tDataStart, 1, DescFNext, 0)
		}, ErrChainTooLong},
		{"two-descriptor loop", false, func(d *driver) {
			d.setDesc(tDesc, 0, tDataStart, 1, DescFNext, 1)
			d.setDesc(tDesc, 1, tDataStart, 1, DescFNext, 0)
		}, ErrChainTooLong},
		{"next out of range", false, func(d *driver) {
			d.setDesc(tDesc, 0, tDataStart, 1, DescFNext, 8)
		}, ErrDescIndex},
		{"buffer outside memory", false, func(d *driver) {
			d.setDesc(tDesc, 0, tMemSize-4, 8, 0, 0)
		}, ErrDescOutOfMemory},
		{"length overflows address", false, func(d *driver) {
			d.setDesc(tDesc, 0, 0xffffffffffff0000, 0xffffffff, 0, 0)
		}, ErrDescOutOfMemory},
		{"read after write", false, func(d *driver) {
			d.setDesc(tDesc, 0, tDataStart, 1, DescFNext|DescFWrite, 1)
			d.setDesc(tDesc, 1, tDataStart, 1, 0, 0)
		}, ErrReadAfterWrite},
		{"indirect not negotiated", false, func(d *driver) {
			d.setDesc(tDesc, 0, tIndirect, 16, DescFIndirect, 0)
		}, ErrIndirectNotNeg},
		{"indirect with next", true, func(d *driver) {
			d.setDesc(tDesc, 0, tIndirect, 16, DescFIndirect|DescFNext, 1)
		}, ErrIndirectWithNext},
		{"indirect length zero", true, func(d *driver) {
			d.setDesc(tDesc, 0, tIndirect, 0, DescFIndirect, 0)
		}, ErrIndirectLen},
		{"indirect length not multiple", true, func(d *driver) {
			d.setDesc(tDesc, 0, tIndirect, 20, DescFIndirect, 0)
		}, ErrIndirectLen},
		{"indirect table outside memory", true, func(d *driver) {
			d.setDesc(tDesc, 0, tMemSize-16, 32, DescFIndirect, 0)
		}, ErrDescOutOfMemory},
		{"nested indirect", true, func(d *driver) {
			d.setDesc(tIndirect, 0, tIndirect+0x100, 16, DescFIndirect, 0)
			d.setDesc(tDesc, 0, tIndirect, 16, DescFIndirect, 0)
		}, ErrNestedIndirect},
		{"indirect loop", true, func(d *driver) {
			d.setDesc(tIndirect, 0, tDataStart, 1, DescFNext, 1)
			d.setDesc(tIndirect, 1, tDataStart, 1, DescFNext, 0)
			d.setDesc(tDesc, 0, tIndirect, 32, DescFIndirect, 0)
		}, ErrChainTooLong},
		{"indirect next out of table", true, func(d *driver) {
			d.setDesc(tIndirect, 0, tDataStart, 1, DescFNext, 2)
			d.setDesc(tDesc, 0, tIndirect, 32, DescFIndirect, 0)
		}, ErrDescIndex},
		{"indirect table longer than the queue", true, func(d *driver) {
			// 4096-entry indirect table whose entries all point at entry 0:
			// refused for its length before a single entry is read.
			for i := uint16(0); i < 4096; i++ {
				d.setDesc(tIndirect, i, tDataStart, 1, DescFNext, 0)
			}
			d.setDesc(tDesc, 0, tIndirect, 4096*16, DescFIndirect, 0)
		}, ErrIndirectTooLong},
		{"indirect table of 9 on a queue of 8", true, func(d *driver) {
			for i := uint16(0); i < 9; i++ {
				d.setDesc(tIndirect, i, tDataStart, 1, DescFNext, i+1)
			}
			d.setDesc(tIndirect, 8, tDataStart, 1, 0, 0)
			d.setDesc(tDesc, 0, tIndirect, 9*16, DescFIndirect, 0)
		}, ErrIndirectTooLong},
		{"16 MiB indirect table", true, func(d *driver) {
			d.setDesc(tDesc, 0, tIndirect, 16<<20, DescFIndirect, 0)
		}, ErrIndirectTooLong},
		{"looping indirect table of queue size", true, func(d *driver) {
			for i := uint16(0); i < 8; i++ {
				d.setDesc(tIndirect, i, tDataStart, 1, DescFNext, (i+1)%8)
			}
			d.setDesc(tDesc, 0, tIndirect, 8*16, DescFIndirect, 0)
		}, ErrChainTooLong},
		{"direct and indirect together longer than the queue", true, func(d *driver) {
			// 3 direct buffers, then an indirect table of 6: 9 buffers.
			d.setDesc(tDesc, 0, tDataStart, 1, DescFNext, 1)
			d.setDesc(tDesc, 1, tDataStart, 1, DescFNext, 2)
			d.setDesc(tDesc, 2, tDataStart, 1, DescFNext, 3)
			d.setDesc(tDesc, 3, tIndirect, 6*16, DescFIndirect, 0)
			for i := uint16(0); i < 6; i++ {
				d.setDesc(tIndirect, i, tDataStart, 1, DescFNext, i+1)
			}
			d.setDesc(tIndirect, 5, tDataStart, 1, 0, 0)
		}, ErrChainTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, q := newPair(t, 8, true, tt.indirect)
			tt.setup(d)
			d.offer(0)
			var c Chain
			ok, err := q.Pop(&c)
			if !ok || !errors.Is(err, tt.want) || !errors.Is(err, ErrMalformedChain) {
				t.Fatalf("Pop = %v, %v; want true, %v", ok, err, tt.want)
			}
			// The request fails cleanly: complete it and the queue goes on.
			if err := q.Push(c.Head, 0); err != nil {
				t.Fatal(err)
			}
			d.setDesc(tDesc, 1, tDataStart, 8, 0, 0)
			d.offer(1)
			ok, err = q.Pop(&c)
			if !ok || err != nil || c.Head != 1 || c.ReadableLen() != 8 {
				t.Fatalf("next Pop after malformed chain = %v, %v, head %d", ok, err, c.Head)
			}
		})
	}
}

// TestChainBounds checks the limits from the accepting side: a chain of
// exactly the queue size, direct or through a full indirect table, is
// served whole.
func TestChainBounds(t *testing.T) {
	t.Run("direct", func(t *testing.T) {
		d, q := newPair(t, 8, false, false)
		for i := uint16(0); i < 8; i++ {
			d.setDesc(tDesc, i, tDataStart+uint64(i)*0x10, 0x10, DescFNext, i+1)
		}
		d.setDesc(tDesc, 7, tDataStart+0x70, 0x10, DescFWrite, 0)
		d.offer(0)
		var c Chain
		if ok, err := q.Pop(&c); !ok || err != nil || c.ReadableLen() != 7*0x10 || c.WritableLen() != 0x10 {
			t.Fatalf("Pop = %v, %v; lengths %d/%d", ok, err, c.ReadableLen(), c.WritableLen())
		}
		if n, err := io.Copy(io.Discard, &c); n != 0x70 || err != nil {
			t.Fatalf("read %d, %v", n, err)
		}
	})
	t.Run("indirect", func(t *testing.T) {
		d, q := newPair(t, 8, false, true)
		for i := uint16(0); i < 8; i++ {
			d.setDesc(tIndirect, i, tDataStart+uint64(i)*0x10, 0x10, DescFNext|DescFWrite, i+1)
		}
		d.setDesc(tIndirect, 7, tDataStart+0x70, 0x10, DescFWrite, 0)
		d.setDesc(tDesc, 3, tIndirect, 8*16, DescFIndirect, 0)
		d.offer(3)
		var c Chain
		if ok, err := q.Pop(&c); !ok || err != nil || c.WritableLen() != 0x80 {
			t.Fatalf("Pop = %v, %v; writable %d", ok, err, c.WritableLen())
		}
		if n, err := c.Write(bytes.Repeat([]byte{1}, 0x80)); n != 0x80 || err != nil {
			t.Fatalf("wrote %d, %v", n, err)
		}
	})
}

// TestMaxChain serves chains longer than the ring, up to Config.MaxChain
// (a device whose seg_max fits its largest ring, on a smaller one), and
// refuses one buffer more, indirect or direct and indirect together.
func TestMaxChain(t *testing.T) {
	const size, maxChain = 8, 32
	tests := []struct {
		name     string
		direct   uint16 // buffers in the ring's table before the indirect one
		indirect uint16 // entries of the indirect table
		want     error
	}{
		{"indirect table of the bound", 0, maxChain, nil},
		{"indirect table over the bound", 0, maxChain + 1, ErrIndirectTooLong},
		{"direct and indirect together at the bound", 3, maxChain - 3, nil},
		{"direct and indirect together over the bound", 3, maxChain - 2, ErrChainTooLong},
		{"indirect table of the ring size, no bound set", 0, size, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := newTestMemory(t)
			cfg := Config{Size: size, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed, Indirect: true, MaxChain: maxChain}
			if tt.indirect == size {
				cfg.MaxChain = 0
			}
			q, err := NewQueue(mem, cfg)
			if err != nil {
				t.Fatal(err)
			}
			d := &driver{t: t, mem: mem, size: size}
			for i := range tt.direct {
				d.setDesc(tDesc, i, tDataStart+uint64(i)*0x10, 0x10, DescFNext, i+1)
			}
			d.setDesc(tDesc, tt.direct, tIndirect, uint32(tt.indirect)*16, DescFIndirect, 0)
			for i := range tt.indirect {
				d.setDesc(tIndirect, i, tDataStart+0x1000+uint64(i)*0x10, 0x10, DescFNext|DescFWrite, i+1)
			}
			d.setDesc(tIndirect, tt.indirect-1, tDataStart+0x1000+uint64(tt.indirect-1)*0x10, 0x10, DescFWrite, 0)
			d.offer(0)
			var c Chain
			ok, err := q.Pop(&c)
			if !ok || !errors.Is(err, tt.want) {
				t.Fatalf("Pop = %v, %v; want true, %v", ok, err, tt.want)
			}
			if tt.want != nil {
				return
			}
			if c.Buffers() != int(tt.direct+tt.indirect) {
				t.Fatalf("Buffers() = %d, want %d", c.Buffers(), tt.direct+tt.indirect)
			}
			if c.ReadableLen() != uint64(tt.direct)*0x10 || c.WritableLen() != uint64(tt.indirect)*0x10 {
				t.Fatalf("lengths %d/%d, want %d/%d", c.ReadableLen(), c.WritableLen(), tt.direct*0x10, tt.indirect*0x10)
			}
			if n, err := io.Copy(io.Discard, &c); n != int64(tt.direct)*0x10 || err != nil {
				t.Fatalf("read %d, %v", n, err)
			}
			w := bytes.Repeat([]byte{7}, int(tt.indirect)*0x10)
			if n, err := c.Write(w); n != len(w) || err != nil {
				t.Fatalf("wrote %d, %v", n, err)
			}
		})
	}
}

// TestChainChangedAfterPop rewrites a chain between Pop and the device's
// walk: the cursors stop at what they can check (never past Pop's totals,
// never outside guest memory) and report a malformed chain.
func TestChainChangedAfterPop(t *testing.T) {
	tests := []struct {
		name   string
		change func(d *driver)
	}{
		{"buffer moved outside memory", func(d *driver) { d.setDesc(tDesc, 1, tMemSize-4, 64, DescFNext, 2) }},
		{"loop added", func(d *driver) { d.setDesc(tDesc, 1, tDataStart, 1, DescFNext, 1) }},
		{"chain cut short", func(d *driver) { d.setDesc(tDesc, 1, tDataStart+0x100, 32, 0, 0) }},
		{"writable became readable", func(d *driver) { d.setDesc(tDesc, 3, tDataStart+0x300, 64, 0, 0) }},
		{"next out of range", func(d *driver) { d.setDesc(tDesc, 1, tDataStart+0x100, 64, DescFNext, 99) }},
		{"grown buffers", func(d *driver) {
			d.setDesc(tDesc, 1, tDataStart+0x100, 4096, DescFNext, 2)
			d.setDesc(tDesc, 3, tDataStart+0x300, 4096, DescFWrite, 0)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, q := newPair(t, 8, false, false)
			d.setDesc(tDesc, 0, tDataStart, 64, DescFNext, 1)
			d.setDesc(tDesc, 1, tDataStart+0x100, 64, DescFNext, 2)
			d.setDesc(tDesc, 2, tDataStart+0x200, 64, DescFNext|DescFWrite, 3)
			d.setDesc(tDesc, 3, tDataStart+0x300, 64, DescFWrite, 0)
			d.offer(0)
			var c Chain
			if ok, err := q.Pop(&c); !ok || err != nil {
				t.Fatal(ok, err)
			}
			tt.change(d)
			got, _ := io.ReadAll(&c)
			n, _ := c.Write(make([]byte, 4096))
			if uint64(len(got)) > c.ReadableLen() || uint64(n) > c.WritableLen() {
				t.Fatalf("read %d of %d, wrote %d of %d", len(got), c.ReadableLen(), n, c.WritableLen())
			}
			if tt.name == "grown buffers" {
				if len(got) != 128 || n != 128 || c.Err() != nil {
					t.Fatalf("read %d, wrote %d, err %v", len(got), n, c.Err())
				}
				return
			}
			if !errors.Is(c.Err(), ErrMalformedChain) {
				t.Fatalf("read %d, wrote %d, Err() = %v", len(got), n, c.Err())
			}
		})
	}
}

func TestBrokenAvailRing(t *testing.T) {
	t.Run("index jumps past queue size", func(t *testing.T) {
		d, q := newPair(t, 8, false, false)
		d.put16(tAvail+2, 9)
		var c Chain
		if _, err := q.Pop(&c); !errors.Is(err, ErrQueueBroken) {
			t.Fatalf("Pop err = %v, want ErrQueueBroken", err)
		}
	})
	t.Run("head out of range", func(t *testing.T) {
		d, q := newPair(t, 8, false, false)
		d.offer(8)
		var c Chain
		if _, err := q.Pop(&c); !errors.Is(err, ErrQueueBroken) {
			t.Fatalf("Pop err = %v, want ErrQueueBroken", err)
		}
	})
}

func TestIndexWrapAround(t *testing.T) {
	d, q := newPair(t, 4, true, false)
	d.availIdx = 0xfffe
	q.SetNextAvail(0xfffe)
	d.put16(tUsed+2, 0xfffe)
	d.setDesc(tDesc, 0, tDataStart, 8, DescFWrite, 0)
	var c Chain
	for i := 0; i < 6; i++ {
		d.offer(0)
		ok, err := q.Pop(&c)
		if !ok || err != nil {
			t.Fatalf("iteration %d: Pop = %v, %v", i, ok, err)
		}
		if err := q.Push(c.Head, 8); err != nil {
			t.Fatal(err)
		}
	}
	if q.NextAvail() != 4 || d.usedIdx() != 4 {
		t.Fatalf("after wrap: next avail %d, used idx %d", q.NextAvail(), d.usedIdx())
	}
}

func TestBatchPublish(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	for i := uint16(0); i < 3; i++ {
		d.setDesc(tDesc, i, tDataStart+uint64(i)*0x100, 0x100, DescFWrite, 0)
		d.offer(i)
	}
	var c Chain
	for i := 0; i < 3; i++ {
		if ok, err := q.Pop(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		if err := q.AddUsed(c.Head, uint32(i)); err != nil {
			t.Fatal(err)
		}
		if d.usedIdx() != 0 {
			t.Fatal("AddUsed published early")
		}
	}
	q.PublishUsed()
	if d.usedIdx() != 3 {
		t.Fatalf("used idx %d after publish", d.usedIdx())
	}
	if err := q.AddUsed(8, 0); err == nil {
		t.Fatal("AddUsed accepted an id outside the queue")
	}
}

func TestNotifyNoEventIdx(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	d.setDesc(tDesc, 0, tDataStart, 8, DescFWrite, 0)
	var c Chain
	if q.NeedsNotify() {
		t.Fatal("NeedsNotify with nothing pushed")
	}
	d.offer(0)
	q.Pop(&c)
	q.Push(c.Head, 0)
	if !q.NeedsNotify() {
		t.Fatal("no notification with interrupts enabled")
	}
	if q.NeedsNotify() {
		t.Fatal("second NeedsNotify without new used elements")
	}
	d.put16(tAvail, AvailFNoInterrupt)
	d.offer(0)
	q.Pop(&c)
	q.Push(c.Head, 0)
	if q.NeedsNotify() {
		t.Fatal("notification despite VRING_AVAIL_F_NO_INTERRUPT")
	}
	// kick suppression through used flags
	q.DisableNotification()
	if d.get16(tUsed)&UsedFNoNotify == 0 {
		t.Fatal("DisableNotification did not set VRING_USED_F_NO_NOTIFY")
	}
	if q.EnableNotification() {
		t.Fatal("EnableNotification reports buffers that are not there")
	}
	if d.get16(tUsed)&UsedFNoNotify != 0 {
		t.Fatal("EnableNotification did not clear VRING_USED_F_NO_NOTIFY")
	}
	d.offer(0)
	if !q.EnableNotification() {
		t.Fatal("EnableNotification missed a newly available buffer")
	}
}

func TestNotifyEventIdx(t *testing.T) {
	d, q := newPair(t, 8, true, false)
	d.setDesc(tDesc, 0, tDataStart, 8, DescFWrite, 0)
	var c Chain
	step := func() {
		d.offer(0)
		if ok, err := q.Pop(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
		q.Push(c.Head, 0)
	}
	step() // used idx 1
	if !q.NeedsNotify() {
		t.Fatal("first completion must notify")
	}
	d.setUsedEvent(3) // driver wants an interrupt once used idx passes 3
	step()            // used 2
	if q.NeedsNotify() {
		t.Fatal("notified before used_event was reached")
	}
	step() // used 3
	if q.NeedsNotify() {
		t.Fatal("notified at used idx 3; used_event 3 asks for idx 4")
	}
	step() // used 4: crosses used_event
	if !q.NeedsNotify() {
		t.Fatal("not notified when used idx passed used_event")
	}
	// Batch crossing the event in one publish still notifies.
	d.setUsedEvent(5)
	step()
	step() // used 6, event 5 in (4, 6]
	if !q.NeedsNotify() {
		t.Fatal("not notified for a batch crossing used_event")
	}
	// avail_event is how the device asks for kicks.
	if q.EnableNotification() {
		t.Fatal("EnableNotification reports phantom buffers")
	}
	if got := d.availEvent(); got != q.NextAvail() {
		t.Fatalf("avail_event = %d, want %d", got, q.NextAvail())
	}
}

func TestChainCursors(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	d.mem.Write(tDataStart, []byte("abc"))
	d.mem.Write(tDataStart+0x10, []byte("defgh"))
	d.setDesc(tDesc, 0, tDataStart, 3, DescFNext, 1)
	d.setDesc(tDesc, 1, tDataStart+0x10, 5, DescFNext, 2)
	d.setDesc(tDesc, 2, tDataStart+0x20, 0, DescFNext, 3) // zero-length readable
	d.setDesc(tDesc, 3, tDataStart+0x100, 3, DescFNext|DescFWrite, 4)
	d.setDesc(tDesc, 4, tDataStart+0x200, 5, DescFWrite, 0)
	d.offer(0)
	var c Chain
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if err := c.SkipRead(2); err != nil {
		t.Fatal(err)
	}
	segs := c.PeekReadable(nil, 4)
	if len(segs) != 2 || string(segs[0]) != "c" || string(segs[1]) != "def" {
		t.Fatalf("PeekReadable = %q", segs)
	}
	buf := make([]byte, 4)
	if err := c.ReadFull(buf); err != nil || string(buf) != "cdef" {
		t.Fatalf("ReadFull = %q, %v", buf, err)
	}
	if c.RemainingRead() != 2 {
		t.Fatalf("RemainingRead = %d", c.RemainingRead())
	}
	if err := c.SkipRead(3); err == nil {
		t.Fatal("SkipRead past the end succeeded")
	}
	if err := c.ReadFull(make([]byte, 3)); err == nil {
		t.Fatal("ReadFull past the end succeeded")
	}
	// zero-copy write: fill peeked segments then commit
	ws := c.PeekWritable(nil, 6)
	if len(ws) != 2 || len(ws[0]) != 3 || len(ws[1]) != 3 {
		t.Fatalf("PeekWritable lengths %d", len(ws))
	}
	copy(ws[0], "XYZ")
	copy(ws[1], "UVW")
	if err := c.SkipWrite(6); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("!!")); err != nil {
		t.Fatal(err)
	}
	if c.Written() != 8 || c.RemainingWrite() != 0 {
		t.Fatalf("Written %d remaining %d", c.Written(), c.RemainingWrite())
	}
	if err := c.SkipWrite(1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("SkipWrite past end = %v", err)
	}
	got := make([]byte, 5)
	d.mem.Read(tDataStart+0x200, got)
	if !bytes.Equal(got, []byte("UVW!!")) {
		t.Fatalf("guest sees %q", got)
	}
}

func TestSetMemory(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	d.setDesc(tDesc, 0, tDataStart, 8, 0, 0)
	// A new map of the same file at the same addresses keeps working.
	f, err := guestmem.NewMemfd("other", 0x1000)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	small, err := guestmem.Map([]guestmem.Region{{GuestAddr: 0, Size: 0x1000, File: f}})
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if err := q.SetMemory(small); err == nil {
		t.Fatal("SetMemory accepted a map that no longer holds the rings")
	}
	if err := q.SetMemory(d.mem); err != nil {
		t.Fatal(err)
	}
	d.offer(0)
	var c Chain
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatal(ok, err)
	}
}

func TestNoAllocations(t *testing.T) {
	d, q := newPair(t, 256, true, true)
	d.setDesc(tDesc, 0, tDataStart, 16, DescFNext, 1)
	d.setDesc(tDesc, 1, tDataStart+0x100, 4096, DescFNext|DescFWrite, 2)
	d.setDesc(tDesc, 2, tDataStart+0x2000, 1, DescFWrite, 0)
	var c Chain
	hdr := make([]byte, 16)
	round := func() {
		d.availIdx++
		store16(q.avail, 4+2*uint32((d.availIdx-1)%d.size), 0)
		store16(q.avail, 2, d.availIdx)
		ok, err := q.Pop(&c)
		if !ok || err != nil {
			t.Fatal(ok, err)
		}
		c.ReadFull(hdr)
		c.Write(hdr[:1])
		q.Push(c.Head, c.Written())
		q.NeedsNotify()
	}
	round()
	if n := testing.AllocsPerRun(1000, round); n != 0 {
		t.Fatalf("%v allocations per request, want 0", n)
	}
}

func TestUnpop(t *testing.T) {
	d, q := newPair(t, 8, false, false)
	for i := uint16(0); i < 3; i++ {
		d.setDesc(tDesc, i, tDataStart, 64, DescFWrite, 0)
		d.offer(i)
	}
	var c Chain
	for i := 0; i < 2; i++ {
		if ok, err := q.Pop(&c); !ok || err != nil {
			t.Fatal(ok, err)
		}
	}
	q.Unpop(2)
	if n, _ := q.Pending(); n != 3 {
		t.Fatalf("Pending after Unpop = %d, want 3", n)
	}
	if ok, _ := q.Pop(&c); !ok || c.Head != 0 {
		t.Fatalf("Pop after Unpop returned head %d", c.Head)
	}
}
