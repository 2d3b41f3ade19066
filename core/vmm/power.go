package vmm

import (
	"encoding/binary"
	"sync"

	"github.com/krun-core/krun-core/core/acpi"
)

// power is the ACPI PM1a register block the FADT points at: status
// (write 1 to clear) and enable at PM1aEventPort, control at
// PM1aControlPort. Writing SLP_TYP = S5 with SLP_EN to control powers off.
type power struct {
	mu    sync.Mutex
	regs  [6]byte // status, enable, control; little-endian words
	event func(event)
}

func (p *power) access(port uint16, out bool, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	base := int(port - acpi.PM1aEventPort)
	if base < 0 || base+len(data) > len(p.regs) {
		if !out {
			clear(data)
		}
		return
	}
	if !out {
		copy(data, p.regs[base:])
		// SCI_EN reads as set: the machine is always in ACPI mode.
		if base <= 4 && base+len(data) > 4 {
			data[4-base] |= acpi.PM1SCIEn
		}
		return
	}
	for i, b := range data {
		switch r := base + i; {
		case r < 2:
			p.regs[r] &^= b // status: write 1 to clear
		default:
			p.regs[r] = b
		}
	}
	ctl := binary.LittleEndian.Uint16(p.regs[4:])
	if ctl&acpi.PM1SleepEn != 0 {
		// SLP_EN is write-only: it never reads back.
		binary.LittleEndian.PutUint16(p.regs[4:], ctl&^acpi.PM1SleepEn)
		if acpi.SleepType(ctl) == acpi.SleepTypeS5 && p.event != nil {
			p.event(event{reason: ExitPowerOff})
		}
	}
}
