package stdio

import (
	"bytes"
	"io"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// execFiles are an exec's four files: the test keeps the other ends.
type execFiles struct {
	stdinW, stdoutR, stderrR, statusR *os.File
	send                              []*os.File
}

func newExecFiles(t *testing.T) *execFiles {
	t.Helper()
	var e execFiles
	pipe := func() (*os.File, *os.File) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(); w.Close() })
		return r, w
	}
	inR, inW := pipe()
	outR, outW := pipe()
	errR, errW := pipe()
	stR, stW := pipe()
	e.stdinW, e.stdoutR, e.stderrR, e.statusR = inW, outR, errR, stR
	e.send = []*os.File{inR, outW, errW, stW}
	return &e
}

// controlPair is the core's SOCK_SEQPACKET control channel.
func controlPair(t *testing.T) (plugin, core *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	plugin, core = os.NewFile(uintptr(fds[0]), "control"), os.NewFile(uintptr(fds[1]), "core")
	t.Cleanup(func() { plugin.Close(); core.Close() })
	return plugin, core
}

func sendRecord(t *testing.T, core *os.File, rec []byte, files []*os.File) {
	t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(int(core.Fd()), rec, oob, nil, 0); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		f.Close()
	}
}

func readAllTimeout(t *testing.T, f *os.File) []byte {
	t.Helper()
	c := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(f); c <- b }()
	select {
	case b := <-c:
		return b
	case <-time.After(5 * time.Second):
		t.Fatalf("%s did not reach its end", f.Name())
	}
	return nil
}

// TestExecSession: an exec record becomes an EXEC frame; the program's
// output is written to its own files and acknowledged; its stdin is sent
// within the guest's credit; EXEC_EXIT writes the status and closes the
// files. START and exec signals are forwarded.
func TestExecSession(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	if f := r.next(t); f.Type != stdioframe.StdinEOF {
		t.Fatalf("first frame %v", f.Type)
	}
	sendRecord(t, core, devopts.StartRecord(), nil)
	if f := r.next(t); f.Type != stdioframe.Start {
		t.Fatalf("frame %v, want START", f.Type)
	}
	e := newExecFiles(t)
	rec, err := devopts.ExecRecord(5, []byte(`{"args":["sh"]}`))
	if err != nil {
		t.Fatal(err)
	}
	sendRecord(t, core, rec, e.send)
	f := r.next(t)
	if f.Type != stdioframe.Exec || f.ExecID() != 5 || string(f.ExecData()) != `{"args":["sh"]}` {
		t.Fatalf("frame %v id %d %q, want EXEC 5", f.Type, f.ExecID(), f.ExecData())
	}
	e.stdinW.Write([]byte("typed"))
	if f := r.next(t); f.Type != stdioframe.ExecStdin || string(f.ExecData()) != "typed" {
		t.Fatalf("frame %v %q, want EXEC_STDIN typed", f.Type, f.ExecData())
	}
	e.stdinW.Close()
	if f := r.next(t); f.Type != stdioframe.ExecStdinEOF || f.ExecID() != 5 {
		t.Fatalf("frame %v, want EXEC_STDIN_EOF", f.Type)
	}
	sendRecord(t, core, devopts.ExecSignalRecord(5, 15), nil)
	if f := r.next(t); f.Type != stdioframe.ExecSignal || f.ExecByte() != 15 {
		t.Fatalf("frame %v, want EXEC_SIGNAL 15", f.Type)
	}
	sendRecord(t, core, devopts.ExecWinsizeRecord(5, 30, 100), nil)
	if f := r.next(t); f.Type != stdioframe.ExecWinsize {
		t.Fatalf("frame %v, want EXEC_WINSIZE", f.Type)
	} else if rows, cols := f.ExecWinsize(); rows != 30 || cols != 100 {
		t.Errorf("winsize %dx%d", rows, cols)
	}
	r.guestW.WriteExec(stdioframe.ExecStdout, 5, []byte("out"))
	r.guestW.WriteExec(stdioframe.ExecStderr, 5, []byte("err"))
	for i := 0; i < 2; i++ {
		if f := r.next(t); f.Type != stdioframe.ExecOutputAck || f.Ack() != 3 {
			t.Fatalf("frame %v ack %d, want EXEC_OUTPUT_ACK 3", f.Type, f.Ack())
		}
	}
	r.guestW.WriteExec(stdioframe.ExecExit, 5, []byte{42})
	if b := readAllTimeout(t, e.statusR); !bytes.Equal(b, []byte{42}) {
		t.Errorf("status %v, want [42]", b)
	}
	if b := readAllTimeout(t, e.stdoutR); string(b) != "out" {
		t.Errorf("stdout %q", b)
	}
	if b := readAllTimeout(t, e.stderrR); string(b) != "err" {
		t.Errorf("stderr %q", b)
	}
	// Frames for an ended exec are dropped; the main stream goes on.
	r.guestW.WriteExec(stdioframe.ExecStdout, 5, []byte("late"))
	r.guestW.WriteData(stdioframe.Stdout, []byte("main"))
	deadline := time.Now().Add(5 * time.Second)
	for r.stdout.String() != "main" && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.stdout.String(); got != "main" {
		t.Errorf("main stdout %q", got)
	}
}

// TestExecWindowOverrun: a guest that sends more than the window of one
// exec loses that exec (its status pipe closes without a status); the
// port keeps going.
func TestExecWindowOverrun(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	e := newExecFiles(t)
	rec, _ := devopts.ExecRecord(9, []byte(`{}`))
	sendRecord(t, core, rec, e.send)
	r.next(t) // EXEC
	// Nobody reads the exec's stdout: the bridge's queue fills. Send far
	// more than a window without waiting for acknowledgements.
	done := make(chan struct{})
	go func() {
		defer close(done)
		chunk := make([]byte, stdioframe.MaxExecData)
		for i := 0; i < 3*stdioframe.ExecWindow/len(chunk)+2; i++ {
			r.guestW.WriteExec(stdioframe.ExecStdout, 9, chunk)
		}
	}()
	go func() {
		for {
			if _, err := r.guestR.Next(); err != nil {
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the guest blocked")
	}
	if b := readAllTimeout(t, e.statusR); len(b) != 0 {
		t.Errorf("status %v after an overrun, want none", b)
	}
}

// TestExecLimit: more than MaxExecs at once are refused with 125.
func TestExecLimit(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t)
	for i := 1; i <= MaxExecs; i++ {
		e := newExecFiles(t)
		rec, _ := devopts.ExecRecord(uint32(i), []byte(`{}`))
		sendRecord(t, core, rec, e.send)
		r.next(t)
	}
	e := newExecFiles(t)
	rec, _ := devopts.ExecRecord(100, []byte(`{}`))
	sendRecord(t, core, rec, e.send)
	if b := readAllTimeout(t, e.statusR); !bytes.Equal(b, []byte{execStatusRefused}) {
		t.Errorf("status %v, want [%d]", b, execStatusRefused)
	}
	if b := readAllTimeout(t, e.stderrR); !bytes.Contains(b, []byte("too many")) {
		t.Errorf("stderr %q", b)
	}
}

// TestHoldStdin: a container's input reaches the guest only after START.
func TestHoldStdin(t *testing.T) {
	plugin, core := controlPair(t)
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	t.Cleanup(func() { g2hW.Close(); h2gR.Close() })
	b := New(Config{Port: port{g2hR, h2gW}, Stdin: bytes.NewReader([]byte("early")), Stdout: io.Discard, Stderr: io.Discard,
		Control: plugin, HoldStdin: true})
	go b.Run(t.Context())
	frames := make(chan stdioframe.Type, 8)
	go func() {
		r := stdioframe.NewReader(h2gR, stdioframe.HostToGuest)
		for {
			f, err := r.Next()
			if err != nil {
				return
			}
			frames <- f.Type
		}
	}()
	select {
	case ft := <-frames:
		t.Fatalf("%v before START", ft)
	case <-time.After(200 * time.Millisecond):
	}
	sendRecord(t, core, devopts.StartRecord(), nil)
	for _, want := range []stdioframe.Type{stdioframe.Start, stdioframe.Stdin, stdioframe.StdinEOF} {
		select {
		case got := <-frames:
			if got != want {
				t.Fatalf("frame %v, want %v", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no %v", want)
		}
	}
}

// TestHoldStdinEndsWithThePort: a container whose port ends before START
// (the guest died while booting) leaves no stdin pump waiting for a START
// that cannot come: the pump ends, and stdin is never read.
func TestHoldStdinEndsWithThePort(t *testing.T) {
	// No control channel: START cannot come. (A control socket closed
	// by the test's cleanup raced with pumpControl's first Fd, which
	// the race detector reported.)
	g2hR, g2hW := io.Pipe()
	h2gR, h2gW := io.Pipe()
	t.Cleanup(func() { h2gR.Close() })
	go io.Copy(io.Discard, h2gR)
	stdin := &countingReader{}
	b := New(Config{Port: port{g2hR, h2gW}, Stdin: stdin, Stdout: io.Discard, Stderr: io.Discard, HoldStdin: true})
	done := make(chan struct{})
	go func() { b.pumpStdin(); close(done) }()
	go b.Run(t.Context())
	g2hW.Close() // the port ends
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the stdin pump still waits for START after the port ended")
	}
	if stdin.reads.Load() != 0 {
		t.Error("stdin was read without START")
	}
}

type countingReader struct{ reads atomic.Int32 }

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return 0, io.EOF
}
