package boot

import (
	"bytes"
	"testing"
)

// FuzzLoad feeds arbitrary kernel images (the first bytes of a valid one
// as seed) to the loader: it must return an error or load within guest
// memory, never panic.
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
	})
}
