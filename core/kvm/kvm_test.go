package kvm

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"unsafe"
)

// The _IOR/_IOW request numbers encode the argument size in bits 16..29;
// they must match the Go structs passed to them.
func TestIoctlSizes(t *testing.T) {
	size := func(req uintptr) uintptr { return req >> 16 & 0x3fff }
	tests := []struct {
		name string
		req  uintptr
		want uintptr
	}{
		{"kvm_regs", kvmGetRegs, unsafe.Sizeof(Regs{})},
		{"kvm_regs set", kvmSetRegs, unsafe.Sizeof(Regs{})},
		{"kvm_sregs", kvmGetSregs, unsafe.Sizeof(Sregs{})},
		{"kvm_sregs set", kvmSetSregs, unsafe.Sizeof(Sregs{})},
		{"kvm_fpu", kvmSetFPU, unsafe.Sizeof(FPU{})},
		{"kvm_lapic_state", kvmGetLAPIC, unsafe.Sizeof(LAPICState{})},
		{"kvm_lapic_state set", kvmSetLAPIC, unsafe.Sizeof(LAPICState{})},
		{"kvm_userspace_memory_region", kvmSetUserMemoryRegion, unsafe.Sizeof(userspaceMemoryRegion{})},
		{"kvm_irq_level", kvmIRQLine, unsafe.Sizeof(irqLevel{})},
		{"kvm_irqfd", kvmIRQFD, unsafe.Sizeof(irqfd{})},
		{"kvm_ioeventfd", kvmIOEventFD, unsafe.Sizeof(ioeventfd{})},
		{"kvm_pit_config", kvmCreatePIT2, unsafe.Sizeof(pitConfig{})},
		{"identity map addr", kvmSetIdentityMapAddr, 8},
		{"kvm_cpuid2 header", kvmSetCPUID2, 8},
		{"kvm_msrs header", kvmSetMSRs, 8},
		{"kvm_cpuid_entry2", cpuidEntrySize, unsafe.Sizeof(CPUIDEntry{})},
		{"kvm_msr_entry", 16, unsafe.Sizeof(MSR{})},
	}
	for _, tt := range tests {
		var got uintptr
		if tt.req > 0x1000 {
			got = size(tt.req)
		} else {
			got = tt.req
		}
		if got != tt.want {
			t.Errorf("%s: ioctl encodes %d bytes, Go struct has %d", tt.name, got, tt.want)
		}
	}
	// Field offsets the kernel relies on.
	var s Sregs
	if off := unsafe.Offsetof(s.CR0); off != 0xe0 {
		t.Errorf("kvm_sregs.cr0 at %#x, want 0xe0", off)
	}
	if off := unsafe.Offsetof(s.EFER); off != 0x108 {
		t.Errorf("kvm_sregs.efer at %#x, want 0x108", off)
	}
	if off := unsafe.Offsetof(s.InterruptBitmap); off != 0x118 {
		t.Errorf("kvm_sregs.interrupt_bitmap at %#x, want 0x118", off)
	}
	var f FPU
	if off := unsafe.Offsetof(f.FCW); off != 0x80 {
		t.Errorf("kvm_fpu.fcw at %#x, want 0x80", off)
	}
	if off := unsafe.Offsetof(f.MXCSR); off != 0x198 {
		t.Errorf("kvm_fpu.mxcsr at %#x, want 0x198", off)
	}
}

func TestCPUIDRoundTrip(t *testing.T) {
	in := []CPUIDEntry{
		{Function: 0, EAX: 0xd, EBX: 1, ECX: 2, EDX: 3},
		{Function: 7, Index: 1, Flags: CPUIDFlagSignificantIndex, EAX: 0xdeadbeef},
	}
	out, err := decodeCPUID(encodeCPUID(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != len(in) {
		t.Fatalf("got %d entries, want %d", len(out), len(in))
	}
	for i := range in {
		if out[i] != in[i] {
			t.Errorf("entry %d: got %+v, want %+v", i, out[i], in[i])
		}
	}
	bad := make([]byte, 8+cpuidEntrySize)
	binary.LittleEndian.PutUint32(bad, 2)
	if _, err := decodeCPUID(bad); err == nil {
		t.Error("decodeCPUID accepted a count larger than the buffer")
	}
	if _, err := decodeCPUID(bad[:4]); err == nil {
		t.Error("decodeCPUID accepted a 4-byte buffer")
	}
}

func find(entries []CPUIDEntry, fn, idx uint32) (CPUIDEntry, bool) {
	for _, e := range entries {
		if e.Function == fn && e.Index == idx {
			return e, true
		}
	}
	return CPUIDEntry{}, false
}

func TestCPUIDFor(t *testing.T) {
	supported := []CPUIDEntry{
		{Function: 0, EAX: 0x1f},
		{Function: 1, EBX: 0xff00_0800 | 0x00ff_0000, ECX: 0x1, EDX: 1 << 28},
		{Function: 4, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: 0xfc00_4121},
		{Function: 4, Index: 4, Flags: CPUIDFlagSignificantIndex, EAX: 0},
		{Function: 0xb, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: 1, EBX: 2, ECX: 0x100, EDX: 7},
		{Function: 0x80000008, ECX: 0x7007},
		{Function: 0x8000001e, EAX: 9, EBX: 0x105, ECX: 0x301},
	}
	orig := append([]CPUIDEntry(nil), supported...)
	tests := []struct {
		id, n    int
		coreBits uint32
	}{
		{0, 1, 0}, {0, 2, 1}, {1, 2, 1}, {2, 3, 2}, {4, 5, 3}, {7, 8, 3},
	}
	for _, tt := range tests {
		got := CPUIDFor(supported, tt.id, tt.n, tt.id%2 == 1)
		l1, _ := find(got, 1, 0)
		if apic := l1.EBX >> 24; apic != uint32(tt.id) {
			t.Errorf("id %d/%d: leaf 1 APIC ID %d", tt.id, tt.n, apic)
		}
		if cnt := l1.EBX >> 16 & 0xff; cnt != uint32(tt.n) {
			t.Errorf("id %d/%d: leaf 1 logical count %d", tt.id, tt.n, cnt)
		}
		if dl := l1.ECX>>24&1 == 1; dl != (tt.id%2 == 1) {
			t.Errorf("id %d/%d: TSC-deadline bit %v", tt.id, tt.n, dl)
		}
		if l1.EBX&0xffff != 0x0800 {
			t.Errorf("id %d/%d: leaf 1 EBX low bits changed: %#x", tt.id, tt.n, l1.EBX)
		}
		if htt := l1.EDX>>28&1 == 1; htt != (tt.n > 1) {
			t.Errorf("id %d/%d: HTT %v", tt.id, tt.n, htt)
		}
		if l1.ECX&(1<<31) == 0 || l1.ECX&1 == 0 {
			t.Errorf("id %d/%d: leaf 1 ECX %#x, want hypervisor bit and original bits", tt.id, tt.n, l1.ECX)
		}
		l4, _ := find(got, 4, 0)
		if c := l4.EAX >> 26; c != uint32(tt.n-1) {
			t.Errorf("id %d/%d: leaf 4 cores-1 = %d", tt.id, tt.n, c)
		}
		if l4.EAX&0x3fff != 0x0121 {
			t.Errorf("id %d/%d: leaf 4 cache bits changed: %#x", tt.id, tt.n, l4.EAX)
		}
		if l44, _ := find(got, 4, 4); l44.EAX != 0 {
			t.Errorf("id %d/%d: empty leaf 4 subleaf became %#x", tt.id, tt.n, l44.EAX)
		}
		smt, ok0 := find(got, 0xb, 0)
		core, ok1 := find(got, 0xb, 1)
		end, ok2 := find(got, 0xb, 2)
		if !ok0 || !ok1 || !ok2 {
			t.Fatalf("id %d/%d: leaf 0xb subleaves missing", tt.id, tt.n)
		}
		if smt.EBX != 1 || smt.ECX>>8&0xff != 1 || smt.EDX != uint32(tt.id) || smt.EAX != 0 {
			t.Errorf("id %d/%d: leaf 0xb.0 = %+v", tt.id, tt.n, smt)
		}
		if core.EBX != uint32(tt.n) || core.ECX>>8&0xff != 2 || core.EAX != tt.coreBits || core.EDX != uint32(tt.id) {
			t.Errorf("id %d/%d: leaf 0xb.1 = %+v", tt.id, tt.n, core)
		}
		if end.ECX>>8&0xff != 0 {
			t.Errorf("id %d/%d: leaf 0xb.2 does not end the list: %+v", tt.id, tt.n, end)
		}
		if _, ok := find(got, 0x1f, 0); ok {
			t.Errorf("id %d/%d: leaf 0x1f invented", tt.id, tt.n)
		}
		a8, _ := find(got, 0x80000008, 0)
		if a8.ECX&0xff != uint32(tt.n-1) || a8.ECX>>12&0xf != tt.coreBits {
			t.Errorf("id %d/%d: leaf 0x80000008 ECX %#x", tt.id, tt.n, a8.ECX)
		}
		ae, _ := find(got, 0x8000001e, 0)
		if ae.EAX != uint32(tt.id) || ae.EBX != uint32(tt.id) || ae.ECX != 0 {
			t.Errorf("id %d/%d: leaf 0x8000001e %+v", tt.id, tt.n, ae)
		}
	}
	for i := range orig {
		if orig[i] != supported[i] {
			t.Fatalf("CPUIDFor modified its input at %d", i)
		}
	}
}

func TestSetLINT(t *testing.T) {
	var l LAPICState
	binary.LittleEndian.PutUint32(l.Regs[lapicLVT0:], 0x10000|0x300) // masked, fixed mode bits garbage
	binary.LittleEndian.PutUint32(l.Regs[lapicLVT1:], 0x10000)
	SetLINT(&l)
	if v := binary.LittleEndian.Uint32(l.Regs[lapicLVT0:]); v != 0x10700 {
		t.Errorf("LVT0 = %#x, want 0x10700", v)
	}
	if v := binary.LittleEndian.Uint32(l.Regs[lapicLVT1:]); v != 0x10400 {
		t.Errorf("LVT1 = %#x, want 0x10400", v)
	}
}

func TestEncodeMSRs(t *testing.T) {
	b := encodeMSRs([]MSR{{Index: 0x1a0, Data: 1}, {Index: 0xc0000082, Data: 0x1122334455667788}})
	if len(b) != 8+32 || binary.LittleEndian.Uint32(b) != 2 {
		t.Fatalf("header wrong: len %d", len(b))
	}
	if binary.LittleEndian.Uint32(b[24:]) != 0xc0000082 || binary.LittleEndian.Uint64(b[32:]) != 0x1122334455667788 {
		t.Errorf("second entry wrong: % x", b[24:])
	}
}

func TestOpenMissingDevice(t *testing.T) {
	_, err := OpenPath("/nonexistent/kvm")
	if !errors.Is(err, ErrNoKVM) {
		t.Fatalf("OpenPath on a missing node: %v, want ErrNoKVM", err)
	}
}

// TestVMSmoke creates a VM and a vCPU on a host with KVM.
func TestVMSmoke(t *testing.T) {
	if _, err := os.Stat(DevicePath); err != nil {
		t.Skip("no /dev/kvm on this host")
	}
	sys, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpuid) == 0 {
		t.Fatal("no CPUID leaves")
	}
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	v, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.SetCPUID(CPUIDFor(cpuid, 0, 1, true)); err != nil {
		t.Fatal(err)
	}
	if err := v.SetMSRs(BootMSRs()); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Sregs(); err != nil {
		t.Fatal(err)
	}
}

// Leaf 4 (deterministic cache parameters): the caches below the last
// level are private to one core (EAX[25:14] = 0), the last level keeps
// the sharing KVM reports, and the cores-per-package field (EAX[31:26],
// six bits) says n-1, at most 63.
func TestCPUIDLeaf4(t *testing.T) {
	const l1d, l2, l3 = 0x121, 0x143, 0x163 // type | level<<5 | self-initializing
	share := func(s uint32) uint32 { return s << 14 }
	supported := []CPUIDEntry{
		{Function: 0, EAX: 0xd},
		{Function: 4, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: l1d | share(1)},
		{Function: 4, Index: 1, Flags: CPUIDFlagSignificantIndex, EAX: l2 | share(1)},
		{Function: 4, Index: 2, Flags: CPUIDFlagSignificantIndex, EAX: l3 | share(0x7f)},
		{Function: 4, Index: 3, Flags: CPUIDFlagSignificantIndex, EAX: 0},
	}
	tests := []struct {
		n     int
		cores uint32
	}{{1, 0}, {4, 3}, {64, 63}, {255, 63}}
	for _, tt := range tests {
		got := CPUIDFor(supported, 0, tt.n, false)
		for _, w := range []struct {
			idx   uint32
			low   uint32
			share uint32
		}{{0, l1d, 0}, {1, l2, 0}, {2, l3, 0x7f}} {
			e, _ := find(got, 4, w.idx)
			if e.EAX&0x3fff != w.low || e.EAX>>14&0xfff != w.share || e.EAX>>26 != tt.cores {
				t.Errorf("n %d: leaf 4.%d EAX %#x: cache %#x sharing %#x cores-1 %d, want %#x %#x %d",
					tt.n, w.idx, e.EAX, e.EAX&0x3fff, e.EAX>>14&0xfff, e.EAX>>26, w.low, w.share, tt.cores)
			}
		}
		if e, _ := find(got, 4, 3); e.EAX != 0 {
			t.Errorf("n %d: the null subleaf became %#x", tt.n, e.EAX)
		}
	}
}
