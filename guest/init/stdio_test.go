package main

import (
	"os"
	"slices"
	"testing"
	"time"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// recSink records what the host sends for the command: signals, window
// sizes and STDIN_EOF (it closes eof); input is dropped.
type recSink struct {
	signals chan int
	ws      chan [2]uint16
	eof     chan struct{}
}

func newRecSink() *recSink {
	return &recSink{signals: make(chan int, 4), ws: make(chan [2]uint16, 2), eof: make(chan struct{})}
}

func (k *recSink) stdin([]byte) error        { return nil }
func (k *recSink) stdinEOF()                 { close(k.eof) }
func (k *recSink) winsize(rows, cols uint16) { k.ws <- [2]uint16{rows, cols} }
func (k *recSink) signal(sig int)            { k.signals <- sig }

// TestSignalAll: a SIGNAL_ALL frame goes to every process (kill -1), not
// to the command alone. One that comes before the command runs (krun-oci
// sends it only after START: `start` then `kill --all ID KILL`) goes to
// the processes there are and is kept for the command, as a SIGNAL is
// (TestSignalBeforeStart); it was dropped, and the command ran on.
func TestSignalAll(t *testing.T) {
	s, r, w, _, _ := newPipeStdio(t)
	s.held = heldSignals{} // the command has not been exec'd
	killed := make(chan int, 4)
	s.killAll = func(sig int) error { killed <- sig; return nil }
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
	must(hw.WriteSignalAll(15)) // before the command: kept for it too
	k := newRecSink()
	// The frame above is read before the sink is set: a CLOSE_ACK
	// behind it says when.
	must(hw.WriteFrame(stdioframe.CloseAck, nil))
	select {
	case <-s.ack:
	case <-time.After(5 * time.Second):
		t.Fatal("the frames were not read")
	}
	s.setSink(k)
	kept := s.keptSignals() // the exec
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
	if !slices.Equal(got, []int{15, 9}) {
		t.Errorf("signals to every process: %v, want [15 9]", got)
	}
	if !slices.Equal(kept, []int{15}) {
		t.Errorf("signals kept for the command: %v, want [15] (the SIGNAL_ALL before it started)", kept)
	}
}

// TestWinsizeAroundStart: a window size that arrives as the command starts
// is applied, whichever side of the start it lands on. readLoop kept it
// after setSink had taken the kept one and before setSink closed started,
// and it was lost (about 1 in 10 000 starts; from review, helper-77).
func TestWinsizeAroundStart(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	const n = 20000
	lost := 0
	for i := range n {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		s := &stdio{log: &logger{out: devNull}, f: r, started: make(chan struct{}), ack: make(chan struct{}), startReq: make(chan struct{})}
		go s.readLoop() // ends once r is closed below
		fw := stdioframe.NewWriter(w)
		fw.WriteWinsize(40, 120)
		fw.WriteFrame(stdioframe.StdinEOF, nil)
		k := newRecSink()
		for range i % 200 { // vary where the start lands
		}
		s.setSink(k)
		select {
		case <-k.eof: // every frame before it was handled
		case <-time.After(5 * time.Second):
			t.Fatal("no STDIN_EOF")
		}
		if len(k.ws) == 0 {
			lost++
		}
		w.Close()
		r.Close()
	}
	if lost > 0 {
		t.Errorf("the window size was lost in %d of %d starts", lost, n)
	}
}

// TestSignalBeforeStart: a SIGNAL that comes before the command has
// started (krun-core forwards a SIGTERM or ^C while the guest boots) is
// kept for the command, each signal once, and not handed to the sink
// (which would signal the launcher, not yet the command). It was dropped,
// and the command then ran as if krun-core had never been signalled.
func TestSignalBeforeStart(t *testing.T) {
	s, r, w, _, _ := newPipeStdio(t)
	s.held = heldSignals{} // the command has not been exec'd
	done := make(chan struct{})
	go func() { s.readLoop(); close(done) }()
	defer func() { r.Close(); w.Close(); <-done }()
	hw := stdioframe.NewWriter(w)
	for _, sig := range []uint8{15, 2, 15, 64} {
		if err := hw.WriteSignal(sig); err != nil {
			t.Fatal(err)
		}
	}
	hw.WriteFrame(stdioframe.CloseAck, nil)
	select {
	case <-s.ack:
	case <-time.After(5 * time.Second):
		t.Fatal("the frames were not read")
	}
	k := newRecSink()
	s.setSink(k)
	// After setSink, before the exec: the process is the launcher, which
	// the signal would kill (SIGQUIT: Go's goroutine dump on the
	// command's stderr); kept too.
	hw.WriteSignal(1)
	hw.WriteFrame(stdioframe.StdinEOF, nil)
	select {
	case <-k.eof: // the SIGNAL before it was handled
	case <-time.After(5 * time.Second):
		t.Fatal("the frames after the start were not read")
	}
	select {
	case sig := <-k.signals:
		t.Fatalf("the sink (the launcher, before the exec) got signal %d", sig)
	default:
	}
	if got, want := s.keptSignals(), []int{1, 2, 15, 64}; !slices.Equal(got, want) {
		t.Errorf("kept signals %v, want %v", got, want)
	}
	hw.WriteSignal(3) // after the exec: to the sink
	select {
	case sig := <-k.signals:
		if sig != 3 {
			t.Errorf("the sink got signal %d, want 3", sig)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SIGNAL after the exec not delivered")
	}
	if got := s.keptSignals(); len(got) != 0 {
		t.Errorf("kept signals a second time: %v", got)
	}
}
