package devspec

import (
	"fmt"
	"io"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/internal/stdiopump"
)

// ConsoleSpec is the stdio console of `krun-core run -- CMD`: a
// virtio-console port whose other end is the plugin holding krun-core's
// standard input, output and error. The core never reads or writes the
// bytes; it only hands the files over. It has no command-line form.
type ConsoleSpec struct {
	Name                  string // port name the guest looks for
	TTY                   bool
	HoldStdin             bool // read stdin only after START
	Stdin, Stdout, Stderr *os.File
	Control               *os.File // nil: no control pipe
}

// Kind is devopts.KindConsole.
func (s *ConsoleSpec) Kind() string { return devopts.KindConsole }

// String describes the console for messages.
func (s *ConsoleSpec) String() string { return fmt.Sprintf("console name=%s", s.Name) }

// Open gives the plugin its own copies of the files (the caller keeps its
// own): a terminal, FIFO or pipe is opened again, so that the plugin's
// file status flags are its own; anything else is duplicated (HandOver).
func (s *ConsoleSpec) Open(OpenOptions) (*Opened, error) {
	o := &Opened{Kind: devopts.KindConsole, Options: map[string]string{devopts.OptName: s.Name, devopts.OptTTY: onOff(s.TTY),
		devopts.OptStdio: strconv.Itoa(stdioframe.Version)}}
	if s.HoldStdin {
		o.Options[devopts.OptHoldStdin] = "on"
	}
	// The plugin reads stdin and writes stdout and stderr, nothing else
	// (HandOver).
	for _, f := range []struct {
		name   string
		file   *os.File
		access int
	}{{devopts.FileStdin, s.Stdin, unix.O_RDONLY}, {devopts.FileStdout, s.Stdout, unix.O_WRONLY},
		{devopts.FileStderr, s.Stderr, unix.O_WRONLY}, {devopts.FileControl, s.Control, unix.O_RDWR}} {
		if f.file == nil {
			continue
		}
		c, err := HandOver(f.file, f.name, f.access)
		if err != nil {
			o.CloseFiles()
			return nil, fmt.Errorf("console %s: %w", f.name, err)
		}
		o.add(f.name, c)
	}
	return o, nil
}

// HandOver returns the plugin's copy of f, for Open and for the files the
// core passes to a plugin outside it (an exec's stdin, stdout, stderr and
// status: vmm.Context.Exec); the caller closes the copy once it is sent.
// A dup shares f's open file description, and with it the file status
// flags, with krun-core and with the user's shell: a compromised console
// plugin (it parses every guest byte; its filter allows F_SETFL, which
// the Go runtime needs) could leave the user's terminal non-blocking
// after krun-core exits (found in review). So a terminal, FIFO or pipe is opened again through
// /proc/self/fd, with f's access mode and status flags: the same terminal
// or pipe, a description of the plugin's own. A regular file keeps one
// description, whose shared offset is what `cmd >file` relies on, and a
// socket cannot be opened again: those, and anything the open refuses (a
// terminal of another user's, a pipe without a reader), are duplicated.
//
// access is the direction the plugin uses the file in (O_RDONLY, O_WRONLY
// or O_RDWR): an O_RDWR file opened again is opened for that direction
// only. A shell's terminal is one O_RDWR description on descriptors 0, 1
// and 2, and a plugin handed stdout with read access could read what the
// user types to the foreground job, out of job control, although krun-core
// reads its stdin itself (found in review, helper-127). A file not open
// O_RDWR keeps its mode: the plugin never gets an access f lacks.
func HandOver(f *os.File, name string, access int) (*os.File, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("flags: %w", err)
	}
	// A FIFO, or a terminal (stdiopump.ReopenableTerminal: not a pty's
	// master, not /dev/tty; another device is never opened again).
	reopen := st.Mode&unix.S_IFMT == unix.S_IFIFO || (st.Mode&unix.S_IFMT == unix.S_IFCHR && stdiopump.ReopenableTerminal(f))
	if st.Mode&unix.S_IFMT == unix.S_IFREG && fl&unix.O_ACCMODE == unix.O_RDWR && access&unix.O_ACCMODE != unix.O_RDWR {
		// A regular file the shell opened `<>` and the plugin only
		// reads (stdin) or writes: a duplicate would give it both
		// (left open by helper-128). A description of its own with
		// the narrower access, at f's offset; that offset is then no
		// longer shared, which only such a file gives up.
		if c, err := reopenRegular(f, fl, access&unix.O_ACCMODE, name); err == nil {
			return c, nil
		}
	}
	if reopen {
		// Non-blocking, so that a FIFO's open cannot wait for its
		// other end; the flags are set as f's once it is open.
		mode := fl & unix.O_ACCMODE
		if mode == unix.O_RDWR {
			mode = access & unix.O_ACCMODE
		}
		if fd, err := stdiopump.Reopen(f, mode|unix.O_NONBLOCK); err == nil {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_ASYNC); err == nil {
				return os.NewFile(uintptr(fd), name), nil
			}
			unix.Close(fd)
		}
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// reopenRegular opens the regular file f again (stdiopump.Reopen) with
// the access mode mode and f's status flags, at f's offset.
func reopenRegular(f *os.File, fl, mode int, name string) (*os.File, error) {
	off, err := unix.Seek(int(f.Fd()), 0, io.SeekCurrent)
	if err != nil {
		return nil, err
	}
	fd, err := stdiopump.Reopen(f, mode)
	if err != nil {
		return nil, err
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_ASYNC); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if _, err := unix.Seek(fd, off, io.SeekStart); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), name), nil
}
