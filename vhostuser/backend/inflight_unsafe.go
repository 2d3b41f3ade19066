package backend

import (
	"sync/atomic"
	"unsafe"
)

// Accessors of a tracker's part of the inflight region. The part comes from
// a page-aligned mapping and each queue's part starts on a 64-byte
// boundary, so every field is naturally aligned: the 64-bit counter is
// stored atomically and the inflight byte through the 32-bit word it
// starts (the rest of that word is padding this back-end owns). Offsets
// are computed from heads below descNum, which the tracker checks against
// the part's length when it attaches; the slice expressions below still
// bound every access. fence orders the steps the specification orders,
// for the compiler and the CPU alike: what a killed back-end wrote before
// a fence is in the region, whatever it did after.

func (t *tracker) ptr(off uint64, n uint64) unsafe.Pointer {
	return unsafe.Pointer(unsafe.SliceData(t.b[off : off+n]))
}

func (t *tracker) load16(off uint64) uint16 { return *(*uint16)(t.ptr(off, 2)) }

func (t *tracker) store16(off uint64, v uint16) {
	*(*uint16)(t.ptr(off, 2)) = v
	if t.onStore != nil {
		t.onStore()
	}
}

func (t *tracker) loadCounter(head uint16) uint64 {
	return atomic.LoadUint64((*uint64)(t.ptr(t.entry(head)+inflightOffCounter, 8)))
}

func (t *tracker) storeCounter(head uint16, v uint64) {
	atomic.StoreUint64((*uint64)(t.ptr(t.entry(head)+inflightOffCounter, 8)), v)
	if t.onStore != nil {
		t.onStore()
	}
}

func (t *tracker) inflight(head uint16) bool {
	return atomic.LoadUint32((*uint32)(t.ptr(t.entry(head), 4)))&0xff == 1
}

func (t *tracker) setInflight(head uint16, v uint32) {
	atomic.StoreUint32((*uint32)(t.ptr(t.entry(head), 4)), v)
	if t.onStore != nil {
		t.onStore()
	}
}

func (t *tracker) fence() { atomic.AddUint32(&t.barrier, 1) }

// stateWords are the device state's flags and mark words: 16 bytes at a
// 64-byte aligned offset of a page-aligned mapping (or of a Go
// allocation of 16 bytes, 8-byte aligned).
func stateWords(b []byte) (flags, mark *uint64) {
	b = b[:16]
	return (*uint64)(unsafe.Pointer(&b[0])), (*uint64)(unsafe.Pointer(&b[8]))
}
