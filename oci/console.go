package oci

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
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
