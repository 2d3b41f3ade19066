package vmtest_test

import (
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/internal/vmtest"
)

// TestBootScript boots a guest whose script prints the kernel release and
// checks both the verdict and the captured output.
func TestBootScript(t *testing.T) {
	a := vmtest.Require(t)
	ib := a.NewInitramfs()
	ib.SetInit(`echo "release=$(uname -r)"; cat /proc/cmdline`)
	vm := vmtest.NewVM(t, vmtest.Options{Kernel: a.Kernel, Initramfs: ib})
	r := vm.Run()
	if want := "release=" + a.Kernel.Release; !strings.Contains(r.Console, want) {
		t.Errorf("console lacks %q", want)
	}
	t.Logf("boot: QEMU start -> /init %v, total %v", r.BootTime, r.Total)
	_ = time.Second
}

// TestNestedKVM boots an outer guest that must get /dev/kvm from kvm_amd
// under TCG's emulated SVM.
func TestNestedKVM(t *testing.T) {
	a := vmtest.Require(t)
	r := vmtest.NestedKVM(t, a, vmtest.NestedOptions{Script: `ls -l /dev/kvm; grep -m1 flags /proc/cpuinfo`})
	if !strings.Contains(r.Console, "/dev/kvm") {
		t.Errorf("console lacks the ls output for /dev/kvm")
	}
}
