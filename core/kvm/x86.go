package kvm

import (
	"encoding/binary"
	"math/bits"
)

// Topology the core presents: every vCPU is one core of a single package,
// one thread per core, APIC ID = vCPU index.

// CPUIDFor returns the CPUID table for vCPU id of n, derived from the
// leaves KVM supports: APIC IDs, the core count and the x2APIC topology
// leaves are rewritten so that the guest sees n cores in one package, and
// the hypervisor bit is set. supported is not modified.
//
// tscDeadline sets the TSC-deadline timer bit, which KVM_GET_SUPPORTED_CPUID
// leaves clear although KVM emulates the timer (KVM_CAP_TSC_DEADLINE_TIMER):
// without it Linux calibrates the local APIC timer against the PIT, which is
// slow and, on a busy or nested host, can fail.
func CPUIDFor(supported []CPUIDEntry, id, n int, tscDeadline bool) []CPUIDEntry {
	if n < 1 {
		n = 1
	}
	coreBits := uint32(bits.Len(uint(n - 1))) // bits needed for core IDs
	apic := uint32(id)
	var maxBasic, lastCache uint32
	for _, e := range supported {
		if e.Function == 0 {
			maxBasic = e.EAX
		}
		if e.Function == 0x4 && e.EAX&0x1f != 0 {
			lastCache = max(lastCache, e.EAX>>5&7)
		}
	}
	out := make([]CPUIDEntry, 0, len(supported)+4)
	for _, e := range supported {
		switch e.Function {
		case 0x1:
			e.EBX = e.EBX&0x0000ffff | apic<<24 | uint32(n&0xff)<<16
			if tscDeadline {
				e.ECX |= 1 << 24 // TSC-deadline timer (KVM emulates it)
			}
			if n > 1 {
				e.EDX |= 1 << 28 // HTT: the count field above is valid
			} else {
				e.EDX &^= 1 << 28
			}
			e.ECX |= 1 << 31 // running under a hypervisor
		case 0x4:
			// Deterministic cache parameters: cores per package - 1
			// in EAX[31:26] (six bits); each cache private to one core
			// (EAX[25:14], threads sharing it - 1, cleared) except
			// that the last level is left as KVM reports it, so the
			// guest sees its cores share one.
			if e.EAX&0x1f != 0 {
				shared := e.EAX & (0xfff << 14)
				if e.EAX>>5&7 != lastCache {
					shared = 0
				}
				e.EAX = e.EAX&0x3fff | shared | uint32(min(n-1, 63))<<26
			}
		case 0xb, 0x1f:
			continue // rebuilt below
		case 0x80000008:
			e.ECX = e.ECX&^0xf0ff | coreBits<<12 | uint32(n-1)&0xff
		case 0x8000001e:
			e.EAX = apic
			e.EBX = uint32(id) & 0xff // core ID; threads per core - 1 = 0
			e.ECX = 0                 // node 0, one node per package
		}
		out = append(out, e)
	}
	for _, leaf := range []uint32{0xb, 0x1f} {
		if maxBasic < leaf || !hasLeaf(supported, leaf) {
			continue
		}
		out = append(out,
			// Subleaf 0: SMT level, one thread per core.
			CPUIDEntry{Function: leaf, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: 0, EBX: 1, ECX: 1 << 8, EDX: apic},
			// Subleaf 1: core level, n cores per package.
			CPUIDEntry{Function: leaf, Index: 1, Flags: CPUIDFlagSignificantIndex, EAX: coreBits, EBX: uint32(n), ECX: 2<<8 | 1, EDX: apic},
			// Subleaf 2: invalid level ends the enumeration.
			CPUIDEntry{Function: leaf, Index: 2, Flags: CPUIDFlagSignificantIndex, ECX: 2, EDX: apic},
		)
	}
	return out
}

func hasLeaf(entries []CPUIDEntry, leaf uint32) bool {
	for _, e := range entries {
		if e.Function == leaf {
			return true
		}
	}
	return false
}

// Model-specific register numbers.
const (
	MSRIA32TSC          = 0x10
	MSRIA32SysenterCS   = 0x174
	MSRIA32SysenterESP  = 0x175
	MSRIA32SysenterEIP  = 0x176
	MSRIA32MiscEnable   = 0x1a0
	MSRMTRRDefType      = 0x2ff
	MSRSTAR             = 0xc0000081
	MSRLSTAR            = 0xc0000082
	MSRCSTAR            = 0xc0000083
	MSRSyscallMask      = 0xc0000084
	MSRKernelGSBase     = 0xc0000102
	miscEnableFastStr   = 1 << 0
	mtrrEnable          = 1 << 11
	mtrrTypeWriteBack   = 6
	lapicLVT0           = 0x350
	lapicLVT1           = 0x360
	lapicDeliveryExtINT = 7
	lapicDeliveryNMI    = 4
)

// BootMSRs is the MSR state of a vCPU at reset as the core sets it: system
// call MSRs cleared, fast strings on, MTRRs enabled with write-back as the
// default memory type (the guest then does not treat RAM as uncached).
func BootMSRs() []MSR {
	return []MSR{
		{Index: MSRIA32SysenterCS}, {Index: MSRIA32SysenterESP}, {Index: MSRIA32SysenterEIP},
		{Index: MSRSTAR}, {Index: MSRLSTAR}, {Index: MSRCSTAR}, {Index: MSRSyscallMask},
		{Index: MSRKernelGSBase},
		{Index: MSRIA32TSC},
		{Index: MSRIA32MiscEnable, Data: miscEnableFastStr},
		{Index: MSRMTRRDefType, Data: mtrrEnable | mtrrTypeWriteBack},
	}
}

// SetLINT programs the local APIC's LINT0 as ExtINT (the 8259 PIC's output)
// and LINT1 as NMI, as firmware leaves them on a PC.
func SetLINT(l *LAPICState) {
	set := func(off int, mode uint32) {
		v := binary.LittleEndian.Uint32(l.Regs[off:])
		v = v&^(7<<8) | mode<<8
		binary.LittleEndian.PutUint32(l.Regs[off:], v)
	}
	set(lapicLVT0, lapicDeliveryExtINT)
	set(lapicLVT1, lapicDeliveryNMI)
}

// BootFPU is the x87/SSE state at reset: FCW 0x37f, MXCSR 0x1f80.
func BootFPU() FPU {
	return FPU{FCW: 0x37f, MXCSR: 0x1f80}
}
