// Package boot loads a Linux bzImage into guest memory by the x86 64-bit
// boot protocol (Documentation/arch/x86/boot.rst): it fills the zero page
// (struct boot_params) with the kernel's setup header, the command line,
// the initrd and the e820 memory map, builds identity-mapping page tables
// and a GDT, and gives the register state for the 64-bit entry point.
//
// The kernel and initrd images come from the user, not the guest, but are
// still treated as untrusted input: every header field that decides where
// bytes go is checked before use.
package boot

// Guest physical layout used by the core (all below 1 MiB except the
// kernel, the initrd and RAM itself):
//
//	0x0000_0500  GDT (5 descriptors)
//	0x0000_7000  zero page (struct boot_params, 4 KiB)
//	0x0000_8ff0  initial stack pointer (grows down, into 0x8000-0x8fff)
//	0x0000_9000  PML4, then PDPT at 0xa000, four PDs at 0xb000-0xefff
//	0x0002_0000  kernel command line
//	0x0009_fc00  end of low conventional RAM in the e820 map
//	0x000e_0000  ACPI tables (RSDP first), reserved in the e820 map
//	0x0010_0000  protected-mode kernel (bzImage payload)
//	...          initrd at the top of RAM below 4 GiB (and initrd_addr_max)
//	0xc000_0000  MMIO hole: virtio-mmio devices, IOAPIC, local APIC
//	0x1_0000_0000 RAM above 4 GiB, when there is more than the hole allows
const (
	GDTAddr       = 0x500
	ZeroPageAddr  = 0x7000
	BootStackAddr = 0x8ff0
	PML4Addr      = 0x9000
	PDPTAddr      = 0xa000
	PDAddr        = 0xb000
	CmdlineAddr   = 0x20000
	CmdlineMax    = 0x10000 // room reserved for the command line
	EBDAStart     = 0x9fc00
	ACPIAddr      = 0xe0000
	ACPISize      = 0x20000 // up to 1 MiB
	KernelAddr    = 0x100000
	HighMemStart  = 1 << 32
	// MMIOHoleStart is where RAM below 4 GiB ends and the device hole
	// begins.
	MMIOHoleStart = 0xc000_0000
	// PageTableMapped is how much the boot page tables identity-map.
	PageTableMapped = 4 << 30
	// MinMemory is the smallest RAM size the core boots with.
	MinMemory = 32 << 20
)

// RAMRange is one contiguous piece of guest RAM.
type RAMRange struct {
	Start, Size uint64
}

// RAMLayout splits size bytes of guest RAM around the MMIO hole: up to
// MMIOHoleStart below 4 GiB, the rest from 4 GiB up.
func RAMLayout(size uint64) []RAMRange {
	if size <= MMIOHoleStart {
		return []RAMRange{{0, size}}
	}
	return []RAMRange{{0, MMIOHoleStart}, {HighMemStart, size - MMIOHoleStart}}
}

// E820 entry types.
const (
	E820RAM      = 1
	E820Reserved = 2
	E820ACPI     = 3
)

// E820Entry is one entry of the e820 memory map (struct boot_e820_entry).
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// E820Map is the memory map the guest sees for the given RAM: low
// conventional memory, the reserved BIOS area holding the ACPI tables, RAM
// from 1 MiB to the hole, and RAM above 4 GiB.
func E820Map(ram []RAMRange) []E820Entry {
	var out []E820Entry
	for _, r := range ram {
		end := r.Start + r.Size
		if r.Start == 0 {
			out = append(out,
				E820Entry{0, min(EBDAStart, end), E820RAM},
				E820Entry{ACPIAddr, ACPISize, E820Reserved})
			if end > KernelAddr {
				out = append(out, E820Entry{KernelAddr, end - KernelAddr, E820RAM})
			}
			continue
		}
		out = append(out, E820Entry{r.Start, r.Size, E820RAM})
	}
	return out
}
