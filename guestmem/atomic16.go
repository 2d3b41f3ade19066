package guestmem

import (
	"fmt"
	"unsafe"
)

// Load16 reads the little-endian 16-bit value at guest address a with one
// aligned load, never torn: a ring index (virtq's used or available index)
// that another process may be storing meanwhile. Read copies byte by byte
// for a 2-byte length (Go's memmove moves 1 or 2 bytes as two single-byte
// moves), so a Read racing a store of 0x4cff -> 0x4d00 can return 0x4dff.
// a must be 2-byte aligned, in guest memory and in its mapping.
func (m *Memory) Load16(a Addr) (uint16, error) {
	b, err := m.slice16(a)
	if err != nil {
		return 0, err
	}
	return *(*uint16)(unsafe.Pointer(unsafe.SliceData(b))), nil
}

// Store16 writes v at guest address a with one aligned store, as Load16
// reads (a driver publishing its available index, in tests).
func (m *Memory) Store16(a Addr, v uint16) error {
	b, err := m.slice16(a)
	if err != nil {
		return err
	}
	*(*uint16)(unsafe.Pointer(unsafe.SliceData(b))) = v
	return nil
}

func (m *Memory) slice16(a Addr) ([]byte, error) {
	if a%2 != 0 {
		return nil, fmt.Errorf("16-bit access at %#x: not 2-byte aligned", a)
	}
	b, err := m.Slice(a, 2)
	if err != nil {
		return nil, err
	}
	if uintptr(unsafe.Pointer(unsafe.SliceData(b)))%2 != 0 {
		return nil, fmt.Errorf("16-bit access at %#x: misaligned in the mapping of guest memory", a)
	}
	return b, nil
}
