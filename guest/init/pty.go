package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/guest/initconfig"
)

// ptyIO gives the command a pseudo-terminal (/dev/pts/N) as its
// controlling terminal; krun-init holds the master side.
type ptyIO struct {
	in     *initProc
	out    func([]byte)
	master *os.File
	slave  *os.File
	pid    int
	wg     sync.WaitGroup
	drain  drainer
	// ended is set by finish: input is no longer written (the command
	// has exited; what it left behind may hold the terminal unread).
	ended atomic.Bool
}

func newPtyIO(in *initProc, ws *initconfig.Winsize, out func([]byte)) (*ptyIO, error) {
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetUint32(mfd, unix.TIOCGPTN)
	if err != nil {
		unix.Close(mfd)
		return nil, fmt.Errorf("pty number: %w", err)
	}
	if ws != nil {
		if err := unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, &unix.Winsize{Row: ws.Rows, Col: ws.Cols}); err != nil {
			unix.Close(mfd)
			return nil, fmt.Errorf("set window size: %w", err)
		}
	}
	// O_NONBLOCK makes the master pollable, so reads take deadlines.
	master := os.NewFile(uintptr(mfd), "/dev/ptmx")
	name := "/dev/pts/" + strconv.FormatUint(uint64(n), 10)
	slave, err := os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	return &ptyIO{in: in, out: out, master: master, slave: slave}, nil
}

func (p *ptyIO) childFiles() [3]*os.File { return [3]*os.File{p.slave, p.slave, p.slave} }

func (p *ptyIO) started(pid int) {
	p.pid = pid
	p.slave.Close()
	p.wg.Add(1)
	safeGo(p.in.log, "pty pump", func() { defer p.wg.Done(); pump(p.master, &p.drain, p.out) })
}

func (p *ptyIO) stdin(b []byte) error {
	_, err := p.master.Write(b)
	if err != nil && p.ended.Load() {
		return nil // the command has exited: its input goes nowhere
	}
	return err
}

// stdinEOF: a terminal has no end of input; the host's terminal sends ^D
// as a byte when the user types it.
func (p *ptyIO) stdinEOF() {}

func (p *ptyIO) winsize(rows, cols uint16) {
	ws := &unix.Winsize{Row: rows, Col: cols}
	if err := ioctlWinsize(p.master, ws); err != nil {
		p.in.log.Printf("set window size %dx%d: %v", rows, cols, err)
	}
}

func ioctlWinsize(f *os.File, ws *unix.Winsize) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws) }); err != nil {
		return err
	}
	return ierr
}

func (p *ptyIO) signal(sig int) { forwardSignal(p.in.log, p.pid, sig) }

// finish drains the master until every slave is closed (EIO).
func (p *ptyIO) finish() {
	// A write of input the command never read may be blocked on a full
	// terminal that a leftover process still holds: it holds the stdio
	// reader, which must go on to read CLOSE_ACK (a pipe's stdin is
	// closed instead). The deadline ends it and every later write.
	p.ended.Store(true)
	p.master.SetWriteDeadline(time.Now())
	p.drain.start(p.master, time.Now())
	p.wg.Wait()
}
