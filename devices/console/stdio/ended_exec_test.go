package stdio

import (
	"bytes"
	"io"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/krun-core/krun-core/devopts"
	"github.com/krun-core/krun-core/guest/stdioframe"
)

// blockingPipe is a pipe whose ends are blocking descriptors, as a caller's
// terminal or inherited pipe is when it reaches the plugin over SCM_RIGHTS
// (os.Pipe makes non-blocking ones, which Close can interrupt).
func blockingPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	r, w = os.NewFile(uintptr(p[0]), "stdin-r"), os.NewFile(uintptr(p[1]), "stdin-w")
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// TestEndedExecDoesNotForwardHostInput: once an exec has ended (EXEC_EXIT,
// status written, `krun-oci exec` returned to the user's shell), what is
// typed on the caller's stdin afterwards belongs to the host, not the
// guest: the bridge sends nothing read after the exec's end (krun-oci exec
// hands it a pipe of its own, too). Before the fix the next line the user
// typed went to the guest (from review).
func TestEndedExecDoesNotForwardHostInput(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	if f := r.next(t); f.Type != stdioframe.StdinEOF {
		t.Fatalf("first frame %v", f.Type)
	}
	inR, inW := blockingPipe(t)
	e := newExecFiles(t)
	e.send[0] = inR
	rec, _ := devopts.ExecRecord(7, []byte(`{"args":["true"]}`))
	sendRecord(t, core, rec, e.send)
	if f := r.next(t); f.Type != stdioframe.Exec {
		t.Fatalf("frame %v, want EXEC", f.Type)
	}
	// The stdin pump is now blocked in read(2) on the caller's stdin.
	time.Sleep(100 * time.Millisecond)
	r.guestW.WriteExec(stdioframe.ExecExit, 7, []byte{0})
	if b := readAllTimeout(t, e.statusR); !bytes.Equal(b, []byte{0}) {
		t.Fatalf("status %v, want [0]", b)
	}
	// exec has returned; the user types the next command / a password.
	inW.Write([]byte("sudo-password\n"))
	frames := make(chan stdioframe.Frame, 4)
	go func() {
		for {
			f, err := r.guestR.Next()
			if err != nil {
				return
			}
			frames <- stdioframe.Frame{Type: f.Type, Payload: append([]byte(nil), f.Payload...)}
		}
	}()
	select {
	case f := <-frames:
		t.Fatalf("after the exec ended the host sent %v id %d %q to the guest", f.Type, f.ExecID(), f.ExecData())
	case <-time.After(500 * time.Millisecond):
	}
}

// TestEmptyExecOutputFramesAreBounded: zero-length EXEC_STDOUT frames carry
// no bytes, so the output window never counts them; while the session's
// writer is blocked (here: on its acknowledgement, as the guest stops
// reading its port) each one was queued, without bound (from review). Empty
// frames are dropped, and small ones of one stream join the last chunk.
func TestEmptyExecOutputFramesAreBounded(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	e := newExecFiles(t)
	rec, _ := devopts.ExecRecord(3, []byte(`{}`))
	sendRecord(t, core, rec, e.send)
	if f := r.next(t); f.Type != stdioframe.Exec {
		t.Fatalf("frame %v, want EXEC", f.Type)
	}
	// One real byte: its acknowledgement blocks the session's writer, since
	// the guest no longer reads host frames.
	r.guestW.WriteExec(stdioframe.ExecStdout, 3, []byte("x"))
	go func() { readAllTimeout(t, e.stdoutR) }()
	const n = 200000
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < n; i++ {
		if err := r.guestW.WriteExec(stdioframe.ExecStdout, 3, nil); err != nil {
			t.Fatal(err)
		}
	}
	s := r.bridge.lookupExec(3)
	if s == nil {
		t.Fatal("session gone")
	}
	s.mu.Lock()
	queued := len(s.runs)
	s.mu.Unlock()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("%d empty frames (%d bytes from the guest): %d runs queued, heap %d -> %d KiB",
		n, n*(stdioframe.HeaderLen+4), queued, before.HeapAlloc>>10, after.HeapAlloc>>10)
	if queued > 1024 {
		t.Fatalf("%d runs queued for one exec from %d empty frames: the window does not bound them", queued, n)
	}
}

// openPTY returns a terminal (master, slave) pair: the slave stands for the
// user's terminal that `krun-oci exec ID CMD` inherits as its stdin.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skip(err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skip(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skip(err)
	}
	fd, err := unix.Open("/dev/pts/"+itoa(n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skip(err)
	}
	s := os.NewFile(uintptr(fd), "tty")
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

// TestEndedExecDoesNotReadUsersTerminal: the same with a real terminal as
// the exec's stdin (`krun-oci exec ID true` typed in a shell): the line the
// user types at the shell prompt after exec returned must not reach the
// guest.
func TestEndedExecDoesNotReadUsersTerminal(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	master, slave := openPTY(t)
	e := newExecFiles(t)
	e.send[0] = slave
	rec, _ := devopts.ExecRecord(8, []byte(`{"args":["true"]}`))
	sendRecord(t, core, rec, e.send) // closes the test's copy of the slave
	r.next(t)                        // EXEC
	time.Sleep(100 * time.Millisecond)
	r.guestW.WriteExec(stdioframe.ExecExit, 8, []byte{0})
	readAllTimeout(t, e.statusR)
	master.Write([]byte("ssh root@prod\n"))
	got := make(chan stdioframe.Frame, 1)
	go func() {
		f, err := r.guestR.Next()
		if err == nil {
			got <- stdioframe.Frame{Type: f.Type, Payload: append([]byte(nil), f.Payload...)}
		}
	}()
	select {
	case f := <-got:
		t.Fatalf("after the exec ended the host sent %v %q (typed on the user's terminal) to the guest", f.Type, f.ExecData())
	case <-time.After(500 * time.Millisecond):
	}
}

// TestSmallExecOutputFramesJoin: one-byte frames of one stream, while the
// session's writer lags, join the last queued chunk, so that the queue's
// memory is bounded by the window's bytes and not by the number of frames.
func TestSmallExecOutputFramesJoin(t *testing.T) {
	plugin, core := controlPair(t)
	r := newRig(t, nil, plugin)
	r.next(t) // STDIN_EOF
	e := newExecFiles(t)
	rec, _ := devopts.ExecRecord(4, []byte(`{}`))
	sendRecord(t, core, rec, e.send)
	if f := r.next(t); f.Type != stdioframe.Exec {
		t.Fatalf("frame %v, want EXEC", f.Type)
	}
	r.guestW.WriteExec(stdioframe.ExecStdout, 4, []byte("x")) // its ack blocks the writer
	go io.Copy(io.Discard, e.stdoutR)
	s := r.bridge.lookupExec(4)
	if s == nil {
		t.Fatal("session gone")
	}
	most := 0
	for range 10000 {
		if err := r.guestW.WriteExec(stdioframe.ExecStdout, 4, []byte("y")); err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		most = max(most, len(s.runs))
		s.mu.Unlock()
	}
	if most > 2 {
		t.Fatalf("10000 one-byte frames made up to %d queued runs, want them joined", most)
	}
}
