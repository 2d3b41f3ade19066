package boot

import (
	"encoding/binary"

	"github.com/krun-core/krun-core/core/kvm"
)

// Page-table entry bits.
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	ptePageSize = 1 << 7 // 2 MiB page in a PD entry
)

// PageTables returns the boot page tables, to be placed at PML4Addr: one
// PML4, one PDPT and four page directories of 2 MiB pages identity-mapping
// the first 4 GiB (PageTableMapped). The boot protocol asks for an identity
// map covering the kernel, zero page and command line; the kernel builds
// its own tables before it touches anything else.
func PageTables() []byte {
	const page = 4096
	const pds = PageTableMapped >> 30
	b := make([]byte, (2+pds)*page)
	le := binary.LittleEndian
	le.PutUint64(b[0:], PDPTAddr|ptePresent|pteWritable)
	for i := 0; i < pds; i++ {
		le.PutUint64(b[page+8*i:], uint64(PDAddr+i*page)|ptePresent|pteWritable)
		for j := 0; j < 512; j++ {
			phys := uint64(i)<<30 | uint64(j)<<21
			le.PutUint64(b[(2+i)*page+8*j:], phys|ptePresent|pteWritable|ptePageSize)
		}
	}
	return b
}

// GDT selectors of the 64-bit boot protocol (__BOOT_CS and __BOOT_DS) and
// the task register the core adds.
const (
	SelectorCode = 0x10
	SelectorData = 0x18
	SelectorTSS  = 0x20
)

// gdtEntries: null, null, 64-bit code, flat data, 64-bit TSS (base 0, only
// there to give TR a valid descriptor).
var gdtEntries = [5]uint64{
	0,
	0,
	descriptor(0xa09b, 0, 0xfffff), // code: G, L, present, DPL 0, execute/read, accessed
	descriptor(0xc093, 0, 0xfffff), // data: G, D/B, present, DPL 0, read/write, accessed
	descriptor(0x008b, 0, 0x67),    // TSS: present, busy 64-bit TSS
}

// descriptor packs a segment descriptor from its flags (bits 15..12 G, D/B,
// L, AVL; bits 7..0 P, DPL, S, type), base and 20-bit limit.
func descriptor(flags uint16, base uint32, limit uint32) uint64 {
	return uint64(base&0xff000000)<<32 |
		uint64(flags&0xf0ff)<<40 |
		uint64(limit&0xf0000)<<32 |
		uint64(base&0x00ffffff)<<16 |
		uint64(limit&0xffff)
}

// GDT returns the boot GDT, to be placed at GDTAddr.
func GDT() []byte {
	b := make([]byte, 8*len(gdtEntries))
	for i, d := range gdtEntries {
		binary.LittleEndian.PutUint64(b[8*i:], d)
	}
	return b
}

// segment decodes a GDT descriptor into KVM's segment-register form, so
// the hidden part of each segment register matches the GDT exactly.
func segment(d uint64, selector uint16) kvm.Segment {
	limit := uint32(d&0xffff) | uint32(d>>32)&0xf0000
	g := uint8(d >> 55 & 1)
	if g == 1 {
		limit = limit<<12 | 0xfff
	}
	return kvm.Segment{
		Base:     d>>16&0xffffff | d>>32&0xff000000,
		Limit:    limit,
		Selector: selector,
		Type:     uint8(d >> 40 & 0xf),
		S:        uint8(d >> 44 & 1),
		DPL:      uint8(d >> 45 & 3),
		Present:  uint8(d >> 47 & 1),
		AVL:      uint8(d >> 52 & 1),
		L:        uint8(d >> 53 & 1),
		DB:       uint8(d >> 54 & 1),
		G:        g,
	}
}

// Control register and EFER bits for long mode.
const (
	cr0PE   = 1 << 0
	cr0ET   = 1 << 4
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

// LongModeSregs sets s (as read from the vCPU, so the APIC base and the
// LDT keep KVM's values) to 64-bit mode with paging by the boot page
// tables, CS = __BOOT_CS and DS/ES/FS/GS/SS = __BOOT_DS.
func LongModeSregs(s *kvm.Sregs) {
	code := segment(gdtEntries[SelectorCode/8], SelectorCode)
	data := segment(gdtEntries[SelectorData/8], SelectorData)
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = segment(gdtEntries[SelectorTSS/8], SelectorTSS)
	s.GDT = kvm.DTable{Base: GDTAddr, Limit: uint16(8*len(gdtEntries) - 1)}
	s.IDT = kvm.DTable{}
	s.CR0 = cr0PE | cr0ET | cr0PG
	s.CR3 = PML4Addr
	s.CR4 = cr4PAE
	s.EFER = eferLME | eferLMA
}

// EntryRegs is the general-purpose register state for the 64-bit entry:
// RIP at the entry point, RSI pointing at the zero page, interrupts off.
func EntryRegs(entry uint64) kvm.Regs {
	return kvm.Regs{RIP: entry, RSI: ZeroPageAddr, RSP: BootStackAddr, RFLAGS: 2}
}
