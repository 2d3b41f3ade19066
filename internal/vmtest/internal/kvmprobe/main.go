// Command kvmprobe is a minimal KVM smoke test for nested-KVM guests: it
// creates a VM with 64 KiB of memory and one vCPU in real mode, runs
//
//	mov dx, 0x3f8; mov al, 'K'; out dx, al; hlt
//
// and checks that KVM reports the port write and then the halt. It prints
// "KVMPROBE ok" on success and exits non-zero with a one-line reason
// otherwise. The vmtest package builds it (CGO_ENABLED=0) and runs it in the
// outer guest of its nested test to prove /dev/kvm can actually run code.
package main

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ioctl numbers from linux/kvm.h (type 0xAE).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmRun                 = 0xAE80
	kvmSetUserMemoryRegion = 0x4020AE46 // _IOW(0xAE, 0x46, 32 bytes)
	kvmGetRegs             = 0x8090AE81 // _IOR(0xAE, 0x81, 144 bytes)
	kvmSetRegs             = 0x4090AE82 // _IOW(0xAE, 0x82, 144 bytes)
	kvmGetSregs            = 0x8138AE83 // _IOR(0xAE, 0x83, 312 bytes)
	kvmSetSregs            = 0x4138AE84 // _IOW(0xAE, 0x84, 312 bytes)

	kvmExitIO  = 2
	kvmExitHLT = 5

	memSize  = 64 << 10
	codeAddr = 0x1000
)

var code = []byte{
	0xba, 0xf8, 0x03, // mov dx, 0x3f8
	0xb0, 'K', // mov al, 'K'
	0xee, // out dx, al
	0xf4, // hlt
}

func main() {
	if err := probe(); err != nil {
		fmt.Println("KVMPROBE fail:", err)
		os.Exit(1)
	}
	fmt.Println("KVMPROBE ok")
}

func probe() error {
	kvm, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/kvm: %w", err)
	}
	defer unix.Close(kvm)
	if v, err := ioctl(kvm, kvmGetAPIVersion, 0); err != nil || v != 12 {
		return fmt.Errorf("KVM_GET_API_VERSION = %d, %v (want 12)", v, err)
	}
	vm, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer unix.Close(int(vm))

	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap guest memory: %w", err)
	}
	defer unix.Munmap(mem)
	copy(mem[codeAddr:], code)

	region := make([]byte, 32)                          // struct kvm_userspace_memory_region
	binary.LittleEndian.PutUint32(region[0:], 0)        // slot
	binary.LittleEndian.PutUint32(region[4:], 0)        // flags
	binary.LittleEndian.PutUint64(region[8:], 0)        // guest_phys_addr
	binary.LittleEndian.PutUint64(region[16:], memSize) // memory_size
	binary.LittleEndian.PutUint64(region[24:], addrOf(mem))
	if _, err := ioctlBuf(int(vm), kvmSetUserMemoryRegion, region); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}

	vcpu, err := ioctl(int(vm), kvmCreateVCPU, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpu))
	runSize, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil || runSize < 64 {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE = %d: %v", runSize, err)
	}
	run, err := unix.Mmap(int(vcpu), 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer unix.Munmap(run)

	sregs := make([]byte, 312)
	if _, err := ioctlBuf(int(vcpu), kvmGetSregs, sregs); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	// cs is the first struct kvm_segment: base u64 at 0, selector u16 at 12.
	binary.LittleEndian.PutUint64(sregs[0:], 0)
	binary.LittleEndian.PutUint16(sregs[12:], 0)
	if _, err := ioctlBuf(int(vcpu), kvmSetSregs, sregs); err != nil {
		return fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	regs := make([]byte, 144)
	if _, err := ioctlBuf(int(vcpu), kvmGetRegs, regs); err != nil {
		return fmt.Errorf("KVM_GET_REGS: %w", err)
	}
	binary.LittleEndian.PutUint64(regs[128:], codeAddr) // rip
	binary.LittleEndian.PutUint64(regs[136:], 2)        // rflags: reserved bit 1
	if _, err := ioctlBuf(int(vcpu), kvmSetRegs, regs); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}

	sawOut := false
	for i := 0; i < 16; i++ {
		if _, err := ioctl(int(vcpu), kvmRun, 0); err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("KVM_RUN: %w", err)
		}
		switch reason := binary.LittleEndian.Uint32(run[8:]); reason {
		case kvmExitIO:
			dir, size := run[32], run[33]
			port := binary.LittleEndian.Uint16(run[34:])
			off := binary.LittleEndian.Uint64(run[40:])
			if dir != 1 || size != 1 || port != 0x3f8 || off >= uint64(len(run)) {
				return fmt.Errorf("unexpected I/O exit: dir %d size %d port %#x offset %d", dir, size, port, off)
			}
			if run[off] != 'K' {
				return fmt.Errorf("guest wrote %q, want 'K'", run[off])
			}
			sawOut = true
		case kvmExitHLT:
			if !sawOut {
				return fmt.Errorf("guest halted before its port write")
			}
			return nil
		default:
			return fmt.Errorf("unexpected exit reason %d", reason)
		}
	}
	return fmt.Errorf("guest did not halt after 16 exits")
}
