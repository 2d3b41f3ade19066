package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/krun-core/krun-core/core/kvm"
	"github.com/krun-core/krun-core/guestmem"
)

type fakeImage struct {
	version    uint16
	setupSects uint8
	xload      uint16
	loadflags  uint8
	initrdMax  uint32
	cmdlineMax uint32
	initSize   uint32
	payload    int
	reloc      bool
	pref       uint64
}

func (f fakeImage) build() []byte {
	sects := int(f.setupSects)
	if sects == 0 {
		sects = 4
	}
	img := make([]byte, (sects+1)*512+f.payload)
	le := binary.LittleEndian
	img[offSetupSects] = f.setupSects
	le.PutUint16(img[offBootFlag:], bootFlagMagic)
	img[offJump] = 0xeb
	img[offJump+1] = 0x6a // header ends at 0x26c
	le.PutUint32(img[offHeader:], headerMagic)
	le.PutUint16(img[offVersion:], f.version)
	img[offLoadFlags] = f.loadflags
	le.PutUint32(img[offInitrdAddrMax:], f.initrdMax)
	le.PutUint32(img[offKernelAlign:], 0x200000)
	if f.reloc {
		img[offRelocatable] = 1
	}
	le.PutUint16(img[offXLoadFlags:], f.xload)
	le.PutUint32(img[offCmdlineSize:], f.cmdlineMax)
	le.PutUint64(img[offPrefAddress:], f.pref)
	le.PutUint32(img[offInitSize:], f.initSize)
	for i := (sects + 1) * 512; i < len(img); i++ {
		img[i] = byte(i * 7)
	}
	return img
}

func goodImage() fakeImage {
	return fakeImage{version: 0x020f, setupSects: 27, xload: 0x7f, loadflags: 1, initrdMax: 0x7fffffff,
		cmdlineMax: 2047, initSize: 0x800000, payload: 100000, reloc: true, pref: 0x1000000}
}

func newMem(t *testing.T, size uint64) (*guestmem.Memory, []RAMRange) {
	return newMemF(t, size)
}

func newMemF(t testing.TB, size uint64) (*guestmem.Memory, []RAMRange) {
	t.Helper()
	ram := RAMLayout(size)
	f, err := guestmem.NewMemfd("boot-test", size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var regions []guestmem.Region
	var off uint64
	for _, r := range ram {
		regions = append(regions, guestmem.Region{GuestAddr: guestmem.Addr(r.Start), Size: r.Size, File: f, Offset: off})
		off += r.Size
	}
	m, err := guestmem.Map(regions)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, ram
}

func TestParseSetupHeader(t *testing.T) {
	tests := []struct {
		name   string
		mod    func(f *fakeImage)
		raw    func(b []byte)
		want   error
		sects  int
		initrd uint32
	}{
		{name: "good", sects: 27, initrd: 0x7fffffff},
		{name: "zero setup sects means 4", mod: func(f *fakeImage) { f.setupSects = 0 }, sects: 4, initrd: 0x7fffffff},
		{name: "zero initrd max gets the old default", mod: func(f *fakeImage) { f.initrdMax = 0 }, sects: 27, initrd: defaultInitMax},
		{name: "old protocol", mod: func(f *fakeImage) { f.version = 0x020b }, want: ErrUnsupported},
		{name: "no 64-bit entry", mod: func(f *fakeImage) { f.xload = 0x7e }, want: ErrUnsupported},
		{name: "zImage", mod: func(f *fakeImage) { f.loadflags = 0 }, want: ErrUnsupported},
		{name: "too many setup sectors", mod: func(f *fakeImage) { f.setupSects = 65 }, want: ErrNotBzImage},
		{name: "bad boot flag", raw: func(b []byte) { b[offBootFlag] = 0 }, want: ErrNotBzImage},
		{name: "bad HdrS", raw: func(b []byte) { b[offHeader] = 'X' }, want: ErrNotBzImage},
		{name: "header too short", raw: func(b []byte) { b[offJump+1] = 0x10 }, want: ErrNotBzImage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := goodImage()
			if tt.mod != nil {
				tt.mod(&f)
			}
			img := f.build()
			if tt.raw != nil {
				tt.raw(img)
			}
			h, err := ParseSetupHeader(img[:1024])
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("err = %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.SetupSects != tt.sects || h.InitrdAddrMax != tt.initrd {
				t.Errorf("setup sects %d initrd max %#x, want %d %#x", h.SetupSects, h.InitrdAddrMax, tt.sects, tt.initrd)
			}
			if len(h.Raw) != 0x26c-hdrStart {
				t.Errorf("raw header %d bytes, want %d", len(h.Raw), 0x26c-hdrStart)
			}
		})
	}
	if _, err := ParseSetupHeader(make([]byte, 100)); !errors.Is(err, ErrNotBzImage) {
		t.Errorf("short image: %v", err)
	}
}

func TestE820Map(t *testing.T) {
	tests := []struct {
		ram  uint64
		want []E820Entry
	}{
		{64 << 20, []E820Entry{
			{0, EBDAStart, E820RAM}, {ACPIAddr, ACPISize, E820Reserved}, {KernelAddr, 64<<20 - KernelAddr, E820RAM}}},
		{3 << 30, []E820Entry{
			{0, EBDAStart, E820RAM}, {ACPIAddr, ACPISize, E820Reserved}, {KernelAddr, MMIOHoleStart - KernelAddr, E820RAM}}},
		{5 << 30, []E820Entry{
			{0, EBDAStart, E820RAM}, {ACPIAddr, ACPISize, E820Reserved}, {KernelAddr, MMIOHoleStart - KernelAddr, E820RAM},
			{HighMemStart, 2 << 30, E820RAM}}},
	}
	for _, tt := range tests {
		got := E820Map(RAMLayout(tt.ram))
		if len(got) != len(tt.want) {
			t.Fatalf("%d MiB: %v, want %v", tt.ram>>20, got, tt.want)
		}
		var total uint64
		for i := range got {
			if got[i] != tt.want[i] {
				t.Errorf("%d MiB entry %d: %+v, want %+v", tt.ram>>20, i, got[i], tt.want[i])
			}
			if i > 0 && got[i].Addr < got[i-1].Addr+got[i-1].Size {
				t.Errorf("%d MiB: entry %d overlaps the previous one", tt.ram>>20, i)
			}
			if got[i].Type == E820RAM {
				total += got[i].Size
			}
		}
		// RAM lost to the BIOS areas: 0x9fc00..0x100000.
		if total != tt.ram-(KernelAddr-EBDAStart) {
			t.Errorf("%d MiB: e820 RAM total %#x", tt.ram>>20, total)
		}
	}
}

func TestInitrdAddr(t *testing.T) {
	tests := []struct {
		name                  string
		size, lowEnd, kernEnd uint64
		max                   uint32
		want                  uint64
		fails                 bool
	}{
		{"top of small RAM", 0x1800, 64 << 20, 0x1000000, 0x7fffffff, 64<<20 - 0x2000, false},
		{"below initrd_addr_max", 0x1000, 3 << 30, 0x1000000, 0x37ffffff, 0x38000000 - 0x1000, false},
		{"exact page", 0x1000, 0x4000000, 0x1000000, 0xffffffff, 0x4000000 - 0x1000, false},
		{"overlaps kernel", 60 << 20, 64 << 20, 8 << 20, 0x7fffffff, 0, true},
		{"larger than RAM", 65 << 20, 64 << 20, 8 << 20, 0x7fffffff, 0, true},
		{"empty", 0, 64 << 20, 8 << 20, 0x7fffffff, 0, true},
	}
	for _, tt := range tests {
		got, err := InitrdAddr(tt.size, tt.lowEnd, tt.max, tt.kernEnd)
		if tt.fails {
			if !errors.Is(err, ErrDoesNotFit) {
				t.Errorf("%s: err %v, want ErrDoesNotFit", tt.name, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: %#x %v, want %#x", tt.name, got, err, tt.want)
		}
		if got&0xfff != 0 || got+tt.size > min(tt.lowEnd, uint64(tt.max)+1) {
			t.Errorf("%s: %#x misplaced", tt.name, got)
		}
	}
}

// walk translates a virtual address through the boot page tables in mem.
func walk(t *testing.T, mem *guestmem.Memory, va uint64) (uint64, bool) {
	t.Helper()
	rd := func(a uint64) uint64 {
		var b [8]byte
		if err := mem.Read(guestmem.Addr(a), b[:]); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint64(b[:])
	}
	pml4e := rd(PML4Addr + 8*(va>>39&511))
	if pml4e&ptePresent == 0 {
		return 0, false
	}
	pdpte := rd(pml4e&^0xfff + 8*(va>>30&511))
	if pdpte&ptePresent == 0 {
		return 0, false
	}
	pde := rd(pdpte&^0xfff + 8*(va>>21&511))
	if pde&ptePresent == 0 || pde&ptePageSize == 0 || pde&pteWritable == 0 {
		return 0, false
	}
	return pde&^0x1fffff | va&0x1fffff, true
}

func TestLoad(t *testing.T) {
	mem, ram := newMem(t, 128<<20)
	f := goodImage()
	img := f.build()
	initrd := bytes.Repeat([]byte("initrd!"), 5000)
	cmdline := "console=ttyS0 panic=-1"
	ld, err := Load(mem, Config{
		Kernel: bytes.NewReader(img), KernelSize: int64(len(img)),
		Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd)),
		Cmdline: cmdline, RAM: ram, RSDP: ACPIAddr,
	})
	if err != nil {
		t.Fatal(err)
	}
	if ld.KernelEnd != 0x1000000+0x800000 {
		t.Errorf("kernel end %#x, want pref_address + init_size", ld.KernelEnd)
	}
	if ld.Entry != KernelAddr+0x200 {
		t.Errorf("entry %#x", ld.Entry)
	}
	// Kernel payload at 1 MiB.
	payload := img[28*512:]
	got := make([]byte, len(payload))
	mem.Read(KernelAddr, got)
	if !bytes.Equal(got, payload) {
		t.Error("kernel payload not at 1 MiB")
	}
	zp := make([]byte, zeroPageSize)
	mem.Read(ZeroPageAddr, zp)
	le := binary.LittleEndian
	if !bytes.Equal(zp[hdrStart:0x26c], func() []byte {
		h := append([]byte(nil), img[hdrStart:0x26c]...)
		h[offTypeOfLoader-hdrStart] = loaderUndef
		copy(h[offCmdLinePtr-hdrStart:], zp[offCmdLinePtr:offCmdLinePtr+4])
		copy(h[offRamdiskImage-hdrStart:], zp[offRamdiskImage:offRamdiskImage+8])
		return h
	}()) {
		t.Error("setup header not copied into the zero page")
	}
	if zp[offTypeOfLoader] != 0xff {
		t.Errorf("type_of_loader %#x", zp[offTypeOfLoader])
	}
	if zp[offSentinel] != 0 {
		t.Error("sentinel set")
	}
	if p := le.Uint32(zp[offCmdLinePtr:]); p != CmdlineAddr {
		t.Errorf("cmd_line_ptr %#x", p)
	}
	cl := make([]byte, len(cmdline)+1)
	mem.Read(CmdlineAddr, cl)
	if string(cl) != cmdline+"\x00" {
		t.Errorf("command line %q", cl)
	}
	ia, is := le.Uint32(zp[offRamdiskImage:]), le.Uint32(zp[offRamdiskSize:])
	if uint64(ia) != ld.InitrdAddr || int(is) != len(initrd) || ia&0xfff != 0 || uint64(ia)+uint64(is) > 128<<20 || uint64(ia) < ld.KernelEnd {
		t.Errorf("initrd at %#x size %d", ia, is)
	}
	gi := make([]byte, len(initrd))
	mem.Read(guestmem.Addr(ia), gi)
	if !bytes.Equal(gi, initrd) {
		t.Error("initrd content differs")
	}
	if r := le.Uint64(zp[offACPIRSDPAddr:]); r != ACPIAddr {
		t.Errorf("acpi_rsdp_addr %#x", r)
	}
	n := int(zp[offE820Entries])
	if n != len(ld.E820) || n != 3 {
		t.Fatalf("e820_entries %d", n)
	}
	for i, e := range ld.E820 {
		b := zp[offE820Table+20*i:]
		if le.Uint64(b) != e.Addr || le.Uint64(b[8:]) != e.Size || le.Uint32(b[16:]) != e.Type {
			t.Errorf("e820 entry %d encoded wrong", i)
		}
	}
	// The page tables identity-map everything the kernel touches first.
	for _, va := range []uint64{0, ZeroPageAddr, CmdlineAddr, KernelAddr + 0x200, uint64(ia), uint64(ia) + uint64(is) - 1, 0xbfffffff, 0xfee00000, PageTableMapped - 1} {
		pa, ok := walk(t, mem, va)
		if !ok || pa != va {
			t.Errorf("VA %#x maps to %#x (%v), want identity", va, pa, ok)
		}
	}
	if _, ok := walk(t, mem, PageTableMapped); ok {
		t.Errorf("VA %#x unexpectedly mapped", uint64(PageTableMapped))
	}
	gdt := make([]byte, 40)
	mem.Read(GDTAddr, gdt)
	if !bytes.Equal(gdt, GDT()) {
		t.Error("GDT not written")
	}
}

func TestLoadErrors(t *testing.T) {
	mem, ram := newMem(t, 64<<20)
	good := goodImage()
	tests := []struct {
		name    string
		img     fakeImage
		cmdline string
		initrd  int
		ram     []RAMRange
		want    error
	}{
		{name: "kernel larger than RAM", img: func() fakeImage { f := good; f.initSize = 64 << 20; return f }(), want: ErrDoesNotFit},
		{name: "payload missing", img: func() fakeImage { f := good; f.payload = 0; return f }(), want: ErrNotBzImage},
		{name: "command line too long", img: good, cmdline: string(bytes.Repeat([]byte("a"), 2048)), want: ErrBadCmdline},
		{name: "command line with NUL", img: good, cmdline: "a\x00b", want: ErrBadCmdline},
		{name: "initrd overlapping the kernel", img: good, initrd: 60 << 20, want: ErrDoesNotFit},
		{name: "too little RAM", img: good, ram: []RAMRange{{0, 16 << 20}}, want: ErrDoesNotFit},
		{name: "decompression area beyond RAM", img: func() fakeImage { f := good; f.pref = 58 << 20; return f }(), want: ErrDoesNotFit},
		{name: "non-relocatable beyond RAM", img: func() fakeImage { f := good; f.reloc = false; f.pref = 60 << 20; return f }(), want: ErrDoesNotFit},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := tt.img.build()
			cfg := Config{Kernel: bytes.NewReader(img), KernelSize: int64(len(img)), Cmdline: tt.cmdline, RAM: ram}
			if tt.ram != nil {
				cfg.RAM = tt.ram
			}
			if tt.initrd > 0 {
				cfg.Initrd, cfg.InitrdSize = bytes.NewReader(make([]byte, tt.initrd)), int64(tt.initrd)
			}
			if _, err := Load(mem, cfg); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
	// A file too short to hold a setup header (an empty file, a stray
	// text file) is no bzImage, whatever its reader says at its end.
	for _, n := range []int{0, 1, 600, 1023} {
		img := good.build()[:n]
		_, err := Load(mem, Config{Kernel: bytes.NewReader(img), KernelSize: int64(n), RAM: ram})
		if !errors.Is(err, ErrNotBzImage) || !strings.Contains(err.Error(), fmt.Sprintf("%d bytes", n)) {
			t.Errorf("kernel of %d bytes: err = %v, want ErrNotBzImage naming its size", n, err)
		}
	}
	// A kernel file shorter than it claims.
	img := good.build()
	if _, err := Load(mem, Config{Kernel: bytes.NewReader(img[:2000]), KernelSize: int64(len(img)), RAM: ram}); err == nil {
		t.Error("truncated kernel accepted")
	}
}

func TestLongModeState(t *testing.T) {
	var s kvm.Sregs
	s.APICBase = 0xfee00900
	LongModeSregs(&s)
	if s.APICBase != 0xfee00900 {
		t.Error("APIC base overwritten")
	}
	if s.CS.Selector != 0x10 || s.CS.L != 1 || s.CS.DB != 0 || s.CS.Type != 0xb || s.CS.Present != 1 || s.CS.S != 1 || s.CS.G != 1 || s.CS.Limit != 0xffffffff || s.CS.Base != 0 {
		t.Errorf("CS %+v", s.CS)
	}
	for i, d := range []kvm.Segment{s.DS, s.ES, s.FS, s.GS, s.SS} {
		if d.Selector != 0x18 || d.Type != 3 || d.DB != 1 || d.L != 0 || d.Limit != 0xffffffff || d.Present != 1 {
			t.Errorf("data segment %d %+v", i, d)
		}
	}
	if s.TR.Selector != 0x20 || s.TR.Type != 0xb || s.TR.S != 0 || s.TR.Limit != 0x67 || s.TR.Present != 1 {
		t.Errorf("TR %+v", s.TR)
	}
	if s.GDT.Base != GDTAddr || s.GDT.Limit != 39 {
		t.Errorf("GDTR %+v", s.GDT)
	}
	if s.CR0&(cr0PE|cr0PG) != cr0PE|cr0PG || s.CR4&cr4PAE == 0 || s.EFER&(eferLME|eferLMA) != eferLME|eferLMA || s.CR3 != PML4Addr {
		t.Errorf("control registers CR0 %#x CR4 %#x EFER %#x CR3 %#x", s.CR0, s.CR4, s.EFER, s.CR3)
	}
	// The GDT descriptors decode back to the segment registers.
	gdt := GDT()
	for _, sel := range []uint16{SelectorCode, SelectorData, SelectorTSS} {
		d := binary.LittleEndian.Uint64(gdt[sel:])
		if d != gdtEntries[sel/8] {
			t.Errorf("GDT entry %#x = %#x", sel, d)
		}
	}
	if binary.LittleEndian.Uint64(gdt[SelectorCode:]) != 0x00af9b000000ffff {
		t.Errorf("code descriptor %#x", binary.LittleEndian.Uint64(gdt[SelectorCode:]))
	}
	if binary.LittleEndian.Uint64(gdt[SelectorData:]) != 0x00cf93000000ffff {
		t.Errorf("data descriptor %#x", binary.LittleEndian.Uint64(gdt[SelectorData:]))
	}
	r := EntryRegs(0x100200)
	if r.RIP != 0x100200 || r.RSI != ZeroPageAddr || r.RFLAGS != 2 {
		t.Errorf("regs %+v", r)
	}
}
