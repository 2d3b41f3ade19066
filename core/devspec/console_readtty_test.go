package devspec

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/internal/stdiotest"
)

// TestConsolePluginCannotReadTheTerminal: krun-core now reads a terminal
// on its stdin itself and hands the console plugin a pipe, so that a
// compromised plugin, in a session of its own and out of the shell's job
// control, no longer takes what the user types to the foreground job. But
// a shell's terminal is one O_RDWR description on descriptors 0, 1 and 2:
// HandOver reopened stdout and stderr with that access mode, and the
// plugin could read the terminal through them all the same (found in
// review, helper-127). The plugin only writes its stdout and stderr and
// only reads its stdin: a copy opened again is opened for that direction.
func TestConsolePluginCannotReadTheTerminal(t *testing.T) {
	m, tty := stdiotest.OpenPTY(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	// What `krun-core run -- CMD` hands over at a terminal: a pipe for
	// stdin, the terminal for stdout and stderr.
	spec := &ConsoleSpec{Name: "krun.stdio", TTY: true, Stdin: r, Stdout: tty, Stderr: tty}
	o, err := spec.Open(OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.CloseFiles()
	for _, f := range o.Files {
		if f.Name == devopts.FileStdin {
			continue
		}
		// The user types a line for the foreground job.
		if _, err := m.Write([]byte("secret\n")); err != nil {
			t.Fatal(err)
		}
		if fl, _ := unix.FcntlInt(f.File.Fd(), unix.F_GETFL, 0); fl&unix.O_ACCMODE != unix.O_WRONLY {
			got := make(chan string, 1)
			go func() {
				b := make([]byte, 64)
				k, _ := unix.Read(int(f.File.Fd()), b)
				got <- string(b[:max(k, 0)])
			}()
			select {
			case s := <-got:
				t.Errorf("the console plugin's %s is open for reading (flags %#o): it read %q typed at the terminal", f.Name, fl, s)
			case <-time.After(2 * time.Second):
				t.Errorf("the console plugin's %s is open for reading (flags %#o)", f.Name, fl)
			}
			continue
		}
		// Still the terminal: what the plugin writes reaches it.
		if _, err := unix.Write(int(f.File.Fd()), []byte("out\n")); err != nil {
			t.Errorf("write %s: %v", f.Name, err)
		}
	}
	// Drain the terminal so that nothing waits on it.
	unix.SetNonblock(int(tty.Fd()), true)
	unix.Read(int(tty.Fd()), make([]byte, 256))
}
