package virtq

import (
	"encoding/binary"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
	"github.com/krun-core/krun-core/guestmem/guestmemtest"
)

// Test layout in a 1 MiB guest memory: rings at fixed places, data above.
const (
	tMemSize   = 1 << 20
	tDesc      = 0x1000
	tAvail     = 0x9000
	tUsed      = 0xa000
	tIndirect  = 0x20000
	tDataStart = 0x40000
)

// driver is a minimal driver side of a split ring, written by the tests
// straight into guest memory (including deliberately broken rings).
type driver struct {
	t        testing.TB
	mem      *guestmem.Memory
	size     uint16
	availIdx uint16
}

func newTestMemory(t testing.TB) *guestmem.Memory {
	t.Helper()
	return guestmemtest.Memory(t, "virtq-test", tMemSize)
}

func newPair(t testing.TB, size uint16, eventIdx, indirect bool) (*driver, *Queue) {
	t.Helper()
	mem := newTestMemory(t)
	q, err := NewQueue(mem, Config{Size: size, DescTable: tDesc, AvailRing: tAvail, UsedRing: tUsed, EventIdx: eventIdx, Indirect: indirect})
	if err != nil {
		t.Fatal(err)
	}
	return &driver{t: t, mem: mem, size: size}, q
}

func (d *driver) put16(a guestmem.Addr, v uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	if err := d.mem.Write(a, b[:]); err != nil {
		d.t.Fatal(err)
	}
}

func (d *driver) get16(a guestmem.Addr) uint16 {
	var b [2]byte
	if err := d.mem.Read(a, b[:]); err != nil {
		d.t.Fatal(err)
	}
	return binary.LittleEndian.Uint16(b[:])
}

func (d *driver) get32(a guestmem.Addr) uint32 {
	var b [4]byte
	if err := d.mem.Read(a, b[:]); err != nil {
		d.t.Fatal(err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

// setDesc writes descriptor i of the table at base.
func (d *driver) setDesc(base guestmem.Addr, i uint16, addr uint64, length uint32, flags, next uint16) {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	if err := d.mem.Write(base+guestmem.Addr(16*uint64(i)), b[:]); err != nil {
		d.t.Fatal(err)
	}
}

// offer puts head into the available ring and publishes it.
func (d *driver) offer(head uint16) {
	d.put16(tAvail+4+2*guestmem.Addr(d.availIdx%d.size), head)
	d.availIdx++
	d.put16(tAvail+2, d.availIdx)
}

func (d *driver) usedIdx() uint16 { return d.get16(tUsed + 2) }

func (d *driver) usedElem(i uint16) (id, length uint32) {
	base := tUsed + 4 + 8*guestmem.Addr(i%d.size)
	return d.get32(base), d.get32(base + 4)
}

func (d *driver) setUsedEvent(v uint16) { d.put16(tAvail+4+2*guestmem.Addr(d.size), v) }
func (d *driver) availEvent() uint16    { return d.get16(tUsed + 4 + 8*guestmem.Addr(d.size)) }
