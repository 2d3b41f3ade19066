package vmm

import (
	"context"
	"io"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/krun-core/krun-core/core/serial"
)

// The serial console's input pump ends with the run. It waited in read(2)
// on the caller's input (stdin), so after a VM ended it took the next
// bytes typed for the machine that was gone, raced the next VM's pump for
// input, and read a descriptor the caller may have closed since (from
// review, helper-97; fixed: a descriptor is read only when poll(2) says
// it has data, the pump waits on an eventfd the run's end signals, and
// Start waits for it).
func TestConsoleInputPumpEndsWithTheRun(t *testing.T) {
	r, w := inputPipe(t)
	m := consoleMachine()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.pumpInput(ctx, r)
	}()
	if _, err := w.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	// The guest gets it: the line status says data ready, RBR holds it.
	deadline := time.Now().Add(5 * time.Second)
	for m.uart.Read(5)&1 == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the input never reached the UART")
		}
		time.Sleep(time.Millisecond)
	}
	if got := m.uart.Read(0); got != 'a' {
		t.Fatalf("the guest read %q, want 'a'", got)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the console input pump still runs after its run ended (blocked reading the caller's input)")
	}
	// What the caller writes now is the caller's: still in the pipe.
	if _, err := w.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	if n, err := r.Read(b); n != 1 || b[0] != 'b' {
		t.Fatalf("the caller read %q, %v after the run; want the 'b' it wrote", b[:n], err)
	}
}

// consoleMachine is a machine with only its serial console, for the
// console input's pump.
func consoleMachine() *machine {
	return &machine{uart: serial.New(io.Discard, nil), log: hclog.NewNullLogger()}
}

// inputPipe is a pipe closed at the test's end: the caller's input.
func inputPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}
