package main

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl issues an ioctl with an integer argument.
func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}

// ioctlBuf issues an ioctl whose argument points at buf (len(buf) > 0).
func ioctlBuf(fd int, req uintptr, buf []byte) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}

// addrOf returns the user address of an mmap'ed slice, which stays mapped
// (and so at the same address) until Munmap.
func addrOf(b []byte) uint64 {
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}
