package devspec

import (
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHandOverPtyMasterIsTheSameTerminal (review, helper-98): HandOver
// opens a terminal again through /proc/self/fd/N. For a pty master
// (/dev/ptmx, or /dev/pts/ptmx), whose TCGETS succeeds like any terminal's,
// that open is an open of /dev/ptmx: a new, unrelated pty pair, whose
// device and inode (ptmx's) pass the Dev/Ino/Rdev check. The console plugin
// then writes the guest's output into a pty nobody reads, and reads stdin
// from one nobody writes. A master must be duplicated (or the reopen
// compared by TIOCGPTN / refused for ptmx's rdev 5:2 and devpts ptmx).
// Fixed: HandOver duplicates a file that answers TIOCGPTN, and /dev/tty.
func TestHandOverPtyMasterIsTheSameTerminal(t *testing.T) {
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skip(err)
	}
	m := os.NewFile(uintptr(mfd), "ptmx")
	defer m.Close()
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		t.Skip(err)
	}
	n, err := unix.IoctlGetInt(mfd, unix.TIOCGPTN)
	if err != nil {
		t.Skip(err)
	}
	sfd, err := unix.Open("/dev/pts/"+strconv.Itoa(n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Skip(err)
	}
	defer unix.Close(sfd)

	c, err := HandOver(m, "stdout", unix.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := unix.IoctlGetInt(int(c.Fd()), unix.TIOCGPTN); err == nil && got != n {
		t.Errorf("the console plugin's copy of pty master %d is the master of another pty, %d", n, got)
	}
	// What the plugin writes to its copy reaches the caller's terminal.
	if _, err := unix.Write(int(c.Fd()), []byte("x\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	deadline := time.Now().Add(2 * time.Second)
	for {
		k, err := unix.Read(sfd, buf)
		if k > 0 {
			return
		}
		if err != unix.EAGAIN || time.Now().After(deadline) {
			t.Fatalf("the caller's pty (slave %d) never got what was written to the plugin's copy of its master: %v", n, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
