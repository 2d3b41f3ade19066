package stdiopump

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Reopen opens the file behind f again through /proc/self/fd with the
// open flags flags (an access mode and others; O_NOCTTY and O_CLOEXEC are
// added) and returns the new descriptor: an open file description of its
// own, whose status flags and offset f does not share. It fails unless
// the file opened is f's (device, inode and, for a device file, its
// number): the name may have come to stand for another.
func Reopen(f *os.File, flags int) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return -1, fmt.Errorf("stat: %w", err)
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), flags|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	var got unix.Stat_t
	if err := unix.Fstat(fd, &got); err != nil || got.Dev != st.Dev || got.Ino != st.Ino || got.Rdev != st.Rdev {
		unix.Close(fd)
		return -1, fmt.Errorf("%s opened again is another file", f.Name())
	}
	return fd, nil
}

// ReopenableTerminal reports whether f is a terminal that Reopen may open
// again as the same terminal: not a pty's master (opening it again,
// /dev/ptmx or /dev/pts/ptmx, makes a new pty) and not /dev/tty (which
// names whatever terminal controls the opener). Another device is never
// opened again: opening it can act on it (a tape rewinds at close).
func ReopenableTerminal(f *os.File) bool {
	if !IsTerminal(f) {
		return false
	}
	if _, err := unix.IoctlGetInt(int(f.Fd()), unix.TIOCGPTN); err == nil {
		return false
	}
	var st unix.Stat_t
	return unix.Fstat(int(f.Fd()), &st) == nil && st.Rdev != unix.Mkdev(5, 0)
}
