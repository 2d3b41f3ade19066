package virtq

import (
	"sync/atomic"
	"unsafe"
)

// Ring fields shared with the driver are accessed with single aligned loads
// and stores (never torn), ordered by full barriers (fence). Alignment of
// every such field is guaranteed by the checks in NewQueue: the avail ring is
// 2-byte aligned and the used ring 4-byte aligned, as the spec requires.
//
// The caller guarantees off+2 <= len(b) (or off+4) and alignment; both are
// established once per queue set-up, so these helpers do no checks.

func load16(b []byte, off uint32) uint16 {
	return *(*uint16)(unsafe.Pointer(unsafe.SliceData(b[off:])))
}

func store16(b []byte, off uint32, v uint16) {
	*(*uint16)(unsafe.Pointer(unsafe.SliceData(b[off:]))) = v
}

func store32(b []byte, off uint32, v uint32) {
	*(*uint32)(unsafe.Pointer(unsafe.SliceData(b[off:]))) = v
}

// fence is a full memory barrier, for both the compiler and the CPU: an
// atomic read-modify-write (LOCK XADD on x86-64) orders every earlier load
// and store before every later one.
func (q *Queue) fence() {
	atomic.AddUint32(&q.barrier, 1)
}

// aligned reports whether b starts at a multiple of n in the address space.
func aligned(b []byte, n uintptr) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))%n == 0
}
