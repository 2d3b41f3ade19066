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
	unacked        int // output sent and not acknowledged (writeOut)
}

func newRig(t *testing.T, stdin io.Reader, control io.Reader) *rig {
	t.Helper()
	return newRigOut(t, stdin, control, nil)
}

// newRigOut is newRig with the command's stdout going to stdout (nil:
// the rig's buffer).
func newRigOut(t *testing.T, stdin io.Reader, control io.Reader, stdout io.Writer) *rig {
	t.Helper()
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	r := &rig{guestW: stdioframe.NewWriter(g2hW), guestR: stdioframe.NewReader(h2gR, stdioframe.HostToGuest), toHost: g2hW, done: make(chan error, 1)}
	if stdout == nil {
		stdout = &r.stdout
	}
	r.bridge = New(Config{Port: port{g2hR, h2gW}, Stdin: stdin, Stdout: stdout, Stderr: &r.stderr, Control: control})
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

// writeOut sends output as krun-init does: within the host's credit,
// reading OUTPUT_ACKs (and nothing else) when it runs out.
func (r *rig) writeOut(t *testing.T, typ stdioframe.Type, p []byte) {
	t.Helper()
	for len(p) > 0 {
		for r.unacked == stdioframe.OutputWindow {
			f := r.next(t)
			if f.Type != stdioframe.OutputAck {
				t.Fatalf("host frame %v while waiting for OUTPUT_ACK", f.Type)
			}
			r.unacked -= int(f.StdinAcked())
		}
		n := min(len(p), stdioframe.OutputWindow-r.unacked, stdioframe.MaxPayload)
		werr := make(chan error, 1)
		go func() { werr <- r.guestW.WriteData(typ, p[:n]) }()
		select {
		case err := <-werr:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the host stopped reading the port")
		}
		r.unacked += n
		p = p[n:]
	}
}

// untilCloseAck reads host frames up to CLOSE_ACK, taking OUTPUT_ACKs.
func (r *rig) untilCloseAck(t *testing.T) {
	t.Helper()
	for {
		switch f := r.next(t); f.Type {
		case stdioframe.CloseAck:
			return
		case stdioframe.OutputAck:
			r.unacked -= int(f.StdinAcked())
		default:
			t.Fatalf("host frame %v while waiting for CLOSE_ACK", f.Type)
		}
	}
}

func TestOutputAndClose(t *testing.T) {
	r := newRig(t, strings.NewReader(""), nil)
	if f := r.next(t); f.Type != stdioframe.StdinEOF {
		t.Fatalf("first host frame %v, want STDIN_EOF for an empty stdin", f.Type)
	}
	r.writeOut(t, stdioframe.Stdout, []byte("out\n"))
	r.writeOut(t, stdioframe.Stderr, []byte("err\n"))
	big := bytes.Repeat([]byte("0123456789abcdef"), 40000) // more than the window
	r.writeOut(t, stdioframe.Stdout, big)
	r.guestW.WriteExit(7)
	r.guestW.WriteFrame(stdioframe.CloseReq, nil)
	r.untilCloseAck(t)
	if r.unacked != 0 {
		t.Errorf("%d bytes unacknowledged at CLOSE_ACK", r.unacked)
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
	waitFor(t, func() bool { return r.stdout.String() != "" })
	time.Sleep(50 * time.Millisecond)
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
	waitFor(t, func() bool { return !b.stdoutOK.Load() })
	g2hW.Close()
}

// waitFor waits up to 5 s for cond (the bridge writes output on a
// goroutine of its own).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }
