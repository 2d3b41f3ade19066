// Package stdiotest has what tests of a command's standard I/O share:
// pseudo-terminals, a log file opened for appending, a file's type.
package stdiotest

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// OpenPTY opens a pseudo-terminal pair, closed at the test's end, or skips
// the test where there are none. The terminal end is a blocking O_RDWR
// descriptor, as a shell hands its terminal to krun-core (os.OpenFile
// would make it non-blocking for Go's poller).
func OpenPTY(t testing.TB) (master, tty *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skipf("no pseudo-terminals here: unlock: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("no pseudo-terminals here: TIOCGPTN: %v", err)
	}
	fd, err := unix.Open("/dev/pts/"+strconv.Itoa(n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	tty = os.NewFile(uintptr(fd), "tty")
	t.Cleanup(func() { tty.Close() })
	return m, tty
}

// AppendLog writes content to a new file and returns it opened as a
// shell's `>>log` opens it: write only, O_APPEND.
func AppendLog(t testing.TB, content string) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// FileType is f's type as fstat says (unix.S_IFIFO, unix.S_IFREG...).
func FileType(t testing.TB, f *os.File) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Mode & unix.S_IFMT
}
