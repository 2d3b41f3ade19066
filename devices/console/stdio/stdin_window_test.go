package stdio

import (
	"bytes"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// TestStdinWithinCredit: the host sends the command's input within the
// guest's credit: StdinWindow bytes, then nothing until STDIN_ACK, then as
// much as acknowledged; the end of input only after all of it. Before,
// input went out as fast as the port took it, and krun-init, writing it
// to a command that does not read it, stopped reading the port, with the
// host's signals behind (from review, helper-117).
func TestStdinWithinCredit(t *testing.T) {
	total := stdioframe.StdinWindow + 100<<10
	input := bytes.Repeat([]byte{'x'}, total)
	r := newRig(t, bytes.NewReader(input), nil)
	got := 0
	for got < stdioframe.StdinWindow {
		f := r.next(t)
		if f.Type != stdioframe.Stdin {
			t.Fatalf("frame %v after %d bytes, want STDIN", f.Type, got)
		}
		got += len(f.Payload)
	}
	if got != stdioframe.StdinWindow {
		t.Fatalf("the host sent %d bytes without an acknowledgement, want the window, %d", got, stdioframe.StdinWindow)
	}
	// Nothing more until the guest acknowledges.
	more := make(chan stdioframe.Frame, 1)
	go func() {
		f, err := r.guestR.Next()
		if err == nil {
			more <- stdioframe.Frame{Type: f.Type, Payload: append([]byte(nil), f.Payload...)}
		}
	}()
	select {
	case f := <-more:
		t.Fatalf("the host sent %v (%d bytes) past its credit", f.Type, len(f.Payload))
	case <-time.After(300 * time.Millisecond):
	}
	r.guestW.WriteStdinAck(stdioframe.StdinWindow)
	rest := 0
	for first := true; ; first = false {
		var f stdioframe.Frame
		if first {
			// The read already under way gets the next frame.
			select {
			case f = <-more:
			case <-time.After(5 * time.Second):
				t.Fatal("nothing more from the host after the acknowledgement")
			}
		} else {
			f = r.next(t)
		}
		if f.Type == stdioframe.StdinEOF {
			break
		}
		if f.Type != stdioframe.Stdin {
			t.Fatalf("frame %v, want STDIN or STDIN_EOF", f.Type)
		}
		rest += len(f.Payload)
	}
	if got+rest != total {
		t.Fatalf("the host sent %d bytes in all, want %d", got+rest, total)
	}
}
