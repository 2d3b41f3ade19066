package acpi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

const testBase = 0xe0000

func table(t *testing.T, blob []byte, addr uint64, sig string) []byte {
	t.Helper()
	if addr < testBase || addr-testBase+headerSize > uint64(len(blob)) {
		t.Fatalf("%s at %#x outside the blob", sig, addr)
	}
	off := addr - testBase
	n := uint64(binary.LittleEndian.Uint32(blob[off+4:]))
	if off+n > uint64(len(blob)) {
		t.Fatalf("%s: length %d runs past the blob", sig, n)
	}
	tb := blob[off : off+n]
	if string(tb[:4]) != sig {
		t.Fatalf("table at %#x is %q, want %q", addr, tb[:4], sig)
	}
	if sig != "FACS" && sum(tb) != 0 {
		t.Errorf("%s checksum: bytes sum to %#x", sig, sum(tb))
	}
	return tb
}

func TestBuild(t *testing.T) {
	devs := []MMIODevice{{Base: 0xd0000000, Size: 0x200, GSI: 16}, {Base: 0xd0001000, Size: 0x1000, GSI: 17}}
	for _, cpus := range []int{1, 2, 4, 64, 255} {
		blob, l, err := Build(Config{CPUs: cpus, Devices: devs}, testBase)
		if err != nil {
			t.Fatal(err)
		}
		le := binary.LittleEndian
		// RSDP at the base, both checksums valid, revision 2.
		r := blob[:rsdpSize]
		if l.RSDP != 0 || string(r[:8]) != "RSD PTR " || r[15] != 2 {
			t.Fatalf("RSDP %q", r[:16])
		}
		if sum(r[:20]) != 0 || sum(r) != 0 {
			t.Errorf("RSDP checksums wrong")
		}
		if le.Uint32(r[20:]) != rsdpSize {
			t.Errorf("RSDP length %d", le.Uint32(r[20:]))
		}
		xsdt := table(t, blob, le.Uint64(r[24:]), "XSDT")
		if len(xsdt) != headerSize+16 {
			t.Fatalf("XSDT length %d", len(xsdt))
		}
		fadt := table(t, blob, le.Uint64(xsdt[36:]), "FACP")
		madt := table(t, blob, le.Uint64(xsdt[44:]), "APIC")
		if len(fadt) != fadtSize || fadt[8] != 6 {
			t.Fatalf("FADT length %d revision %d", len(fadt), fadt[8])
		}
		// FADT: the FACS only through X_FIRMWARE_CTRL (both set makes
		// Linux install it twice); DSDT pointers agree.
		facsAddr, dsdtAddr := uint32(le.Uint64(fadt[132:])), le.Uint32(fadt[40:])
		if le.Uint32(fadt[36:]) != 0 {
			t.Error("FIRMWARE_CTRL set alongside X_FIRMWARE_CTRL")
		}
		if uint64(dsdtAddr) != le.Uint64(fadt[140:]) {
			t.Error("FADT 32/64-bit DSDT pointers differ")
		}
		if facsAddr%64 != 0 {
			t.Errorf("FACS at %#x not 64-byte aligned", facsAddr)
		}
		facs := table(t, blob, uint64(facsAddr), "FACS")
		if len(facs) != facsSize {
			t.Errorf("FACS length %d", len(facs))
		}
		if le.Uint16(fadt[46:]) != SCI || le.Uint32(fadt[48:]) != 0 {
			t.Error("FADT SCI or SMI_CMD wrong")
		}
		if le.Uint32(fadt[56:]) != PM1aEventPort || le.Uint32(fadt[64:]) != PM1aControlPort || fadt[88] != 4 || fadt[89] != 2 {
			t.Error("FADT PM1a blocks wrong")
		}
		// X_PM1a_CNT_BLK: system I/O, 16 bits, at the control port.
		xcnt := fadt[172:184]
		if xcnt[0] != 1 || xcnt[1] != 16 || le.Uint64(xcnt[4:]) != PM1aControlPort {
			t.Errorf("X_PM1a_CNT_BLK % x", xcnt)
		}
		flags := le.Uint32(fadt[112:])
		if flags&fadtResetRegSup == 0 || flags&(1<<20) != 0 {
			t.Errorf("FADT flags %#x: want RESET_REG_SUP, not HW_REDUCED", flags)
		}
		reset := fadt[116:128]
		if reset[0] != 1 || reset[1] != 8 || le.Uint64(reset[4:]) != ResetPort || fadt[128] != ResetValue {
			t.Errorf("reset register % x value %#x", reset, fadt[128])
		}
		if boot := le.Uint16(fadt[109:]); boot&bootArchNoCMOS == 0 {
			t.Errorf("IAPC_BOOT_ARCH %#x", boot)
		}
		// MADT: one enabled local APIC per CPU with APIC ID = index,
		// one IOAPIC, one NMI entry; entries exactly fill the table.
		if le.Uint32(madt[36:]) != LAPICAddr || le.Uint32(madt[40:])&1 != 1 {
			t.Error("MADT header fields wrong")
		}
		var lapics, ioapics, nmis int
		for off := 44; off < len(madt); {
			typ, n := madt[off], int(madt[off+1])
			if n < 2 || off+n > len(madt) {
				t.Fatalf("MADT entry at %d has length %d", off, n)
			}
			e := madt[off : off+n]
			switch typ {
			case madtLocalAPIC:
				if n != 8 || int(e[2]) != lapics || int(e[3]) != lapics || le.Uint32(e[4:])&1 != 1 {
					t.Errorf("local APIC entry % x", e)
				}
				lapics++
			case madtIOAPIC:
				if n != 12 || le.Uint32(e[4:]) != IOAPICAddr || le.Uint32(e[8:]) != 0 {
					t.Errorf("IOAPIC entry % x", e)
				}
				ioapics++
			case madtLocalAPICNMI:
				if n != 6 || e[2] != 0xff || e[5] != 1 {
					t.Errorf("NMI entry % x", e)
				}
				nmis++
			default:
				t.Errorf("unexpected MADT entry type %d", typ)
			}
			off += n
		}
		if lapics != cpus || ioapics != 1 || nmis != 1 {
			t.Errorf("%d CPUs: MADT has %d local APICs, %d IOAPICs, %d NMIs", cpus, lapics, ioapics, nmis)
		}
		dsdt := table(t, blob, uint64(dsdtAddr), "DSDT")
		// \_S5 package: Name(_S5_, Package(4){5, 5, 0, 0}).
		s5 := []byte{amlNameOp, '_', 'S', '5', '_', amlPackageOp, 8, 4, amlBytePfx, 5, amlBytePfx, 5, 0, 0}
		if !bytes.Contains(dsdt, s5) {
			t.Error("DSDT lacks the _S5_ package")
		}
		if n := bytes.Count(dsdt, []byte(VirtioMMIOHID)); n != len(devs) {
			t.Errorf("DSDT has %d LNRO0005 devices, want %d", n, len(devs))
		}
		for _, d := range devs {
			mem := memory32Fixed(uint32(d.Base), uint32(d.Size))
			irq := extendedIRQ(d.GSI)
			if !bytes.Contains(dsdt, append(mem, irq...)) {
				t.Errorf("DSDT lacks the resources of device at %#x", d.Base)
			}
		}
		// Tables do not overlap and stay in order.
		offs := []uint64{l.RSDP, l.XSDT, l.FADT, l.FACS, l.DSDT, l.MADT}
		for i := 1; i < len(offs); i++ {
			if offs[i] <= offs[i-1] {
				t.Errorf("layout out of order: %+v", l)
			}
		}
	}
}

func TestBuildErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		base uint64
	}{
		{"no CPUs", Config{CPUs: 0}, testBase},
		{"too many CPUs", Config{CPUs: 256}, testBase},
		{"unaligned base", Config{CPUs: 1}, testBase + 4},
		{"device above 4 GiB", Config{CPUs: 1, Devices: []MMIODevice{{Base: 1 << 32, Size: 0x200, GSI: 5}}}, testBase},
		{"device crossing 4 GiB", Config{CPUs: 1, Devices: []MMIODevice{{Base: 0xffffff00, Size: 0x200, GSI: 5}}}, testBase},
		{"empty device", Config{CPUs: 1, Devices: []MMIODevice{{Base: 0xd0000000, GSI: 5}}}, testBase},
		{"GSI beyond IOAPIC", Config{CPUs: 1, Devices: []MMIODevice{{Base: 0xd0000000, Size: 0x200, GSI: 24}}}, testBase},
	}
	for _, tt := range tests {
		if _, _, err := Build(tt.cfg, tt.base); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: err %v, want ErrConfig", tt.name, err)
		}
	}
}

// decodePkgLength is the inverse of pkgLength, as an AML interpreter reads it.
func decodePkgLength(b []byte) (total, size int) {
	size = int(b[0]>>6) + 1
	if size == 1 {
		return int(b[0] & 0x3f), 1
	}
	total = int(b[0] & 0xf)
	for i := 1; i < size; i++ {
		total |= int(b[i]) << (4 + 8*(i-1))
	}
	return total, size
}

func TestPkgLength(t *testing.T) {
	for _, n := range []int{0, 1, 61, 62, 63, 64, 100, 4093, 4094, 4095, 1 << 19, 1<<20 - 4, 1<<20 - 3, 1 << 27} {
		b, err := pkgLength(n)
		if err != nil {
			t.Fatalf("%d: %v", n, err)
		}
		total, size := decodePkgLength(b)
		if size != len(b) || total != n+len(b) {
			t.Errorf("n=%d: encoded % x decodes to total %d size %d", n, b, total, size)
		}
		if len(b) > 1 && b[0]&0x30 != 0 {
			t.Errorf("n=%d: bits 4-5 of a multi-byte PkgLength must be zero: % x", n, b)
		}
		// The shortest encoding is used.
		if len(b) == 2 && n+1 < 64 || len(b) == 3 && n+2 < 1<<12 {
			t.Errorf("n=%d: %d-byte encoding is not the shortest", n, len(b))
		}
	}
	if _, err := pkgLength(1 << 28); err == nil {
		t.Error("pkgLength accepted 2^28")
	}
}

func TestAMLPrimitives(t *testing.T) {
	ints := []struct {
		v    uint64
		want []byte
	}{
		{0, []byte{0}}, {1, []byte{1}}, {5, []byte{0x0a, 5}}, {0x1234, []byte{0x0b, 0x34, 0x12}},
		{0x12345678, []byte{0x0c, 0x78, 0x56, 0x34, 0x12}}, {1 << 32, []byte{0x0e, 0, 0, 0, 0, 1, 0, 0, 0}},
	}
	for _, tt := range ints {
		if got := amlInteger(tt.v); !bytes.Equal(got, tt.want) {
			t.Errorf("amlInteger(%#x) = % x, want % x", tt.v, got, tt.want)
		}
	}
	for _, bad := range []string{"_S5", "1ABC", "ab__", "AB-C"} {
		if _, err := nameSeg(bad); err == nil {
			t.Errorf("nameSeg(%q) accepted", bad)
		}
	}
	if got := extendedIRQ(17); !bytes.Equal(got, []byte{0x89, 6, 0, 3, 1, 17, 0, 0, 0}) {
		t.Errorf("extendedIRQ = % x", got)
	}
	if got := memory32Fixed(0xd0000000, 0x200); !bytes.Equal(got, []byte{0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 2, 0, 0}) {
		t.Errorf("memory32Fixed = % x", got)
	}
	if SleepType(SleepTypeS5<<10|PM1SleepEn) != SleepTypeS5 {
		t.Error("SleepType")
	}
}
