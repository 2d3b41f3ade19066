package devspec

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
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

// Open duplicates the files for the plugin (the caller keeps its own).
func (s *ConsoleSpec) Open(OpenOptions) (*Opened, error) {
	o := &Opened{Kind: devopts.KindConsole, Options: map[string]string{devopts.OptName: s.Name, devopts.OptTTY: onOff(s.TTY)}}
	if s.HoldStdin {
		o.Options[devopts.OptHoldStdin] = "on"
	}
	for _, f := range []struct {
		name string
		file *os.File
	}{{devopts.FileStdin, s.Stdin}, {devopts.FileStdout, s.Stdout}, {devopts.FileStderr, s.Stderr}, {devopts.FileControl, s.Control}} {
		if f.file == nil {
			continue
		}
		fd, err := unix.FcntlInt(f.file.Fd(), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			o.CloseFiles()
			return nil, fmt.Errorf("console %s: dup: %w", f.name, err)
		}
		o.add(f.name, os.NewFile(uintptr(fd), f.name))
	}
	return o, nil
}
