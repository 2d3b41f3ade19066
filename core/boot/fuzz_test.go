package boot

import (
	"bytes"
	"testing"

	"github.com/krun-core/krun-core/guestmem"
)

// FuzzLoad feeds arbitrary kernel images (the first bytes of a valid one
// as seed) to the loader: it must return an error or load within guest
// memory, never panic, with the kernel's payload, the command line and the
// initrd in place afterwards (none overwritten by what was written later).
func FuzzLoad(f *testing.F) {
	good := goodImage()
	good.payload = 4096
	good.initSize = 0x100000
	good.pref = 0
	f.Add(good.build(), "console=ttyS0", uint16(100))
	f.Add(make([]byte, 1024), "", uint16(0))
	mem, ram := newMemF(f, 64<<20)
	f.Fuzz(func(t *testing.T, img []byte, cmdline string, initrd uint16) {
		if len(img) > 1<<20 {
			return
		}
		cfg := Config{Kernel: bytes.NewReader(img), KernelSize: int64(len(img)), Cmdline: cmdline, RAM: ram}
		if initrd > 0 {
			cfg.Initrd, cfg.InitrdSize = bytes.NewReader(make([]byte, initrd)), int64(initrd)
		}
		ld, err := Load(mem, cfg)
		if err != nil {
			return
		}
		if ld.KernelEnd > ram[0].Size || ld.InitrdAddr+ld.InitrdSize > ram[0].Size {
			t.Fatalf("loaded beyond RAM: %+v", ld)
		}
		// What Load wrote is in place: nothing written after the kernel
		// (command line, initrd, zero page, tables) overwrote it, and the
		// initrd is page-aligned, whole, and above the kernel's area.
		payload := ld.Header.PayloadOffset()
		if kb, err := mem.Slice(guestmem.Addr(KernelAddr), uint64(int64(len(img))-payload)); err != nil || !bytes.Equal(kb, img[payload:]) {
			t.Fatalf("the kernel at %#x does not hold the image's payload (%v)", KernelAddr, err)
		}
		if cb, err := mem.Slice(guestmem.Addr(CmdlineAddr), uint64(len(cmdline)+1)); err != nil || string(cb) != cmdline+"\x00" {
			t.Fatalf("the command line at %#x is not %q (%v)", CmdlineAddr, cmdline, err)
		}
		if ld.Entry < KernelAddr || ld.Entry >= ld.KernelEnd {
			t.Fatalf("entry %#x outside the kernel [%#x, %#x)", ld.Entry, KernelAddr, ld.KernelEnd)
		}
		if initrd > 0 {
			if ld.InitrdSize != uint64(initrd) || ld.InitrdAddr%4096 != 0 || ld.InitrdAddr < ld.KernelEnd {
				t.Fatalf("initrd of %d bytes loaded as %+v", initrd, ld)
			}
			if ib, err := mem.Slice(guestmem.Addr(ld.InitrdAddr), ld.InitrdSize); err != nil || !bytes.Equal(ib, make([]byte, initrd)) {
				t.Fatalf("the initrd at %#x does not hold its bytes (%v)", ld.InitrdAddr, err)
			}
		}
	})
}
