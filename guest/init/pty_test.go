package main

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPtyFinishUnblocksStdin: input the command never read must not keep
// the stdio reader (which also reads CLOSE_ACK) blocked in a write to the
// pty once the command has exited, when a process it left behind still
// holds the terminal: a pipe's stdin is closed then, the pty's was not,
// and init waited the whole CLOSE_ACK timeout before powering off.
func TestPtyFinishUnblocksStdin(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	in := &initProc{log: &logger{out: devNull}}
	p, err := newPtyIO(in, nil, func([]byte) {})
	if err != nil {
		t.Skipf("no pty here: %v", err)
	}
	defer p.master.Close()
	// Raw mode: the line discipline queues input instead of dropping it
	// (as a full-screen program sets it).
	tio, err := unix.IoctlGetTermios(int(p.slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	tio.Lflag &^= unix.ICANON | unix.ECHO | unix.ISIG | unix.IEXTEN
	tio.Iflag &^= unix.IXON | unix.ICRNL
	if err := unix.IoctlSetTermios(int(p.slave.Fd()), unix.TCSETS, tio); err != nil {
		t.Fatal(err)
	}
	// The orphan's copy of the terminal.
	orphanFD, err := unix.Dup(int(p.slave.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(orphanFD)
	p.started(0) // pid 0: no signal goes anywhere
	wrote := make(chan error, 1)
	go func() { wrote <- p.stdin(make([]byte, 1<<20)) }() // more than the terminal holds
	select {
	case err := <-wrote:
		t.Fatalf("1 MiB of input went into an unread terminal (%v): the test needs a write that blocks", err)
	case <-time.After(300 * time.Millisecond):
	}
	finished := make(chan struct{})
	go func() { p.finish(); close(finished) }()
	select {
	case <-wrote:
	case <-time.After(3 * time.Second):
		t.Fatal("the write of input stayed blocked after the command ended")
	}
	select {
	case <-finished:
	case <-time.After(drainMax + 2*time.Second):
		t.Fatal("finish did not return")
	}
}
