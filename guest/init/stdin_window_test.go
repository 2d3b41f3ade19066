package main

import (
	"bytes"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// stuckSink is a command that does not read its input until released;
// the rest it records as recSink does.
type stuckSink struct {
	*recSink
	release chan struct{}
	relOnce sync.Once
	mu      sync.Mutex
	got     bytes.Buffer
}

// let lets the command read (again: a no-op).
func (k *stuckSink) let() { k.relOnce.Do(func() { close(k.release) }) }

func (k *stuckSink) stdin(p []byte) error {
	<-k.release
	k.mu.Lock()
	k.got.Write(p)
	k.mu.Unlock()
	return nil
}

// TestSignalNotBehindUnreadInput: the command's input and the host's
// signals share the port. krun-init wrote each STDIN frame to the command
// before reading the next frame, so a command that does not read its
// input (`krun-core run -- sleep 1000 < /dev/zero`) kept every SIGNAL
// behind it: ^C and SIGTERM never arrived, only the third signal stopped
// the VM (from review, helper-117). Input is now queued, within the
// window the host keeps to (STDIN_ACK), and the signal arrives at once;
// the input reaches the command in order once it reads, each piece
// acknowledged, then the end of input.
func TestSignalNotBehindUnreadInput(t *testing.T) {
	s, h2gR, h2gW, g2hR, g2hW := newPipeStdio(t)
	k := &stuckSink{recSink: newRecSink(), release: make(chan struct{})}
	s.setSink(k)
	done := make(chan struct{})
	go func() { s.readLoop(); close(done) }()
	// Closing the read end ends readLoop (it rides over an end of file:
	// a port without its host reads so). The sink is released first: a
	// readLoop that writes input itself (as before STDIN_ACK) is stuck in
	// it, and the test would hang to go test's timeout instead of failing.
	defer func() { k.let(); h2gR.Close(); <-done; h2gW.Close(); g2hW.Close() }()

	// The host: the whole window of input, then a SIGTERM, then the end.
	input := bytes.Repeat([]byte("0123456789abcdef"), stdioframe.StdinWindow/16)
	hw := stdioframe.NewWriter(h2gW)
	go func() {
		hw.WriteData(stdioframe.Stdin, input)
		hw.WriteSignal(15)
		hw.WriteFrame(stdioframe.StdinEOF, nil)
	}()
	select {
	case sig := <-k.signals:
		if sig != 15 {
			t.Fatalf("signal %d, want 15", sig)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the SIGTERM waited behind input the command does not read")
	}

	// The command reads: all of it, in order, acknowledged, then EOF.
	k.let()
	acked := 0
	r := stdioframe.NewReader(g2hR, stdioframe.GuestToHost)
	for acked < len(input) {
		f, err := r.Next()
		if err != nil {
			t.Fatalf("reading the acknowledgements: %v (%d of %d acknowledged)", err, acked, len(input))
		}
		if f.Type == stdioframe.StdinAck {
			acked += int(f.StdinAcked())
		}
	}
	select {
	case <-k.eof:
	case <-time.After(10 * time.Second):
		t.Fatal("no end of input after the queued input")
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if !bytes.Equal(k.got.Bytes(), input) {
		t.Fatalf("the command got %d bytes, not the %d sent in order", k.got.Len(), len(input))
	}
}

// TestStdinQueueCoalesces: the host sends what each read of krun-core's
// stdin returned, so a writer of small pieces (one byte a write, into a
// pipe) fills the window with frames of a byte each while the command
// does not read. Each was queued as a slice of its own: some 32 bytes of
// heap (slice header, smallest allocation) a byte of input, 8 MiB or so
// for the 256 KiB window, and a write and a STDIN_ACK a byte once the
// command reads. Small pieces now join the piece queued before them.
func TestStdinQueueCoalesces(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	s := &stdio{log: &logger{out: devNull}}
	var want []byte
	for i := 0; i < stdioframe.StdinWindow; i++ {
		b := []byte{byte(i)}
		want = append(want, b...)
		s.queueStdin(stdioframe.Frame{Type: stdioframe.Stdin, Payload: b})
	}
	if s.inOverrun {
		t.Fatal("a window of one-byte frames overran the window")
	}
	if max := 2 * stdioframe.StdinWindow / stdioframe.MaxPayload; len(s.inQ) > max {
		t.Fatalf("%d pieces queued for %d bytes of input, want at most %d", len(s.inQ), stdioframe.StdinWindow, max)
	}
	got := bytes.Join(s.inQ, nil)
	if !bytes.Equal(got, want) || s.inQueued != len(want) {
		t.Fatalf("queued %d bytes (count %d), not the %d sent in order", len(got), s.inQueued, len(want))
	}
}

// newPipeStdio is krun-init's stdio on two pipes instead of its port: the
// test writes the host's frames to h2gW and reads the guest's from g2hR;
// closing h2gR ends readLoop. Everything is closed at the test's end.
func newPipeStdio(t *testing.T) (s *stdio, h2gR, h2gW, g2hR, g2hW *os.File) {
	t.Helper()
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	h2gR, h2gW, err = os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	g2hR, g2hW, err = os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, f := range []*os.File{devNull, h2gR, h2gW, g2hR, g2hW} {
			f.Close()
		}
	})
	s = &stdio{log: &logger{out: devNull}, f: h2gR, w: stdioframe.NewWriter(g2hW), started: make(chan struct{}),
		ack: make(chan struct{}), startReq: make(chan struct{}), held: heldSignals{execd: true}}
	return s, h2gR, h2gW, g2hR, g2hW
}
