package vmm

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/krun-core/krun-core/core/acpi"
	"github.com/krun-core/krun-core/core/serial"
)

// FuzzPortDispatch drives the core's port and MMIO dispatch with what a
// hostile guest's exits can carry: any port or address, widths the
// dispatcher does not expect (0..8 bytes), string I/O split as handleExit
// splits it, both directions (from review, helper-97). Each 8-byte record
// is (flags, port/addr low 16 bits, width, count, value). It checks: no
// panic; an IN or MMIO read fills every byte it returns (no stale
// kvm_run bytes); an access that covers none of a device's ports leaves
// that device's registers alone; only an access covering a power port
// ends the run.
func FuzzPortDispatch(f *testing.F) {
	rec := func(fl byte, port uint16, width, count byte, v uint16) []byte {
		b := []byte{fl, 0, 0, width, count}
		binary.LittleEndian.PutUint16(b[1:], port)
		return binary.LittleEndian.AppendUint16(append(b, 0), v)
	}
	var seed []byte
	for _, r := range [][]byte{
		rec(1, 0x3fb, 1, 1, 0x80), rec(1, 0x3f8, 2, 3, 0x0102), rec(0, 0x3fe, 4, 1, 0),
		rec(1, acpi.PM1aEventPort, 4, 1, 0xffff), rec(0, acpi.PM1aControlPort, 2, 1, 0),
		rec(1, acpi.PM1aControlPort-1, 4, 1, 0x0500), rec(1, PortMilestone, 2, 1, 1),
		rec(2, 0x0000, 8, 1, 0xabcd),
	} {
		seed = append(seed, r...)
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, ops []byte) {
		m := newTestMachine(&bytes.Buffer{})
		covers := func(port uint16, n int, lo, hi int) bool {
			return int(port) < hi && int(port)+n > lo
		}
		for len(ops) >= 8 {
			fl := ops[0]
			port := binary.LittleEndian.Uint16(ops[1:])
			width := int(ops[3] % 9)
			count := int(ops[4]%8) + 1
			val := ops[6:8]
			ops = ops[8:]
			if fl&2 != 0 { // MMIO
				if width == 0 {
					continue // kvm.MMIO refuses 0
				}
				addr := MMIOBase - 0x1000 + uint64(port)
				data := bytes.Repeat([]byte{0xa5}, width)
				write := fl&1 != 0
				m.mmio(addr, write, data)
				if !write && !bytes.Equal(data, make([]byte, width)) {
					t.Fatalf("MMIO read at %#x (no device) returned % x", addr, data)
				}
				continue
			}
			if width == 0 {
				continue // kvm.IO refuses size 0
			}
			out := fl&1 != 0
			data := make([]byte, width*count)
			for i := range data {
				data[i] = val[i%2]
			}
			m.uart.Write(7, 0x3c) // scratch, to see stray writes
			pmBefore := m.power.regs
			lastEvent(m) // only this access's event counts
			for off := 0; off+width <= len(data); off += width {
				m.pio(port, out, data[off:off+width])
			}
			n := width
			if !covers(port, n, serial.COM1Base, serial.COM1Base+serial.NumPorts) {
				if got := m.uart.Read(7); got != 0x3c {
					t.Fatalf("access at %#x width %d changed the UART's scratch register to %#x", port, width, got)
				}
			}
			if !covers(port, n, acpi.PM1aEventPort, acpi.PM1aControlPort+2) && m.power.regs != pmBefore {
				t.Fatalf("access at %#x width %d changed PM1 registers % x -> % x", port, width, pmBefore, m.power.regs)
			}
			if ev, ok := lastEvent(m); ok && ev.err == nil {
				if !out || !(covers(port, n, acpi.PM1aControlPort, acpi.PM1aControlPort+2) ||
					covers(port, n, acpi.ResetPort, acpi.ResetPort+1) || covers(port, n, portI8042Command, portI8042Command+1)) {
					t.Fatalf("access at %#x width %d out %v ended the run: %+v", port, width, out, ev)
				}
			}
		}
	})
}
