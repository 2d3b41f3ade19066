package oci

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/internal/stdiopump"
)

// openPty makes a new pseudo-terminal and returns its master and slave.
func openPty() (master, slave *os.File, err error) {
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	master = os.NewFile(uintptr(mfd), "/dev/ptmx")
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(mfd, unix.TIOCGPTN)
	if err != nil {
		master.Close()
		return nil, nil, fmt.Errorf("pty number: %w", err)
	}
	name := "/dev/pts/" + strconv.Itoa(n)
	sfd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		master.Close()
		return nil, nil, fmt.Errorf("open %s: %w", name, err)
	}
	return master, os.NewFile(uintptr(sfd), name), nil
}

// makeRaw puts a terminal in raw mode (cfmakeraw): the guest's own
// terminal does the line discipline, the host's end passes bytes.
func makeRaw(f *os.File) error {
	fd := int(f.Fd())
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

// setWinsize sets a terminal's size.
func setWinsize(f *os.File, rows, cols uint16) error {
	return unix.IoctlSetWinsize(int(f.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
}

// getWinsize reads a terminal's size.
func getWinsize(f *os.File) (rows, cols uint16, err error) {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil {
		return 0, 0, err
	}
	return ws.Row, ws.Col, nil
}

// sendConsole hands a pty master to the caller's console socket, as runc
// does: one message whose data is the master's name, the descriptor
// attached with SCM_RIGHTS.
func sendConsole(socketPath string, master *os.File) error {
	conn, err := net.DialTimeout("unix", socketPath, 10*time.Second)
	if err != nil {
		return fmt.Errorf("--console-socket %s: %w", socketPath, err)
	}
	defer conn.Close()
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("--console-socket %s is not a unix socket", socketPath)
	}
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := uc.WriteMsgUnix([]byte(master.Name()), unix.UnixRights(int(master.Fd())), nil); err != nil {
		return fmt.Errorf("--console-socket %s: send the terminal: %w", socketPath, err)
	}
	return nil
}

// newConsole makes the terminal of a process that has one: the master
// goes to the console socket, the slave (raw, at the given size) becomes
// the process's stdin, stdout and stderr on the host.
func newConsole(socketPath string, rows, cols uint16) (*os.File, error) {
	master, slave, err := openPty()
	if err != nil {
		return nil, err
	}
	defer master.Close()
	if err := makeRaw(slave); err != nil {
		slave.Close()
		return nil, fmt.Errorf("terminal raw mode: %w", err)
	}
	if rows > 0 && cols > 0 {
		_ = setWinsize(master, rows, cols)
	}
	if err := sendConsole(socketPath, master); err != nil {
		slave.Close()
		return nil, err
	}
	return slave, nil
}

// findHostTerminal returns the caller's terminal, for a foreground run or
// exec with a terminal and no console socket, where runc looks for it:
// stderr, stdout, stdin (any may be redirected), then the controlling
// terminal. own says the file was opened here (the caller closes it).
func findHostTerminal(env *Env) (tty *os.File, own bool, err error) {
	for _, f := range []*os.File{env.Stderr, env.Stdout, env.Stdin} {
		if f != nil && stdiopump.IsTerminal(f) {
			return f, false, nil
		}
	}
	f, err := os.OpenFile("/dev/tty", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, false, fmt.Errorf("process.terminal without --console-socket needs a terminal to relay: stdin, stdout and stderr are none, and %w", err)
	}
	return f, true, nil
}

// hostConsole is the terminal of a foreground run without a console
// socket, as runc makes it: a pty of krun-oci's own, whose slave is the
// container's and whose master is relayed to and from the caller's stdio,
// the caller's terminal in raw mode meanwhile and its size followed.
type hostConsole struct {
	tty     *os.File // the caller's terminal
	ownTTY  bool
	master  *os.File
	restore func()
	winch   chan os.Signal
	outDone chan struct{}
}

// newHostConsole makes the pty (its slave raw, at the caller's terminal's
// size, or rows x cols from the config where that is unknown) and returns
// it with the slave for the container.
func newHostConsole(env *Env, rows, cols uint16) (*hostConsole, *os.File, error) {
	tty, own, err := findHostTerminal(env)
	if err != nil {
		return nil, nil, err
	}
	master, slave, err := openPty()
	if err != nil {
		if own {
			tty.Close()
		}
		return nil, nil, err
	}
	if err := makeRaw(slave); err != nil {
		master.Close()
		slave.Close()
		if own {
			tty.Close()
		}
		return nil, nil, fmt.Errorf("terminal raw mode: %w", err)
	}
	if r, c, err := getWinsize(tty); err == nil && r > 0 && c > 0 {
		rows, cols = r, c
	}
	if rows > 0 && cols > 0 {
		_ = setWinsize(master, rows, cols)
	}
	return &hostConsole{tty: tty, ownTTY: own, master: master}, slave, nil
}

// relay puts the caller's terminal in raw mode (the container's terminal
// does the line discipline) and copies stdin to the pty and the pty to
// stdout until close.
func (h *hostConsole) relay(log *runtimeLog, env *Env) {
	if restore, err := rawMode(h.tty); err == nil {
		h.restore = restore
	} else {
		log.warn("the terminal's raw mode: %v", err)
	}
	h.winch = make(chan os.Signal, 1)
	signal.Notify(h.winch, unix.SIGWINCH)
	go func() {
		for range h.winch {
			if r, c, err := getWinsize(h.tty); err == nil {
				_ = setWinsize(h.master, r, c)
			}
		}
	}()
	if env.Stdin != nil {
		go io.Copy(h.master, env.Stdin)
	}
	h.outDone = make(chan struct{})
	go func() {
		defer close(h.outDone)
		if env.Stdout != nil {
			io.Copy(env.Stdout, h.master) // to EIO, once every slave is closed
		}
	}()
}

// close waits a little for the container's last output (the pty reads
// EIO once the container's processes are gone), then restores the
// caller's terminal.
func (h *hostConsole) close(log *runtimeLog) {
	if h.outDone != nil {
		select {
		case <-h.outDone:
		case <-time.After(2 * time.Second):
			log.warn("the container's terminal is still open 2 s after its end; not waiting for more output")
		}
	}
	if h.winch != nil {
		signal.Stop(h.winch)
		close(h.winch)
	}
	if h.restore != nil {
		h.restore()
	}
	h.master.Close()
	if h.ownTTY {
		h.tty.Close()
	}
}
