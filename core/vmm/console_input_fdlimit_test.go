package vmm

import (
	"context"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPumpWithoutEventfdEndsWithTheRun: Start waits for the console input
// pump whenever the reader is a syscall.Conn (an *os.File), on the
// promise that such a pump "ends with the run at once" (it waits in
// poll). But pumpFD falls back to pumpReader, a plain blocking Read, when
// it cannot make its eventfd (EMFILE at the descriptor limit): that pump
// does not end with ctx, so Start would wait, after the VM ended, until
// the user types something (and then take that input for a dead VM).
//
// From review, helper-105; fixed: without an eventfd console input is off,
// with a warning (the pump returns at once).
func TestPumpWithoutEventfdEndsWithTheRun(t *testing.T) {
	r, w := inputPipe(t)
	m := consoleMachine()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The process is at its descriptor limit: the next descriptor
	// (the pump's eventfd) cannot be made.
	free, err := unix.Dup(0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(free)
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = uint64(free)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.pumpInput(ctx, r)
	}()
	time.Sleep(200 * time.Millisecond) // the pump is set up (or failed to)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	cancel() // the run ends; Start now waits for the pump
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		w.Write([]byte("x")) // let it go
		<-done
		t.Fatal("the console input pump of an *os.File did not end with the run (eventfd failed: it fell back to a blocking Read); Start, which waits for it, would hang until the user typed")
	}
}
