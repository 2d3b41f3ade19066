package main

import (
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestOutputWithinHostCredit: the command's output goes within the host's
// credit (OUTPUT_ACK): krun-init sends OutputWindow bytes, then waits, so
// a slow reader on the host stalls the command (its pipe fills), never
// the port; an acknowledgement lets the rest go. Once the port is no
// longer read, a waiting writer gives up instead of hanging.
func TestOutputWithinHostCredit(t *testing.T) {
	s, h2gR, h2gW, g2hR, _ := newPipeStdio(t)
	done := make(chan struct{})
	go func() { s.readLoop(); close(done) }()

	// The host: reads every frame, counting the output bytes.
	got := make(chan int, 100)
	go func() {
		r := stdioframe.NewReader(g2hR, stdioframe.GuestToHost)
		for {
			f, err := r.Next()
			if err != nil {
				return
			}
			if f.Type == stdioframe.Stdout || f.Type == stdioframe.Stderr {
				got <- len(f.Payload)
			}
		}
	}()
	total := 2*stdioframe.OutputWindow + 1000
	wrote := make(chan struct{})
	go func() {
		s.writeStdout(make([]byte, total-1000))
		s.writeStderr(make([]byte, 1000))
		close(wrote)
	}()
	sent := 0
	count := func(until time.Duration) {
		deadline := time.After(until)
		for {
			select {
			case n := <-got:
				sent += n
			case <-deadline:
				return
			}
		}
	}
	count(300 * time.Millisecond)
	if sent != stdioframe.OutputWindow {
		t.Fatalf("%d bytes sent without an acknowledgement, want the window, %d", sent, stdioframe.OutputWindow)
	}
	w := stdioframe.NewWriter(h2gW)
	if err := w.WriteOutputAck(stdioframe.OutputWindow); err != nil {
		t.Fatal(err)
	}
	count(300 * time.Millisecond)
	if sent != 2*stdioframe.OutputWindow {
		t.Fatalf("%d bytes sent after one window's acknowledgement, want %d", sent, 2*stdioframe.OutputWindow)
	}
	select {
	case <-wrote:
		t.Fatal("the writer returned with output unsent and no credit")
	default:
	}
	// The port is no longer read: the waiting writer gives up.
	h2gR.Close()
	select {
	case <-wrote:
	case <-time.After(5 * time.Second):
		t.Fatal("the writer still waits for credit after the port ended")
	}
	<-done
}
