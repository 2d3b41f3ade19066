package kvm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeHost builds a host tree: proc/cpuinfo with the given flags (none
// written when flags is "-"), sys/module/<m> for each module, dev/kvm
// when dev is set.
func fakeHost(t *testing.T, flags string, modules []string, dev bool) string {
	t.Helper()
	root := t.TempDir()
	mk := func(p, content string) {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, p), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if flags != "-" {
		mk("proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme "+flags+" sse sse2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
	}
	for _, m := range modules {
		mk("sys/module/"+m+"/refcnt", "0\n")
	}
	if dev {
		mk("dev/kvm", "")
	}
	return root
}

func TestDiagnose(t *testing.T) {
	tests := []struct {
		name    string
		flags   string
		modules []string
		dev     bool
		want    string // "" means usable
	}{
		{"intel", "vmx ept", []string{"kvm", "kvm_intel"}, true, ""},
		{"amd", "svm npt", []string{"kvm", "kvm_amd"}, true, ""},
		{"nested amd guest", "hypervisor svm", []string{"kvm", "kvm_amd", "irqbypass"}, true, ""},
		{"pvm", "hypervisor", []string{"kvm", "kvm_pvm"}, true, "provided by kvm_pvm (no VT-x/AMD-V): it runs only PVM guest kernels"},
		{"pvm even with a vmx flag shown", "vmx", []string{"kvm", "kvm_pvm"}, true, "kvm_pvm"},
		{"pvm next to kvm_amd is fine", "svm", []string{"kvm", "kvm_pvm", "kvm_amd"}, true, ""},
		{"no device node", "vmx", []string{"kvm", "kvm_intel"}, false, "/dev/kvm does not exist"},
		{"no device, no flags", "hypervisor", nil, false, "/dev/kvm does not exist"},
		{"device without hardware support", "hypervisor", []string{"kvm"}, true, "neither vmx nor svm"},
		{"vmx shown, module unknown", "vmx", []string{"kvm"}, true, ""},
		{"no cpuinfo, no module", "-", []string{"kvm"}, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := ReadHostInfo(fakeHost(t, tt.flags, tt.modules, tt.dev))
			err := h.Diagnose()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Diagnose(%+v) = %v, want usable", h, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Diagnose(%+v) = nil, want %q", h, tt.want)
			}
			if !errors.Is(err, ErrNoKVM) {
				t.Errorf("error %v does not wrap ErrNoKVM", err)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error %q lacks %q", msg, tt.want)
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error is not one line: %q", msg)
			}
		})
	}
}

func TestReadHostInfoFlags(t *testing.T) {
	h := ReadHostInfo(fakeHost(t, "hypervisor svm", []string{"kvm_amd"}, true))
	if !h.SVM || h.VMX || !h.CPUInfoRead || !h.KVMAMD || h.KVMIntel || h.KVMPVM || !h.Device {
		t.Errorf("ReadHostInfo = %+v", h)
	}
	// Only the first CPU's flags line counts; "svmx" is not "svm".
	h = ReadHostInfo(fakeHost(t, "svmx", nil, false))
	if h.SVM || h.VMX {
		t.Errorf("flags svmx read as %+v", h)
	}
}

// CheckHostAt on a fake tree whose dev/kvm is a regular file passes the
// sysfs checks and then fails to open it as KVM: one line, ErrNoKVM.
func TestCheckHostAtNotADevice(t *testing.T) {
	err := CheckHostAt(fakeHost(t, "vmx", []string{"kvm_intel"}, true))
	if !errors.Is(err, ErrNoKVM) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("CheckHostAt = %v, want one ErrNoKVM line", err)
	}
}

// TestCheckHostHere checks CheckHost against what this host shows: a PVM
// /dev/kvm (the development machines) must be refused with the kvm_pvm
// line, a missing one with the missing-node line.
func TestCheckHostHere(t *testing.T) {
	h := ReadHostInfo("/")
	err := CheckHost()
	switch {
	case !h.Device:
		if err == nil || !strings.Contains(err.Error(), "does not exist") {
			t.Errorf("no /dev/kvm here, CheckHost = %v", err)
		}
	case h.KVMPVM && !h.KVMIntel && !h.KVMAMD:
		if err == nil || !strings.Contains(err.Error(), "kvm_pvm") {
			t.Errorf("PVM host, CheckHost = %v", err)
		}
	default:
		t.Logf("CheckHost on this host (%+v): %v", h, err)
	}
}
