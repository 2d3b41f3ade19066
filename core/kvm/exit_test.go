package kvm

import (
	"encoding/binary"
	"testing"
	"unsafe"
)

// fakeRun is a kvm_run area as KVM maps it: the run page and the pages
// after it (the PIO data page, the coalesced MMIO ring).
func fakeRun(size int) *VCPU {
	return &VCPU{id: 0, fd: -1, run: make([]byte, size)}
}

func setIO(v *VCPU, dir, size uint8, port uint16, count uint32, off uint64) {
	u := v.run[runUnion:]
	u[0], u[1] = dir, size
	binary.LittleEndian.PutUint16(u[2:], port)
	binary.LittleEndian.PutUint32(u[4:], count)
	binary.LittleEndian.PutUint64(u[8:], off)
}

// inside reports whether b lies within v's kvm_run area.
func inside(v *VCPU, b []byte) bool {
	if len(b) == 0 {
		return true
	}
	lo := uintptr(unsafe.Pointer(&v.run[0]))
	p := uintptr(unsafe.Pointer(&b[0]))
	return p >= lo && p-lo+uintptr(cap(b)) <= uintptr(len(v.run))
}

func TestIOExitDecode(t *testing.T) {
	const runSize = 3 * 4096
	tests := []struct {
		name        string
		size        uint8
		count       uint32
		off         uint64
		ok          bool
		wantDataLen int
	}{
		{"outb", 1, 1, 4096, true, 1},
		{"rep outsb page", 1, 4096, 4096, true, 4096},
		{"rep outsl fills the rest", 4, 2048, 4096, true, 8192},
		{"one byte past the end", 4, 2048, 4097, false, 0},
		{"last byte", 1, 1, runSize - 1, true, 1},
		{"offset at the end", 1, 1, runSize, false, 0},
		{"offset far away", 1, 1, 1 << 40, false, 0},
		{"offset wraps", 2, 8, ^uint64(0) - 3, false, 0},
		{"count huge", 4, 0xffffffff, 4096, false, 0},
		{"size 0", 0, 1, 4096, false, 0},
		{"count 0", 1, 0, 4096, true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := fakeRun(runSize)
			setIO(v, ExitIOOut, tt.size, 0x3f8, tt.count, tt.off)
			e, err := v.IO()
			if tt.ok != (err == nil) {
				t.Fatalf("IO() err = %v, want ok=%v", err, tt.ok)
			}
			if err != nil {
				return
			}
			if len(e.Data) != tt.wantDataLen || cap(e.Data) != tt.wantDataLen || !inside(v, e.Data) {
				t.Fatalf("Data len %d cap %d inside %v, want len %d inside kvm_run", len(e.Data), cap(e.Data), inside(v, e.Data), tt.wantDataLen)
			}
			if !e.Out || e.Port != 0x3f8 || e.Size != tt.size || e.Count != tt.count {
				t.Fatalf("decoded %+v", e)
			}
		})
	}
}

func TestMMIOExitDecode(t *testing.T) {
	for n := uint32(0); n <= 16; n++ {
		v := fakeRun(runMinSize)
		u := v.run[runUnion:]
		binary.LittleEndian.PutUint64(u, 0xd0000000)
		for i := 0; i < 8; i++ {
			u[8+i] = byte(i + 1)
		}
		binary.LittleEndian.PutUint32(u[16:], n)
		u[20] = 1
		e, err := v.MMIO()
		if ok := n >= 1 && n <= 8; ok != (err == nil) {
			t.Fatalf("len %d: err %v, want ok=%v", n, err, ok)
		}
		if err != nil {
			continue
		}
		if e.Addr != 0xd0000000 || !e.Write || len(e.Data) != int(n) || cap(e.Data) != int(n) || e.Data[0] != 1 {
			t.Fatalf("len %d: decoded %+v", n, e)
		}
		// The data buffer is kvm_run's: a read's answer goes back to KVM.
		e.Data[0] = 0xee
		if u[8] != 0xee {
			t.Fatalf("len %d: Data is not kvm_run's mmio.data", n)
		}
	}
}

// FuzzExitDecode decodes arbitrary kvm_run exit unions as KVM_EXIT_IO and
// KVM_EXIT_MMIO. What KVM writes there follows from what the guest did; a
// decoder that trusts it must still never hand out bytes outside the run
// area nor panic.
func FuzzExitDecode(f *testing.F) {
	seed := func(size uint8, count uint32, off uint64) []byte {
		b := []byte{ExitIOOut, size, 0xf8, 0x03}
		b = binary.LittleEndian.AppendUint32(b, count)
		b = binary.LittleEndian.AppendUint64(b, off)
		return append(b, make([]byte, 8)...)
	}
	f.Add(seed(1, 1, 4096), uint16(3))
	f.Add(seed(4, 1024, 4096), uint16(2))
	f.Add(seed(2, 0x80000000, 0xffffffffffff0000), uint16(1))
	f.Add(seed(8, 8, 0x930), uint16(0))
	f.Fuzz(func(t *testing.T, union []byte, pages uint16) {
		size := runMinSize + int(pages%4)*4096
		v := fakeRun(size)
		copy(v.run[runUnion:], union)
		if e, err := v.IO(); err == nil {
			if !inside(v, e.Data) || uint64(len(e.Data)) != uint64(e.Size)*uint64(e.Count) {
				t.Fatalf("IO Data of %d bytes for %+v outside the %d-byte run area", len(e.Data), e, size)
			}
		}
		if e, err := v.MMIO(); err == nil {
			if !inside(v, e.Data) || len(e.Data) < 1 || len(e.Data) > 8 {
				t.Fatalf("MMIO Data of %d bytes", len(e.Data))
			}
		}
		_ = v.SystemEvent()
		_ = v.InternalError()
		_ = v.FailEntryReason()
	})
}
