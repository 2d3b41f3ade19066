package kvm

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// HostInfo is what the host shows about its virtualization support, read
// from /proc/cpuinfo and /sys/module without touching /dev/kvm.
type HostInfo struct {
	// Device says whether the device node exists.
	Device bool `json:"device"`
	// VMX and SVM are the CPU flags for Intel VT-x and AMD-V.
	VMX bool `json:"vmx"`
	SVM bool `json:"svm"`
	// CPUInfoRead says whether /proc/cpuinfo had a flags line; without it
	// VMX and SVM say nothing.
	CPUInfoRead bool `json:"cpuinfo_read"`
	// Which of kvm_intel, kvm_amd and kvm_pvm are loaded (or built in with
	// parameters, which also shows in /sys/module).
	KVMIntel bool `json:"kvm_intel"`
	KVMAMD   bool `json:"kvm_amd"`
	KVMPVM   bool `json:"kvm_pvm"`
}

// ReadHostInfo reads HostInfo below root ("/" for this host; tests use a
// fake tree with proc/cpuinfo, sys/module/NAME and dev/kvm).
func ReadHostInfo(root string) HostInfo {
	var h HostInfo
	if _, err := os.Stat(filepath.Join(root, DevicePath)); err == nil {
		h.Device = true
	}
	exists := func(p string) bool {
		_, err := os.Stat(filepath.Join(root, p))
		return err == nil
	}
	h.KVMIntel = exists("sys/module/kvm_intel")
	h.KVMAMD = exists("sys/module/kvm_amd")
	h.KVMPVM = exists("sys/module/kvm_pvm")
	if f, err := os.Open(filepath.Join(root, "proc/cpuinfo")); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			key, val, ok := strings.Cut(sc.Text(), ":")
			if !ok || strings.TrimSpace(key) != "flags" {
				continue
			}
			h.CPUInfoRead = true
			for _, f := range strings.Fields(val) {
				switch f {
				case "vmx":
					h.VMX = true
				case "svm":
					h.SVM = true
				}
			}
			break // the first CPU speaks for all
		}
	}
	return h
}

// Diagnose decides from h alone whether this host's KVM can boot a stock
// Linux kernel. It returns nil when nothing speaks against it, or an error
// wrapping ErrNoKVM whose text is one line naming the cause and what would
// work. CheckHost also opens the device; Diagnose is the part a test can
// feed a fake host.
func (h HostInfo) Diagnose() error {
	if !h.Device {
		return fmt.Errorf("%w: %s does not exist; krun-core needs hardware virtualization (Intel VT-x or AMD-V) with the kvm_intel or kvm_amd module loaded", ErrNoKVM, DevicePath)
	}
	if h.KVMIntel || h.KVMAMD {
		return nil
	}
	if h.KVMPVM {
		return fmt.Errorf("%w: %s is provided by kvm_pvm (no VT-x/AMD-V): it runs only PVM guest kernels; krun-core needs hardware virtualization (kvm_intel or kvm_amd)", ErrNoKVM, DevicePath)
	}
	if h.CPUInfoRead && !h.VMX && !h.SVM {
		return fmt.Errorf("%w: %s exists but the CPU shows neither vmx nor svm and neither kvm_intel nor kvm_amd is loaded; krun-core needs hardware virtualization (Intel VT-x or AMD-V)", ErrNoKVM, DevicePath)
	}
	return nil
}

// CheckHost says whether this host's KVM can boot a stock Linux kernel:
// the device node exists, it is backed by hardware virtualization (not,
// for example, kvm_pvm, which runs only PVM guest kernels and leaves a
// stock kernel hanging silently), and it opens with the API version and
// capabilities the core needs. A nil error means krun-core run can work;
// otherwise the error wraps ErrNoKVM and its text is one line saying why
// and what would work. Every caller that chooses between running a guest
// on KVM and not (krun-core run, the tests) uses this one function.
func CheckHost() error {
	return CheckHostAt("/")
}

// CheckHostAt is CheckHost for a host tree rooted at root.
func CheckHostAt(root string) error {
	if err := ReadHostInfo(root).Diagnose(); err != nil {
		return err
	}
	path := filepath.Join(root, DevicePath)
	s, err := OpenPath(path)
	if err != nil {
		if errors.Is(err, ErrNoKVM) {
			return err
		}
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%w: %s: permission denied (add the user to the group that owns it, usually kvm)", ErrNoKVM, DevicePath)
		}
		return fmt.Errorf("%w: %v", ErrNoKVM, err)
	}
	s.Close()
	return nil
}
