package serial

import (
	"testing"
	"time"
)

// blockingWriter blocks every Write until release is closed.
type blockingWriter struct {
	entered chan struct{}
	release chan struct{}
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	select {
	case w.entered <- struct{}{}:
	default:
	}
	<-w.release
	return len(p), nil
}

// A transmitted byte whose write blocks (a console whose reader stopped
// reading: a paused pager, a terminal after ^S) holds only the vCPU that
// transmits it. It held the UART's lock: every other vCPU's access to the
// UART, the host's input pump and OutputError waited with it, so the
// VMM's Start could not return after the guest ended (from review,
// helper-105).
func TestBlockedOutputHoldsOnlyTheTransmitter(t *testing.T) {
	w := &blockingWriter{entered: make(chan struct{}, 1), release: make(chan struct{})}
	defer close(w.release)
	u := New(w, nil)
	go u.Write(regData, 'x')
	select {
	case <-w.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the byte never reached the output")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		u.Read(regLSR)
		u.Write(regSCR, 7)
		u.Receive([]byte("input"))
		if err := u.OutputError(); err != nil {
			t.Errorf("OutputError: %v", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the UART's registers, its input and OutputError wait for a blocked output write")
	}
}
