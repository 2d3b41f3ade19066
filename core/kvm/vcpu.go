package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// VCPU is one virtual CPU. Run, and the exit accessors, must be called from
// one goroutine locked to its OS thread; Kick may be called from anywhere.
type VCPU struct {
	id  int
	fd  int
	run []byte // the shared kvm_run page
}

// ID is the vCPU index given to CreateVCPU (also its APIC ID).
func (v *VCPU) ID() int { return v.id }

// Close unmaps kvm_run and closes the vCPU fd.
func (v *VCPU) Close() error {
	var first error
	if v.run != nil {
		if err := unix.Munmap(v.run); err != nil {
			first = fmt.Errorf("unmap kvm_run: %w", err)
		}
		v.run = nil
	}
	if v.fd >= 0 {
		if err := unix.Close(v.fd); err != nil && first == nil {
			first = err
		}
		v.fd = -1
	}
	return first
}

// ErrInterrupted says KVM_RUN returned because of a signal or immediate_exit;
// the caller checks why and calls Run again or stops.
var ErrInterrupted = errors.New("KVM_RUN interrupted")

// Run enters the guest until the next exit and returns its reason.
func (v *VCPU) Run() (uint32, error) {
	_, err := ioctl(v.fd, kvmRun, 0)
	if err != nil {
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			return ExitIntr, ErrInterrupted
		}
		return 0, fmt.Errorf("KVM_RUN vCPU %d: %w", v.id, err)
	}
	return binary.LittleEndian.Uint32(v.run[runExitReason:]), nil
}

// SetImmediateExit makes the next (or current) KVM_RUN return at once with
// EINTR when on. Combined with a signal to the vCPU thread it stops a vCPU
// that sits in the guest.
func (v *VCPU) SetImmediateExit(on bool) { v.setImmediateExit(on) }

// IOExit describes a KVM_EXIT_IO: Data holds Size*Count bytes inside kvm_run
// (out: what the guest wrote; in: fill it with what it reads).
type IOExit struct {
	Port  uint16
	Size  uint8
	Out   bool
	Count uint32
	Data  []byte
}

// IO decodes the current KVM_EXIT_IO.
func (v *VCPU) IO() (IOExit, error) {
	u := v.run[runUnion:]
	e := IOExit{
		Out:   u[0] == ExitIOOut,
		Size:  u[1],
		Port:  binary.LittleEndian.Uint16(u[2:]),
		Count: binary.LittleEndian.Uint32(u[4:]),
	}
	off := binary.LittleEndian.Uint64(u[8:])
	n := uint64(e.Size) * uint64(e.Count)
	if e.Size == 0 || off > uint64(len(v.run)) || n > uint64(len(v.run))-off {
		return IOExit{}, fmt.Errorf("KVM_EXIT_IO: data (offset %#x, %d x %d bytes) outside kvm_run", off, e.Count, e.Size)
	}
	e.Data = v.run[off : off+n : off+n]
	return e, nil
}

// MMIOExit describes a KVM_EXIT_MMIO: Data is Len bytes inside kvm_run
// (write: what the guest wrote; read: fill it).
type MMIOExit struct {
	Addr  uint64
	Write bool
	Data  []byte
}

// MMIO decodes the current KVM_EXIT_MMIO.
func (v *VCPU) MMIO() (MMIOExit, error) {
	u := v.run[runUnion:]
	n := binary.LittleEndian.Uint32(u[16:])
	if n == 0 || n > 8 {
		return MMIOExit{}, fmt.Errorf("KVM_EXIT_MMIO: length %d", n)
	}
	return MMIOExit{
		Addr:  binary.LittleEndian.Uint64(u),
		Write: u[20] != 0,
		Data:  u[8 : 8+n : 8+n],
	}, nil
}

// SystemEvent returns the type of a KVM_EXIT_SYSTEM_EVENT.
func (v *VCPU) SystemEvent() uint32 {
	return binary.LittleEndian.Uint32(v.run[runUnion:])
}

// InternalError returns the suberror of a KVM_EXIT_INTERNAL_ERROR.
func (v *VCPU) InternalError() uint32 {
	return binary.LittleEndian.Uint32(v.run[runUnion:])
}

// FailEntryReason returns the hardware reason of a KVM_EXIT_FAIL_ENTRY.
func (v *VCPU) FailEntryReason() uint64 {
	return binary.LittleEndian.Uint64(v.run[runUnion:])
}

// Regs reads the general-purpose registers.
func (v *VCPU) Regs() (Regs, error) {
	var r Regs
	if err := v.getRegs(&r); err != nil {
		return r, fmt.Errorf("KVM_GET_REGS vCPU %d: %w", v.id, err)
	}
	return r, nil
}

// SetRegs writes the general-purpose registers.
func (v *VCPU) SetRegs(r Regs) error {
	if err := v.setRegs(&r); err != nil {
		return fmt.Errorf("KVM_SET_REGS vCPU %d: %w", v.id, err)
	}
	return nil
}

// Sregs reads the special registers.
func (v *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	if err := v.getSregs(&s); err != nil {
		return s, fmt.Errorf("KVM_GET_SREGS vCPU %d: %w", v.id, err)
	}
	return s, nil
}

// SetSregs writes the special registers.
func (v *VCPU) SetSregs(s Sregs) error {
	if err := v.setSregs(&s); err != nil {
		return fmt.Errorf("KVM_SET_SREGS vCPU %d: %w", v.id, err)
	}
	return nil
}

// SetFPU writes the x87/SSE state.
func (v *VCPU) SetFPU(f FPU) error {
	if err := v.setFPU(&f); err != nil {
		return fmt.Errorf("KVM_SET_FPU vCPU %d: %w", v.id, err)
	}
	return nil
}

// LAPIC reads the local APIC register page.
func (v *VCPU) LAPIC() (LAPICState, error) {
	var l LAPICState
	if err := v.getLAPIC(&l); err != nil {
		return l, fmt.Errorf("KVM_GET_LAPIC vCPU %d: %w", v.id, err)
	}
	return l, nil
}

// SetLAPIC writes the local APIC register page.
func (v *VCPU) SetLAPIC(l LAPICState) error {
	if err := v.setLAPIC(&l); err != nil {
		return fmt.Errorf("KVM_SET_LAPIC vCPU %d: %w", v.id, err)
	}
	return nil
}

// SetCPUID sets the CPUID leaves the guest sees.
func (v *VCPU) SetCPUID(entries []CPUIDEntry) error {
	if _, err := ioctlBytes(v.fd, kvmSetCPUID2, encodeCPUID(entries)); err != nil {
		return fmt.Errorf("KVM_SET_CPUID2 vCPU %d (%d entries): %w", v.id, len(entries), err)
	}
	return nil
}

// SetMSRs writes model-specific registers; it fails unless all were set.
func (v *VCPU) SetMSRs(msrs []MSR) error {
	n, err := ioctlBytes(v.fd, kvmSetMSRs, encodeMSRs(msrs))
	if err != nil {
		return fmt.Errorf("KVM_SET_MSRS vCPU %d: %w", v.id, err)
	}
	if int(n) != len(msrs) {
		return fmt.Errorf("KVM_SET_MSRS vCPU %d: set %d of %d (MSR %#x refused)", v.id, n, len(msrs), msrs[n].Index)
	}
	return nil
}
