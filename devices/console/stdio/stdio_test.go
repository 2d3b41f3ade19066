package stdio

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
	"github.com/krun-core/krun-core/internal/syncbuf"
)

// port joins two pipes: what the guest writes, the bridge reads; what the
// bridge writes, the guest reads.
type port struct {
	io.Reader
	io.Writer
}

type rig struct {
	guestW         *stdioframe.Writer // the guest's frames to the host
	guestR         *stdioframe.Reader // frames the host sent to the guest
	toHost         *io.PipeWriter
	bridge         *Bridge
	stdout, stderr syncbuf.Buffer
	done           chan error
}

func newRig(t *testing.T, stdin io.Reader, control io.Reader) *rig {
	t.Helper()
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	r := &rig{guestW: stdioframe.NewWriter(g2hW), guestR: stdioframe.NewReader(h2gR, stdioframe.HostToGuest), toHost: g2hW, done: make(chan error, 1)}
	r.bridge = New(Config{Port: port{g2hR, h2gW}, Stdin: stdin, Stdout: &r.stdout, Stderr: &r.stderr, Control: control})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { r.done <- r.bridge.Run(ctx) }()
	t.Cleanup(func() { cancel(); g2hW.Close(); h2gR.Close() })
	return r
}

// next reads the next frame the host sent, with a time limit.
func (r *rig) next(t *testing.T) stdioframe.Frame {
	t.Helper()
	type res struct {
		f   stdioframe.Frame
		err error
	}
	c := make(chan res, 1)
	go func() {
		f, err := r.guestR.Next()
		c <- res{stdioframe.Frame{Type: f.Type, Payload: append([]byte(nil), f.Payload...)}, err}
	}()
	select {
	case x := <-c:
		if x.err != nil {
			t.Fatalf("reading host frames: %v", x.err)
		}
		return x.f
	case <-time.After(5 * time.Second):
		t.Fatal("no frame from the host")
	}
	return stdioframe.Frame{}
}

func TestOutputAndClose(t *testing.T) {
	r := newRig(t, strings.NewReader(""), nil)
	if f := r.next(t); f.Type != stdioframe.StdinEOF {
		t.Fatalf("first host frame %v, want STDIN_EOF for an empty stdin", f.Type)
	}
	r.guestW.WriteData(stdioframe.Stdout, []byte("out\n"))
	r.guestW.WriteData(stdioframe.Stderr, []byte("err\n"))
	big := bytes.Repeat([]byte("0123456789abcdef"), 20000) // several frames
	r.guestW.WriteData(stdioframe.Stdout, big)
	r.guestW.WriteExit(7)
	r.guestW.WriteFrame(stdioframe.CloseReq, nil)
	if f := r.next(t); f.Type != stdioframe.CloseAck {
		t.Fatalf("host answered CLOSE_REQ with %v", f.Type)
	}
	// Everything before CLOSE_REQ is written by the time of the ack.
	if got := r.stdout.String(); got != "out\n"+string(big) {
		t.Errorf("stdout: %d bytes, want %d", len(got), 4+len(big))
	}
	if got := r.stderr.String(); got != "err\n" {
		t.Errorf("stderr %q", got)
	}
	if st, ok := r.bridge.Exit(); !ok || st != 7 {
		t.Errorf("exit %d, %v", st, ok)
	}
	r.toHost.Close()
	if err := <-r.done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestStdinAndControl(t *testing.T) {
	ctlR, ctlW := io.Pipe()
	stdinR, stdinW := io.Pipe()
	r := newRig(t, stdinR, ctlR)
	stdinW.Write([]byte("a\nb\n"))
	if f := r.next(t); f.Type != stdioframe.Stdin || string(f.Payload) != "a\nb\n" {
		t.Fatalf("stdin frame %v %q", f.Type, f.Payload)
	}
	ctlW.Write(devopts.WinsizeRecord(40, 120))
	if f := r.next(t); f.Type != stdioframe.Winsize {
		t.Fatalf("frame %v, want WINSIZE", f.Type)
	} else if rows, cols := f.Winsize(); rows != 40 || cols != 120 {
		t.Errorf("winsize %dx%d", rows, cols)
	}
	ctlW.Write(devopts.SignalRecord(15))
	if f := r.next(t); f.Type != stdioframe.Signal || f.Signal() != 15 {
		t.Fatalf("frame %v, want SIGNAL 15", f.Type)
	}
	ctlW.Write(devopts.SignalAllRecord(9))
	if f := r.next(t); f.Type != stdioframe.SignalAll || f.Signal() != 9 {
		t.Fatalf("frame %v, want SIGNAL_ALL 9", f.Type)
	}
	ctlW.Write(devopts.SignalRecord(0))    // refused by the encoder: logged, no frame
	ctlW.Write(devopts.SignalAllRecord(0)) // the same
	ctlW.Write([]byte{9, 0, 0, 0, 0, 0, 0, 0})
	stdinW.Close()
	if f := r.next(t); f.Type != stdioframe.StdinEOF {
		t.Fatalf("frame %v, want STDIN_EOF", f.Type)
	}
}

// A guest that breaks the protocol has the rest of its output discarded,
// and is still drained (it never blocks).
func TestProtocolViolation(t *testing.T) {
	r := newRig(t, nil, nil)
	r.next(t) // STDIN_EOF
	r.guestW.WriteData(stdioframe.Stdout, []byte("before "))
	r.toHost.Write([]byte{99, 1, 0, 0, 0, 'x'}) // unknown type
	done := make(chan struct{})
	go func() {
		r.guestW.WriteData(stdioframe.Stdout, bytes.Repeat([]byte("x"), 1<<20))
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the guest blocked after a protocol violation")
	}
	if got := r.stdout.String(); got != "before " {
		t.Errorf("stdout %q: nothing after the violation may be written", got)
	}
}

// A failing stdout drops output but keeps draining the guest.
func TestStdoutError(t *testing.T) {
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	go io.Copy(io.Discard, h2gR)
	b := New(Config{Port: port{g2hR, h2gW}, Stdout: failWriter{}, Stderr: io.Discard})
	go b.Run(context.Background())
	w := stdioframe.NewWriter(g2hW)
	for i := 0; i < 100; i++ {
		if err := w.WriteData(stdioframe.Stdout, make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	if b.stdoutOK.Load() {
		t.Error("stdout still marked ok after a write error")
	}
	g2hW.Close()
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }
