package vmm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFindKernel(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	os.MkdirAll(cache, 0o755)
	t.Setenv("KRUN_KERNEL_CACHE", cache)

	// Nothing anywhere (the host's /boot may have one: skip then).
	t.Setenv(KernelEnv, "")
	os.Unsetenv(KernelEnv)
	if k, err := FindKernel(); err == nil {
		if strings.HasPrefix(k, "/boot/") {
			t.Logf("this host has its own kernel %s; the missing case is not reachable", k)
		} else {
			t.Fatalf("FindKernel = %s with an empty cache", k)
		}
	} else if !errors.Is(err, ErrNoKernel) || !strings.Contains(err.Error(), filepath.Join(cache, "vmlinuz")) ||
		!strings.Contains(err.Error(), "make kernel") || strings.Contains(err.Error(), "\n") {
		t.Errorf("FindKernel error %q: want one line naming the cache and make kernel", err)
	}

	// The cache's vmlinuz.
	cached := filepath.Join(cache, "vmlinuz")
	os.WriteFile(cached, []byte("k"), 0o644)
	if k, err := FindKernel(); err != nil || (k != cached && !strings.HasPrefix(k, "/boot/")) {
		t.Errorf("FindKernel = %q, %v; want %s", k, err, cached)
	}

	// $KRUN_KERNEL wins, and is not skipped when missing.
	env := filepath.Join(dir, "env-vmlinuz")
	os.WriteFile(env, []byte("k"), 0o644)
	t.Setenv(KernelEnv, env)
	if k, err := FindKernel(); err != nil || k != env {
		t.Errorf("FindKernel = %q, %v; want %s", k, err, env)
	}
	t.Setenv(KernelEnv, filepath.Join(dir, "missing"))
	if _, err := FindKernel(); !errors.Is(err, ErrNoKernel) || !strings.Contains(err.Error(), "KRUN_KERNEL=") {
		t.Errorf("missing $KRUN_KERNEL: %v", err)
	}
}
