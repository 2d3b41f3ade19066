package vhostuser

import (
	"errors"
	"os"
	"testing"
	"time"
)

// TestRecvFDsBoundedWhileReceiving: a peer sends one message in pieces,
// each with MaxFDs descriptors (a stream socket hands over each piece's
// descriptors on its own read). Recv refuses the message as soon as more
// than MaxFDs have arrived and closes them, instead of holding 8 per byte
// of payload until the message is complete. (From review: the limit was
// checked only at the end, and krun-core's back-end request channel has
// no read deadline, so a compromised plugin could pin ~32k descriptors in
// the VMM.)
func TestRecvFDsBoundedWhileReceiving(t *testing.T) {
	a, b := pair(t)
	fds := make([]int, MaxFDs)
	for i := range fds {
		fds[i] = int(os.Stdin.Fd())
	}
	before := openFDs(t)
	done := make(chan error, 1)
	go func() { _, err := b.Recv(); done <- err }()
	rawSend(t, a, header(SetMemTable, Version, MaxPayloadSize), fds)
	for range 3 {
		rawSend(t, a, []byte{0}, fds)
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrTooManyFDs) {
			t.Fatalf("Recv: %v, want ErrTooManyFDs", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("Recv still waiting for the payload, holding %d descriptors", openFDs(t)-before)
	}
	if held := openFDs(t) - before; held > 0 {
		t.Errorf("%d received descriptors left open after the refusal", held)
	}
}
