package main

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// outb writes val to an x86 I/O port; the calling thread needs I/O
// permission for it (ioperm).
func outb(port uint16, val uint8)

// ioportWrite writes one byte with ioperm + OUTB. I/O permissions belong
// to a thread, so the goroutine is locked to its thread for both; the
// permission is dropped again afterwards.
func ioportWrite(port uint16, val uint8) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Ioperm(int(port), 1, 1); err != nil {
		return err
	}
	outb(port, val)
	return unix.Ioperm(int(port), 1, 0)
}
