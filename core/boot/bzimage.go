package boot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/krun-core/krun-core/guestmem"
)

// Offsets inside the bzImage / boot_params of the setup header fields used
// here (boot.rst, "THE REAL-MODE KERNEL HEADER"; zero-page.rst).
const (
	hdrStart          = 0x1f1
	offSetupSects     = 0x1f1
	offBootFlag       = 0x1fe
	offJump           = 0x200
	offHeader         = 0x202
	offVersion        = 0x206
	offTypeOfLoader   = 0x210
	offLoadFlags      = 0x211
	offRamdiskImage   = 0x218
	offRamdiskSize    = 0x21c
	offCmdLinePtr     = 0x228
	offInitrdAddrMax  = 0x22c
	offKernelAlign    = 0x230
	offRelocatable    = 0x234
	offXLoadFlags     = 0x236
	offCmdlineSize    = 0x238
	offPrefAddress    = 0x258
	offInitSize       = 0x260
	offACPIRSDPAddr   = 0x070
	offExtRamdiskImg  = 0x0c0
	offExtRamdiskSize = 0x0c4
	offExtCmdLinePtr  = 0x0c8
	offE820Entries    = 0x1e8
	offSentinel       = 0x1ef
	offE820Table      = 0x2d0
	e820EntrySize     = 20
	e820MaxEntries    = 128
	zeroPageSize      = 4096

	bootFlagMagic  = 0xaa55
	headerMagic    = 0x53726448 // "HdrS"
	minVersion     = 0x020c     // 2.12: xloadflags and the 64-bit entry
	xlfKernel64    = 1 << 0
	loadedHigh     = 1 << 0
	loaderUndef    = 0xff
	entry64Offset  = 0x200
	maxSetupSects  = 64 // 32 KiB of real-mode code is the protocol's limit
	defaultInitMax = 0x37ffffff
)

// Errors for malformed or unsupported kernel images.
var (
	ErrNotBzImage   = errors.New("not a bzImage")
	ErrUnsupported  = errors.New("unsupported bzImage")
	ErrDoesNotFit   = errors.New("does not fit in guest memory")
	ErrBadCmdline   = errors.New("invalid kernel command line")
	ErrTooManyE820  = errors.New("too many e820 entries")
	ErrImageTooLong = errors.New("image too large")
)

// SetupHeader holds the fields of a bzImage's setup header the loader uses.
type SetupHeader struct {
	Version       uint16
	SetupSects    int
	LoadFlags     uint8
	XLoadFlags    uint16
	InitrdAddrMax uint32
	KernelAlign   uint32
	Relocatable   bool
	CmdlineSize   uint32
	PrefAddress   uint64
	InitSize      uint32
	// Raw is the setup header as found in the image, from 0x1f1 to its
	// end (0x202 + the byte at 0x201), to be copied into the zero page.
	Raw []byte
}

// PayloadOffset is where the protected-mode kernel starts in the file.
func (h *SetupHeader) PayloadOffset() int64 { return int64(h.SetupSects+1) * 512 }

// ParseSetupHeader reads and checks the setup header of a bzImage. The
// first 1 KiB of the image is enough.
func ParseSetupHeader(img []byte) (*SetupHeader, error) {
	if len(img) < offInitSize+4 {
		return nil, fmt.Errorf("%w: %d bytes is too short for a setup header", ErrNotBzImage, len(img))
	}
	le := binary.LittleEndian
	if le.Uint16(img[offBootFlag:]) != bootFlagMagic {
		return nil, fmt.Errorf("%w: boot flag %#x", ErrNotBzImage, le.Uint16(img[offBootFlag:]))
	}
	if le.Uint32(img[offHeader:]) != headerMagic {
		return nil, fmt.Errorf("%w: no HdrS signature", ErrNotBzImage)
	}
	h := &SetupHeader{
		Version:       le.Uint16(img[offVersion:]),
		SetupSects:    int(img[offSetupSects]),
		LoadFlags:     img[offLoadFlags],
		XLoadFlags:    le.Uint16(img[offXLoadFlags:]),
		InitrdAddrMax: le.Uint32(img[offInitrdAddrMax:]),
		KernelAlign:   le.Uint32(img[offKernelAlign:]),
		Relocatable:   img[offRelocatable] != 0,
		CmdlineSize:   le.Uint32(img[offCmdlineSize:]),
		PrefAddress:   le.Uint64(img[offPrefAddress:]),
		InitSize:      le.Uint32(img[offInitSize:]),
	}
	if h.Version < minVersion {
		return nil, fmt.Errorf("%w: boot protocol %d.%02d, need 2.12 or later", ErrUnsupported, h.Version>>8, h.Version&0xff)
	}
	if h.XLoadFlags&xlfKernel64 == 0 {
		return nil, fmt.Errorf("%w: no 64-bit entry point (XLF_KERNEL_64 clear)", ErrUnsupported)
	}
	if h.LoadFlags&loadedHigh == 0 {
		return nil, fmt.Errorf("%w: zImage (not loaded high)", ErrUnsupported)
	}
	if h.SetupSects == 0 {
		h.SetupSects = 4
	}
	if h.SetupSects > maxSetupSects {
		return nil, fmt.Errorf("%w: %d setup sectors", ErrNotBzImage, h.SetupSects)
	}
	if h.InitrdAddrMax == 0 {
		h.InitrdAddrMax = defaultInitMax
	}
	end := offHeader + int(img[offJump+1])
	if end < offInitSize+4 || end > len(img) || end > zeroPageSize {
		return nil, fmt.Errorf("%w: setup header ends at %#x", ErrNotBzImage, end)
	}
	h.Raw = append([]byte(nil), img[hdrStart:end]...)
	return h, nil
}

// Memory is where the loader writes: guestmem.Memory satisfies it.
type Memory interface {
	Slice(a guestmem.Addr, n uint64) ([]byte, error)
}

// Config says what to boot.
type Config struct {
	Kernel     io.ReaderAt
	KernelSize int64
	Initrd     io.ReaderAt // nil: no initrd
	InitrdSize int64
	Cmdline    string
	// RAM is the guest RAM layout (RAMLayout).
	RAM []RAMRange
	// RSDP is the guest address of the ACPI RSDP (0: none).
	RSDP uint64
}

// Loaded says where things went.
type Loaded struct {
	Entry      uint64 // 64-bit entry point
	KernelEnd  uint64 // end of the kernel's reserved area (load + init_size)
	InitrdAddr uint64
	InitrdSize uint64
	E820       []E820Entry
	Header     *SetupHeader
}

// Load writes the kernel, initrd, command line, zero page, page tables and
// GDT into guest memory.
func Load(mem Memory, cfg Config) (*Loaded, error) {
	if len(cfg.RAM) == 0 || cfg.RAM[0].Start != 0 {
		return nil, fmt.Errorf("%w: no RAM at address 0", ErrDoesNotFit)
	}
	lowEnd := cfg.RAM[0].Size
	if lowEnd < MinMemory {
		return nil, fmt.Errorf("%w: %d MiB of low RAM, need at least %d MiB", ErrDoesNotFit, lowEnd>>20, MinMemory>>20)
	}
	head := make([]byte, 1024)
	if n, err := cfg.Kernel.ReadAt(head, 0); n < len(head) {
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read kernel header: %w", err)
		}
		// An empty or stray small file: say what it is not, rather
		// than "EOF".
		return nil, fmt.Errorf("%w: %d bytes is too short for a setup header", ErrNotBzImage, n)
	}
	hdr, err := ParseSetupHeader(head)
	if err != nil {
		return nil, err
	}
	payload := hdr.PayloadOffset()
	if cfg.KernelSize <= payload {
		return nil, fmt.Errorf("%w: %d bytes, payload starts at %d", ErrNotBzImage, cfg.KernelSize, payload)
	}
	psize := uint64(cfg.KernelSize - payload)
	// The kernel decompresses itself to max(load address, pref_address)
	// (LOAD_PHYSICAL_ADDR), aligned up to kernel_alignment if it is
	// relocatable, and needs init_size bytes from there.
	if psize > lowEnd-KernelAddr {
		return nil, fmt.Errorf("kernel: %w (%d bytes at %#x, low RAM ends at %#x)", ErrDoesNotFit, psize, KernelAddr, lowEnd)
	}
	base := uint64(KernelAddr)
	if hdr.PrefAddress > base {
		base = hdr.PrefAddress
	}
	if hdr.Relocatable {
		// A relocatable kernel runs from align_up(max(load address,
		// pref_address), kernel_alignment) (boot.rst, init_size).
		a := uint64(hdr.KernelAlign)
		if a == 0 || a&(a-1) != 0 {
			return nil, fmt.Errorf("%w: kernel_alignment %#x is not a power of two", ErrNotBzImage, a)
		}
		if base > lowEnd {
			return nil, fmt.Errorf("kernel: %w (pref_address %#x, low RAM ends at %#x)", ErrDoesNotFit, base, lowEnd)
		}
		base = (base + a - 1) &^ (a - 1)
	}
	if base > lowEnd || uint64(hdr.InitSize) > lowEnd-base {
		return nil, fmt.Errorf("kernel: %w (needs %#x bytes from %#x, low RAM ends at %#x)", ErrDoesNotFit, hdr.InitSize, base, lowEnd)
	}
	kernelEnd := max(KernelAddr+psize, base+uint64(hdr.InitSize))
	kbuf, err := mem.Slice(guestmem.Addr(KernelAddr), psize)
	if err != nil {
		return nil, fmt.Errorf("kernel destination: %w", err)
	}
	if n, err := cfg.Kernel.ReadAt(kbuf, payload); uint64(n) != psize {
		return nil, fmt.Errorf("read kernel: %w", orEOF(err))
	}
	ld := &Loaded{Entry: KernelAddr + entry64Offset, KernelEnd: kernelEnd, Header: hdr}

	zp := make([]byte, zeroPageSize)
	copy(zp[hdrStart:], hdr.Raw)
	le := binary.LittleEndian
	zp[offTypeOfLoader] = loaderUndef

	// Command line.
	cmd, err := cmdlineBytes(cfg.Cmdline, hdr.CmdlineSize)
	if err != nil {
		return nil, err
	}
	cbuf, err := mem.Slice(guestmem.Addr(CmdlineAddr), uint64(len(cmd)))
	if err != nil {
		return nil, fmt.Errorf("command line destination: %w", err)
	}
	copy(cbuf, cmd)
	le.PutUint32(zp[offCmdLinePtr:], CmdlineAddr)
	le.PutUint32(zp[offExtCmdLinePtr:], 0)

	// Initrd at the top of low RAM, below initrd_addr_max.
	if cfg.Initrd != nil && cfg.InitrdSize > 0 {
		addr, err := InitrdAddr(uint64(cfg.InitrdSize), lowEnd, hdr.InitrdAddrMax, ld.KernelEnd)
		if err != nil {
			return nil, err
		}
		ibuf, err := mem.Slice(guestmem.Addr(addr), uint64(cfg.InitrdSize))
		if err != nil {
			return nil, fmt.Errorf("initrd destination: %w", err)
		}
		if n, err := cfg.Initrd.ReadAt(ibuf, 0); int64(n) != cfg.InitrdSize {
			return nil, fmt.Errorf("read initrd: %w", orEOF(err))
		}
		le.PutUint32(zp[offRamdiskImage:], uint32(addr))
		le.PutUint32(zp[offRamdiskSize:], uint32(cfg.InitrdSize))
		ld.InitrdAddr, ld.InitrdSize = addr, uint64(cfg.InitrdSize)
	}

	ld.E820 = E820Map(cfg.RAM)
	if err := putE820(zp, ld.E820); err != nil {
		return nil, err
	}
	le.PutUint64(zp[offACPIRSDPAddr:], cfg.RSDP)

	zbuf, err := mem.Slice(guestmem.Addr(ZeroPageAddr), zeroPageSize)
	if err != nil {
		return nil, fmt.Errorf("zero page destination: %w", err)
	}
	copy(zbuf, zp)

	pt, err := mem.Slice(guestmem.Addr(PML4Addr), uint64(len(PageTables())))
	if err != nil {
		return nil, fmt.Errorf("page table destination: %w", err)
	}
	copy(pt, PageTables())
	gdt := GDT()
	gbuf, err := mem.Slice(guestmem.Addr(GDTAddr), uint64(len(gdt)))
	if err != nil {
		return nil, fmt.Errorf("GDT destination: %w", err)
	}
	copy(gbuf, gdt)
	return ld, nil
}

// InitrdAddr picks the page-aligned address of an initrd of size bytes:
// as high as possible below both the end of low RAM and initrd_addr_max
// (the highest address its last byte may have), above kernelEnd.
func InitrdAddr(size, lowEnd uint64, addrMax uint32, kernelEnd uint64) (uint64, error) {
	top := min(lowEnd, uint64(addrMax)+1)
	if size == 0 || size > top {
		return 0, fmt.Errorf("initrd of %d bytes: %w (limit %#x)", size, ErrDoesNotFit, top)
	}
	addr := (top - size) &^ 0xfff
	if addr < kernelEnd {
		return 0, fmt.Errorf("initrd of %d bytes: %w (would overlap the kernel ending at %#x)", size, ErrDoesNotFit, kernelEnd)
	}
	return addr, nil
}

// cmdlineBytes returns the NUL-terminated command line after checking it
// against the kernel's limit (cmdline_size excludes the NUL).
func cmdlineBytes(s string, limit uint32) ([]byte, error) {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return nil, fmt.Errorf("%w: NUL byte at %d", ErrBadCmdline, i)
		}
	}
	if limit == 0 {
		limit = 255
	}
	if uint64(len(s)) > uint64(limit) || len(s) >= CmdlineMax {
		return nil, fmt.Errorf("%w: %d bytes, the kernel accepts %d", ErrBadCmdline, len(s), limit)
	}
	return append([]byte(s), 0), nil
}

func putE820(zp []byte, entries []E820Entry) error {
	if len(entries) > e820MaxEntries {
		return fmt.Errorf("%w: %d", ErrTooManyE820, len(entries))
	}
	zp[offE820Entries] = uint8(len(entries))
	for i, e := range entries {
		b := zp[offE820Table+i*e820EntrySize:]
		binary.LittleEndian.PutUint64(b, e.Addr)
		binary.LittleEndian.PutUint64(b[8:], e.Size)
		binary.LittleEndian.PutUint32(b[16:], e.Type)
	}
	return nil
}

func orEOF(err error) error {
	if err == nil {
		return io.ErrUnexpectedEOF
	}
	return err
}
