package main

import (
	"encoding/binary"
	"os"
	"slices"
	"testing"

	"github.com/krun-core/krun-core/guest/stdioframe"
)

// sigIO is a commandIO that records the signals it gets.
type sigIO struct {
	*recSink
	sigs []int
}

func (s *sigIO) signal(sig int)            { s.sigs = append(s.sigs, sig) }
func (s *sigIO) childFiles() [3]*os.File   { return [3]*os.File{} }
func (s *sigIO) started(int)               {}
func (s *sigIO) finish()                   {}
func (s *sigIO) winsize(rows, cols uint16) {}

// TestExecSignalBeforeExec: an EXEC_SIGNAL that comes once an exec'd
// program's files are handed over but before its exec went to krun-init's
// launcher, which a SIGQUIT made print Go's goroutine dump on the
// program's stderr and others killed. It is kept until the exec, then
// sent to the program (each signal once, lowest first); later ones go at
// once (from review, helper-118; the main command had the same rule
// already).
func TestExecSignalBeforeExec(t *testing.T) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	in := &initProc{log: &logger{out: devNull}}
	m := &execManager{in: in, procs: map[uint32]*execProc{}}
	cio := &sigIO{recSink: newRecSink()}
	p := &execProc{m: m, id: 7, cio: cio} // handed over, not yet exec'd
	m.procs[7] = p
	sig := func(n byte) stdioframe.Frame {
		b := binary.LittleEndian.AppendUint32(nil, 7)
		return stdioframe.Frame{Type: stdioframe.ExecSignal, Payload: append(b, n)}
	}
	for _, n := range []byte{15, 3, 15} {
		m.frame(sig(n))
	}
	if len(cio.sigs) != 0 {
		t.Fatalf("signals %v reached the launcher before the exec", cio.sigs)
	}
	for _, n := range p.execStarted() {
		cio.signal(n)
	}
	if !slices.Equal(cio.sigs, []int{3, 15}) {
		t.Fatalf("after the exec the program got %v, want [3 15]", cio.sigs)
	}
	m.frame(sig(2))
	if !slices.Equal(cio.sigs, []int{3, 15, 2}) {
		t.Fatalf("a signal after the exec: the program got %v, want it at once", cio.sigs)
	}
}
