package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// TestNetNSPathFIFO: linux.namespaces[network].path comes from
// config.json, and the runtime opens it as root on the host. Anything but
// a namespace file is refused: by Translate without opening it, and by
// spawn, which opens it without blocking, once open. Before the fix a FIFO
// there hung create for good (from review), and a device node would have
// been opened.
func TestNetNSPathFIFO(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "netns")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	s, b := baseSpec(t)
	s.Linux = &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: "network", Path: fifo}}}
	if _, err := Translate("x", b, s, translateOptions{}); err == nil || !strings.Contains(err.Error(), "not a namespace file") {
		t.Errorf("Translate with a FIFO as the network namespace: %v, want it refused", err)
	}

	done := make(chan error, 1)
	go func() {
		p, err := spawn(spawnOptions{Args: []string{"--version"}, NetNS: fifo,
			Stdio: [3]*os.File{os.Stdin, os.Stdout, os.Stderr}})
		if p != nil {
			p.Kill()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a namespace file") {
			t.Errorf("spawn in a FIFO as the network namespace: %v, want it refused", err)
		}
	case <-time.After(3 * time.Second):
		// Unblock the open so the goroutine ends.
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			f.Close()
		}
		t.Fatal("create's spawn blocked for 3 s opening a FIFO named as the network namespace")
	}
}
