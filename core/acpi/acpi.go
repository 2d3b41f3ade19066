// Package acpi builds the minimal ACPI tables the core gives a guest: an
// RSDP, an XSDT, a FADT whose PM1a control block and reset register are I/O
// ports the core traps (poweroff and reboot), a FACS, a DSDT with the \_S5
// sleep package and one LNRO0005 device per virtio-mmio transport, and a
// MADT describing the vCPUs' local APICs and the IOAPIC.
//
// Linux on x86 powers off only through ACPI, and Debian's virtio_mmio
// module has no command-line device support, so both depend on these
// tables.
package acpi

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Fixed hardware the tables describe.
const (
	LAPICAddr  = 0xfee00000
	IOAPICAddr = 0xfec00000
	IOAPICPins = 24 // KVM's in-kernel IOAPIC
	// SCI is the ACPI system control interrupt. It is never raised (the
	// core has no ACPI events), but it must be valid.
	SCI = 9

	// I/O ports of the fixed ACPI registers, trapped by the core.
	PM1aEventPort   = 0x600 // PM1a status (2 bytes) and enable (2 bytes)
	PM1aControlPort = 0x604 // PM1a control (2 bytes)
	ResetPort       = 0x608 // FADT reset register (1 byte)
	ResetValue      = 0x01

	// SleepTypeS5 is the SLP_TYP value of \_S5 (soft off). The guest
	// writes it to PM1a control bits 10..12 together with SLP_EN (bit 13).
	SleepTypeS5 = 5
	PM1SleepEn  = 1 << 13
	PM1SCIEn    = 1 << 0
)

// SleepType extracts SLP_TYP from a PM1 control value.
func SleepType(v uint16) uint16 { return v >> 10 & 7 }

// MMIODevice is one virtio-mmio transport to describe in the DSDT.
type MMIODevice struct {
	Base uint64
	Size uint64
	GSI  uint32
}

// Config describes the machine.
type Config struct {
	CPUs    int
	Devices []MMIODevice
}

// MaxCPUs is what one-byte local APIC entries can describe.
const MaxCPUs = 255

// ErrConfig reports a machine the tables cannot describe.
var ErrConfig = errors.New("invalid ACPI configuration")

const (
	headerSize = 36
	rsdpSize   = 36
	fadtSize   = 276
	facsSize   = 64
	oemID      = "KRUNCR"
	oemTableID = "KRUNCORE"
	creatorID  = "KRUN"
)

// Table offsets inside the blob Build returns.
type Layout struct {
	RSDP, XSDT, FADT, FACS, DSDT, MADT uint64
}

// Build returns the tables laid out for guest address base (the RSDP comes
// first, so base is the RSDP's address; base must be 16-byte aligned) and
// where each table went.
func Build(cfg Config, base uint64) ([]byte, Layout, error) {
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return nil, Layout{}, fmt.Errorf("%w: %d CPUs (1..%d)", ErrConfig, cfg.CPUs, MaxCPUs)
	}
	if base&15 != 0 || base > 0xffffffff-0x100000 {
		return nil, Layout{}, fmt.Errorf("%w: base %#x", ErrConfig, base)
	}
	dsdt, err := buildDSDT(cfg.Devices)
	if err != nil {
		return nil, Layout{}, err
	}
	madt := buildMADT(cfg.CPUs)

	var l Layout
	off := uint64(0)
	place := func(size, align uint64) uint64 {
		off = (off + align - 1) &^ (align - 1)
		at := off
		off += size
		return at
	}
	l.RSDP = place(rsdpSize, 16)
	l.XSDT = place(headerSize+2*8, 8)
	l.FADT = place(fadtSize, 8)
	l.FACS = place(facsSize, 64)
	l.DSDT = place(uint64(len(dsdt)), 8)
	l.MADT = place(uint64(len(madt)), 8)
	blob := make([]byte, off)

	copy(blob[l.DSDT:], dsdt)
	copy(blob[l.MADT:], madt)
	copy(blob[l.FACS:], buildFACS())
	copy(blob[l.FADT:], buildFADT(base+l.FACS, base+l.DSDT))
	xsdt := header("XSDT", headerSize+16, 1)
	xsdt = binary.LittleEndian.AppendUint64(xsdt, base+l.FADT)
	xsdt = binary.LittleEndian.AppendUint64(xsdt, base+l.MADT)
	finish(xsdt)
	copy(blob[l.XSDT:], xsdt)
	copy(blob[l.RSDP:], buildRSDP(base+l.XSDT))
	return blob, l, nil
}

// header is the 36-byte System Description Table header; finish fills in
// the checksum once the table is complete.
func header(sig string, length uint32, rev uint8) []byte {
	b := make([]byte, headerSize)
	copy(b, sig)
	binary.LittleEndian.PutUint32(b[4:], length)
	b[8] = rev
	copy(b[10:16], oemID)
	copy(b[16:24], oemTableID)
	binary.LittleEndian.PutUint32(b[24:], 1)
	copy(b[28:32], creatorID)
	binary.LittleEndian.PutUint32(b[32:], 1)
	return b
}

// finish sets the table length from len(t) and the checksum byte so that
// all bytes sum to zero.
func finish(t []byte) {
	binary.LittleEndian.PutUint32(t[4:], uint32(len(t)))
	t[9] = 0
	t[9] = -sum(t)
}

func sum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

func buildRSDP(xsdt uint64) []byte {
	b := make([]byte, rsdpSize)
	copy(b, "RSD PTR ")
	copy(b[9:15], oemID)
	b[15] = 2 // ACPI 2.0+: use the XSDT
	binary.LittleEndian.PutUint32(b[20:], rsdpSize)
	binary.LittleEndian.PutUint64(b[24:], xsdt)
	b[8] = -sum(b[:20])
	b[32] = -sum(b)
	return b
}

// gas appends a Generic Address Structure for a system I/O register.
func gas(b []byte, port uint16, bits uint8, access uint8) []byte {
	b = append(b, 1 /* SystemIO */, bits, 0, access)
	return binary.LittleEndian.AppendUint64(b, uint64(port))
}

// FADT flags and boot architecture flags.
const (
	fadtWBINVD      = 1 << 0
	fadtProcC1      = 1 << 2
	fadtPwrButton   = 1 << 4 // no fixed-feature power button
	fadtSlpButton   = 1 << 5 // no fixed-feature sleep button
	fadtResetRegSup = 1 << 10
	bootArchNoVGA   = 1 << 2
	bootArchNoCMOS  = 1 << 5 // no CMOS RTC: the guest uses kvmclock
	accessByte      = 1
	accessWord      = 2
	accessDWord     = 3
)

func buildFADT(facs, dsdt uint64) []byte {
	t := header("FACP", fadtSize, 6)
	le := binary.LittleEndian
	t = le.AppendUint32(t, 0)            // FIRMWARE_CTRL: X_FIRMWARE_CTRL is used
	t = le.AppendUint32(t, uint32(dsdt)) // DSDT
	t = append(t, 0, 0)                  // reserved, preferred PM profile (unspecified)
	t = le.AppendUint16(t, SCI)
	t = le.AppendUint32(t, 0)                // SMI_CMD: none, ACPI mode is always on
	t = append(t, 0, 0, 0, 0)                // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
	t = le.AppendUint32(t, PM1aEventPort)    // PM1a_EVT_BLK
	t = le.AppendUint32(t, 0)                // PM1b_EVT_BLK
	t = le.AppendUint32(t, PM1aControlPort)  // PM1a_CNT_BLK
	t = le.AppendUint32(t, 0)                // PM1b_CNT_BLK
	t = le.AppendUint32(t, 0)                // PM2_CNT_BLK
	t = le.AppendUint32(t, 0)                // PM_TMR_BLK
	t = le.AppendUint32(t, 0)                // GPE0_BLK
	t = le.AppendUint32(t, 0)                // GPE1_BLK
	t = append(t, 4, 2, 0, 0, 0, 0, 0, 0)    // PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR, GPE0, GPE1 lengths, GPE1_BASE, CST_CNT
	t = le.AppendUint16(t, 0xfff)            // P_LVL2_LAT: C2 not supported
	t = le.AppendUint16(t, 0xffff)           // P_LVL3_LAT: C3 not supported
	t = append(t, 0, 0, 0, 0, 0, 0, 0, 0, 0) // FLUSH_SIZE, FLUSH_STRIDE, DUTY_OFFSET, DUTY_WIDTH, DAY/MON_ALRM, CENTURY
	t = le.AppendUint16(t, bootArchNoVGA|bootArchNoCMOS)
	t = append(t, 0) // reserved
	t = le.AppendUint32(t, fadtWBINVD|fadtProcC1|fadtPwrButton|fadtSlpButton|fadtResetRegSup)
	t = gas(t, ResetPort, 8, accessByte) // RESET_REG
	t = append(t, ResetValue)
	t = le.AppendUint16(t, 0) // ARM_BOOT_ARCH
	t = append(t, 0)          // FADT minor version
	t = le.AppendUint64(t, facs)
	t = le.AppendUint64(t, dsdt)
	t = gas(t, PM1aEventPort, 32, accessWord)   // X_PM1a_EVT_BLK
	t = gas(t, 0, 0, 0)                         // X_PM1b_EVT_BLK
	t = gas(t, PM1aControlPort, 16, accessWord) // X_PM1a_CNT_BLK
	t = gas(t, 0, 0, 0)                         // X_PM1b_CNT_BLK
	t = gas(t, 0, 0, 0)                         // X_PM2_CNT_BLK
	t = gas(t, 0, 0, 0)                         // X_PM_TMR_BLK
	t = gas(t, 0, 0, 0)                         // X_GPE0_BLK
	t = gas(t, 0, 0, 0)                         // X_GPE1_BLK
	t = gas(t, 0, 0, 0)                         // SLEEP_CONTROL_REG
	t = gas(t, 0, 0, 0)                         // SLEEP_STATUS_REG
	t = append(t, "KRUNCORE"...)                // hypervisor vendor identity
	finish(t)
	return t
}

func buildFACS() []byte {
	b := make([]byte, facsSize)
	copy(b, "FACS")
	binary.LittleEndian.PutUint32(b[4:], facsSize)
	b[32] = 2 // version
	return b
}

// MADT entry types.
const (
	madtLocalAPIC    = 0
	madtIOAPIC       = 1
	madtLocalAPICNMI = 4
	madtPCATCompat   = 1
)

func buildMADT(cpus int) []byte {
	t := header("APIC", 0, 5)
	le := binary.LittleEndian
	t = le.AppendUint32(t, LAPICAddr)
	t = le.AppendUint32(t, madtPCATCompat)
	for i := 0; i < cpus; i++ {
		t = append(t, madtLocalAPIC, 8, byte(i), byte(i))
		t = le.AppendUint32(t, 1) // enabled
	}
	t = append(t, madtIOAPIC, 12, 0, 0)
	t = le.AppendUint32(t, IOAPICAddr)
	t = le.AppendUint32(t, 0) // GSI base
	// LINT1 of every processor is NMI (flags: conforming).
	t = append(t, madtLocalAPICNMI, 6, 0xff, 0, 0, 1)
	finish(t)
	return t
}

// VirtioMMIOHID is the ACPI hardware ID Linux's virtio_mmio driver binds to.
const VirtioMMIOHID = "LNRO0005"

func buildDSDT(devs []MMIODevice) ([]byte, error) {
	if len(devs) > 256 {
		return nil, fmt.Errorf("%w: %d devices", ErrConfig, len(devs))
	}
	// Name (_S5, Package () {5, 5, 0, 0}): SLP_TYPa, SLP_TYPb, reserved.
	s5pkg, err := amlPackage(amlInteger(SleepTypeS5), amlInteger(SleepTypeS5), amlInteger(0), amlInteger(0))
	if err != nil {
		return nil, err
	}
	s5, err := amlName("_S5_", s5pkg)
	if err != nil {
		return nil, err
	}
	var sb []byte
	for i, d := range devs {
		if d.Size == 0 || d.Base > 0xffffffff || d.Size > 0xffffffff || d.Base+d.Size > 1<<32 {
			return nil, fmt.Errorf("%w: device %d at %#x size %#x is not in 32-bit MMIO space", ErrConfig, i, d.Base, d.Size)
		}
		if d.GSI >= IOAPICPins {
			return nil, fmt.Errorf("%w: device %d GSI %d beyond the IOAPIC's %d pins", ErrConfig, i, d.GSI, IOAPICPins)
		}
		crsData := append(append(memory32Fixed(uint32(d.Base), uint32(d.Size)), extendedIRQ(d.GSI)...), endTag()...)
		crsBuf, err := amlBuffer(crsData)
		if err != nil {
			return nil, err
		}
		var body []byte
		for _, part := range []struct {
			name string
			val  []byte
		}{
			{"_HID", amlString(VirtioMMIOHID)},
			{"_UID", amlInteger(uint64(i))},
			{"_CRS", crsBuf},
		} {
			n, err := amlName(part.name, part.val)
			if err != nil {
				return nil, err
			}
			body = append(body, n...)
		}
		dev, err := amlDevice(fmt.Sprintf("VR%02X", i), body)
		if err != nil {
			return nil, err
		}
		sb = append(sb, dev...)
	}
	t := header("DSDT", 0, 2)
	t = append(t, s5...)
	if len(sb) > 0 {
		scope, err := amlRootScope("_SB_", sb)
		if err != nil {
			return nil, err
		}
		t = append(t, scope...)
	}
	finish(t)
	return t, nil
}
