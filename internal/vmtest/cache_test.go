package vmtest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// fakeApt puts apt-cache, apt-get and dpkg-deb scripts first on PATH. The
// download counter file records every apt-get download.
func fakeApt(t *testing.T, listsMissing bool) (counter string) {
	t.Helper()
	bin := t.TempDir()
	counter = filepath.Join(bin, "downloads")
	scripts := map[string]string{
		"apt-cache": `#!/bin/sh
if [ -n "$FAKE_LISTS_MISSING" ]; then echo "E: No packages found" >&2; exit 100; fi
case "$1 $3" in
"depends ") echo "linux-image-amd64"; echo "  Depends: linux-image-9.9.9-1-amd64";;
"show linux-image-9.9.9-1-amd64") echo "Package: linux-image-9.9.9-1-amd64"; echo "Version: 9.9.9-2";;
"show busybox-static") echo "Package: busybox-static"; echo "Version: 1:1.0-1";;
*) echo "E: No packages found" >&2; exit 100;;
esac
`,
		"apt-get": `#!/bin/sh
echo "$@" >> "` + counter + `"
sleep 0.2
echo fake-deb > "fake_${4%%=*}.deb"
`,
		"dpkg-deb": `#!/bin/sh
# dpkg-deb -x DEB DIR
mkdir -p "$3/boot" "$3/lib/modules/9.9.9-1-amd64/kernel" "$3/bin"
echo kernel > "$3/boot/vmlinuz-9.9.9-1-amd64"
echo busybox > "$3/bin/busybox"
`,
	}
	for name, body := range scripts {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	t.Setenv(CacheEnv, t.TempDir())
	if listsMissing {
		t.Setenv("FAKE_LISTS_MISSING", "1")
	}
	return counter
}

func TestFetchConcurrent(t *testing.T) {
	counter := fakeApt(t, false)
	const n = 4
	var wg sync.WaitGroup
	kernels := make([]*Kernel, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kernels[i], errs[i] = FetchKernel(context.Background())
		}()
	}
	wg.Wait()
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatalf("fetch %d: %v", i, errs[i])
		}
		if kernels[i].Vmlinuz != kernels[0].Vmlinuz {
			t.Errorf("fetch %d got %s, fetch 0 got %s", i, kernels[i].Vmlinuz, kernels[0].Vmlinuz)
		}
	}
	k := kernels[0]
	if k.Release != "9.9.9-1-amd64" || k.Package != "linux-image-9.9.9-1-amd64" || k.Version != "9.9.9-2" {
		t.Errorf("kernel %+v", k)
	}
	if k.Vmlinux != "" || k.VmlinuxErr == nil {
		t.Errorf("a fake bzImage yielded vmlinux %q (err %v)", k.Vmlinux, k.VmlinuxErr)
	}
	bb, err := FetchBusybox(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(bb); err != nil || string(b) != "busybox\n" {
		t.Errorf("busybox %s: %q %v", bb, b, err)
	}
	log, err := os.ReadFile(counter)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(log), "download"); got != 2 {
		t.Errorf("%d downloads, want 2 (kernel once, busybox once):\n%s", got, log)
	}
	// No temp directories are left behind.
	left, _ := filepath.Glob(filepath.Join(os.Getenv(CacheEnv), "deb", ".tmp-*"))
	if len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestFetchNoPackageLists(t *testing.T) {
	fakeApt(t, true)
	_, err := FetchKernel(context.Background())
	if !errors.Is(err, ErrNoPackageLists) || !strings.Contains(err.Error(), "apt-get update") {
		t.Errorf("FetchKernel err = %v, want one telling to run apt-get update", err)
	}
	_, err = FetchBusybox(context.Background())
	if !errors.Is(err, ErrNoPackageLists) {
		t.Errorf("FetchBusybox err = %v, want ErrNoPackageLists", err)
	}
}

// TestFetchOffline reuses a cached kernel when apt cannot be asked.
func TestFetchOffline(t *testing.T) {
	fakeApt(t, false)
	first, err := FetchKernel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("FAKE_LISTS_MISSING", "1")
	// Invalidate the memo so apt is asked again.
	os.Remove(filepath.Join(os.Getenv(CacheEnv), "apt-memo-kernel"))
	second, err := FetchKernel(context.Background())
	if err != nil {
		t.Fatalf("offline fetch with a cached kernel: %v", err)
	}
	if second.Vmlinuz != first.Vmlinuz {
		t.Errorf("offline fetch %s, want cached %s", second.Vmlinuz, first.Vmlinuz)
	}
}
