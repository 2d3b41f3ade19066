package virtq

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
)

// FuzzChainWalk lays arbitrary bytes over the descriptor table, the
// available ring and an indirect table area, then pops every chain the
// driver claims to offer. Pop must terminate, never panic, return only
// buffers inside guest memory, and classify every failure.
func FuzzChainWalk(f *testing.F) {
	seed := func(size uint16, flags byte, descs ...[4]uint64) []byte {
		b := make([]byte, 4+16*len(descs)+8)
		binary.LittleEndian.PutUint16(b[0:], size)
		b[2] = flags
		b[3] = byte(len(descs))
		for i, d := range descs {
			binary.LittleEndian.PutUint64(b[4+16*i:], d[0])
			binary.LittleEndian.PutUint32(b[4+16*i+8:], uint32(d[1]))
			binary.LittleEndian.PutUint16(b[4+16*i+12:], uint16(d[2]))
			binary.LittleEndian.PutUint16(b[4+16*i+14:], uint16(d[3]))
		}
		return b
	}
	f.Add(seed(8, 3, [4]uint64{tDataStart, 16, DescFNext, 1}, [4]uint64{tDataStart + 0x100, 512, DescFWrite, 0}))
	f.Add(seed(8, 3, [4]uint64{tDataStart, 16, DescFNext, 0}))
	f.Add(seed(4, 2, [4]uint64{tIndirect, 32, DescFIndirect, 0}))
	f.Add(seed(16, 1, [4]uint64{0xffffffffffffff00, 0x200, 0, 0}))
	f.Add(seed(2, 0, [4]uint64{tDataStart, 1, DescFWrite | DescFNext, 1}, [4]uint64{tDataStart, 1, 0, 0}))
	// Indirect tables that loop on themselves, and ones longer than the
	// queue (the body is also laid over the indirect table area).
	f.Add(seed(8, 2, [4]uint64{tIndirect, 8 * 16, DescFIndirect, 0}, [4]uint64{tDataStart, 1, DescFNext, 0}))
	f.Add(seed(8, 2, [4]uint64{tIndirect, 1 << 24, DescFIndirect, 0}, [4]uint64{tDataStart, 1, DescFNext, 1}))
	f.Add(seed(4, 2, [4]uint64{tIndirect, 5 * 16, DescFIndirect, 0}, [4]uint64{tDataStart, 1, DescFNext, 1}, [4]uint64{tDataStart, 1, DescFNext, 2},
		[4]uint64{tDataStart, 1, DescFNext, 3}, [4]uint64{tDataStart, 1, DescFNext, 4}, [4]uint64{tDataStart, 1, DescFWrite, 0}))
	f.Add(seed(16, 3, [4]uint64{tIndirect, 16 * 16, DescFIndirect, 0}, [4]uint64{tDataStart, 4096, DescFNext | DescFWrite, 0}))
	// A ring of 8 that allows chains of 32, with an indirect table of 32
	// (the body lands in the indirect area too, so the table's first entry
	// is this indirect descriptor: the seed starts nested, and TestMaxChain
	// covers the long chain itself).
	f.Add(seed(8, 6, [4]uint64{tIndirect, 32 * 16, DescFIndirect, 0}, [4]uint64{tDataStart, 1, DescFNext, 1}))

	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		size := binary.LittleEndian.Uint16(data[0:]) & 0x3ff
		if size == 0 || size&(size-1) != 0 {
			size = 8
		}
		eventIdx, indirect := data[2]&1 != 0, data[2]&2 != 0
		// Bit 2: chains may be four times the ring (a device's largest
		// ring on a smaller one, Config.MaxChain).
		maxChain := size
		if data[2]&4 != 0 {
			maxChain = 4 * size
		}
		availCount := uint16(data[3])
		body := data[4:]

		mem := newTestMemory(t)
		q, err := NewQueue(mem, Config{Size: size, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed, EventIdx: eventIdx, Indirect: indirect, MaxChain: maxChain})
		if err != nil {
			t.Fatal(err)
		}
		d := &driver{t: t, mem: mem, size: size}
		// Descriptor table and indirect area both get the fuzzed bytes; the
		// available ring offers heads taken from them too.
		table := make([]byte, 16*int(size))
		copy(table, body)
		d.mem.Write(tDesc, table)
		if len(body) > 0 {
			ind := body
			if len(ind) > 0x10000 {
				ind = ind[:0x10000]
			}
			d.mem.Write(tIndirect, ind)
		}
		for i := uint16(0); i < availCount; i++ {
			head := i % size
			if int(2*i+1) < len(body) {
				head = binary.LittleEndian.Uint16(body[2*i:]) % (size + 2) // sometimes out of range
			}
			d.put16(tAvail+4+2*guestmem.Addr(i%size), head)
		}
		d.put16(tAvail+2, availCount)

		var c Chain
		for i := 0; i <= int(size)+1; i++ {
			ok, err := q.Pop(&c)
			if err != nil {
				if errors.Is(err, ErrQueueBroken) {
					return
				}
				if !errors.Is(err, ErrMalformedChain) {
					t.Fatalf("unclassified error: %v", err)
				}
				if err := q.Push(c.Head, 0); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if !ok {
				return
			}
			rd := c.PeekReadable(nil, c.ReadableLen())
			wr := c.PeekWritable(nil, c.WritableLen())
			if len(rd)+len(wr) > int(maxChain) {
				t.Fatalf("chain with %d segments on a queue of %d allowing %d", len(rd)+len(wr), size, maxChain)
			}
			if segLen(rd) != c.ReadableLen() || segLen(wr) != c.WritableLen() {
				t.Fatalf("segments hold %d/%d bytes, chain %d/%d", segLen(rd), segLen(wr), c.ReadableLen(), c.WritableLen())
			}
			if c.ReadableLen()+c.WritableLen() > uint64(maxChain)*0xffffffff {
				t.Fatalf("chain of %d bytes", c.ReadableLen()+c.WritableLen())
			}
			// The guest rewrites the chain under the device: the cursors
			// must stay within what Pop checked.
			if len(body) > 16 {
				mut := make([]byte, 16*int(size))
				copy(mut, body[16:])
				d.mem.Write(tDesc, mut)
			}
			buf := make([]byte, 64)
			var read uint64
			for {
				n, err := c.Read(buf)
				read += uint64(n)
				if err != nil {
					break
				}
			}
			if read > c.ReadableLen() {
				t.Fatalf("read %d of %d readable bytes", read, c.ReadableLen())
			}
			c.Write(buf)
			if err := c.Err(); err != nil && !errors.Is(err, ErrMalformedChain) {
				t.Fatalf("unclassified cursor error: %v", err)
			}
			if err := q.Push(c.Head, c.Written()); err != nil {
				t.Fatal(err)
			}
			q.NeedsNotify()
		}
	})
}

func segLen(segs [][]byte) uint64 {
	var n uint64
	for _, s := range segs {
		n += uint64(len(s))
	}
	return n
}
