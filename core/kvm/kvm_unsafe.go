package kvm

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file holds every use of unsafe in the package: passing Go structs to
// ioctls and touching the shared kvm_run page.

func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

// ioctlPtr passes p by pointer; p stays alive for the call.
func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(p))
	if e != 0 {
		return r, e
	}
	return r, nil
}

func ioctlBytes(fd int, req uintptr, b []byte) (uintptr, error) {
	if len(b) == 0 {
		return ioctl(fd, req, 0)
	}
	return ioctlPtr(fd, req, unsafe.Pointer(&b[0]))
}

// HostAddr is the host virtual address of b's first byte. b must be memory
// that the Go garbage collector does not move (an mmap).
func HostAddr(b []byte) uintptr {
	if len(b) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&b[0]))
}

func (v *VCPU) getRegs(r *Regs) error {
	_, err := ioctlPtr(v.fd, kvmGetRegs, unsafe.Pointer(r))
	return err
}

func (v *VCPU) setRegs(r *Regs) error {
	_, err := ioctlPtr(v.fd, kvmSetRegs, unsafe.Pointer(r))
	return err
}

func (v *VCPU) getSregs(s *Sregs) error {
	_, err := ioctlPtr(v.fd, kvmGetSregs, unsafe.Pointer(s))
	return err
}

func (v *VCPU) setSregs(s *Sregs) error {
	_, err := ioctlPtr(v.fd, kvmSetSregs, unsafe.Pointer(s))
	return err
}

func (v *VCPU) setFPU(f *FPU) error {
	_, err := ioctlPtr(v.fd, kvmSetFPU, unsafe.Pointer(f))
	return err
}

func (v *VCPU) getLAPIC(l *LAPICState) error {
	_, err := ioctlPtr(v.fd, kvmGetLAPIC, unsafe.Pointer(l))
	return err
}

func (v *VCPU) setLAPIC(l *LAPICState) error {
	_, err := ioctlPtr(v.fd, kvmSetLAPIC, unsafe.Pointer(l))
	return err
}

func (m *VM) setUserMemoryRegion(r *userspaceMemoryRegion) error {
	_, err := ioctlPtr(m.fd, kvmSetUserMemoryRegion, unsafe.Pointer(r))
	return err
}

func (m *VM) irqLine(l *irqLevel) error {
	_, err := ioctlPtr(m.fd, kvmIRQLine, unsafe.Pointer(l))
	return err
}

func (m *VM) irqfd(f *irqfd) error {
	_, err := ioctlPtr(m.fd, kvmIRQFD, unsafe.Pointer(f))
	return err
}

func (m *VM) ioeventfd(f *ioeventfd) error {
	_, err := ioctlPtr(m.fd, kvmIOEventFD, unsafe.Pointer(f))
	return err
}

func (m *VM) createPIT2(c *pitConfig) error {
	_, err := ioctlPtr(m.fd, kvmCreatePIT2, unsafe.Pointer(c))
	return err
}

func (m *VM) setIdentityMapAddr(addr *uint64) error {
	_, err := ioctlPtr(m.fd, kvmSetIdentityMapAddr, unsafe.Pointer(addr))
	return err
}

// setImmediateExit stores kvm_run.immediate_exit. The first 8 bytes of
// kvm_run are request_interrupt_window (u8, unused here), immediate_exit
// (u8) and padding, so one aligned 32-bit atomic store covers it and is
// safe against a concurrent KVM_RUN on the vCPU thread.
func (v *VCPU) setImmediateExit(on bool) {
	var val uint32
	if on {
		val = 1 << (8 * runImmediateExit)
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&v.run[0])), val)
}
