package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// boot.rst, init_size: the kernel needs init_size bytes from its runtime
// start, and for a relocatable kernel
//
//	if (load_address < pref_address) load_address = pref_address;
//	runtime_start = align_up(load_address, kernel_alignment);
//
// (arch/x86/boot/compressed/head_64.S does the same with the
// kernel_alignment it finds in boot_params). Load ignored
// kernel_alignment (from review): with pref_address 16 MiB and
// kernel_alignment 32 MiB the kernel decompresses itself to 32..48 MiB,
// while Load reported KernelEnd 32 MiB, checked the window against RAM
// from 16 MiB, and put the initrd inside the window the kernel then
// overwrites. An alignment that is not a power of two is refused.
func TestKernelAlignmentDecidesRuntimeStart(t *testing.T) {
	const (
		pref     = 0x1000000 // 16 MiB
		align    = 0x2000000 // 32 MiB
		initSize = 0x1000000 // 16 MiB
	)
	f := goodImage()
	f.pref, f.initSize = pref, initSize
	img := f.build()
	binary.LittleEndian.PutUint32(img[offKernelAlign:], align)
	runtimeEnd := uint64(align + initSize) // align_up(max(1 MiB, pref), align) + init_size

	t.Run("initrd outside the window", func(t *testing.T) {
		mem, ram := newMem(t, 48<<20)
		initrd := make([]byte, 8<<20)
		ld, err := Load(mem, Config{Kernel: bytes.NewReader(img), KernelSize: int64(len(img)), Cmdline: "x",
			RAM: ram, Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd))})
		if errors.Is(err, ErrDoesNotFit) {
			return // refusing is right too: 48 MiB cannot hold the window and the initrd
		}
		if err != nil {
			t.Fatal(err)
		}
		if ld.KernelEnd < runtimeEnd {
			t.Errorf("KernelEnd = %#x, but the kernel runs from align_up(%#x, %#x) = %#x and needs init_size %#x: ends at %#x",
				ld.KernelEnd, pref, align, align, initSize, runtimeEnd)
		}
		if ld.InitrdAddr < runtimeEnd && ld.InitrdAddr+ld.InitrdSize > align {
			t.Errorf("initrd at %#x-%#x lies inside the kernel's decompression window %#x-%#x",
				ld.InitrdAddr, ld.InitrdAddr+ld.InitrdSize, uint64(align), runtimeEnd)
		}
	})
	for _, bad := range []uint32{0, 3 << 20} {
		t.Run(fmt.Sprintf("alignment %#x", bad), func(t *testing.T) {
			img := f.build()
			binary.LittleEndian.PutUint32(img[offKernelAlign:], bad)
			mem, ram := newMem(t, 64<<20)
			_, err := Load(mem, Config{Kernel: bytes.NewReader(img), KernelSize: int64(len(img)), Cmdline: "x", RAM: ram})
			if !errors.Is(err, ErrNotBzImage) || !strings.Contains(err.Error(), "kernel_alignment") {
				t.Errorf("Load: %v, want %v naming kernel_alignment", err, ErrNotBzImage)
			}
		})
	}
	t.Run("window beyond RAM", func(t *testing.T) {
		mem, ram := newMem(t, 40<<20) // the window ends at 48 MiB
		_, err := Load(mem, Config{Kernel: bytes.NewReader(img), KernelSize: int64(len(img)), Cmdline: "x", RAM: ram})
		if !errors.Is(err, ErrDoesNotFit) {
			t.Errorf("Load with 40 MiB of RAM: err = %v, want %v (the kernel needs RAM up to %#x)", err, ErrDoesNotFit, runtimeEnd)
		}
	})
}
