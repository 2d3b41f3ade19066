package main

// Adversarial review (helper rev-net-88): a real passt behind the plugin's
// device dies or is killed; the device must take the link down and report
// the config change (the host then restarts passt and the plugin).

import (
	"context"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/vhostuser/backend"
)

// TestRealPasstDies (held): passt killed with each signal -> link
// down and one config change, within 5 s.
func TestRealPasstDies(t *testing.T) {
	const passt = "/usr/bin/passt"
	if _, err := os.Stat(passt); err != nil {
		t.Skipf("passt not installed (%s): %v", passt, err)
	}
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
	}{
		{"SIGKILL (crash)", syscall.SIGKILL},
		{"SIGTERM (stopped for a replacement)", syscall.SIGTERM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			ours, theirs := os.NewFile(uintptr(fds[0]), "plugin"), os.NewFile(uintptr(fds[1]), "passt")
			cmd := exec.Command(passt, "--foreground", "--quiet", "--fd", "3")
			cmd.ExtraFiles = []*os.File{theirs}
			if err := cmd.Start(); err != nil {
				t.Skipf("passt does not start here: %v", err)
			}
			theirs.Close()
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			select {
			case <-exited:
				t.Skipf("passt exited at start here (%v); cannot test its death", cmd.ProcessState)
			case <-time.After(300 * time.Millisecond):
			}
			dev, err := plugin{}.Configure(context.Background(), map[string]string{"mac": "52:54:00:12:34:56"},
				map[string]*os.File{devopts.FilePasst: ours}, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer dev.(interface{ Close() error }).Close()
			type linker interface{ LinkUp() bool }
			if !dev.(linker).LinkUp() {
				t.Fatal("link down with passt running")
			}
			cmd.Process.Signal(tc.sig)
			<-exited
			select {
			case <-dev.(backend.ConfigChanger).ConfigChanges():
			case <-time.After(5 * time.Second):
				t.Fatal("no config change within 5 s of passt's death")
			}
			if dev.(linker).LinkUp() {
				t.Fatal("link still up after passt died")
			}
		})
	}
}
