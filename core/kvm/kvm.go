// Package kvm is a thin, typed layer over the Linux KVM ioctls for x86-64:
// the system handle (/dev/kvm), a VM with its in-kernel irqchip and PIT,
// guest memory slots, ioeventfds and irqfds, and vCPUs with their register
// state and shared kvm_run page.
//
// It does no device emulation and no policy; core/vmm builds the machine from
// it. Everything that needs unsafe lives in kvm_unsafe.go.
package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// DevicePath is the KVM device node.
const DevicePath = "/dev/kvm"

// ErrNoKVM says the host has no KVM that can boot a stock kernel: no
// device node, or one without hardware virtualization behind it (see
// CheckHost).
var ErrNoKVM = errors.New("no usable KVM")

// System is an open /dev/kvm.
type System struct {
	fd       int
	mmapSize int
}

// Open opens /dev/kvm and checks the API version and the extensions the
// core depends on. A missing device node gives an error wrapping ErrNoKVM.
func Open() (*System, error) {
	return OpenPath(DevicePath)
}

// OpenPath is Open for a given device node.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("%w: %s: %v", ErrNoKVM, path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &System{fd: fd}
	v, err := ioctl(fd, kvmGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("KVM_GET_API_VERSION: %w", err)
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("KVM API version %d, want %d", v, APIVersion)
	}
	for _, c := range []struct {
		cap  uintptr
		name string
	}{
		{CapIRQChip, "IRQCHIP"}, {CapUserMemory, "USER_MEMORY"}, {CapSetTSSAddr, "SET_TSS_ADDR"},
		{CapExtCPUID, "EXT_CPUID"}, {CapIRQFD, "IRQFD"}, {CapPIT2, "PIT2"}, {CapIOEventFD, "IOEVENTFD"},
		{CapImmediateExit, "IMMEDIATE_EXIT"},
	} {
		if n, err := s.CheckExtension(c.cap); err != nil || n == 0 {
			s.Close()
			return nil, fmt.Errorf("KVM lacks KVM_CAP_%s", c.name)
		}
	}
	n, err := ioctl(fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	if n < runMinSize || n > 1<<24 {
		s.Close()
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: implausible size %d", n)
	}
	s.mmapSize = int(n)
	return s, nil
}

// Close closes /dev/kvm. VMs created from it stay usable.
func (s *System) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return err
}

// CheckExtension returns KVM_CHECK_EXTENSION's answer for cap (0: absent).
func (s *System) CheckExtension(cap uintptr) (int, error) {
	r, err := ioctl(s.fd, kvmCheckExtension, cap)
	if err != nil {
		return 0, fmt.Errorf("KVM_CHECK_EXTENSION %d: %w", cap, err)
	}
	return int(r), nil
}

// MaxVCPUs is the largest number of vCPUs a VM may have on this host.
func (s *System) MaxVCPUs() int {
	n, err := s.CheckExtension(CapMaxVCPUs)
	if err != nil || n <= 0 {
		n, err = s.CheckExtension(CapNrVCPUs)
		if err != nil || n <= 0 {
			return 4 // the documented default when neither is reported
		}
	}
	return n
}

// maxCPUIDEntries bounds the KVM_GET_SUPPORTED_CPUID buffer.
const maxCPUIDEntries = 4096

// SupportedCPUID returns the CPUID leaves KVM can present to a guest.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	for n := 128; n <= maxCPUIDEntries; n *= 2 {
		buf := make([]byte, 8+n*cpuidEntrySize)
		binary.LittleEndian.PutUint32(buf, uint32(n))
		_, err := ioctlBytes(s.fd, kvmGetSupportedCPUID, buf)
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		return decodeCPUID(buf)
	}
	return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: more than %d entries", maxCPUIDEntries)
}

const cpuidEntrySize = 40

// encodeCPUID builds a struct kvm_cpuid2 with its entries.
func encodeCPUID(entries []CPUIDEntry) []byte {
	buf := make([]byte, 8+len(entries)*cpuidEntrySize)
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	for i, e := range entries {
		b := buf[8+i*cpuidEntrySize:]
		for j, v := range []uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX} {
			binary.LittleEndian.PutUint32(b[4*j:], v)
		}
	}
	return buf
}

// decodeCPUID parses a struct kvm_cpuid2 filled in by the kernel.
func decodeCPUID(buf []byte) ([]CPUIDEntry, error) {
	if len(buf) < 8 {
		return nil, errors.New("kvm_cpuid2 too short")
	}
	n := binary.LittleEndian.Uint32(buf)
	if uint64(n) > uint64(len(buf)-8)/cpuidEntrySize {
		return nil, fmt.Errorf("kvm_cpuid2: %d entries do not fit the buffer", n)
	}
	out := make([]CPUIDEntry, n)
	for i := range out {
		b := buf[8+i*cpuidEntrySize:]
		u := func(j int) uint32 { return binary.LittleEndian.Uint32(b[4*j:]) }
		out[i] = CPUIDEntry{Function: u(0), Index: u(1), Flags: u(2), EAX: u(3), EBX: u(4), ECX: u(5), EDX: u(6)}
	}
	return out, nil
}

// encodeMSRs builds a struct kvm_msrs with its entries.
func encodeMSRs(msrs []MSR) []byte {
	buf := make([]byte, 8+16*len(msrs))
	binary.LittleEndian.PutUint32(buf, uint32(len(msrs)))
	for i, m := range msrs {
		b := buf[8+16*i:]
		binary.LittleEndian.PutUint32(b, m.Index)
		binary.LittleEndian.PutUint64(b[8:], m.Data)
	}
	return buf
}

// createVMTries bounds the retries of KVM_CREATE_VM after EINTR.
const createVMTries = 100

// CreateVM creates a VM with an in-kernel irqchip (PIC + IOAPIC + local
// APICs) and PIT. The TSS and identity-map pages are placed just below the
// IOAPIC, inside the MMIO hole.
func (s *System) CreateVM() (*VM, error) {
	// KVM_CREATE_VM fails with EINTR when a signal is pending (the Go
	// runtime's preemption signal, a caller's SIGCHLD): a retry is what
	// the kernel asks for.
	var fd uintptr
	var err error
	for range createVMTries {
		if fd, err = ioctl(s.fd, kvmCreateVM, 0); !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	m := &VM{fd: int(fd), mmapSize: s.mmapSize}
	unix.CloseOnExec(m.fd)
	idmap := uint64(IdentityMapAddr)
	if err := m.setIdentityMapAddr(&idmap); err != nil {
		m.Close()
		return nil, fmt.Errorf("KVM_SET_IDENTITY_MAP_ADDR: %w", err)
	}
	if _, err := ioctl(m.fd, kvmSetTSSAddr, TSSAddr); err != nil {
		m.Close()
		return nil, fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	if _, err := ioctl(m.fd, kvmCreateIRQChip, 0); err != nil {
		m.Close()
		return nil, fmt.Errorf("KVM_CREATE_IRQCHIP: %w", err)
	}
	pit := pitConfig{Flags: pitSpeakerDummy}
	if err := m.createPIT2(&pit); err != nil {
		m.Close()
		return nil, fmt.Errorf("KVM_CREATE_PIT2: %w", err)
	}
	return m, nil
}

// Addresses KVM needs for Intel's real-mode emulation: one page for the
// identity map table and three for the TSS, inside the MMIO hole where no
// RAM or device lives.
const (
	IdentityMapAddr = 0xfeffc000
	TSSAddr         = 0xfeffd000
)

// VM is a KVM virtual machine.
type VM struct {
	fd       int
	mmapSize int
}

// Close closes the VM fd. vCPUs must be closed first.
func (m *VM) Close() error {
	if m.fd < 0 {
		return nil
	}
	err := unix.Close(m.fd)
	m.fd = -1
	return err
}

// SetMemory registers host memory [host, host+size) as guest physical
// [gpa, gpa+size) in slot. host must stay mapped for the VM's lifetime.
func (m *VM) SetMemory(slot uint32, gpa, size uint64, host uintptr) error {
	r := userspaceMemoryRegion{Slot: slot, GuestPhysAddr: gpa, MemorySize: size, UserspaceAddr: uint64(host)}
	if err := m.setUserMemoryRegion(&r); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d (guest %#x size %#x): %w", slot, gpa, size, err)
	}
	return nil
}

// IRQLine sets the level of an interrupt line (GSI) of the in-kernel
// irqchip. It is safe to call from any goroutine.
func (m *VM) IRQLine(gsi uint32, high bool) error {
	l := irqLevel{IRQ: gsi}
	if high {
		l.Level = 1
	}
	if err := m.irqLine(&l); err != nil {
		return fmt.Errorf("KVM_IRQ_LINE %d: %w", gsi, err)
	}
	return nil
}

// RegisterIRQFD makes a write to the eventfd fd raise the interrupt gsi
// (edge), inside the kernel.
func (m *VM) RegisterIRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi}
	if err := m.irqfd(&f); err != nil {
		return fmt.Errorf("KVM_IRQFD fd %d gsi %d: %w", fd, gsi, err)
	}
	return nil
}

// UnregisterIRQFD undoes RegisterIRQFD.
func (m *VM) UnregisterIRQFD(fd int, gsi uint32) error {
	f := irqfd{FD: uint32(fd), GSI: gsi, Flags: irqfdFlagDeassign}
	if err := m.irqfd(&f); err != nil {
		return fmt.Errorf("KVM_IRQFD deassign fd %d gsi %d: %w", fd, gsi, err)
	}
	return nil
}

// RegisterIOEventFD makes a guest write of width bytes with value datamatch
// to MMIO address addr signal the eventfd fd inside the kernel, without a
// vCPU exit.
func (m *VM) RegisterIOEventFD(addr uint64, width uint32, datamatch uint64, fd int) error {
	f := ioeventfd{Addr: addr, Len: width, Datamatch: datamatch, FD: int32(fd), Flags: ioeventfdFlagDatamatch}
	if err := m.ioeventfd(&f); err != nil {
		return fmt.Errorf("KVM_IOEVENTFD addr %#x data %d fd %d: %w", addr, datamatch, fd, err)
	}
	return nil
}

// UnregisterIOEventFD undoes RegisterIOEventFD.
func (m *VM) UnregisterIOEventFD(addr uint64, width uint32, datamatch uint64, fd int) error {
	f := ioeventfd{Addr: addr, Len: width, Datamatch: datamatch, FD: int32(fd), Flags: ioeventfdFlagDatamatch | ioeventfdFlagDeassign}
	if err := m.ioeventfd(&f); err != nil {
		return fmt.Errorf("KVM_IOEVENTFD deassign addr %#x data %d fd %d: %w", addr, datamatch, fd, err)
	}
	return nil
}

// CreateVCPU creates vCPU id and maps its kvm_run page.
func (m *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctl(m.fd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU %d: %w", id, err)
	}
	unix.CloseOnExec(int(fd))
	run, err := unix.Mmap(int(fd), 0, m.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("mmap kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{id: id, fd: int(fd), run: run}, nil
}
