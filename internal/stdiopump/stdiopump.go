// Package stdiopump puts a pipe between a command's standard I/O and the
// console plugin, where the plugin must not hold the caller's file
// itself. The plugin parses the guest's bytes and is treated as possibly
// compromised (docs/SECURITY.md):
//
//   - a terminal on stdin: the plugin runs in a session of its own, out of
//     the shell's job control, and would go on reading what the user types
//     to the foreground job while its command sat in the background.
//     krun-core and krun-oci, the shell's job, read it themselves (Input):
//     in the background their read stops them, as any program's.
//   - a regular file (anything but a pipe, a socket or a terminal) on
//     stdout or stderr: the plugin would share its open file description
//     and could clear O_APPEND on a `>>log`, write over it or truncate it.
//     The caller copies a pipe into it instead (Outputs).
//
// The pumps copy bytes; they never look at them.
package stdiopump

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/cli"
)

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Input is a pipe fed from a file (a terminal): Pipe is what the plugin
// gets, Run copies, Stop ends the copy.
type Input struct {
	src          *os.File // what is read: the terminal
	own          *os.File // src opened again, non-blocking (ownReader); nil if not
	dst          *os.File // the pipe's write end
	stopR, stopW int      // Stop closes stopW, which wakes Run
	stopOnce     sync.Once
	endOnce      sync.Once // closes stopR, dst and own: Run's end or Close

	afterPoll func() // tests: runs between poll and read
}

// NewInput makes the pipe for src and returns its read end, for the
// plugin; the caller closes its own copy once the plugin has one.
func NewInput(src *os.File) (*Input, *os.File, error) {
	var stop [2]int
	if err := unix.Pipe2(stop[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, fmt.Errorf("stdin pipe: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		unix.Close(stop[0])
		unix.Close(stop[1])
		return nil, nil, fmt.Errorf("stdin pipe: %w", err)
	}
	return &Input{src: src, own: ownReader(src), dst: w, stopR: stop[0], stopW: stop[1]}, r, nil
}

// ownReader opens the terminal src again, read only and non-blocking: a
// description of the pump's own, so that the caller's (the shell's, with
// its flags) stays as it was. Another reader of the same terminal (`run
// ... | less` reads it too) can take what poll announced before the
// pump's read; a blocking read would then wait for the next line and
// take it after the command ended, where a non-blocking one returns
// EAGAIN and the pump polls again. nil where src is no terminal, or one
// that cannot be opened again (another user's), a pty's master (opening
// it again makes a new pty) or /dev/tty: Run then reads src itself.
func ownReader(src *os.File) *os.File {
	if src == nil || !ReopenableTerminal(src) {
		return nil
	}
	fd, err := Reopen(src, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), src.Name())
}

// Run copies src to the pipe until src ends or fails (^D, a hang-up),
// the pipe's reader is gone (the plugin exited) or Stop is called, then
// closes the pipe: the command's input ends.
//
// It reads src only when poll says there is something to read and
// neither of the others has happened: a blocked read of a terminal
// would take the next line the user types, after the command ended, for
// a pipe nobody reads any more, and the shell that comes next would
// never see it. In the background the process is stopped (SIGTTIN)
// before it polls, as a read would stop it.
func (p *Input) Run() {
	defer p.end()
	if p.src == nil {
		return
	}
	src := int(p.src.Fd())
	if p.own != nil {
		src = int(p.own.Fd())
	}
	var dst int
	if err := withFd(p.dst, func(fd int) { dst = fd }); err != nil {
		return
	}
	tty := IsTerminal(p.src)
	buf := make([]byte, 32*1024)
	for {
		if tty {
			stopInBackground(src)
		}
		fds := []unix.PollFd{
			{Fd: int32(p.stopR), Events: unix.POLLIN},
			{Fd: int32(dst)}, // POLLERR: the reader is gone
			{Fd: int32(src), Events: unix.POLLIN},
		}
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			return
		}
		if fds[0].Revents != 0 || fds[1].Revents != 0 {
			return
		}
		if fds[2].Revents&unix.POLLNVAL != 0 {
			return
		}
		if fds[2].Revents == 0 {
			continue
		}
		if p.afterPoll != nil {
			p.afterPoll()
		}
		n, err := unix.Read(src, buf)
		switch {
		case err == unix.EINTR || err == unix.EAGAIN:
			continue
		case err != nil || n <= 0:
			return // the end (^D), or a hang-up (EIO)
		}
		if _, err := p.dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

// stopInBackground stops the process group (SIGTTIN) when the terminal
// fd is its controlling terminal and another group is in the foreground,
// as the kernel does at a read: poll does not, so without it a
// background job waited unstopped until something was typed. The kernel
// drops the signal for an orphaned group, and a read then fails (EIO),
// as it would have.
func stopInBackground(fd int) {
	fg, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP)
	if err == nil && fg != unix.Getpgrp() {
		unix.Kill(0, unix.SIGTTIN)
	}
}

// withFd calls f with the descriptor of file, which stays open meanwhile
// (Fd would make a pipe of os.Pipe blocking for good).
func withFd(file *os.File, f func(fd int)) error {
	rc, err := file.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

// Stop ends Run without reading src any more: what is typed from then on
// is for whoever reads the terminal next. Call it once the command has
// ended. A read under way (input that came before Stop) is copied.
func (p *Input) Stop() {
	p.stopOnce.Do(func() { unix.Close(p.stopW) })
}

// Close closes the pipe without copying (the command never started).
func (p *Input) Close() {
	p.Stop()
	p.end()
}

// end closes what Run uses, once.
func (p *Input) end() {
	p.endOnce.Do(func() {
		unix.Close(p.stopR)
		p.dst.Close()
		if p.own != nil {
			p.own.Close()
		}
	})
}

// PassThrough reports whether an output file can be handed to the plugin
// as it is: a pipe or a socket (what the plugin can do to it is only
// write in order), or a terminal (opened again for the plugin, write
// only, devspec's HandOver). Anything else, a regular file above all, is
// copied through a pipe.
func PassThrough(f *os.File) (bool, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFIFO, unix.S_IFSOCK:
		return true, nil
	case unix.S_IFCHR:
		return IsTerminal(f), nil
	}
	return false, nil
}

// Output copies pipes into a command's stdout and stderr where they are
// files the plugin must not hold (PassThrough).
type Output struct {
	writers []*os.File // the pipes' write ends, until CloseWriters
	nulls   []*os.File // /dev/null opened for the plugin, until CloseWriters
	wg      sync.WaitGroup
	mu      sync.Mutex
	err     error
}

// Outputs returns what the plugin gets for stdout and stderr: each file
// itself where PassThrough allows, a /dev/null of its own for /dev/null,
// else the write end of a pipe that o copies into the file (one io.Copy
// a stream). stdout and stderr that are
// one file (`>>log 2>&1`) share one pipe, so that what the command wrote
// to both stays in its order. A nil file stays nil. The caller closes
// the write ends (CloseWriters) once the plugin has its own copies, and
// calls Wait before it exits, so that nothing the command wrote is lost.
func Outputs(stdout, stderr *os.File) (out, errOut *os.File, o *Output, err error) {
	o = &Output{}
	out, err = o.add(stdout)
	if err == nil {
		if stderr != nil && stdout != nil && sameFile(stdout, stderr) {
			errOut = out
		} else {
			errOut, err = o.add(stderr)
		}
	}
	if err != nil {
		o.CloseWriters()
		o.Wait()
		return nil, nil, nil, err
	}
	return out, errOut, o, nil
}

// add returns what the plugin gets for f.
func (o *Output) add(f *os.File) (*os.File, error) {
	if f == nil {
		return nil, nil
	}
	pass, err := PassThrough(f)
	if err != nil || pass {
		return f, err
	}
	if isDevNull(f) {
		// Nothing to copy: the plugin gets a /dev/null of its own (no
		// file status flags shared with the caller's).
		null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s for the plugin: %w", os.DevNull, err)
		}
		o.nulls = append(o.nulls, null)
		return null, nil
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("output pipe for %s: %w", f.Name(), err)
	}
	o.writers = append(o.writers, w)
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		defer r.Close()
		if _, err := io.Copy(f, r); err != nil {
			o.mu.Lock()
			o.err = errors.Join(o.err, fmt.Errorf("copy the command's output to %s: %w", f.Name(), err))
			o.mu.Unlock()
			// The rest is dropped, as the plugin dropped a stream
			// whose file failed: the writer must not block.
			io.Copy(io.Discard, r)
		}
	}()
	return w, nil
}

// Pumped reports whether o copies any stream.
func (o *Output) Pumped() bool { return o != nil && len(o.writers) > 0 }

// CloseWriters closes the caller's write ends of the pipes: each pump
// ends once the plugin's copies are closed too.
func (o *Output) CloseWriters() {
	if o == nil {
		return
	}
	for _, w := range o.writers {
		w.Close()
	}
	o.writers = nil
	for _, n := range o.nulls {
		n.Close()
	}
	o.nulls = nil
}

// Wait waits until every pipe is copied to its end (every write end
// closed) and returns the first failure to write a file.
func (o *Output) Wait() error {
	if o == nil {
		return nil
	}
	o.wg.Wait()
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.err
}

// Dropped words a failure of Wait for the user, in one line: which copy
// failed (a full disk), and that the rest of that stream was dropped,
// which the command's exit status alone would not tell.
func Dropped(err error) string {
	return cli.OneLine(strings.ReplaceAll(err.Error(), "\n", "; ")) + "; the rest of it was dropped"
}

// isDevNull reports whether f is the null device (character device 1:3,
// whatever its name).
func isDevNull(f *os.File) bool {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == unix.Mkdev(1, 3)
}

// sameFile reports whether a and b are the same file (device and inode).
func sameFile(a, b *os.File) bool {
	var sa, sb unix.Stat_t
	if unix.Fstat(int(a.Fd()), &sa) != nil || unix.Fstat(int(b.Fd()), &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}
