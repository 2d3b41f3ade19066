package testguest

import (
	"sync/atomic"
	"unsafe"
)

// Ring fields shared with the device are accessed with single aligned
// loads and stores, ordered by full barriers. Callers guarantee bounds and
// alignment: the driver allocates its rings itself, 4-byte aligned and
// padded so that the u32 around every u16 field is inside the slice.

// load16 reads an aligned u16 through an atomic load of the aligned u32
// that holds it.
func load16(b []byte, off uint64) uint16 {
	word := off &^ 3
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(unsafe.SliceData(b[word : word+4]))))
	if off&3 == 2 {
		return uint16(v >> 16)
	}
	return uint16(v)
}

// store16 writes an aligned u16 (a single store: never torn).
func store16(b []byte, off uint64, v uint16) {
	*(*uint16)(unsafe.Pointer(unsafe.SliceData(b[off : off+2]))) = v
}

// fence is a full barrier for compiler and CPU (an atomic read-modify-write).
func fence(x *atomic.Uint32) { x.Add(1) }
