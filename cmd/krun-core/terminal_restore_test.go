package main

// TestRunExecFailureRestoresTerminal: `krun-core run --root DIR -- CMD`
// typed at a terminal leaves the terminal as it was when it fails before
// the VM starts (CMD not found, a bad --plugin-restarts or --plugin-uid, no
// usable KVM). Before, setupExec put it in raw mode at once and only the
// path that started the VM restored it: no echo, no line editing, no ^C
// after the failure. (From review.)

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/core/boot/boottest"
	"github.com/krun-core/krun-core/core/kvm"
)

// openPTY returns a pseudo-terminal's master and slave.
func openPTY(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		t.Skipf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		t.Skipf("ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		t.Skipf("open the slave: %v", err)
	}
	t.Cleanup(func() { s.Close(); m.Close() })
	return m, s
}

func TestRunExecFailureRestoresTerminal(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin/sh"), []byte("#!"), 0o755)
	k := filepath.Join(t.TempDir(), "bzImage")
	boottest.WriteFakeBzImage(t, k, "6.1.0-test")
	tests := []struct {
		name string
		args []string
		rc   int
		kvm  bool // reachable only on a host without a usable KVM
	}{
		{"command not found", []string{"--kernel", k, "--root", root, "--", "nosuch"}, 127, false},
		{"bad --plugin-restarts", []string{"--kernel", k, "--root", root, "--plugin-restarts", "x", "--", "sh"}, 125, false},
		{"--plugin-uid 0", []string{"--kernel", k, "--root", root, "--plugin-uid", "0", "--", "sh"}, 125, false},
		{"no usable KVM", []string{"--kernel", k, "--root", root, "--", "sh"}, 125, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.kvm && kvm.CheckHost() == nil {
				t.Skip("this host's KVM is usable")
			}
			_, slave := openPTY(t)
			before, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
			if err != nil {
				t.Fatal(err)
			}
			saved := os.Stdin
			os.Stdin = slave
			defer func() { os.Stdin = saved }()
			var out, errb bytes.Buffer
			rc := runCommand(tt.args, &out, &errb)
			after, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
			if err != nil {
				t.Fatal(err)
			}
			if rc != tt.rc {
				t.Errorf("exit %d, want %d (stderr %q)", rc, tt.rc, errb.String())
			}
			if after.Lflag != before.Lflag || after.Iflag != before.Iflag || after.Oflag != before.Oflag {
				t.Errorf("run failed (exit %d, %q) and left the terminal changed: lflag %#o -> %#o (ECHO %v, ICANON %v, ISIG %v), iflag %#o -> %#o, oflag %#o -> %#o",
					rc, errb.String(), before.Lflag, after.Lflag, after.Lflag&unix.ECHO != 0, after.Lflag&unix.ICANON != 0, after.Lflag&unix.ISIG != 0,
					before.Iflag, after.Iflag, before.Oflag, after.Oflag)
			}
		})
	}
}
