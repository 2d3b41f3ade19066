package main

import (
	"os"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// nopSink takes the command's frames and drops them; signals are
// counted.
type nopSink struct{ signals chan int }

func (nopSink) stdin([]byte) error     { return nil }
func (nopSink) stdinEOF()              {}
func (nopSink) winsize(uint16, uint16) {}
func (k nopSink) signal(sig int)       { k.signals <- sig }

// TestSignalAll: a SIGNAL_ALL frame goes to every process (kill -1), not
// to the command alone, and only once the command runs: before, it is
// dropped like a SIGNAL.
func TestSignalAll(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	killed := make(chan int, 4)
	s := &stdio{log: &logger{out: devNull}, f: r, started: make(chan struct{}), ack: make(chan struct{}),
		startReq: make(chan struct{}), killAll: func(sig int) error { killed <- sig; return nil }}
	done := make(chan struct{})
	go func() { s.readLoop(); close(done) }()
	defer func() { r.Close(); w.Close(); <-done }()

	hw := stdioframe.NewWriter(w)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(hw.WriteSignalAll(15)) // before the command: dropped
	k := nopSink{signals: make(chan int, 4)}
	// The frame above is read before the sink is set: a CLOSE_ACK
	// behind it says when.
	must(hw.WriteFrame(stdioframe.CloseAck, nil))
	select {
	case <-s.ack:
	case <-time.After(5 * time.Second):
		t.Fatal("the frames were not read")
	}
	s.setSink(k)
	must(hw.WriteSignalAll(9))
	must(hw.WriteSignal(2))
	select {
	case sig := <-k.signals:
		if sig != 2 {
			t.Errorf("the command got signal %d, want 2", sig)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SIGNAL not delivered")
	}
	close(killed)
	var got []int
	for sig := range killed {
		got = append(got, sig)
	}
	if len(got) != 1 || got[0] != 9 {
		t.Errorf("signals to every process: %v, want [9] (none before the command started)", got)
	}
}
