// Command ptyrun runs a program with a new pseudo-terminal as its
// controlling terminal and standard I/O, the way an interactive shell
// session would: e2e/run uses it to check that `krun-core run -- CMD` on a
// terminal gives CMD a terminal of the same size in the guest.
//
//	ptyrun ROWS COLS PROGRAM [ARGS...]
//
// ptyrun's stdin is copied to the terminal (then, after a pause, ^D), the
// terminal's output to ptyrun's stdout; ptyrun exits with the program's
// status.
package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: ptyrun ROWS COLS PROGRAM [ARGS...]")
		os.Exit(2)
	}
	rows, _ := strconv.Atoi(os.Args[1])
	cols, _ := strconv.Atoi(os.Args[2])
	master, slave, err := openPTY()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ptyrun:", err)
		os.Exit(2)
	}
	if err := unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(rows), Col: uint16(cols)}); err != nil {
		fmt.Fprintln(os.Stderr, "ptyrun: set size:", err)
		os.Exit(2)
	}
	cmd := exec.Command(os.Args[3], os.Args[4:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "ptyrun:", err)
		os.Exit(2)
	}
	slave.Close()
	go io.Copy(os.Stdout, master)
	go func() {
		// Give the program time to set its terminal up before typing.
		time.Sleep(2 * time.Second)
		io.Copy(master, os.Stdin)
	}()
	err = cmd.Wait()
	time.Sleep(200 * time.Millisecond) // the last output
	if ee, ok := err.(*exec.ExitError); ok {
		os.Exit(ee.ExitCode())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ptyrun:", err)
		os.Exit(2)
	}
}

func openPTY() (*os.File, *os.File, error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		return nil, nil, fmt.Errorf("pty number: %w", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	return m, s, nil
}
