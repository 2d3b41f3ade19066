package vmtest

import (
	"context"
	"os/exec"
	"testing"
)

// Assets are what a VM test needs from the host and the Debian archive.
type Assets struct {
	QEMU    string  // path of qemu-system-x86_64
	Kernel  *Kernel // Debian's stock kernel, unpacked in the cache
	Busybox string  // static busybox binary in the cache
}

func testContext(t testing.TB) context.Context {
	return t.Context()
}

// Require makes sure an end-to-end VM test can run and returns its assets.
//
// It skips the test (naming what is missing) in -short mode, when
// qemu-system-x86_64 is not installed, or when neither apt-get nor a cached
// kernel is available (the kernel package is not downloadable on this host).
// Where QEMU is installed and apt exists, any failure to download or unpack
// the kernel or busybox fails the test: a broken cache or missing package
// lists must not turn into a silent skip. Missing package lists produce an
// error telling to run `apt-get update`.
func Require(t testing.TB) *Assets {
	t.Helper()
	if testing.Short() {
		t.Skip("vmtest: end-to-end VM test (QEMU under TCG) skipped in -short mode")
	}
	qemu, err := qemuAvailable()
	if err != nil {
		t.Skipf("vmtest: %v", err)
	}
	if _, err := exec.LookPath("apt-get"); err != nil && len(cachedTrees("linux-image-")) == 0 {
		t.Skip("vmtest: kernel package not downloadable: apt-get not found and no kernel in the cache " +
			"(needs a Debian host or a populated $" + CacheEnv + ")")
	}
	ctx := testContext(t)
	k, err := FetchKernel(ctx)
	if err != nil {
		t.Fatalf("vmtest: get Debian kernel: %v", err)
	}
	bb, err := FetchBusybox(ctx)
	if err != nil {
		t.Fatalf("vmtest: get busybox-static: %v", err)
	}
	return &Assets{QEMU: qemu, Kernel: k, Busybox: bb}
}

// NewInitramfs returns an initramfs builder with this host's busybox
// already added (the usual starting point of a test).
func (a *Assets) NewInitramfs() *Initramfs {
	ib := NewInitramfs()
	ib.AddBusybox(a.Busybox)
	return ib
}
