package devspec

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// KindConsole is the plugin kind of the stdio console (krun-plugin-console).
const KindConsole = "console"

// Names of the files and option a console plugin is configured with.
const (
	FileStdin   = "stdin"
	FileStdout  = "stdout"
	FileStderr  = "stderr"
	FileControl = "control" // read end of the core's control pipe (window size, signals)
	OptName     = "name"    // the virtio-console port's name
	OptTTY      = "tty"     // on: the guest program has a terminal (stdout carries stderr too)
	// OptHoldStdin ("hold-stdin=on"): stdin is read only after the core
	// releases a command waiting for START (a container's).
	OptHoldStdin = "hold-stdin"
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

// Kind is KindConsole.
func (s *ConsoleSpec) Kind() string { return KindConsole }

// String describes the console for messages.
func (s *ConsoleSpec) String() string { return fmt.Sprintf("console name=%s", s.Name) }

// Open duplicates the files for the plugin (the caller keeps its own).
func (s *ConsoleSpec) Open(OpenOptions) (*Opened, error) {
	o := &Opened{Kind: KindConsole, Options: map[string]string{OptName: s.Name, OptTTY: onOff(s.TTY)}}
	if s.HoldStdin {
		o.Options[OptHoldStdin] = "on"
	}
	for _, f := range []struct {
		name string
		file *os.File
	}{{FileStdin, s.Stdin}, {FileStdout, s.Stdout}, {FileStderr, s.Stderr}, {FileControl, s.Control}} {
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
